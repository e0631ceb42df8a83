"""lmforge run -> one GGUF file that llama.cpp (and Ollama, LM Studio, llama-cpp-python) load.

    export_gguf("runs/llama", "llama.gguf", qtype="q8_0")

GGUF is llama.cpp's format: key/value metadata (architecture, hyper-parameters, tokenizer,
chat template) followed by named tensors. Which llama.cpp architecture a run becomes follows
from its switches (`gguf_arch`):

    learned or sinusoidal positions, LayerNorm, GELU  -> gpt2   (fused attn_qkv, as GPT-2's c_attn)
    RoPE, RMSNorm, SwiGLU                              -> llama  (Llama, Mistral without a window)
        + Q/K/V biases                                 -> qwen2
        + QK-norm                                      -> qwen3
    RoPE, (1 + w) RMSNorm, GeGLU, sandwich norms       -> gemma2

A setting llama.cpp's architecture would silently ignore (a sliding window on llama, a
query_pre_attn_scalar Gemma 2's code hard-wires, a separate QK-norm eps) is refused with a one-line
reason instead of giving a file that computes something else.

Layouts: tensors are written in PyTorch's (out, in) order, which GGUF stores as (in, out) dims.
llama.cpp's `llama` architecture rotates interleaved pairs (2i, 2i+1) where lmforge, like Hugging
Face, rotates halves (i, i + d/2), so the rows of W_q and W_k are permuted per head
(`rope_interleave_rows`); qwen2, qwen3 and gemma2 use the half rotation and are written as is.
Llama 3.1's frequency rescaling becomes the `rope_freqs` tensor (each frequency's divisor).
Gemma's norm gains are stored as w (gain 1 + w) and written as 1 + w.

Weight types: f32; f16 and bf16 (matrices; norms and biases stay f32, as llama.cpp's converter
does); q8_0 (blocks of 32 int8 weights with one f16 scale; matrices whose rows are not a
multiple of 32 stay f16)."""

from __future__ import annotations

from pathlib import Path
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch

from ..checkpoint import read_run_config
from ..errors import LMForgeError
from ..fileio import atomic_path
from ..models.gpt import GPTConfig
from ..nn.positional import sinusoidal_table
from ..nn.rope_scaling import llama3_frequencies
from ..tokenizers import load_tokenizer
from .gguf_tokenizer import gguf_vocab, write_vocab
from .hf_weights import open_run_weights

QTYPES = ("f32", "f16", "bf16", "q8_0")
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # llama.cpp's LLAMA_FTYPE_*
LAYER = {  # lmforge name inside blocks.{i} -> GGUF name inside blk.{i} (fused ones are split below)
    "ln_1": "attn_norm", "attn.proj": "attn_output", "ln_2": "ffn_norm", "mlp.proj": "ffn_down",
    "attn.q_norm": "attn_q_norm", "attn.k_norm": "attn_k_norm",
    "post_attn_norm": "post_attention_norm", "post_mlp_norm": "post_ffw_norm",
}
TOP = {"tok_emb": "token_embd", "pos_emb": "position_embd", "ln_f": "output_norm", "lm_head": "output"}


def _refuse(reason: str) -> LMForgeError:
    return LMForgeError(f"GGUF cannot express this run: {reason}")


def gguf_arch(cfg: GPTConfig) -> str:
    """The llama.cpp architecture that computes what `cfg` computes, or an error naming the
    first setting none of them expresses."""
    plain = dict(post_norms=False, embed_scale=False, norm_unit_offset=False, attn_softcap=None, final_softcap=None)
    if cfg.pos_encoding in ("learned", "sinusoidal"):
        _need(cfg, "gpt2", norm="layernorm", mlp="gelu", qk_norm=False, **plain)
        if cfg.head_size * cfg.n_head != cfg.n_embd or (cfg.n_kv_head or cfg.n_head) != cfg.n_head:
            raise _refuse("llama.cpp's gpt2 architecture needs head_dim = n_embd / n_head and no grouped-query "
                          "attention")
        _no_window_or_scale(cfg, "gpt2")
        return "gpt2"
    if cfg.mlp == "geglu":
        _need(cfg, "gemma2", norm="rmsnorm", bias=False, qkv_bias=False, qk_norm=False, norm_unit_offset=True,
              embed_scale=True, post_norms=True, rope_scaling="none")
        if not cfg.tie_embeddings:
            raise _refuse("llama.cpp's gemma2 architecture ties the LM head to the embeddings (tie_embeddings=true)")
        default = cfg.head_size ** -0.5 if cfg.n_layer != 46 else (cfg.n_embd / cfg.n_head) ** -0.5
        if cfg.attn_scale is not None and abs(cfg.attn_scale - default) > 1e-9:
            raise _refuse(f"llama.cpp's gemma2 fixes the attention scale at {default:.6g} (query_pre_attn_scalar = "
                          f"head_dim), this run has attn_scale={cfg.attn_scale:.6g}")
        if cfg.sliding_window is not None and cfg.sliding_window_layers != "even":
            raise _refuse("llama.cpp's gemma2 slides on layers 0, 2, 4, ... only (sliding_window_layers=even)")
        return "gemma2"
    _need(cfg, "llama", norm="rmsnorm", mlp="swiglu", bias=False, **plain)
    _no_window_or_scale(cfg, "llama")
    if cfg.qk_norm:
        _need(cfg, "qwen3", qkv_bias=False, rope_scaling="none")
        if cfg.qk_norm_eps != cfg.norm_eps:
            raise _refuse(f"llama.cpp's qwen3 norms queries and keys with norm_eps={cfg.norm_eps}, this run uses "
                          f"qk_norm_eps={cfg.qk_norm_eps}")
        return "qwen3"
    if cfg.qkv_bias:
        _need(cfg, "qwen2", rope_scaling="none")
        return "qwen2"
    return "llama"


