"""Hugging Face GPT-2 checkpoints <-> lmforge run directories.

lmforge's GPT with learned positions, LayerNorm, GELU (tanh approximation), biases and full
multi-head attention *is* GPT-2; only the names and one layout differ. GPT-2 was written with
`Conv1D` layers that store their weight as (in, out), the transpose of nn.Linear's (out, in),
so every projection matrix is transposed on the way in and out. The attention's causal mask is
a buffer (`attn.bias`, `attn.masked_bias` in older files), not a weight: it is skipped.

transformers itself is not imported: the files are read and written directly, and the tests
check the result against transformers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import load_run, read_run_config, save_run
from ..errors import LMForgeError
from ..fileio import atomic_path, read_json, write_json
from ..models.gpt import GPT, GPTConfig
from ..tokenizers import BPETokenizer, Tokenizer
from .hf_tokenizer import read_hf_tokenizer, write_hf_tokenizer

# GPT-2's module -> lmforge's, inside block i (h.i <-> blocks.i). True: a Conv1D, weight transposed.
BLOCK_MODULES = {
    "ln_1": ("ln_1", False),
    "attn.c_attn": ("attn.qkv", True),  # q, k, v side by side, in that order, in both
    "attn.c_proj": ("attn.proj", True),
    "ln_2": ("ln_2", False),
    "mlp.c_fc": ("mlp.fc", True),
    "mlp.c_proj": ("mlp.proj", True),
}
TOP_LEVEL = {"wte.weight": "tok_emb.weight", "wpe.weight": "pos_emb.weight",
             "ln_f.weight": "ln_f.weight", "ln_f.bias": "ln_f.bias"}
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # the same function under two names
BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older checkpoints
# what an lmforge config must hold for GPT-2 to express it
GPT2_SHAPE = {"pos_encoding": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True, "qk_norm": False}


# --- configs ----------------------------------------------------------------------------------
def gpt_config_from_hf(hf: dict[str, Any], where: str | Path = "config.json") -> GPTConfig:
    """A transformers GPT2Config (as a dict) -> GPTConfig; options lmforge lacks are errors."""
    if not isinstance(hf, dict) or hf.get("model_type") != "gpt2":
        kind = hf.get("model_type") if isinstance(hf, dict) else None
        raise LMForgeError(f"{where} describes a {kind!r} model, not GPT-2; import-hf reads GPT-2 checkpoints only")
    act = hf.get("activation_function", "gelu_new")
    if act not in TANH_GELUS:
        raise LMForgeError(f"{where}: activation_function {act!r} is not supported; lmforge's GPT uses "
                           "gelu_new (GELU, tanh approximation)")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):
        if hf.get(key, want) != want:
            raise LMForgeError(f"{where}: {key}={hf[key]!r} is not supported (lmforge's GPT needs {want})")
    n_embd = hf.get("n_embd", 768)
    n_inner = hf.get("n_inner") or 4 * n_embd
    cfg = GPTConfig(
        vocab_size=hf.get("vocab_size", 50257), block_size=hf.get("n_positions", 1024),
        n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=n_embd,
        dropout=float(hf.get("resid_pdrop", 0.1)), bias=True, pos_encoding="learned",
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), norm="layernorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), mlp="gelu", mlp_ratio=n_inner / n_embd)
    cfg.validate()
    if cfg.mlp_hidden != n_inner:
        raise LMForgeError(f"{where}: n_inner={n_inner} is not a multiple of 8, which lmforge's MLP width needs")
    return cfg


def hf_config_from_gpt(cfg: GPTConfig, tokenizer: Tokenizer | None = None,
                       dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """GPTConfig -> the config.json of a transformers GPT2LMHeadModel. Raises, naming the
    option, when the model is not GPT-2's architecture."""
    for key, want in GPT2_SHAPE.items():
        if getattr(cfg, key) != want:
            raise LMForgeError(f"GPT-2 cannot express {key}={getattr(cfg, key)!r} (it needs {key}={want!r}); "
                               "only GPT runs with GPT-2's architecture export to Hugging Face")
    if cfg.n_kv_head not in (None, cfg.n_head):
        raise LMForgeError(f"GPT-2 cannot express n_kv_head={cfg.n_kv_head} (grouped-query attention); "
                           "it needs n_kv_head=None (one K/V head per query head)")
    eot = tokenizer.eot_id if tokenizer is not None else None
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.mlp_hidden,
        "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "add_cross_attention": False, "use_cache": True,
        "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": eot, "eos_token_id": eot,
        "dtype": str(dtype).removeprefix("torch."),
    }


