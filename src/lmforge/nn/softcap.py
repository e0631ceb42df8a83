"""Soft-capping (Gemma 2): squash scores smoothly into (-cap, cap) with cap * tanh(x / cap).

Near zero it is the identity; far out it saturates instead of growing without bound, so no
single attention score or output logit can dominate a softmax. Gemma 2 caps attention scores
at 50 and the final logits at 30."""

from __future__ import annotations

import torch


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap); x unchanged when cap is None."""
    if cap is None:
        return x
    return torch.tanh(x / cap) * cap