def _need(cfg: GPTConfig, arch: str, **want: Any) -> None:
    for key, value in want.items():
        if getattr(cfg, key) != value:
            raise _refuse(f"llama.cpp's {arch} architecture needs {key}={value!r}, this run has "
                          f"{key}={getattr(cfg, key)!r}")


def _no_window_or_scale(cfg: GPTConfig, arch: str) -> None:
    if cfg.sliding_window is not None and cfg.sliding_window < cfg.block_size:
        raise _refuse(f"llama.cpp's {arch} architecture has no sliding-window attention "
                      f"(sliding_window={cfg.sliding_window})")
    if cfg.attn_scale is not None and abs(cfg.attn_scale - cfg.head_size ** -0.5) > 1e-9:
        raise _refuse(f"llama.cpp's {arch} architecture scales attention by head_dim^-0.5, this run has "
                      f"attn_scale={cfg.attn_scale}")


# --- hyper-parameters ----------------------------------------------------------------------------
def write_hparams(writer, cfg: GPTConfig, arch: str, qtype: str) -> None:
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.mlp_hidden)
    writer.add_head_count(cfg.n_head)
    writer.add_file_type(FILE_TYPES[qtype])
    if arch == "gpt2":
        writer.add_layer_norm_eps(cfg.norm_eps)
        return
    writer.add_head_count_kv(cfg.n_kv_head or cfg.n_head)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_size)
    writer.add_key_length(cfg.head_size)
    writer.add_value_length(cfg.head_size)
    writer.add_vocab_size(cfg.vocab_size)
    if arch == "gemma2":
        if cfg.attn_softcap is not None:
            writer.add_attn_logit_softcapping(cfg.attn_softcap)
        if cfg.final_softcap is not None:
            writer.add_final_logit_softcapping(cfg.final_softcap)
        writer.add_sliding_window(cfg.sliding_window or cfg.block_size)  # no window: one as long as the context


# --- tensors ---------------------------------------------------------------------------------------
def rope_interleave_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of W_q / W_k (n_heads * hd, ...) from the half-split RoPE order to the interleaved one:
    per head, row order [0, hd/2, 1, hd/2 + 1, ...], so that llama.cpp's rotation of pair (2i, 2i+1)
    rotates what lmforge's rotation of (i, i + hd/2) rotates."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_freq_divisors(cfg: GPTConfig) -> torch.Tensor:
    """llama.cpp divides RoPE frequency i by rope_freqs[i]: the original over the rescaled one."""
    hd = cfg.head_size
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))  # (hd/2,)
    return (inv_freq / llama3_frequencies(inv_freq, *cfg.llama3_rope)).float()