# --- weights ----------------------------------------------------------------------------------
def name_map(cfg: GPTConfig) -> list[tuple[str, str, bool]]:
    """(GPT-2 name without "transformer.", lmforge name, transposed?) for every tensor."""
    names = [(hf, ours, False) for hf, ours in TOP_LEVEL.items()]
    for i in range(cfg.n_layer):
        for hf, (ours, conv) in BLOCK_MODULES.items():
            names.append((f"h.{i}.{hf}.weight", f"blocks.{i}.{ours}.weight", conv))
            names.append((f"h.{i}.{hf}.bias", f"blocks.{i}.{ours}.bias", False))
    if not cfg.tie_embeddings:
        names.append(("lm_head.weight", "lm_head.weight", False))
    return names


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """model.safetensors or pytorch_model.bin, single or sharded (with its index.json)."""
    for name, loader in (("model.safetensors", _load_safetensors), ("pytorch_model.bin", _load_bin)):
        if (directory / name).is_file():
            return loader(directory / name)
        index = directory / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(read_json(index, "weights index").get("weight_map", {}).values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(loader(directory / shard))
            return state
    raise LMForgeError(f"no weights in {directory}: expected model.safetensors or pytorch_model.bin")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise LMForgeError(f"weights shard not found: {path}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for a bad header
        raise LMForgeError(f"{path} is not a readable safetensors file ({e})") from None


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise LMForgeError(f"weights shard not found: {path}")
    try:  # weights_only: a pickle from the internet must not run code
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LMForgeError(f"{path} is not a readable PyTorch weights file ({e})") from None


def state_from_hf(hf_state: dict[str, torch.Tensor], cfg: GPTConfig, where: Path | str = "") -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel / GPT2Model state dict -> lmforge GPT state dict (float32)."""
    state = {k.removeprefix("transformer."): v for k, v in hf_state.items() if not k.endswith(BUFFER_SUFFIXES)}
    out: dict[str, torch.Tensor] = {}
    names = name_map(cfg)
    missing = [hf for hf, _, _ in names if hf not in state]
    if missing:
        raise LMForgeError(f"{where}: the checkpoint lacks {missing[:3]} ({len(missing)} tensors); "
                           "it does not match its config.json")
    unexpected = sorted(set(state) - {hf for hf, _, _ in names} - {"lm_head.weight"})
    if unexpected:
        raise LMForgeError(f"{where}: unexpected tensors {unexpected[:3]}; not a plain GPT-2 checkpoint")
    for hf, ours, conv in names:
        t = state[hf].float()
        out[ours] = t.t().contiguous() if conv else t  # Conv1D (in, out) -> Linear (out, in)
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["tok_emb.weight"]
    return out


def state_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """lmforge GPT -> GPT2LMHeadModel state dict; a tied head is left out, as transformers does."""
    state = model.state_dict()
    out = {}
    for hf, ours, conv in name_map(model.config):
        t = state[ours].detach()
        name = hf if hf == "lm_head.weight" else f"transformer.{hf}"
        out[name] = (t.t() if conv else t).contiguous()  # Linear (out, in) -> Conv1D (in, out)
    return out


# --- directories ------------------------------------------------------------------------------
def load_hf_gpt2(directory: str | Path, tokenizer_dir: str | Path | None = None) -> tuple[GPT, Tokenizer, dict]:
    """Read a Hugging Face GPT-2 directory into (GPT in eval mode, tokenizer, HF config dict)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LMForgeError(f"Hugging Face model directory not found: {directory}")
    hf_cfg = read_json(directory / "config.json", "Hugging Face config")
    cfg = gpt_config_from_hf(hf_cfg, directory / "config.json")
    tokenizer = read_hf_tokenizer(tokenizer_dir if tokenizer_dir is not None else directory)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise LMForgeError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}; "
                           "they do not belong together")
    model = GPT(cfg)
    model.load_state_dict(state_from_hf(read_hf_weights(directory), cfg, directory))
    return model.eval(), tokenizer, hf_cfg


