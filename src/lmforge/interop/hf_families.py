"""The Hugging Face model families lmforge reads and writes: one name table and one config
mapping per family, all for the same GPT.

Llama, Mistral, Qwen2, Qwen3, Gemma 2 and Phi-3 are one architecture with switches
(docs/concepts.md): RMSNorm, RoPE, a gated MLP, grouped-query attention, and per family a
few more (Llama 3.1's RoPE rescaling, a sliding window, Q/K/V biases, QK-norm, a decoupled
head size, Gemma's (1 + w) norms, sandwich norms, soft-caps and embedding scale). A family
here is therefore data:

- `layer`: lmforge's tensor name inside `blocks.{i}` -> the Hugging Face names inside
  `model.layers.{i}`. Several names are concatenated along dim 0 on import and split back on
  export: lmforge keeps Q, K, V in one `attn.qkv` matrix and gate, up in one `mlp.fc`.
- `top`: the tensors outside the blocks.
- `from_hf` / `to_hf`: config.json <-> GPTConfig. A setting lmforge does not implement is an
  error that names it; nothing is silently dropped.

Hugging Face's Llama weights are already in RoPE's rotate-half layout, as lmforge's are, so
no tensor needs permuting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..errors import LMForgeError
from ..models.gpt import GPTConfig
from .hf_gpt2 import GPT2_LAYER, GPT2_TOP, gpt_config_from_hf, hf_config_from_gpt


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str  # the transformers class config.json's "architectures" names
    layer: dict[str, tuple[str, ...]]
    top: dict[str, tuple[str, ...]]
    from_hf: Callable[[dict[str, Any], str], GPTConfig]
    to_hf: Callable[[GPTConfig], dict[str, Any]]
    layer_prefix: str = "model.layers.{i}."
    transposed: frozenset[str] = frozenset()  # GPT-2's Conv1D layers store W as (in, out)
    skip_suffixes: tuple[str, ...] = ()  # buffers some files carry, not weights
    optional_prefix: str = "model."  # files of the headless model (LlamaModel) lack it
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or self.model_type


LLAMA_LAYER = {
    "ln_1.weight": ("input_layernorm.weight",),
    "attn.qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.proj.weight": ("self_attn.o_proj.weight",),
    "ln_2.weight": ("post_attention_layernorm.weight",),
    "mlp.fc.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.proj.weight": ("mlp.down_proj.weight",),
}
QWEN2_LAYER = {**LLAMA_LAYER,
               "attn.qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")}
QWEN3_LAYER = {**LLAMA_LAYER,
               "attn.q_norm.weight": ("self_attn.q_norm.weight",), "attn.k_norm.weight": ("self_attn.k_norm.weight",)}
GEMMA2_LAYER = {**LLAMA_LAYER,
                "post_attn_norm.weight": ("post_attention_layernorm.weight",),  # Gemma's name for the sandwich
                "ln_2.weight": ("pre_feedforward_layernorm.weight",),
                "post_mlp_norm.weight": ("post_feedforward_layernorm.weight",)}
PHI3_LAYER = {**LLAMA_LAYER,
              "attn.qkv.weight": ("self_attn.qkv_proj.weight",),  # already fused, q k v in that order
              "mlp.fc.weight": ("mlp.gate_up_proj.weight",)}  # gate then up
LLAMA_TOP = {"tok_emb.weight": ("model.embed_tokens.weight",), "ln_f.weight": ("model.norm.weight",),
             "lm_head.weight": ("lm_head.weight",)}

# the transformers class defaults of each family, for config.json files that omit a key
DEFAULTS = {
    "llama": dict(rms_norm_eps=1e-6, max_position_embeddings=2048, tie_word_embeddings=False, hidden_act="silu"),
    "mistral": dict(rms_norm_eps=1e-6, max_position_embeddings=131072, tie_word_embeddings=False,
                    hidden_act="silu", sliding_window=4096, num_key_value_heads=8),
    "qwen2": dict(rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=False, hidden_act="silu"),
    "qwen3": dict(rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=False, hidden_act="silu",
                  head_dim=128),
    "gemma2": dict(rms_norm_eps=1e-6, max_position_embeddings=8192, tie_word_embeddings=True,
                   hidden_activation="gelu_pytorch_tanh", head_dim=256, num_key_value_heads=4,
                   sliding_window=4096, query_pre_attn_scalar=256, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0),
    "phi3": dict(rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=False, hidden_act="silu"),
}
# settings of other architectures: refused by name when they are switched on
NOT_IMPLEMENTED = ("num_experts", "num_local_experts", "moe_intermediate_size", "n_routed_experts",
                   "use_bidirectional_attention", "mlp_bias", "attention_bias")
ROPE_TYPES = ("default", "llama3")


def _get(hf: dict, key: str, model_type: str, where: str) -> Any:
    if key in hf and hf[key] is not None:
        return hf[key]
    if key in DEFAULTS[model_type]:
        return DEFAULTS[model_type][key]
    raise LMForgeError(f"{where} lacks {key!r}, which a {model_type} config needs")


def _rope(hf: dict, where: str) -> dict[str, Any]:
    """rope_parameters (transformers 5) or rope_theta + rope_scaling (earlier files) -> fields."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise LMForgeError(f"{where}: per-layer rope_parameters are not supported (lmforge has one RoPE)")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise LMForgeError(f"{where}: RoPE scaling {kind!r} is not supported; lmforge implements "
                           f"{', '.join(ROPE_TYPES)}")
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise LMForgeError(f"{where}: partial_rotary_factor={params.get('partial_rotary_factor', hf.get('partial_rotary_factor'))} "
                           "is not supported (lmforge rotates the whole head)")
    out: dict[str, Any] = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if kind == "llama3":
        try:
            out.update(rope_scaling="llama3", rope_factor=float(params["factor"]),
                       rope_low_freq_factor=float(params["low_freq_factor"]),
                       rope_high_freq_factor=float(params["high_freq_factor"]),
                       rope_original_max_position=int(params["original_max_position_embeddings"]))
        except KeyError as e:
            raise LMForgeError(f"{where}: llama3 RoPE scaling lacks {e}") from None
    return out


