"""A frozen base model stored compactly, for LoRA on a quantized base (QLoRA, Dettmers et al., 2023).

LoRA trains only A and B, so the base weights never need a gradient of their own: they only
have to carry gradients through to the input, dx = dy W, so that the adapters below them learn.
That frees the base's storage format. `FrozenLinear` keeps W in one of

    bfloat16   2 bytes a weight
    int8       1 byte: each output row stored as round(w / s) with one scale s = max|w| / 127
    nf4        half a byte: blocks of 64 consecutive inputs of a row share an absmax a; each
               weight is the nearest of the 16 NormalFloat levels (QLoRA's codebook) times a

and computes in bfloat16 with a hand-written backward that rebuilds W a few rows at a time
(never the whole matrix in floating point): forward y = x W^T, backward dx = dy W, no dW. The
activations come back in the caller's dtype, so LoRA's A and B train in float32 beside it.

`FrozenEmbedding` reads rows of the same table; a tied LM head and token embedding share one
FrozenLinear, so the tie holds. `freeze_base` builds all of this from a checkpoint, one
full-precision tensor at a time.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

BASE_DTYPES = ("float32", "bfloat16", "int8", "nf4")  # float32: the base stays plain nn.Linear
NF4_BLOCK = 64
# NormalFloat4 (QLoRA, appendix E): quantiles of N(0, 1) scaled to [-1, 1], with an exact 0
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
              -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
              0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
              0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
CHUNK_ELEMENTS = 1 << 22  # weights rebuilt in floating point at once (8 MiB of bf16)
COMPUTE = torch.bfloat16


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (out, in), scale float32 (out,)) with w ~ q * scale[:, None]; rows a chunk at a time."""
    q = torch.empty(w.shape, dtype=torch.int8)
    scale = torch.empty(w.shape[0], dtype=torch.float32)
    for lo, hi in _row_chunks(*w.shape):
        c = w[lo:hi].float()
        s = c.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q[lo:hi] = torch.round(c / s[:, None]).to(torch.int8)
        scale[lo:hi] = s
    return q, scale


def quantize_nf4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 (out, in / 2), two 4-bit codes a byte; absmax float32 (out, in / 64))."""
    out_f, in_f = w.shape
    levels = torch.tensor(NF4_LEVELS)
    mids = (levels[1:] + levels[:-1]) / 2  # the nearest level is found by bucketing on midpoints
    packed = torch.empty(out_f, in_f // 2, dtype=torch.uint8)
    absmax = torch.empty(out_f, in_f // NF4_BLOCK, dtype=torch.float32)
    for lo, hi in _row_chunks(out_f, in_f):
        c = w[lo:hi].float().reshape(hi - lo, -1, NF4_BLOCK)  # (rows, blocks, 64)
        a = c.abs().amax(dim=-1).clamp(min=1e-12)
        codes = torch.bucketize(c / a[..., None], mids).to(torch.uint8).reshape(hi - lo, in_f)
        packed[lo:hi] = codes[:, 0::2] << 4 | codes[:, 1::2]
        absmax[lo:hi] = a
    return packed, absmax


def _row_chunks(rows: int, cols: int):
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    return [(lo, min(lo + step, rows)) for lo in range(0, rows, step)]


class _FrozenMatmul(torch.autograd.Function):
    """y = x W^T with W held by a FrozenLinear: a gradient for x only, computed from the compact
    weight again (nothing is saved but the reference to the layer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "FrozenLinear") -> torch.Tensor:
        ctx.layer, ctx.x_dtype = layer, x.dtype
        device = x.device.type
        # under autocast a linear layer's output has the autocast dtype, as nn.Linear's does
        out = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        return layer.matmul(x).to(out)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        return ctx.layer.matmul_t(dy).to(ctx.x_dtype), None


