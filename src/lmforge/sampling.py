"""From next-token logits to a chosen token: softmax turns scores into probabilities, and we
sample from them rather than always taking the maximum (which repeats itself)."""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top k, and outside the smallest set of tokens whose
    probabilities add up to top_p (nucleus sampling). logits: (B, V), float."""
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # mass before this token already >= p
        drop_orig = torch.zeros_like(drop).scatter(-1, order, drop)
        logits = logits.masked_fill(drop_orig, float("-inf"))
    return logits


def probabilities(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """logits: (B, V) -> the distribution `sample_next` draws from (B, V), float32. At
    temperature 0 it is one-hot on the greedy token."""
    if temperature <= 0:
        return torch.nn.functional.one_hot(logits.max(dim=-1).indices, logits.size(-1)).float()
    return torch.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: (B, V) -> token ids (B,). Temperature 0 means greedy (argmax); higher
    temperatures flatten the distribution, lower ones sharpen it."""
    if temperature <= 0:
        # the first maximum, as argmax; on a CPU argmax over 50k bf16 logits is ~5x slower
        return logits.max(dim=-1).indices
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
