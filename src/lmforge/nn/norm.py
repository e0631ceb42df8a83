"""Layer normalisation: LayerNorm (the original) or RMSNorm (Llama's cheaper variant)."""

from __future__ import annotations

import torch
from torch import nn


class UnitOffsetRMSNorm(nn.Module):
    """Gemma's RMSNorm: x / rms(x) * (1 + w), computed in float32. The gain is stored as an
    offset from 1, so a weight of zero (its initial value) is the identity scale."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., dim)
        return (h * (1.0 + self.weight.float())).type_as(x)


def make_norm(kind: str, dim: int, bias: bool = True, eps: float = 1e-5, unit_offset: bool = False) -> nn.Module:
    """LayerNorm re-centres and re-scales each vector with a trainable gain (and bias);
    RMSNorm only re-scales, which is cheaper and works as well in practice. `unit_offset`:
    an RMSNorm whose gain is 1 + w (Gemma)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return UnitOffsetRMSNorm(dim, eps=eps) if unit_offset else nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}")