def import_hf(directory: str | Path, out: str | Path, tokenizer_dir: str | Path | None = None,
              adapter: str | Path | None = None, adapter_out: str | Path | None = None) -> Path:
    """Hugging Face GPT-2 directory -> lmforge run directory `out`. With `adapter` (a PEFT
    LoRA directory), also write it as an lmforge adapter to `adapter_out` (default out/adapter)."""
    model, tokenizer, _ = load_hf_gpt2(directory, tokenizer_dir)
    if adapter is not None:  # check it before anything is written
        from .peft import read_peft_adapter

        read_peft_adapter(adapter, model.config)
    out = Path(out)
    save_run(out, model, tokenizer, extra={"source": {"format": "huggingface-gpt2",
                                                      "path": str(Path(directory).resolve())}})
    if adapter is not None:
        from .peft import import_peft_adapter

        import_peft_adapter(adapter, out, adapter_out if adapter_out is not None else out / "adapter")
    return out


def export_hf(run: str | Path, out: str | Path, adapter: str | Path | None = None,
              adapter_out: str | Path | None = None, tokenizer: bool = True) -> Path:
    """lmforge run -> a directory that GPT2LMHeadModel.from_pretrained and
    AutoTokenizer.from_pretrained load. With `adapter`, also write it in PEFT's format to
    `adapter_out` (default out/adapter), pointing at `out` as its base model."""
    cfg = read_run_config(run)
    if cfg["model"] != "gpt":
        raise LMForgeError(f"{run} holds a {cfg['model']!r} model; only GPT runs export to Hugging Face GPT-2")
    model, tok = load_run(run)
    dtype = model.tok_emb.weight.dtype
    hf_cfg = hf_config_from_gpt(model.config, tok, dtype)  # refuses non-GPT-2 shapes first
    if tokenizer and not isinstance(tok, BPETokenizer):
        raise LMForgeError(f"the run's {tok.kind!r} tokenizer has no Hugging Face GPT-2 form; "
                           "export the weights alone with --no-tokenizer")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state_to_hf(model), str(tmp), metadata={"format": "pt"})
    write_json(out / "config.json", hf_cfg)
    write_json(out / "generation_config.json", {"bos_token_id": hf_cfg["bos_token_id"],
                                                "eos_token_id": hf_cfg["eos_token_id"]})
    if tokenizer:
        write_hf_tokenizer(tok, out, model_max_length=model.config.block_size)
    if adapter is not None:
        from .peft import export_peft_adapter

        export_peft_adapter(run, adapter, adapter_out if adapter_out is not None else out / "adapter", base=out)
    return out


def describe(directory: str | Path) -> str:
    """One line about an exported or imported directory (for the CLI)."""
    directory = Path(directory)
    files = sorted(p.name for p in directory.iterdir() if p.is_file())
    return f"{directory}{os.sep}: {', '.join(files)}"


__all__ = ["import_hf", "export_hf", "load_hf_gpt2", "gpt_config_from_hf", "hf_config_from_gpt",
           "state_from_hf", "state_to_hf", "read_hf_weights", "name_map"]
