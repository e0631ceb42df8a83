"""Layer normalisation: LayerNorm (the original) or RMSNorm (Llama's cheaper variant)."""

from __future__ import annotations

from torch import nn


def make_norm(kind: str, dim: int, bias: bool = True, eps: float = 1e-5) -> nn.Module:
    """LayerNorm re-centres and re-scales each vector with a trainable gain (and bias);
    RMSNorm only re-scales, which is cheaper and works as well in practice."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}")
