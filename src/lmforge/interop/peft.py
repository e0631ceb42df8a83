"""lmforge LoRA adapters <-> PEFT's LoRA format, for GPT-2 models.

    PEFT:    adapter_config.json      {"peft_type": "LORA", "r", "lora_alpha", "target_modules", ...}
             adapter_model.safetensors base_model.model.transformer.h.0.attn.c_attn.lora_A.weight ...
    lmforge: adapter_config.json      {"format": "lmforge-adapter", "r", "alpha", "targets", ...}
             adapter.safetensors       blocks.0.attn.qkv.lora_A ...

Both compute W x + (alpha / r) B A x with A (r, in) and B (out, r). GPT-2's Conv1D stores W
transposed, but PEFT keeps A and B in nn.Linear's orientation for it too (`fan_in_fan_out`
only says how W is stored), so A and B are copied unchanged; only the names change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import load_run, read_run_config
from ..errors import LMForgeError
from ..fileio import atomic_path, read_json, write_json
from ..models.gpt import GPTConfig
from .hf_gpt2 import BLOCK_MODULES

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel wraps the model twice: PeftModel.base_model.model
_OURS_TO_HF = {ours: hf for hf, (ours, conv) in BLOCK_MODULES.items() if conv}  # the Linear/Conv1D layers


def hf_module(name: str) -> str:
    """'blocks.3.attn.qkv' -> 'transformer.h.3.attn.c_attn'; 'lm_head' stays."""
    if name == "lm_head":
        return name
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[2] in _OURS_TO_HF:
        return f"transformer.h.{parts[1]}.{_OURS_TO_HF[parts[2]]}"
    raise LMForgeError(f"LoRA on {name!r} has no GPT-2 counterpart; PEFT export covers {sorted(_OURS_TO_HF)} and lm_head")


def lmforge_module(name: str) -> str:
    """'transformer.h.3.attn.c_attn' (or 'h.3.attn.c_attn') -> 'blocks.3.attn.qkv'."""
    name = name.removeprefix("transformer.")
    if name == "lm_head":
        return name
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "h" and parts[1].isdigit() and parts[2] in BLOCK_MODULES and BLOCK_MODULES[parts[2]][1]:
        return f"blocks.{parts[1]}.{BLOCK_MODULES[parts[2]][0]}"
    raise LMForgeError(f"PEFT adapter adapts {name!r}, which lmforge's GPT-2 import does not map "
                       f"(supported: h.N.{', h.N.'.join(_OURS_TO_HF.values())}, lm_head)")


# --- lmforge -> PEFT --------------------------------------------------------------------------
def _target_modules(hf_names: list[str], n_layer: int) -> list[str]:
    """Short names ('attn.c_attn') where every layer is adapted, full names otherwise. PEFT
    matches a target against the end of a module's name at a dot."""
    targets: list[str] = []
    for kind in dict.fromkeys(n.split(".", 3)[-1] for n in hf_names if n != "lm_head"):
        layers = [n for n in hf_names if n.endswith("." + kind)]
        targets += [kind] if len(layers) == n_layer else layers
    return targets + (["lm_head"] if "lm_head" in hf_names else [])


def export_peft_adapter(run: str | Path, adapter: str | Path, out: str | Path, base: str | Path) -> Path:
    """Write the lmforge adapter of `run` in PEFT's format; `base` (the exported Hugging Face
    model directory) becomes base_model_name_or_path, as an absolute path."""
    model, _ = load_run(run, adapter=adapter)  # checks that the adapter belongs to this run
    from ..nn.lora import LoRAEmbedding, lora_layers

    layers = lora_layers(model)
    embeddings = [n for n, m in layers.items() if isinstance(m, LoRAEmbedding)]
    if embeddings:
        raise LMForgeError(f"this adapter also adapts the embedding ({embeddings[0]}), which PEFT's GPT-2 export "
                           f"here does not cover; `lmforge merge` it and export the merged run instead")
    lora = model.lora_config
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        hf = hf_module(name)
        tensors[f"{PREFIX}{hf}.lora_A.weight"] = layer.lora_A.detach().contiguous()  # (r, in)
        tensors[f"{PREFIX}{hf}.lora_B.weight"] = layer.lora_B.detach().contiguous()  # (out, r)
    hf_names = [hf_module(n) for n in layers]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(Path(base).resolve()),
        "r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "use_rslora": lora.rslora,
        "target_modules": _target_modules(hf_names, model.config.n_layer),
        "fan_in_fan_out": True,  # GPT-2's Conv1D stores W as (in, out); PEFT resets it for lm_head (a Linear)
        "bias": "none", "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "inference_mode": True, "revision": None,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / PEFT_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json(out / PEFT_CONFIG, config)
    return out


