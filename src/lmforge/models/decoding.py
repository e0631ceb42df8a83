"""The autoregressive loop shared by the decoder-only models: prefill the prompt into a KV
cache, then feed one token at a time."""

from __future__ import annotations

import os
import time
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..sampling import sample_next
from .quantize import Int4Linear, Int8Linear


@torch.no_grad()
def decode_steps(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True) -> Iterator[torch.Tensor]:
    """Yield each step's new token ids (B,) for the prompts idx (B, T).

    The model needs `config.block_size`, `forward(idx, cache=...)` and `make_cache(batch)`.
    Once the context fills block_size the window slides: each further step reruns the model
    on the last block_size tokens, without the cache. Stop iterating to stop early."""
    was_training = model.training
    model.eval()
    try:
        block = model.config.block_size
        context = idx[:, -block:]
        # room for the prompt and the new tokens only: a full block_size cache (GPT-2: 1,024
        # slots, 75 MB in fp32) would mostly be zero-filled and never read
        need = min(block, context.shape[1] + max_new_tokens)
        cache = model.make_cache(idx.shape[0], need) if use_cache else None
        logits = model(context, cache=cache)[:, -1]  # prefill: (B, V)
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            yield nxt
            if step == max_new_tokens - 1:
                break
            context = torch.cat([context, nxt[:, None]], dim=1)[:, -block:]  # the window so far
            if cache is not None and cache.pos < cache.max_len:
                logits = model(nxt[:, None], cache=cache)[:, -1]
            else:  # window full: slide it
                cache = None
                logits = model(context)[:, -1]
    finally:
        model.train(was_training)