def _llama_like(hf: dict, where: str, model_type: str, **switches: Any) -> GPTConfig:
    """The keys every Llama-shaped config shares -> GPTConfig, plus the family's switches."""
    for key in NOT_IMPLEMENTED:
        if hf.get(key):
            raise LMForgeError(f"{where}: {key}={hf[key]!r} is not supported by lmforge's {model_type} import "
                               "(dense models without attention/MLP biases only)")
    act_key = "hidden_activation" if model_type == "gemma2" else "hidden_act"
    act = _get(hf, act_key, model_type, where)
    want_act = ("gelu_pytorch_tanh", "gelu_tanh") if model_type == "gemma2" else ("silu",)
    if act not in want_act:
        raise LMForgeError(f"{where}: {act_key}={act!r} is not supported for {model_type} (lmforge needs {want_act[0]})")
    n_embd, n_head = _get(hf, "hidden_size", model_type, where), _get(hf, "num_attention_heads", model_type, where)
    head_dim = hf.get("head_dim") or DEFAULTS[model_type].get("head_dim") or n_embd // n_head
    n_kv = hf.get("num_key_value_heads") or DEFAULTS[model_type].get("num_key_value_heads") or n_head
    fields = dict(
        vocab_size=_get(hf, "vocab_size", model_type, where),
        block_size=_get(hf, "max_position_embeddings", model_type, where),
        n_layer=_get(hf, "num_hidden_layers", model_type, where), n_head=n_head, n_embd=n_embd,
        dropout=0.0, bias=False, pos_encoding="rope",
        tie_embeddings=bool(_get(hf, "tie_word_embeddings", model_type, where)),
        norm="rmsnorm", norm_eps=float(_get(hf, "rms_norm_eps", model_type, where)), mlp="swiglu",
        mlp_hidden_size=_get(hf, "intermediate_size", model_type, where),
        n_kv_head=None if n_kv == n_head else n_kv,
        head_dim=None if head_dim * n_head == n_embd else head_dim, **_rope(hf, where))
    cfg = GPTConfig(**{**fields, **switches})
    cfg.validate()
    return cfg


def _window(hf: dict, where: str, model_type: str) -> int | None:
    w = hf.get("sliding_window", DEFAULTS[model_type].get("sliding_window"))
    return None if w is None or w >= _get(hf, "max_position_embeddings", model_type, where) else int(w)


def _no_layer_types(hf: dict, where: str, model_type: str) -> None:
    kinds = set(hf.get("layer_types") or ())
    if len(kinds) > 1:
        raise LMForgeError(f"{where}: mixed layer_types {sorted(kinds)} are not supported for {model_type}")


def llama_from_hf(hf: dict, where: str) -> GPTConfig:
    return _llama_like(hf, where, "llama")


