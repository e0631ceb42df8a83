"""A compiled decode step for the batching engine. The engine's batch changes shape as requests
come and go; a compiled graph needs fixed shapes. So this step always runs every one of the
cache's max_batch rows over all of its columns: rows without a sequence feed token 0 at
column 0 (their output is dropped), and a mask keeps each row to its own filled columns. One
graph serves every step, compiled once at start-up. Prefill stays eager, into the same cache."""

from __future__ import annotations

import time

import torch

from ..models.compiled import compile_step
from .slots import SlotKVCache


class _AllRows:
    """The cache as the compiled step sees it: row i writes column cols[i], every column is read."""

    def __init__(self, cache: SlotKVCache, cols: torch.Tensor):
        self.k, self.v, self.cols = cache.k, cache.v, cols
        self.rows = torch.arange(cache.k[0].shape[0], device=cache.k[0].device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[layer][self.rows, :, self.cols] = k[:, :, 0]  # k, v (B, nkv, 1, hs)
        self.v[layer][self.rows, :, self.cols] = v[:, :, 0]
        return self.k[layer], self.v[layer]

    def advance(self, n: int) -> None:  # the engine keeps the lengths
        pass


class CompiledStep:
    """`step(rows_last)`: one token for each of the first S rows (S = len(rows_last)), through a
    `torch.compile`d forward over all rows; returns logits (S, V) and advances those rows."""

    def __init__(self, model, cache: SlotKVCache, mode: str | None = None):
        self.model, self.cache = model, cache
        B, device = cache.k[0].shape[0], cache.k[0].device
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.cols = torch.zeros(B, dtype=torch.long, device=device)
        self.columns = torch.arange(cache.k[0].shape[2], device=device)
        self.view = _AllRows(cache, self.cols)
        self._compiled = compile_step(self._forward, device, mode)
        t0 = time.perf_counter()
        with torch.no_grad():
            self._compiled(self.tokens, self.cols)  # compile now, not on the first request
        self.compile_seconds = time.perf_counter() - t0

    def _forward(self, tokens: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        mask = (self.columns[None, :] <= cols[:, None])[:, None, None, :]  # (B, 1, 1, max_len)
        return self.model(tokens, cache=self.view, positions=cols[:, None], mask=mask)[:, -1]

    def step(self, rows_last: list[int]) -> torch.Tensor:
        S = len(rows_last)
        self.tokens.zero_()
        self.cols.zero_()
        self.tokens[:S, 0] = torch.tensor(rows_last)
        self.cols[:S] = torch.tensor(self.cache.lens[:S])
        logits = self._compiled(self.tokens, self.cols)[:S]
        for i in range(S):
            self.cache.lens[i] += 1
        return logits
