"""lmforge LoRA adapters <-> PEFT's LoRA format, for every family in `hf_families`.

    PEFT:    adapter_config.json      {"peft_type": "LORA", "r", "lora_alpha", "target_modules", ...}
             adapter_model.safetensors base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight ...
    lmforge: adapter_config.json      {"format": "lmforge-adapter", "r", "alpha", "targets", ...}
             adapter.safetensors       blocks.0.attn.qkv.lora_A ...

Both compute W x + s B A x with A (r, in), B (out, r) and s = alpha / r (alpha / sqrt(r) with
rslora). GPT-2's Conv1D stores W transposed, but PEFT keeps A and B in nn.Linear's
orientation for it too (`fan_in_fan_out` only says how W is stored), so A and B are copied.

lmforge fuses Q, K, V into one `attn.qkv` (and gate, up into `mlp.fc`); Hugging Face keeps
them apart. Export is exact: the fused layer's one A serves every part, and B's rows split as
W's do. Import stacks the parts' A matrices and places each B on its own rows (block
diagonal): B A is then exactly the sum of the parts' updates, at rank r x (parts adapted).
Every module then gets that rank (zero-padded) and alpha grows with it, so s stays the same.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoint import load_run
from ..errors import LMForgeError
from ..fileio import atomic_path, read_json, write_json
from ..models.gpt import GPT, GPTConfig
from .hf_families import GPT2, Family, part_rows

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel wraps the model twice: PeftModel.base_model.model
LINEAR = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")  # the adaptable layers inside a block


def hf_modules(name: str, family: Family = GPT2) -> list[str]:
    """'blocks.3.attn.qkv' -> ['model.layers.3.self_attn.q_proj', ...k_proj, ...v_proj] (GPT-2:
    ['transformer.h.3.attn.c_attn']); 'lm_head' stays."""
    if name == "lm_head":
        return [name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[2] in LINEAR:
        prefix = family.layer_prefix.format(i=parts[1])
        return [prefix + h.removesuffix(".weight") for h in family.layer[parts[2] + ".weight"]]
    raise LMForgeError(f"LoRA on {name!r} has no {family.name} counterpart; PEFT export covers "
                       f"{', '.join(LINEAR)} and lm_head")


def hf_module(name: str) -> str:
    """GPT-2's one module for an lmforge layer: 'blocks.3.attn.qkv' -> 'transformer.h.3.attn.c_attn'."""
    return hf_modules(name, GPT2)[0]


def lmforge_module(name: str, family: Family = GPT2) -> tuple[str, int] | str:
    """'model.layers.3.self_attn.k_proj' -> ('blocks.3.attn.qkv', 1): the lmforge layer and
    which of its parts. For GPT-2 (one part each) just the name: 'h.3.attn.c_attn' -> 'blocks.3.attn.qkv'."""
    ours, part = _lmforge_part(name, family)
    return ours if family is GPT2 else (ours, part)


def _lmforge_part(name: str, family: Family) -> tuple[str, int]:
    if name == "lm_head":
        return name, 0
    if not name.startswith(family.optional_prefix):
        name = family.optional_prefix + name
    pattern = re.escape(family.layer_prefix).replace(r"\{i\}", r"(\d+)")
    m = re.fullmatch(pattern + r"(.+)", name)
    if m:
        for kind in LINEAR:
            hfs = [h.removesuffix(".weight") for h in family.layer[kind + ".weight"]]
            if m.group(2) in hfs:
                return f"blocks.{m.group(1)}.{kind}", hfs.index(m.group(2))
    supported = sorted({h.removesuffix(".weight") for k in LINEAR for h in family.layer[k + ".weight"]})
    raise LMForgeError(f"PEFT adapter adapts {name!r}, which lmforge's {family.name} import does not map "
                       f"(supported: {', '.join(supported)} in each layer, and lm_head)")


# --- lmforge -> PEFT --------------------------------------------------------------------------
def _target_modules(hf_names: list[str], n_layer: int) -> list[str]:
    """Short names ('self_attn.q_proj') where every layer is adapted, full names otherwise.
    PEFT matches a target against the end of a module's name at a dot."""
    targets: list[str] = []
    for kind in dict.fromkeys(n.split(".", 3)[-1] for n in hf_names if n != "lm_head"):
        layers = [n for n in hf_names if n.endswith("." + kind)]
        targets += [kind] if len(layers) == n_layer else layers
    return targets + (["lm_head"] if "lm_head" in hf_names else [])