def mistral_from_hf(hf: dict, where: str) -> GPTConfig:
    _no_layer_types(hf, where, "mistral")
    return _llama_like(hf, where, "mistral", sliding_window=_window(hf, where, "mistral"))


def qwen2_from_hf(hf: dict, where: str) -> GPTConfig:
    if hf.get("use_sliding_window"):
        raise LMForgeError(f"{where}: use_sliding_window=true (a window on layers past max_window_layers) is not "
                           "supported for qwen2")
    return _llama_like(hf, where, "qwen2", qkv_bias=True)


def qwen3_from_hf(hf: dict, where: str) -> GPTConfig:
    if hf.get("use_sliding_window"):
        raise LMForgeError(f"{where}: use_sliding_window=true is not supported for qwen3")
    return _llama_like(hf, where, "qwen3", qk_norm=True, qk_norm_eps=float(_get(hf, "rms_norm_eps", "qwen3", where)))


def gemma2_from_hf(hf: dict, where: str) -> GPTConfig:
    n = _get(hf, "num_hidden_layers", "gemma2", where)
    kinds = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    even = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    if kinds != even and set(kinds) != {"sliding_attention"}:
        raise LMForgeError(f"{where}: layer_types {kinds[:4]}... are not supported; lmforge's gemma2 slides on "
                           "every layer or on layers 0, 2, 4, ...")
    return _llama_like(
        hf, where, "gemma2", mlp="geglu", norm_unit_offset=True, embed_scale=True, post_norms=True,
        sliding_window=_window(hf, where, "gemma2"), sliding_window_layers="even" if kinds == even else "all",
        attn_scale=float(_get(hf, "query_pre_attn_scalar", "gemma2", where)) ** -0.5,
        attn_softcap=_cap(hf.get("attn_logit_softcapping", DEFAULTS["gemma2"]["attn_logit_softcapping"])),
        final_softcap=_cap(hf.get("final_logit_softcapping", DEFAULTS["gemma2"]["final_logit_softcapping"])))


def _cap(v: Any) -> float | None:
    return None if v is None else float(v)


def phi3_from_hf(hf: dict, where: str) -> GPTConfig:
    return _llama_like(hf, where, "phi3", sliding_window=_window(hf, where, "phi3"))


# --- GPTConfig -> config.json -------------------------------------------------------------------
def _llama_like_to_hf(cfg: GPTConfig, model_type: str, architecture: str) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
                "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
                "original_max_position_embeddings": cfg.rope_original_max_position}
    act = {"hidden_activation": "gelu_pytorch_tanh"} if model_type == "gemma2" else {"hidden_act": "silu"}
    return {
        "architectures": [architecture], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd, "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head or cfg.n_head,
        "head_dim": cfg.head_size, "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0, **act,
        # transformers 5 reads rope_parameters; earlier versions rope_theta and rope_scaling
        "rope_parameters": rope, "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_scaling == "none" else {k: v for k, v in rope.items() if k != "rope_theta"},
    }


def _extras(model_type: str, cfg: GPTConfig) -> dict[str, Any]:
    if model_type == "mistral":
        return {"sliding_window": cfg.sliding_window}
    if model_type == "phi3":
        return {"sliding_window": cfg.sliding_window, "original_max_position_embeddings": cfg.block_size}
    if model_type in ("qwen2", "qwen3"):
        return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layer,
                **({"attention_bias": False} if model_type == "qwen3" else {})}
    if model_type == "gemma2":
        scalar = round(cfg.attn_scale ** -2) if cfg.attn_scale is not None else cfg.head_size
        kinds = ["full_attention" if cfg.window(i) is None else "sliding_attention" for i in range(cfg.n_layer)]
        return {"query_pre_attn_scalar": scalar, "attn_logit_softcapping": cfg.attn_softcap,
                "final_logit_softcapping": cfg.final_softcap, "sliding_window": cfg.sliding_window,
                "layer_types": kinds}
    return {"attention_bias": False, "mlp_bias": False}


def _family(model_type: str, architecture: str, layer: dict, from_hf: Callable) -> Family:
    def to_hf(cfg: GPTConfig) -> dict[str, Any]:
        out = {**_llama_like_to_hf(cfg, model_type, architecture), **_extras(model_type, cfg)}
        return {k: v for k, v in out.items() if v is not None or k in ("sliding_window", "rope_scaling")}

    return Family(model_type, architecture, layer, LLAMA_TOP, from_hf, to_hf)


