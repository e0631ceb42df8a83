"""GPT-2's config.json and tensor names (the `gpt2` family of `hf_families`).

lmforge's GPT with learned positions, LayerNorm, GELU (tanh approximation), biases and full
multi-head attention *is* GPT-2; only the names and one layout differ. GPT-2 was written with
`Conv1D` layers that store their weight as (in, out), the transpose of nn.Linear's (out, in),
so every projection matrix is transposed on the way in and out. The attention's causal mask is
a buffer (`attn.bias`, `attn.masked_bias` in older files), not a weight: it is skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import LMForgeError
from ..models.gpt import GPTConfig

# lmforge module inside blocks.{i} -> GPT-2's inside transformer.h.{i}; q, k, v side by side in both
GPT2_MODULES = {"ln_1": "ln_1", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "ln_2": "ln_2",
                "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
GPT2_LAYER = {f"{ours}.{p}": (f"{hf}.{p}",) for ours, hf in GPT2_MODULES.items() for p in ("weight", "bias")}
GPT2_TOP = {"tok_emb.weight": ("transformer.wte.weight",), "pos_emb.weight": ("transformer.wpe.weight",),
            "ln_f.weight": ("transformer.ln_f.weight",), "ln_f.bias": ("transformer.ln_f.bias",),
            "lm_head.weight": ("lm_head.weight",)}
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # the same function under two names
BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older checkpoints
# what an lmforge config must hold for GPT-2 to express it
GPT2_SHAPE = {"pos_encoding": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True, "qk_norm": False,
              "head_dim": None, "sliding_window": None, "attn_scale": None, "attn_softcap": None,
              "final_softcap": None, "norm_unit_offset": False, "embed_scale": False, "post_norms": False}


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
    if cfg.mlp_hidden != n_inner:  # not a multiple of 8: say the width outright
        cfg = cfg.replace(mlp_hidden_size=n_inner)
    cfg.validate()
    return cfg


def hf_config_from_gpt(cfg: GPTConfig) -> dict[str, Any]:
    """GPTConfig -> the config.json of a transformers GPT2LMHeadModel. Raises, naming the
    option, when the model is not GPT-2's architecture."""
    for key, want in GPT2_SHAPE.items():
        if getattr(cfg, key) != want:
            raise LMForgeError(f"GPT-2 cannot express {key}={getattr(cfg, key)!r} (it needs {key}={want!r}); "
                               "only GPT runs with GPT-2's architecture export to Hugging Face")
    if cfg.n_kv_head not in (None, cfg.n_head):
        raise LMForgeError(f"GPT-2 cannot express n_kv_head={cfg.n_kv_head} (grouped-query attention); "
                           "it needs n_kv_head=None (one K/V head per query head)")
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.mlp_hidden,
        "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "add_cross_attention": False, "use_cache": True,
        "tie_word_embeddings": cfg.tie_embeddings,
    }