def gguf_tensors(cfg: GPTConfig, arch: str, weights: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor) for every tensor llama.cpp's `arch` loads."""
    seen = set()
    nkv = cfg.n_kv_head or cfg.n_head
    qdim, kvdim = cfg.n_head * cfg.head_size, nkv * cfg.head_size
    offset = arch == "gemma2"  # gain 1 + w
    for name, t in weights.items():
        t = t.float()
        module, _, kind = name.rpartition(".")
        if name.startswith("blocks."):
            _, i, rest = module.split(".", 2)
            prefix = f"blk.{i}."
            if rest == "attn.qkv" and arch != "gpt2":
                q, k, v = t.split([qdim, kvdim, kvdim], dim=0)
                if arch == "llama":
                    q, k = rope_interleave_rows(q, cfg.n_head), rope_interleave_rows(k, nkv)
                parts = {"attn_q": q, "attn_k": k, "attn_v": v}
            elif rest == "attn.qkv":
                parts = {"attn_qkv": t}
            elif rest == "mlp.fc" and cfg.mlp in ("swiglu", "geglu"):
                gate, up = t.chunk(2, dim=0)
                parts = {"ffn_gate": gate, "ffn_up": up}
            elif rest == "mlp.fc":
                parts = {"ffn_up": t}
            elif rest in LAYER:
                norm = rest.endswith("norm") or rest.startswith("ln_")
                parts = {LAYER[rest]: t + 1 if offset and norm and kind == "weight" else t}
            else:
                raise LMForgeError(f"the run holds a tensor {name} that GGUF export does not know")
        elif module in TOP:
            if module == "lm_head" and cfg.tie_embeddings:
                continue
            prefix, parts = "", {TOP[module]: t + 1 if offset and module == "ln_f" else t}
        else:
            raise LMForgeError(f"the run holds a tensor {name} that GGUF export does not know")
        for gname, part in parts.items():
            seen.add(f"{prefix}{gname}.{kind}")
            yield f"{prefix}{gname}.{kind}", part.contiguous()
    if cfg.pos_encoding == "sinusoidal":
        yield "position_embd.weight", sinusoidal_table(cfg.block_size, cfg.n_embd)
    if arch == "llama" and cfg.rope_scaling == "llama3":
        yield "rope_freqs.weight", rope_freq_divisors(cfg)
    if arch == "gpt2":  # llama.cpp's gpt2 requires every bias: a run without them has zeros
        sizes = {"attn_norm": cfg.n_embd, "attn_qkv": qdim + 2 * kvdim, "attn_output": cfg.n_embd,
                 "ffn_norm": cfg.n_embd, "ffn_up": cfg.mlp_hidden, "ffn_down": cfg.n_embd}
        for i in range(cfg.n_layer):
            for gname, size in sizes.items():
                if f"blk.{i}.{gname}.bias" not in seen:
                    yield f"blk.{i}.{gname}.bias", torch.zeros(size)
        if "output_norm.bias" not in seen:
            yield "output_norm.bias", torch.zeros(cfg.n_embd)


def encode_tensor(t: torch.Tensor, qtype: str):
    """(numpy data, raw GGML type or None) for one tensor in the requested weight type."""
    import gguf

    a = t.numpy().astype(np.float32, copy=False)
    if t.dim() < 2 or qtype == "f32":
        return a, None
    if qtype == "f16" or (qtype == "q8_0" and a.shape[-1] % 32):
        return a.astype(np.float16), None
    kind = gguf.GGMLQuantizationType.BF16 if qtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(a, kind), kind


# --- the file ------------------------------------------------------------------------------------
def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise LMForgeError("GGUF export needs the gguf package: pip install gguf") from None
    return gguf


def export_gguf(run: str | Path, out: str | Path, qtype: str = "f16") -> Path:
    """Write the run as one GGUF file `out` with weights in `qtype` (f32 | f16 | bf16 | q8_0).
    Checks everything (architecture, tokenizer) before writing; the file appears whole or not at all."""
    gguf = _import_gguf()
    run, out = Path(run), Path(out)
    if qtype not in QTYPES:
        raise LMForgeError(f"--type must be one of {', '.join(QTYPES)}, not {qtype!r}")
    if out.is_dir():
        raise LMForgeError(f"{out} is a directory; --out names the .gguf file to write")
    rc = read_run_config(run)
    if rc.get("model") != "gpt":
        raise LMForgeError(f"{run} holds a {rc.get('model')!r} model; only GPT runs export to GGUF")
    cfg = GPTConfig.from_dict(rc["model_config"], where="gpt model config")
    arch = gguf_arch(cfg)
    tok = load_tokenizer(run / "tokenizer.json")
    vocab = gguf_vocab(tok, cfg.vocab_size, rc.get("generation") or {})
    from ..chat.template import load_chat_template

    chat = load_chat_template(run)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _open_weights(run / "model.safetensors") as weights, atomic_path(out) as tmp:
        # use_temp_file: each tensor goes to a spooled file as it is made, so memory holds one
        # tensor at a time rather than the whole converted model
        writer = gguf.GGUFWriter(str(tmp), arch, use_temp_file=True)
        writer.add_name(run.resolve().name)
        write_hparams(writer, cfg, arch, qtype)
        write_vocab(writer, vocab)
        if chat is not None:
            writer.add_chat_template(chat.source)
        for name, t in gguf_tensors(cfg, arch, weights):
            data, raw = encode_tensor(t, qtype)
            writer.add_tensor(name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


class _LazyWeights(Mapping):
    """The run's tensors by name, each read from the memory-mapped file when asked for."""

    def __init__(self, handle):
        self.handle, self.names = handle, list(handle.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.handle.get_tensor(name)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


@contextmanager
def _open_weights(path: Path) -> Iterator[_LazyWeights]:
    yield _LazyWeights(open_run_weights(path))


__all__ = ["export_gguf", "gguf_arch", "gguf_tensors", "rope_interleave_rows", "QTYPES"]