GPT2 = Family("gpt2", "GPT2LMHeadModel", GPT2_LAYER, GPT2_TOP, gpt_config_from_hf, hf_config_from_gpt,
              layer_prefix="transformer.h.{i}.", transposed=frozenset(k for k in GPT2_LAYER if k.endswith(
                  ("attn.qkv.weight", "attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight"))),
              skip_suffixes=(".attn.bias", ".attn.masked_bias"), optional_prefix="transformer.", label="GPT-2")
FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    GPT2,
    _family("llama", "LlamaForCausalLM", LLAMA_LAYER, llama_from_hf),
    _family("mistral", "MistralForCausalLM", LLAMA_LAYER, mistral_from_hf),
    _family("qwen2", "Qwen2ForCausalLM", QWEN2_LAYER, qwen2_from_hf),
    _family("qwen3", "Qwen3ForCausalLM", QWEN3_LAYER, qwen3_from_hf),
    _family("gemma2", "Gemma2ForCausalLM", GEMMA2_LAYER, gemma2_from_hf),
    _family("phi3", "Phi3ForCausalLM", PHI3_LAYER, phi3_from_hf),
)}


def family_of(hf: dict[str, Any], where: str) -> Family:
    kind = hf.get("model_type") if isinstance(hf, dict) else None
    if kind not in FAMILIES:
        raise LMForgeError(f"{where}: model_type {kind!r} is not supported; import-hf reads "
                           f"{', '.join(FAMILIES)}")
    return FAMILIES[kind]


def part_rows(name: str, cfg: GPTConfig, parts: int, rows: int) -> list[int]:
    """How the rows of a fused lmforge tensor split into its Hugging Face parts."""
    if parts == 1:
        return [rows]
    if name.startswith("attn.qkv"):
        q, kv = cfg.n_head * cfg.head_size, (cfg.n_kv_head or cfg.n_head) * cfg.head_size
        return [q, kv, kv]
    return [rows // parts] * parts  # gate and up: equal halves


# --- which family expresses a given GPTConfig -----------------------------------------------------
IGNORED = ("dropout",)  # training settings, not the function the model computes


def canonical(cfg: GPTConfig) -> dict[str, Any]:
    """The fields that decide what the model computes, with equivalent spellings made equal."""
    d = cfg.to_dict()
    d.update(mlp_hidden_size=cfg.mlp_hidden, mlp_ratio=None, head_dim=cfg.head_size,
             n_kv_head=cfg.n_kv_head or cfg.n_head)
    if cfg.rope_scaling == "none":
        d.update(rope_factor=None, rope_low_freq_factor=None, rope_high_freq_factor=None, rope_original_max_position=None)
    if cfg.pos_encoding != "rope":
        d.update(rope_theta=None)
    if cfg.sliding_window is None:
        d.update(sliding_window_layers=None)
    if not cfg.qk_norm:
        d.update(qk_norm_eps=None)
    if cfg.attn_scale is not None and abs(cfg.attn_scale - cfg.head_size ** -0.5) < 1e-12:
        d.update(attn_scale=None)
    for key in IGNORED:
        d.pop(key)
    return d


def expressible(family: Family, cfg: GPTConfig) -> list[str]:
    """What `family` cannot express of cfg ([] = all of it): config -> config.json -> config."""
    if family is GPT2:
        try:
            family.to_hf(cfg)
        except LMForgeError as e:
            return [str(e)]
    try:
        back = family.from_hf(family.to_hf(cfg), "config")
    except LMForgeError as e:
        return [str(e)]
    ours, theirs = canonical(cfg), canonical(back)
    return [f"{family.name} cannot express {k}={ours[k]!r} (it needs {k}={theirs[k]!r})"
            for k in ours if ours[k] != theirs[k]]


def family_for(cfg: GPTConfig, hint: str | None = None) -> Family:
    """The family of an imported run (`hint`: its model_type), else the first that expresses cfg."""
    order = [FAMILIES[hint]] if hint in FAMILIES else []
    order += [f for f in FAMILIES.values() if f not in order]
    problems = {f.model_type: expressible(f, cfg) for f in order}
    for f in order:
        if not problems[f.model_type]:
            return f
    closest = min(order, key=lambda f: len(problems[f.model_type]))
    raise LMForgeError(f"no Hugging Face family lmforge writes can express this model: "
                       f"{problems[closest.model_type][0]}")


__all__ = ["Family", "FAMILIES", "family_of", "family_for", "expressible", "canonical", "part_rows"]
