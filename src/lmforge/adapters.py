"""LoRA adapters on disk: a directory that holds only what fine-tuning changed.

    ADAPTER/adapter_config.json   {"format": "lmforge-adapter", "base_config_hash": ...,
                                   "r", "alpha", "dropout", "targets", "rslora", ...}
    ADAPTER/adapter.safetensors   the A and B tensors, nothing else

The base model is identified by the hash of its run's model config (kind + hyper-parameters,
canonical JSON): an adapter's shapes only make sense on a model of that exact shape. The
hash names the shape, not the trained weights; `base_run` records where the adapter was
trained, as a hint for people.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import LMForgeError
from .fileio import atomic_path, read_json, write_json
from .nn.lora import LoRAConfig, apply_lora, lora_layers, lora_state_dict

ADAPTER_FORMAT = "lmforge-adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
# settings that change training, not the function a trained model computes
_NOT_HASHED = ("dropout",)


def base_model_description(base_config: dict[str, Any]) -> dict[str, Any]:
    """The part of a run's config.json that an adapter depends on."""
    if "model" not in base_config or "model_config" not in base_config:
        raise LMForgeError("base config has no model / model_config; pass the run's config.json contents")
    cfg = {k: v for k, v in base_config["model_config"].items() if k not in _NOT_HASHED}
    return {"model": base_config["model"], "model_config": cfg}


def config_hash(base_config: dict[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of the base model's description."""
    text = json.dumps(base_model_description(base_config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def adapter_fingerprint(path: str | Path) -> str:
    """sha256 of an adapter's tensor file: names one trained adapter (used to refuse merging
    the same adapter into a model twice)."""
    h = hashlib.sha256()
    with open(Path(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_adapter(model: torch.nn.Module, adapter_dir: str | Path, base_config: dict[str, Any],
                 extra: dict[str, Any] | None = None) -> Path:
    """Write adapter.safetensors (A and B only) and adapter_config.json, each atomically.
    The config is written last, so it always describes a complete tensor file."""
    cfg: LoRAConfig | None = getattr(model, "lora_config", None)
    if cfg is None or not lora_layers(model):
        raise LMForgeError("the model has no LoRA adapters to save; apply_lora() it first")
    if any(layer.merged for layer in lora_layers(model).values()):
        raise LMForgeError("the adapters are merged into the weights; unmerge_lora(model) before saving them")
    adapter_dir = Path(adapter_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(adapter_dir / ADAPTER_WEIGHTS) as tmp:
        save_file(lora_state_dict(model), str(tmp), metadata={"format": ADAPTER_FORMAT})
    write_json(adapter_dir / ADAPTER_CONFIG, {
        "format": ADAPTER_FORMAT, "version": 1,
        "base_config_hash": config_hash(base_config),
        "base_model": base_model_description(base_config),
        **cfg.to_dict(), **(extra or {})})
    return adapter_dir


def read_adapter_config(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(adapter directory, its adapter_config.json). `path` is the directory or a file in it."""
    path = Path(path)
    adapter_dir = path if path.is_dir() else path.parent
    if not path.exists():
        raise LMForgeError(f"adapter not found: {path}")
    cfg = read_json(adapter_dir / ADAPTER_CONFIG, "adapter config")
    if not isinstance(cfg, dict) or cfg.get("format") != ADAPTER_FORMAT:
        raise LMForgeError(f"{adapter_dir / ADAPTER_CONFIG} is not an lmforge adapter config")
    return adapter_dir, cfg


def check_base(adapter_cfg: dict[str, Any], base_config: dict[str, Any], adapter_dir: Path) -> None:
    """A clear error when the adapter was trained on a differently shaped model."""
    if adapter_cfg.get("base_config_hash") == config_hash(base_config):
        return
    want = adapter_cfg.get("base_model", {})
    have = base_model_description(base_config)
    if want.get("model") != have["model"]:
        diff = f"model kind {want.get('model')!r} vs {have['model']!r}"
    else:
        a, b = want.get("model_config", {}), have["model_config"]
        keys = [k for k in sorted({*a, *b}) if a.get(k) != b.get(k)]
        diff = ", ".join(f"{k}={a.get(k)!r} vs {b.get(k)!r}" for k in keys[:3]) or "config hash"
    raise LMForgeError(f"adapter {adapter_dir} was trained on a different base model ({diff}: adapter's "
                       f"base vs this run); load it onto the run it was fine-tuned from")


def load_adapter(model: torch.nn.Module, path: str | Path, base_config: dict[str, Any]) -> torch.nn.Module:
    """Apply a saved adapter to a base model (in place, not merged). `base_config` is the base
    run's config.json contents, checked against the adapter's base hash."""
    adapter_dir, cfg = read_adapter_config(path)
    check_base(cfg, base_config, adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise LMForgeError(f"adapter weights not found: {weights}")
    if adapter_fingerprint(weights) in base_config.get("merged_adapters", []):
        raise LMForgeError(f"adapter {adapter_dir} is already merged into this run's weights; "
                           f"load the run without --adapter")
    lora = adapter_lora_config(cfg, adapter_dir)
    apply_lora(model, lora.targets, lora.r, lora.alpha, lora.dropout, lora.rslora)
    load_adapter_weights(model, adapter_dir)
    return model


def adapter_lora_config(cfg: dict[str, Any], adapter_dir: Path) -> LoRAConfig:
    try:
        return LoRAConfig.from_dict({k: cfg[k] for k in ("r", "alpha", "dropout", "targets", "rslora")},
                                    where="adapter config")
    except KeyError as e:
        raise LMForgeError(f"{adapter_dir / ADAPTER_CONFIG} lacks the key {e}; the adapter config is corrupt") from None


def load_adapter_weights(model: torch.nn.Module, adapter_dir: str | Path) -> None:
    """Copy A and B from adapter.safetensors into a model that apply_lora already adapted
    with the same settings (used by load_adapter and by a resumed LoRA fine-tuning run)."""
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise LMForgeError(f"adapter weights not found: {weights}")
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors' own error type for a bad header
        raise LMForgeError(f"{weights} is not a readable safetensors file ({e}); the adapter is corrupt") from None
    expected = lora_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise LMForgeError(f"{weights} does not match its adapter_config.json (missing {missing[:2]}, "
                           f"unexpected {unexpected[:2]}, wrong shape {wrong[:2]}); the adapter is corrupt")
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            layer.lora_A.copy_(state[f"{name}.lora_A"])
            layer.lora_B.copy_(state[f"{name}.lora_B"])