# --- PEFT -> lmforge --------------------------------------------------------------------------
def read_peft_adapter(path: str | Path, cfg: GPTConfig) -> tuple[dict[str, Any], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Read and check a PEFT LoRA directory for a GPT-2 of config `cfg`. Returns the LoRA
    settings (r, alpha, dropout, rslora) and {lmforge module: (A (r, in), B (out, r))}."""
    path = Path(path)
    if not path.is_dir():
        raise LMForgeError(f"PEFT adapter directory not found: {path}")
    pc = read_json(path / PEFT_CONFIG, "PEFT adapter config")
    if not isinstance(pc, dict) or pc.get("format") == "lmforge-adapter":
        raise LMForgeError(f"{path / PEFT_CONFIG} is an lmforge adapter, not a PEFT one; use it with --adapter directly")
    if pc.get("peft_type") != "LORA":
        raise LMForgeError(f"{path}: PEFT type {pc.get('peft_type')!r} is not supported; only LORA adapters import")
    for key, ok in (("use_dora", False), ("bias", "none"), ("lora_bias", False)):
        if pc.get(key, ok) != ok:
            raise LMForgeError(f"{path}: {key}={pc[key]!r} is not supported by lmforge's LoRA (it needs {ok!r})")
    for key in ("modules_to_save", "rank_pattern", "alpha_pattern"):
        if pc.get(key):
            raise LMForgeError(f"{path}: {key} is not supported (lmforge's LoRA has one r and alpha for all layers)")
    r, alpha = pc.get("r"), pc.get("lora_alpha")
    if type(r) is not int or r <= 0 or not isinstance(alpha, (int, float)):
        raise LMForgeError(f"{path / PEFT_CONFIG} lacks a positive integer r and a number lora_alpha")
    weights = path / PEFT_WEIGHTS
    if weights.is_file():
        try:
            state = load_file(str(weights))
        except Exception as e:  # safetensors' own error type for a bad header
            raise LMForgeError(f"{weights} is not a readable safetensors file ({e})") from None
    elif (path / "adapter_model.bin").is_file():
        state = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise LMForgeError(f"no adapter weights in {path}: expected {PEFT_WEIGHTS}")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        module, _, rest = key.removeprefix(PREFIX).partition(".lora_")
        part = rest.split(".")[0]
        if part not in ("A", "B") or not rest.endswith("weight"):
            raise LMForgeError(f"{weights}: unexpected tensor {key!r}; only lora_A / lora_B weights import")
        pairs.setdefault(lmforge_module(module), {})[part] = t.float()
    out = {}
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise LMForgeError(f"{weights}: {name} has lora_{'A' if 'B' in ab else 'B'} missing; the adapter is corrupt")
        d_in, d_out = _linear_shape(name, cfg)
        if ab["A"].shape != (r, d_in) or ab["B"].shape != (d_out, r):
            raise LMForgeError(f"{weights}: {name} has A {tuple(ab['A'].shape)} and B {tuple(ab['B'].shape)}, "
                               f"expected ({r}, {d_in}) and ({d_out}, {r}); it was trained for another model")
        out[name] = (ab["A"], ab["B"])
    if not out:
        raise LMForgeError(f"{weights} holds no LoRA tensors")
    settings = {"r": r, "alpha": float(alpha), "dropout": float(pc.get("lora_dropout", 0.0)),
                "rslora": bool(pc.get("use_rslora", False))}
    return settings, out


def _linear_shape(name: str, cfg: GPTConfig) -> tuple[int, int]:
    """(in, out) of an lmforge GPT-2 linear layer."""
    if name == "lm_head":
        return cfg.n_embd, cfg.vocab_size
    layer, kind = int(name.split(".")[1]), name.split(".", 2)[2]
    if layer >= cfg.n_layer:
        raise LMForgeError(f"the adapter adapts layer {layer}, but the model has {cfg.n_layer} layers")
    return {"attn.qkv": (cfg.n_embd, 3 * cfg.n_embd), "attn.proj": (cfg.n_embd, cfg.n_embd),
            "mlp.fc": (cfg.n_embd, cfg.mlp_hidden), "mlp.proj": (cfg.mlp_hidden, cfg.n_embd)}[kind]


def import_peft_adapter(path: str | Path, run: str | Path, out: str | Path) -> Path:
    """A PEFT LoRA directory -> an lmforge adapter directory for the (imported) GPT-2 `run`."""
    from ..adapters import save_adapter
    from ..nn.lora import apply_lora, lora_layers

    run_cfg = read_run_config(run)
    model, _ = load_run(run)
    settings, tensors = read_peft_adapter(path, model.config)
    apply_lora(model, list(tensors), settings["r"], settings["alpha"], settings["dropout"], settings["rslora"])
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            layer.lora_A.copy_(tensors[name][0])
            layer.lora_B.copy_(tensors[name][1])
    return save_adapter(model, out, base_config=run_cfg,
                        extra={"base_run": str(Path(run).resolve()),
                               "source": {"format": "peft-lora", "path": str(Path(path).resolve())}})
