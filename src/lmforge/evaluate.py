"""Loss over a whole split, for `lmforge eval`: every token once, not a random sample."""

from __future__ import annotations

import inspect

import numpy as np
import torch
from tqdm import tqdm


@torch.no_grad()
def split_loss(model, data, split: str = "val", batch_size: int = 16, max_tokens: int | None = None,
               progress: bool = False) -> tuple[float, int]:
    """Mean next-token cross-entropy over non-overlapping blocks of the split.
    Returns (loss, number of predicted tokens)."""
    model.eval()
    arr = data.splits[split]
    n = len(arr) if max_tokens is None else min(len(arr), max_tokens + 1)
    block = model.config.block_size
    device = next(model.parameters()).device
    starts = list(range(0, n - 1, block))
    total, count = 0.0, 0
    # a model that can give the loss without whole logits (GPT: 16 x 1024 x 50,257 floats are
    # 3.3 GB) is asked for it
    loss_only = "return_logits" in inspect.signature(model.forward).parameters
    for i in tqdm(range(0, len(starts), batch_size), desc="eval", disable=not progress):
        rows = []
        for s in starts[i:i + batch_size]:
            seq = np.asarray(arr[s:min(s + block + 1, n)], dtype=np.int64)
            rows.append(seq)
        width = max(len(r) for r in rows)
        xy = torch.full((len(rows), width), -1, dtype=torch.long)
        for j, r in enumerate(rows):
            xy[j, :len(r)] = torch.from_numpy(r)
        x, y = xy[:, :-1].clamp(min=0).to(device), xy[:, 1:].to(device)
        n_tokens = int((y != -1).sum())
        if loss_only:
            total += model(x, targets=y, return_logits=False)[1].item() * n_tokens  # a mean: back to a sum
        else:
            logits = model(x)
            total += torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                                                       ignore_index=-1, reduction="sum").item()
        count += n_tokens
    return total / max(count, 1), count
