"""Where a token sits in the sequence: learned tables, fixed sinusoids, or rotations (RoPE).

Attention itself is blind to order, so each model adds (or, for RoPE, rotates in) position."""

from __future__ import annotations

import math

import torch
from torch import nn

from .rope_scaling import llama3_frequencies


def sinusoidal_table(n_pos: int, dim: int) -> torch.Tensor:
    """The fixed encoding of "Attention Is All You Need":
    PE[p, 2i] = sin(p / 10000^(2i/dim)),  PE[p, 2i+1] = cos(p / 10000^(2i/dim))."""
    position = torch.arange(n_pos, dtype=torch.float64)[:, None]  # (P, 1)
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))  # (dim/2,)
    table = torch.zeros(n_pos, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div[: dim // 2])
    return table.float()


class LearnedPositions(nn.Module):
    """One trained vector per position, as in GPT-2 (`wpe`)."""

    def __init__(self, n_pos: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_pos, dim))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        return self.weight[pos]  # (T, dim)


class SinusoidalPositions(nn.Module):
    """The fixed table; a buffer, so it is not trained and not saved with the weights."""

    def __init__(self, n_pos: int, dim: int):
        super().__init__()
        self.register_buffer("table", sinusoidal_table(n_pos, dim), persistent=False)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        return self.table[pos]  # (T, dim)


class RotaryEmbedding(nn.Module):
    """RoPE: rotate pairs of query/key features by an angle proportional to
    the position, so q·k depends only on the distance between the two tokens.

    Uses the "rotate half" layout (feature i pairs with feature i + head_dim/2), as Llama does.
    `llama3`: (factor, low_freq_factor, high_freq_factor, original_max_position) rescales the
    frequencies as Llama 3.1 does (`rope_scaling.llama3_frequencies`)."""

    def __init__(self, head_dim: int, n_pos: int, theta: float = 10000.0,
                 llama3: tuple[float, float, float, int] | None = None):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))  # (hd/2,)
        if llama3 is not None:
            inv_freq = llama3_frequencies(inv_freq, *llama3)
        angles = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv_freq  # (P, hd/2)
        angles = torch.cat([angles, angles], dim=-1)  # (P, hd)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[pos], self.sin[pos]  # (T, hd) each


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, nh, T, hd); cos, sin: (T, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)