class FrozenLinear(nn.Module):
    """A linear layer whose weight (out, in) is frozen and stored as bfloat16, int8 or nf4."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str):
        super().__init__()
        if fmt not in BASE_DTYPES[1:]:
            raise ValueError(f"unknown frozen weight format {fmt!r}")
        self.out_features, self.in_features = weight.shape
        self.fmt = fmt
        self.tied = False  # True when an embedding reads the same table (set by freeze_base)
        if fmt == "bfloat16":
            self.register_buffer("weight", weight.to(COMPUTE).contiguous(), persistent=False)
        elif fmt == "int8":
            q, scale = quantize_int8(weight)
            self.register_buffer("qweight", q, persistent=False)
            self.register_buffer("scale", scale, persistent=False)
        else:
            if self.in_features % NF4_BLOCK:
                raise ValueError(f"nf4 needs in_features divisible by {NF4_BLOCK}, got {self.in_features}")
            packed, absmax = quantize_nf4(weight)
            self.register_buffer("packed", packed, persistent=False)
            self.register_buffer("absmax", absmax, persistent=False)
            levels = torch.tensor(NF4_LEVELS)
            # byte -> (level of its high nibble, level of its low nibble): one lookup per byte
            pairs = torch.stack([levels.repeat_interleave(16), levels.repeat(16)], dim=-1)  # (256, 2)
            self.register_buffer("byte_levels", pairs, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone(), persistent=False)

    @property
    def n_weights(self) -> int:
        return self.out_features * self.in_features

    def storage_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def dequantize(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """W[rows] in bfloat16 (rows: a slice, or an index tensor of any shape: (..., in))."""
        if self.fmt == "bfloat16":
            return self.weight[rows]
        if self.fmt == "int8":
            return (self.qweight[rows].float() * self.scale[rows][..., None]).to(COMPUTE)
        packed = self.packed[rows]  # (..., in / 2)
        w = F.embedding(packed.int(), self.byte_levels)  # (..., in / 2, 2): the gather kernel
        w = w.reshape(*packed.shape[:-1], -1, NF4_BLOCK)  # (..., blocks, 64)
        return (w * self.absmax[rows][..., None]).flatten(-2).to(COMPUTE)  # one rounding, to bf16

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T (+ bias) in bfloat16, returned in x's dtype: (N, in) -> (N, out)."""
        flat = x.to(COMPUTE)  # (N, in)
        if self.fmt == "bfloat16":
            y = flat @ self.weight.t()
        else:
            y = torch.empty(flat.shape[0], self.out_features, dtype=COMPUTE, device=x.device)
            for lo, hi in _row_chunks(self.out_features, self.in_features):
                if self.fmt == "int8":  # int8 -> bf16 is exact; the row scales apply to the output
                    y[:, lo:hi] = (flat @ self.qweight[lo:hi].to(COMPUTE).t()) * self.scale[lo:hi].to(COMPUTE)
                else:
                    y[:, lo:hi] = flat @ self.dequantize(slice(lo, hi)).t()
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def matmul_t(self, dy: torch.Tensor) -> torch.Tensor:
        """dy W: the input gradient, (N, out) -> (N, in), summed over row chunks in float32."""
        flat = dy.to(COMPUTE)  # (N, out)
        if self.fmt == "bfloat16":
            dx = (flat @ self.weight).to(dy.dtype)
        else:
            chunks = _row_chunks(self.out_features, self.in_features)
            dx = torch.zeros(flat.shape[0], self.in_features, dtype=torch.float32, device=dy.device)
            for lo, hi in chunks:
                if self.fmt == "int8":  # (dy * s) q: the scale moves onto dy's columns
                    part = (flat[:, lo:hi] * self.scale[lo:hi].to(COMPUTE)) @ self.qweight[lo:hi].to(COMPUTE)
                else:
                    part = flat[:, lo:hi] @ self.dequantize(slice(lo, hi))
                dx += part
            dx = dx.to(dy.dtype)
        return dx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # reshaped outside the Function: its output must not be a view (LoRA adds to it in place)
        y = _FrozenMatmul.apply(x.reshape(-1, self.in_features), self)  # (N, out)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


class FrozenEmbedding(nn.Module):
    """Token embedding rows read from a FrozenLinear table (vocab, d), returned in float32.
    With a tied LM head the head *is* that table, so it is held without registering it twice."""

    def __init__(self, table: FrozenLinear, tied: bool):
        super().__init__()
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        if tied:
            object.__setattr__(self, "table", table)  # owned by the head module
        else:
            self.table = table

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table.dequantize(idx).float()  # (..., d)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def freeze_base(model: nn.Module, fmt: str, tensor: Callable[[str], torch.Tensor], names: set[str]) -> None:
    """Fill a model built with its parameters on the meta device (`checkpoint.params_on_meta`)
    from a checkpoint: every nn.Linear and nn.Embedding becomes a FrozenLinear / FrozenEmbedding
    in `fmt`; every other parameter (norms, learned positions) is assigned in float32, frozen.
    `tensor(name)` reads one tensor of the checkpoint, whose tensor names are `names`: one
    full-precision matrix is alive at a time, beside the compact ones already made."""
    aliases: dict[int, list[str]] = {}  # a tied parameter appears under several names
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)

    def read(p: torch.Tensor) -> torch.Tensor:
        stored = [n for n in aliases[id(p)] if n in names]
        if not stored:
            raise KeyError(aliases[id(p)][0])
        return tensor(stored[0])

    tables: dict[int, FrozenLinear] = {}  # id(weight Parameter) -> its frozen table
    modules = [(n, m) for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Embedding)]
    users = {}
    for _, m in modules:
        users[id(m.weight)] = users.get(id(m.weight), 0) + 1
    for name, m in modules:
        key = id(m.weight)
        if key not in tables:
            w = read(m.weight)
            bias = read(m.bias) if isinstance(m, nn.Linear) and m.bias is not None else None
            tables[key] = FrozenLinear(w, bias, fmt)
            del w
        table, tied = tables[key], users[key] > 1
        table.tied = table.tied or tied
        if isinstance(m, nn.Embedding):
            if m.padding_idx is not None or m.max_norm is not None:
                raise ValueError(f"{name}: a frozen embedding supports neither padding_idx nor max_norm")
            _set_module(model, name, FrozenEmbedding(table, tied))
        else:
            if m.bias is not None and table.bias is None:
                table.bias = read(m.bias).float()
            _set_module(model, name, table)
    for mod in model.modules():
        for leaf, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                mod._parameters[leaf] = nn.Parameter(read(p).float(), requires_grad=False)
