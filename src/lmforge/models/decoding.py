"""The autoregressive loop shared by the decoder-only models: prefill the prompt into a KV
cache, then feed one token at a time."""

from __future__ import annotations

from typing import Iterator

import torch

from ..sampling import sample_next


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
        cache = model.make_cache(idx.shape[0], block) if use_cache else None
        logits = model(context, cache=cache)[:, -1]  # prefill: (B, V)
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            yield nxt
            if step == max_new_tokens - 1:
                break
            if cache is not None and cache.pos < block:
                logits = model(nxt[:, None], cache=cache)[:, -1]
            else:  # window full: slide it
                cache = None
                context = torch.cat([context, nxt[:, None]], dim=1)[:, -block:]
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
