"""Speculative decoding inside the batching engine: a draft model proposes k tokens for every
active row, and the served model checks all of them in one batched forward pass.

Each row keeps its own lengths in two slot caches, the served model's and the draft's. At the
start of a round a row's model cache holds its first L positions and `last` (position L) is not
yet cached; the draft's cache holds L - 1, so the draft is fed [prev, last] (prev: the token at
L - 1) and then its own guesses. Whatever the model keeps, both caches are cut back to that
invariant, so the columns of refused guesses are simply overwritten later. Each row is judged by
the same rule as single-sequence decoding (`models.speculative.accept`), with the row's own
sampling settings and generator: greedy output is the model's own, sampled output has its
distribution.

Rows near the end of their max_tokens or of a context still feed k guesses (one batch shape);
their extra positions are clamped into the model's range, sit in spare cache columns and are
never reported. Past the draft's own context its positions are clamped too: its guesses get
worse, the output stays the model's."""

from __future__ import annotations

import torch

from ..models.speculative import SpeculativeStats, accept
from ..sampling import probabilities
from .slots import SlotKVCache


class Speculator:
    """The draft's side of the engine: its slot cache (rows mirror the engine's) and the round."""

    def __init__(self, draft, k: int, max_batch: int, max_len: int, device, dtype):
        if k < 1:
            raise ValueError(f"the draft must propose at least one token per round, not {k}")
        self.draft, self.k = draft.eval(), k
        probe = draft.make_cache(1, 1)
        self.cache = SlotKVCache(draft.config.n_layer, max_batch, probe.k.shape[2], probe.k.shape[4],
                                 max_len=max_len + k + 1, device=device, dtype=dtype)
        self.max_position = draft.config.block_size - 1
        self.stats = SpeculativeStats()

    def prefill(self, row: int, n: int, prompt_ids: list[int]) -> None:
        """Rows [row, row + n) start a sequence: the draft caches all of the prompt but its last token."""
        self.cache.prefill(row, n)
        if len(prompt_ids) > 1:
            device = self.cache.k[0].device
            idx = torch.tensor([prompt_ids[:-1]] * n, device=device)
            positions = torch.arange(idx.shape[1], device=device).clamp(max=self.max_position)
            self.draft(idx, cache=self.cache, positions=positions)

    def move(self, src: int, dst: int) -> None:
        self.cache.move(src, dst)

    def round(self, model, cache: SlotKVCache, rows: list) -> list[tuple[list[int], torch.Tensor]]:
        """One round over `rows` (the engine's sequences, in cache-row order; each has .last,
        .prev, .generator and .handle.params). Returns per row the tokens to emit (the kept
        guesses, then the model's own next token) and the model's logits (m, V) they came from."""
        S, k, device = len(rows), self.k, cache.k[0].device
        for r in range(S):  # the draft's cache is valid up to the model's, less one position
            self.cache.lens[r] = cache.lens[r] - 1
        feed = torch.tensor([[s.prev, s.last] for s in rows], device=device)
        guesses, qs = [], []
        for _ in range(k):
            positions, mask = self.cache.decode(S, feed.shape[1], self.max_position)
            logits = self.draft(feed, cache=self.cache, positions=positions, mask=mask)[:, -1]  # (S, V)
            q = torch.cat([_probs(logits[r:r + 1], s.handle.params) for r, s in enumerate(rows)])  # (S, V)
            g = torch.tensor([_draw(q[r], s) for r, s in enumerate(rows)], device=device)  # (S,)
            guesses.append(g)
            qs.append(q)
            feed = g[:, None]
        G, Q = torch.stack(guesses, 1), torch.stack(qs, 1)  # (S, k), (S, k, V)
        start = list(cache.lens[:S])
        verify = torch.cat([torch.tensor([[s.last] for s in rows], device=device), G], 1)  # (S, k + 1)
        positions, mask = cache.decode(S, k + 1, model.config.block_size - 1)
        logits = model(verify, cache=cache, positions=positions, mask=mask)  # (S, k + 1, V)
        out = []
        for r, s in enumerate(rows):
            params = s.handle.params
            p = _probs(logits[r], params)  # (k + 1, V)
            kept, nxt = accept(p, list(Q[r]), G[r].tolist(), params.temperature <= 0, s.generator)
            cache.lens[r] = start[r] + 1 + kept
            useful = max(0, min(k, params.max_tokens - s.generated - 1))  # guesses that could be emitted
            self.stats.proposed += useful
            self.stats.accepted += min(kept, useful)
            out.append((G[r, :kept].tolist() + [nxt], logits[r, :kept + 1]))
        self.stats.rounds += 1
        return out


def _probs(logits: torch.Tensor, params) -> torch.Tensor:
    return probabilities(logits, params.temperature, params.top_k, params.top_p)


def _draw(q: torch.Tensor, seq) -> int:
    if seq.handle.params.temperature <= 0:
        return int(q.argmax())
    return int(torch.multinomial(q, 1, generator=seq.generator))
