"""The run directory: the unit users pass around.

RUN/config.json (model kind + hyper-parameters), RUN/model.safetensors (weights),
RUN/tokenizer.json. Every file is written atomically, so an interrupted save leaves the
previous checkpoint intact."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .adapters import ADAPTER_WEIGHTS, adapter_fingerprint, load_adapter, read_adapter_config
from .errors import LMForgeError
from .fileio import atomic_path, read_json, write_json
from .models import build_model
from .models.decoding import prepare_for_decoding
from .nn.lora import merge_lora
from .tokenizers import load_tokenizer

RUN_FORMAT = "lmforge-run"


def model_state(model: torch.nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The weights to save: tied tensors once (under their first name), contiguous.
    `state`: the model's full state dict gathered elsewhere (a sharded model's), which holds
    tied tensors under every name as separate copies."""
    if state is not None:
        tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
        return {name: t.detach().contiguous() for name, t in state.items() if name not in tied}
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen and t.numel() > 0:
            continue
        seen.add(t.data_ptr())
        out[name] = t.detach().contiguous()
    return out


def save_weights(path: str | Path, model: torch.nn.Module, state: dict[str, torch.Tensor] | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file(model_state(model, state), str(tmp), metadata={"format": "pt"})


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise LMForgeError(f"weights not found: {path}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for a bad header
        raise LMForgeError(f"{path} is not a readable safetensors file ({e}); the checkpoint is corrupt")


def _mapped_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The file's tensors, each memory-mapped through its own handle: a page is read when a
    tensor is first used, and a tensor that is later replaced (re-laid out for decoding,
    converted to another dtype) takes its mapping with it. One shared mapping would keep every
    page it ever read resident until the last tensor goes: twice the weights at the peak."""
    read_weights(path)  # the checks and their errors; maps the file without reading it
    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
    state = {}
    for name in names:
        with safe_open(str(path), framework="pt") as f:
            state[name] = f.get_tensor(name)
    return state


def _unmap_packed_source(model: torch.nn.Module, path: Path) -> Callable[[Any], None]:
    """A PackedLinear decodes from its packed copy and keeps `weight` only for state_dict and
    tying. Packing read every page of the weight's mapping; pointing `weight` at a fresh mapping
    of the same bytes, not yet read, lets those pages go at once. Without it a packed bf16 model
    holds its weights twice (about 2 S resident for an S-byte checkpoint)."""
    names = {p.data_ptr(): n for n, p in model.named_parameters() if p.device.type == "cpu"}

    def release(layer) -> None:
        name = names.get(layer.weight.data_ptr())  # None once converted to another dtype
        if name is not None:
            with safe_open(str(path), framework="pt") as f:
                fresh = f.get_tensor(name)
            if fresh.dtype == layer.weight.dtype and fresh.shape == layer.weight.shape:
                layer.weight.data = fresh
    return release


@contextmanager
def params_on_meta() -> Iterator[None]:
    """Build a model whose parameters take no memory, to be assigned from a file next
    (`load_weights`); buffers (RoPE tables, sinusoids) are computed as usual. Without it a
    model's own random init would sit beside the loaded weights: two copies at the peak."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def load_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Copy the file's weights into `model`; a model built under `params_on_meta` takes the
    file's tensors themselves (and their dtype), so loading holds one copy of the weights."""
    if any(p.is_meta for p in model.parameters()):
        _assign_weights(path, model, _mapped_weights(path))
        return
    state = read_weights(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {n for n in missing if _is_tied(model, n)}
    missing = [n for n in missing if n not in tied]
    if missing or unexpected:
        raise LMForgeError(f"{path} does not match the model in config.json "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def _assign_weights(path: str | Path, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    groups: dict[int, list[str]] = {}  # tied parameters: one object under several names
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    for names in groups.values():
        present = [n for n in names if n in state]
        for name in names:
            if present and name not in state:  # re-tie to the assigned tensor
                module, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(module), leaf, model.get_parameter(present[0]))
    missing = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    if missing or unexpected:
        raise LMForgeError(f"{path} does not match the model in config.json "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def _is_tied(model: torch.nn.Module, name: str) -> bool:
    tensor = model.state_dict()[name]
    return any(other is not name and t.data_ptr() == tensor.data_ptr()
               for other, t in model.state_dict().items() if other != name)


def save_run(run_dir: str | Path, model: torch.nn.Module, tokenizer, extra: dict[str, Any] | None = None,
             state: dict[str, torch.Tensor] | None = None) -> None:
    """Write config.json, model.safetensors and tokenizer.json (each atomically).
    `state`: see `model_state`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_weights(run_dir / "model.safetensors", model, state)
    tokenizer.save(run_dir / "tokenizer.json")
    config = {"format": RUN_FORMAT, "version": 1, "model": model.kind,
              "model_config": model.config.to_dict(), **(extra or {})}
    write_json(run_dir / "config.json", config)


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LMForgeError(f"run directory not found: {run_dir}")
    if not (run_dir / "config.json").exists() and (run_dir / "adapter_config.json").exists():
        raise LMForgeError(f"{run_dir} holds a LoRA adapter, not a run: pass the base run as --run and "
                           f"--adapter {run_dir} (or merge them with `lmforge merge`)")
    cfg = read_json(run_dir / "config.json", "run config")
    if not isinstance(cfg, dict) or cfg.get("format") != RUN_FORMAT:
        raise LMForgeError(f"{run_dir}/config.json is not an lmforge run config")
    return cfg


def load_run(run_dir: str | Path, adapter: str | Path | None = None,
             device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             inference: bool = True):
    """Rebuild the model and tokenizer saved in a run directory, optionally with a LoRA
    adapter applied (not merged). Returns (model, tokenizer); the model is in eval mode.

    inference=True (the default): the weights are laid out for fast token-by-token decoding
    (`models.decoding.prepare_for_decoding`): the same values in another storage order, so
    outputs agree with the plain layout to float rounding. In float32 (and on a GPU) the
    model still trains; in bf16 on a CPU, layers may be packed for oneDNN, which makes it
    inference-only. inference=False: plain nn.Linear storage, for fine-tuning, merging and
    export."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    with params_on_meta():
        model = build_model(cfg["model"], cfg["model_config"])
    load_weights(run_dir / "model.safetensors", model)
    if adapter is not None:
        load_adapter(model, adapter, base_config=cfg)
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    model.to(device=device)
    if inference:
        prepare_for_decoding(model, dtype=dtype, on_packed=_unmap_packed_source(model, run_dir / "model.safetensors"))
    elif dtype is not None:
        model.to(dtype=dtype)
    model.eval()
    return model, tokenizer


def merge_adapter_into_run(base_run: str | Path, adapter: str | Path, out_dir: str | Path) -> Path:
    """base run + adapter -> a plain run directory with W + scaling * B A in every adapted
    layer (`lmforge merge`). Its config.json lists the adapter's fingerprint under
    `merged_adapters`, so applying the same adapter to it again is refused."""
    base_run, out_dir = Path(base_run), Path(out_dir)
    if out_dir.resolve() == base_run.resolve():
        raise LMForgeError("--out must differ from --base: merging must not overwrite the base run")
    if (out_dir / "config.json").exists():
        raise LMForgeError(f"{out_dir} already holds a run; choose another --out")
    base_cfg = read_run_config(base_run)
    adapter_dir, _ = read_adapter_config(adapter)
    model, tokenizer = load_run(base_run, adapter=adapter_dir, inference=False)
    merge_lora(model, unload=True)
    extra = {k: base_cfg[k] for k in ("preset", "data", "generation") if k in base_cfg}
    extra["merged_adapters"] = [*base_cfg.get("merged_adapters", []),
                                adapter_fingerprint(adapter_dir / ADAPTER_WEIGHTS)]
    extra["merged_from"] = {"base_run": str(base_run.resolve()), "adapter": str(adapter_dir.resolve())}
    from .chat.template import load_chat_template, save_chat_template

    template = load_chat_template(base_run)
    if template is not None:  # the merged run chats in its base's format
        save_chat_template(template, out_dir)
    save_run(out_dir, model, tokenizer, extra)
    return out_dir