def export_peft_adapter(run: str | Path, adapter: str | Path, out: str | Path, base: str | Path,
                        family: Family = GPT2) -> Path:
    """Write the lmforge adapter of `run` in PEFT's format; `base` (the exported Hugging Face
    model directory) becomes base_model_name_or_path, as an absolute path."""
    model, _ = load_run(run, adapter=adapter)  # checks that the adapter belongs to this run
    from ..nn.lora import LoRAEmbedding, lora_layers

    layers = lora_layers(model)
    embeddings = [n for n, m in layers.items() if isinstance(m, LoRAEmbedding)]
    if embeddings:
        raise LMForgeError(f"this adapter also adapts the embedding ({embeddings[0]}), which PEFT export "
                           f"here does not cover; `lmforge merge` it and export the merged run instead")
    lora = model.lora_config
    tensors: dict[str, torch.Tensor] = {}
    hf_names = []
    for name, layer in layers.items():
        hfs = hf_modules(name, family)
        rows = part_rows(name.split(".", 2)[-1], model.config, len(hfs), layer.lora_B.shape[0])
        for hf, b in zip(hfs, layer.lora_B.detach().split(rows, dim=0)):  # each part: the one A, its rows of B
            tensors[f"{PREFIX}{hf}.lora_A.weight"] = layer.lora_A.detach().clone()  # (r, in), a copy per part
            tensors[f"{PREFIX}{hf}.lora_B.weight"] = b.contiguous()  # (rows, r)
        hf_names += hfs
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(Path(base).resolve()),
        "r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "use_rslora": lora.rslora,
        "target_modules": _target_modules(hf_names, model.config.n_layer),
        # GPT-2's Conv1D stores W as (in, out); PEFT resets it for lm_head (a Linear)
        "fan_in_fan_out": family is GPT2,
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
def read_peft_adapter(path: str | Path, cfg: GPTConfig, family: Family = GPT2
                      ) -> tuple[dict[str, Any], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Read and check a PEFT LoRA directory for a model of config `cfg`. Returns the LoRA
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
    pairs: dict[str, dict[int, dict[str, torch.Tensor]]] = {}  # lmforge module -> part -> A, B
    for key, t in state.items():
        module, _, rest = key.removeprefix(PREFIX).partition(".lora_")
        part = rest.split(".")[0]
        if part not in ("A", "B") or not rest.endswith("weight"):
            raise LMForgeError(f"{weights}: unexpected tensor {key!r}; only lora_A / lora_B weights import")
        ours, k = _lmforge_part(module, family)
        pairs.setdefault(ours, {}).setdefault(k, {})[part] = t.float()
    with torch.device("meta"):
        model = GPT(cfg)
    rank = r * max(len(p) for p in pairs.values()) if pairs else r
    out = {}
    for name, by_part in pairs.items():
        layer = _layer(model, name)
        n_parts = 1 if name == "lm_head" else len(family.layer[name.split(".", 2)[-1] + ".weight"])
        rows = part_rows(name.split(".", 2)[-1], cfg, n_parts, layer.out_features)
        A = torch.zeros(rank, layer.in_features)
        B = torch.zeros(layer.out_features, rank)
        for j, (k, ab) in enumerate(sorted(by_part.items())):
            if set(ab) != {"A", "B"}:
                raise LMForgeError(f"{weights}: {name} has lora_{'A' if 'B' in ab else 'B'} missing; the adapter is corrupt")
            if ab["A"].shape != (r, layer.in_features) or ab["B"].shape != (rows[k], r):
                raise LMForgeError(f"{weights}: {name} has A {tuple(ab['A'].shape)} and B {tuple(ab['B'].shape)}, "
                                   f"expected ({r}, {layer.in_features}) and ({rows[k]}, {r}); it was trained for "
                                   "another model")
            A[j * r:(j + 1) * r] = ab["A"]
            B[sum(rows[:k]):sum(rows[:k + 1]), j * r:(j + 1) * r] = ab["B"]  # its own rows only
        out[name] = (A, B)
    if not out:
        raise LMForgeError(f"{weights} holds no LoRA tensors")
    rslora = bool(pc.get("use_rslora", False))
    # the same scaling s at the larger rank: alpha / r = alpha' / rank (rslora: over square roots)
    grow = math.sqrt(rank / r) if rslora else rank / r
    settings = {"r": rank, "alpha": float(alpha) * grow, "dropout": float(pc.get("lora_dropout", 0.0)),
                "rslora": rslora}
    return settings, out


def _layer(model: GPT, name: str) -> nn.Linear:
    layer_idx = int(name.split(".")[1]) if name.startswith("blocks.") else 0
    if layer_idx >= model.config.n_layer:
        raise LMForgeError(f"the adapter adapts layer {layer_idx}, but the model has {model.config.n_layer} layers")
    return model.get_submodule(name)


def write_imported_adapter(lora: tuple[dict[str, Any], dict[str, tuple[torch.Tensor, torch.Tensor]]],
                           cfg: GPTConfig, run_config: dict[str, Any], out: Path, base_run: Path,
                           source: str | Path) -> Path:
    """Write what read_peft_adapter returned as an lmforge adapter directory (the layout
    `adapters.save_adapter` writes), without loading the base weights."""
    from ..adapters import ADAPTER_CONFIG, ADAPTER_FORMAT, ADAPTER_WEIGHTS, base_model_description, config_hash
    from ..nn.lora import LoRAConfig

    settings, tensors = lora
    lc = LoRAConfig(r=settings["r"], alpha=settings["alpha"], dropout=settings["dropout"],
                    targets=list(tensors), rslora=settings["rslora"])
    lc.validate()
    out.mkdir(parents=True, exist_ok=True)
    state = {f"{name}.{p}": t.contiguous() for name, (a, b) in tensors.items() for p, t in (("lora_A", a), ("lora_B", b))}
    with atomic_path(out / ADAPTER_WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": ADAPTER_FORMAT})
    write_json(out / ADAPTER_CONFIG, {
        "format": ADAPTER_FORMAT, "version": 1, "base_config_hash": config_hash(run_config),
        "base_model": base_model_description(run_config), **lc.to_dict(),
        "base_run": str(Path(base_run).resolve()),
        "source": {"format": "peft-lora", "path": str(Path(source).resolve())}})
    return out


def import_peft_adapter(path: str | Path, run: str | Path, out: str | Path) -> Path:
    """A PEFT LoRA directory -> an lmforge adapter directory for the (imported) run `run`."""
    from ..checkpoint import read_run_config
    from .hf_families import family_for

    rc = read_run_config(run)
    cfg = GPTConfig.from_dict(rc["model_config"], where="gpt model config")
    family = family_for(cfg, rc.get("source", {}).get("model_type"))
    return write_imported_adapter(read_peft_adapter(path, cfg, family), cfg, rc, Path(out), base_run=Path(run),
                                  source=path)
