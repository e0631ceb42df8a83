"""The position-wise feed-forward network that follows attention in every block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


GATED = ("swiglu", "geglu")  # fc holds [gate; up]


class MLP(nn.Module):
    """`gelu`: Linear -> GELU (tanh approximation, as GPT-2) -> Linear.
    `relu`: the original Transformer's ReLU network.
    `swiglu`: Llama's gated unit, silu(x W_gate) * (x W_up) -> W_down; `fc` holds gate and up
    side by side so both come from one matrix product.
    `geglu`: the same gate with GELU (tanh approximation) in place of SiLU (Gemma)."""

    def __init__(self, dim: int, hidden: int, kind: str = "gelu", bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.kind = kind
        if kind not in ("gelu", "relu", "swiglu", "geglu"):
            raise ValueError(f"unknown mlp {kind!r}")
        self.fc = nn.Linear(dim, 2 * hidden if kind in GATED else hidden, bias=bias)
        self.proj = nn.Linear(hidden, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)  # (B, T, hidden) or (B, T, 2*hidden)
        if self.kind in GATED:
            gate, up = h.chunk(2, dim=-1)  # (B, T, hidden) each
            h = (F.silu(gate) if self.kind == "swiglu" else F.gelu(gate, approximate="tanh")) * up
        elif self.kind == "relu":
            h = F.relu(h)
        else:
            h = F.gelu(h, approximate="tanh")
        return self.dropout(self.proj(h))