@torch.no_grad()
def generate_ids(model, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """idx: (B, T) -> (B, T + max_new_tokens)."""
    out = torch.empty(idx.shape[0], idx.shape[1] + max_new_tokens, dtype=torch.long, device=idx.device)
    out[:, :idx.shape[1]] = idx
    n = idx.shape[1]
    for nxt in decode_steps(model, idx, max_new_tokens, **kwargs):
        out[:, n] = nxt
        n += 1
    return out[:, :n]


# ---- making batch-1 decoding fast on a CPU -------------------------------------------------
# Decoding one token multiplies every weight matrix by one vector: the time goes into reading
# the weights from memory (GPT-2 124M in fp32: 498 MB per token), so what matters is how fast
# the bytes stream. On this project's machines a vector-matrix product reads an fp32 weight
# stored (in, out)-contiguous faster than the usual (out, in) nn.Linear layout (PERF-NOTES:
# 19.7 vs 12.8 GB/s on an AMD Zen 4; docs/benchmarks.md: a few per cent on the Intel machine the
# benchmarks ran on). In bf16 the (out, in) layout streams poorly (about half the bandwidth);
# oneDNN's own blocked layout (PackedLinear) or the (in, out) one does, and which of the two is
# faster depends on the CPU and the shape, so prepare_for_decoding times both once per shape
# (on an Ice Lake CPU without bf16 instructions: the 50,257 x 768 LM head 3.2 ms (in, out)
# against 4.8 ms packed; GPT-2's MLP down-projection 0.27 ms packed against 0.38 ms).


def can_pack(weight: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> bool:
    """oneDNN's packed linear for a CPU weight of `dtype`: CPU builds with mkldnn only."""
    return (weight.device.type == "cpu" and weight.dtype == dtype and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class PackedLinear(nn.Module):
    """A bf16 linear layer whose weight is also held in oneDNN's blocked layout, which a
    vector-matrix product reads about 1.5x faster than the (out, in) tensor. `weight` stays
    the same Parameter (state_dict and tying unchanged); the packed copy is inference-only
    and costs the weight's size again in memory."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # an opaque oneDNN tensor: not a buffer (it cannot be saved, copied or moved)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self._bias = None if linear.bias is None else linear.bias.detach()  # same storage, no autograd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed, self._bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


# A batched step (serving several streams, the harness's batches) multiplies each weight by a
# few rows instead of one. For fp32 the BLAS kernel that wins for one row and for prefill-sized
# products reads the weights far more slowly at 2-32 rows, where oneDNN's packed kernel does
# better (benchmarks/batched_step.py); so a batched decoder keeps both layouts.
SMALL_BATCH = range(2, 33)


class BatchPackedLinear(nn.Module):
    """An fp32 linear layer that also holds its weight in oneDNN's packed layout and uses it
    for products of 2-32 rows; one row and prefill-sized products keep using `weight` (the
    same Parameter: state_dict and tying unchanged). Costs the weight's size again in memory.
    With autograd recording and a weight that needs gradients it is a plain linear layer."""

    def __init__(self, linear: nn.Linear, rows: range = SMALL_BATCH):
        super().__init__()
        self.weight, self.bias, self.rows = linear.weight, linear.bias, rows
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows.stop - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] not in self.rows or (torch.is_grad_enabled() and self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.detach()
        y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


def available_memory() -> int:
    """Bytes the kernel could give this process now (MemAvailable: free plus reclaimable cache)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 0


def prepare_for_batches(model: nn.Module) -> bool:
    """For a model that will decode several sequences at once (a server, the harness): give
    its fp32 CPU linear layers a packed copy (`prepare_for_decoding(batched=True)`) if that copy
    takes at most half of the free memory. Returns whether it did. The copy is taken now:
    later changes to the weights do not reach it."""
    weights = [m.weight for m in model.modules() if type(m) is nn.Linear and can_pack(m.weight, torch.float32)]
    extra = sum({w.data_ptr(): w.numel() * w.element_size() for w in weights}.values())  # tied: once
    if not weights or 2 * extra > available_memory():
        return False
    prepare_for_decoding(model, batched=True)
    return True


def _seconds(f, reps: int = 5) -> float:
    f()  # warm-up: first-call allocations, oneDNN primitive creation
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best


def packing_is_faster(weight: torch.Tensor, margin: float = 1.1) -> bool:
    """Time one batch-1 product with the weight packed and with it stored (in, out). Packing
    stays unless the other layout wins by `margin`: near-equal timings then do not flip the
    choice (and with it the float rounding) from one run to the next."""
    x = torch.randn(1, weight.shape[1], dtype=weight.dtype)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
    t_packed = _seconds(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
    w_t = weight.detach().t().contiguous().t()  # (out, in) view of (in, out) storage
    return t_packed < margin * _seconds(lambda: F.linear(x, w_t))


@torch.no_grad()
def prepare_for_decoding(model: nn.Module, dtype: torch.dtype | None = None, int8: bool = False,
                         packed: bool | None = None, int4: bool = False, group_size: int = 64,
                         on_packed: Callable[[PackedLinear], None] | None = None, batched: bool = False) -> nn.Module:
    """Re-lay a model's weights for fast token-by-token inference, in place; returns it in eval
    mode. For inference only; outputs are unchanged up to float rounding.
    - dtype: e.g. torch.bfloat16 halves the bytes read per token; on a CPU each plain nn.Linear
      in bf16 then either becomes a PackedLinear (the model is for inference only from then on)
      or is stored transposed as below, whichever a timed product of its shape says is faster
      (`packed=True` / `False` decides without timing, e.g. for a reproducible choice);
    - fp32: every plain nn.Linear stores its weight transposed ((in, out) contiguous; `weight`
      stays the usual (out, in) tensor as a view, so names, tying and state_dict are unchanged);
    - int8: replace each plain nn.Linear by an Int8Linear (weight-only quantisation);
    - int4: by an Int4Linear (group-wise scales, `group_size` inputs per group; CPU), or by an
      Int8Linear where its input width is not a multiple of group_size;
    - batched: for decoding several sequences at once, each fp32 nn.Linear on a CPU becomes a
      BatchPackedLinear (a second, packed copy of its weight for products of 2-32 rows).
    `on_packed` is called with each new PackedLinear, before the next layer is laid out (the
    loader uses it to let go of the pages the packing read)."""
    if int8 and int4:
        raise ValueError("choose int8 or int4, not both")
    if dtype is not None:
        model.to(dtype=dtype)
    faster_packed: dict[tuple, bool] = {}  # timed once per weight shape

    def pack(w: torch.Tensor) -> bool:
        if not can_pack(w) or packed is not None:
            return can_pack(w) and bool(packed)
        if tuple(w.shape) not in faster_packed:
            faster_packed[tuple(w.shape)] = packing_is_faster(w)
        return faster_packed[tuple(w.shape)]

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:  # leave LoRA layers and other subclasses alone
                continue
            w = child.weight
            if int4 and child.in_features % group_size == 0:
                setattr(parent, name, Int4Linear(child, group_size))
            elif int8 or int4:
                setattr(parent, name, Int8Linear(child))
            elif batched and can_pack(w, torch.float32):
                setattr(parent, name, BatchPackedLinear(child))
            elif pack(w):
                setattr(parent, name, PackedLinear(child))
                if on_packed is not None:
                    on_packed(getattr(parent, name))
            elif w.is_contiguous() and (w.dtype == torch.float32
                                        or (w.dtype == torch.bfloat16 and w.device.type == "cpu")):
                child.weight.data = w.data.t().contiguous().t()  # (out, in) view of (in, out)
    return model.eval()
