"""Weight-only quantisation for decoding: the weights shrink to a quarter (int8) or an eighth
(int4) of fp32's bytes, and batch-1 decoding, which is bound by reading the weights, speeds up
accordingly. Activations stay in floating point; each layer dequantises inside its kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Int8Linear(nn.Module):
    """Weight-only int8 quantisation: each output row is stored as int8 with one scale
    (max |w| / 127), a quarter of fp32's bytes; activations stay in float."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()  # (out, in)
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
        self.register_buffer("qweight", torch.round(w / scale[:, None]).to(torch.int8).contiguous())
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # (N, in)
        # The CPU kernel is vectorised for bf16 activations only: with fp32 ones it is ~10x
        # slower (2304 x 768: 62 vs 766 us). Rounding the activations to bf16 costs less
        # precision than the int8 weights already do.
        kind = torch.bfloat16 if x.dtype == torch.float32 else x.dtype
        y = torch.ops.aten._weight_int8pack_mm(flat.to(kind), self.qweight, self.scale.to(kind)).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """Weight-only int4, group-wise: every `group_size` consecutive input weights of a row
    share a scale and an offset (asymmetric, from the group's min and max), so
    w ~ (q - 8) * scale + zero with q in 0..15. Half of int8's bytes, plus 4 bytes of scale
    and zero per group (6% more at group 64). Rows are padded to a multiple of 16, which the
    packed CPU kernel needs (a 50,257-token LM head gets 15 zero rows, sliced off)."""

    def __init__(self, linear: nn.Linear, group_size: int = 64):
        super().__init__()
        out_f, in_f = linear.out_features, linear.in_features
        if in_f % group_size:
            raise ValueError(f"in_features {in_f} is not a multiple of group_size {group_size}")
        self.in_features, self.out_features, self.group_size = in_f, out_f, group_size
        w = linear.weight.detach().float()
        pad = -out_f % 16
        w = F.pad(w, (0, 0, 0, pad))  # (out + pad, in)
        groups = w.reshape(w.shape[0], in_f // group_size, group_size)
        lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = (hi - lo).clamp(min=1e-8) / 15
        q = ((groups - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape_as(w)
        zero = lo + 8 * scale  # so that (q - 8) * scale + zero = lo + q * scale
        self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2))
        # (groups, out + pad, 2): the kernel's layout for scales and zeros
        sz = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("scales_and_zeros", sz.to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)  # the kernel takes bf16 activations
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.qweight, self.group_size, self.scales_and_zeros)
        y = y[:, :self.out_features].to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

