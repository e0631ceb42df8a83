"""Speculative decoding: a small draft model guesses the next k tokens one by one, and the
target model checks all k in a single forward pass.

Batch-1 decoding of a large model is bound by reading its weights, so a forward pass over
k + 1 tokens costs about as much as over one. Each guess d_i is kept with probability
min(1, p(d_i) / q(d_i)) (p: the target's distribution, q: the draft's); at the first refusal
the token is drawn from max(0, p - q), renormalised, and the round ends. This makes every
emitted token distributed exactly as the target's alone would be (Leviathan et al., 2023;
Chen et al., 2023). At temperature 0 it reduces to: keep guesses while they equal the
target's argmax, then emit the target's argmax, so greedy output is the target's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..errors import LMForgeError
from ..sampling import probabilities
from .decoding import decode_steps


@dataclass
class SpeculativeStats:
    """What a run of speculative decoding did; acceptance_rate is the share of the draft's
    guesses the target kept."""
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def _forward(model, tokens: list[int], cache, device) -> torch.Tensor:
    """Logits (T, V) of `tokens` placed after the cached positions."""
    return model(torch.tensor([tokens], device=device), cache=cache)[0]


def _residual_sample(p: torch.Tensor, q: torch.Tensor, generator) -> int:
    """A token from max(0, p - q), renormalised: what the target adds where the draft fell short."""
    r = (p - q).clamp(min=0)
    if r.sum() <= 0:  # p == q: any draw from p will do
        r = p
    return int(torch.multinomial(r / r.sum(), 1, generator=generator))


def accept(p: torch.Tensor, qs: list[torch.Tensor], guesses: list[int], greedy: bool,
           generator: torch.Generator | None = None) -> tuple[int, int]:
    """The target's verdict on one round: p (n + 1, V) its distributions after the last token
    and after each of the n guesses, qs the draft's n distributions. Returns (guesses kept,
    the token that follows them): the first refused guess is replaced by a draw from
    max(0, p - q); with every guess kept, p's last row gives one more token."""
    kept = 0
    for i, d in enumerate(guesses):
        ok = (int(p[i].argmax()) == d if greedy else
              float(torch.rand((), generator=generator)) * float(qs[i][d]) < float(p[i, d]))
        if not ok:
            break
        kept += 1
    n = len(guesses)
    if kept < n:
        return kept, int(p[kept].argmax()) if greedy else _residual_sample(p[kept], qs[kept], generator)
    return kept, int(p[n].argmax()) if greedy else int(torch.multinomial(p[n], 1, generator=generator))


@torch.no_grad()
def speculative_steps(target, draft, idx: torch.Tensor, max_new_tokens: int, k: int = 4,
                      temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                      generator: torch.Generator | None = None,
                      stats: SpeculativeStats | None = None) -> Iterator[torch.Tensor]:
    """Yield each new token id as a (1,) tensor, like `decode_steps`, for the prompt idx (1, T).

    The draft must share the target's vocabulary. Once the context no longer leaves room for a
    round in either model's block_size, the rest is decoded by the target alone (sliding its
    window as `decode_steps` does)."""
    if idx.shape[0] != 1:
        raise LMForgeError("speculative decoding runs one sequence at a time (batch 1)")
    if k < 1:
        raise LMForgeError(f"the draft must propose at least one token per round, not k={k}")
    if draft.config.vocab_size != target.config.vocab_size:
        raise LMForgeError(f"the draft's vocabulary ({draft.config.vocab_size}) differs from the target's "
                           f"({target.config.vocab_size}); use a draft trained with the same tokenizer")
    stats = stats if stats is not None else SpeculativeStats()
    greedy = temperature <= 0
    modes = target.training, draft.training
    target.eval(), draft.eval()
    try:
        block = min(target.config.block_size, draft.config.block_size)
        context = idx[0, -block:].tolist()
        room = min(block, len(context) + max_new_tokens + k + 1)
        t_cache, d_cache = target.make_cache(1, room), draft.make_cache(1, room)
        device = idx.device
        if len(context) > 1:  # the last prompt token is fed with the first round's guesses
            _forward(target, context[:-1], t_cache, device)
            _forward(draft, context[:-1], d_cache, device)
        last = context[-1]  # the newest token: in neither cache yet
        pending = [last]  # tokens not yet in the draft's cache
        emitted: list[int] = []
        while len(emitted) < max_new_tokens:
            n = min(k, room - t_cache.pos - 1, max_new_tokens - len(emitted))
            if n < 1:
                break
            base = t_cache.pos
            guesses, qs = [], []
            logits = _forward(draft, pending, d_cache, device)[-1:]
            for i in range(n):
                q = probabilities(logits, temperature, top_k, top_p)[0]  # (V,)
                d = int(q.argmax()) if greedy else int(torch.multinomial(q, 1, generator=generator))
                guesses.append(d)
                qs.append(q)
                if i < n - 1:
                    logits = _forward(draft, [d], d_cache, device)
            p = probabilities(_forward(target, [last, *guesses], t_cache, device),
                              temperature, top_k, top_p)  # (n + 1, V): after last, after each guess
            kept, last = accept(p, qs, guesses, greedy, generator)
            stats.rounds, stats.proposed, stats.accepted = stats.rounds + 1, stats.proposed + n, stats.accepted + kept
            # keep the cached positions of what was emitted; later slots get overwritten
            t_cache.pos = base + 1 + kept
            d_cache.pos = min(d_cache.pos, base + 1 + kept)
            pending = guesses[d_cache.pos - base - 1:kept] + [last]
            for t in [*guesses[:kept], last][:max_new_tokens - len(emitted)]:
                emitted.append(t)
                yield torch.tensor([t], device=device)
        if len(emitted) < max_new_tokens:  # no room for another round: the target goes on alone
            rest = torch.tensor([context + emitted], device=device)
            yield from decode_steps(target, rest, max_new_tokens - len(emitted), temperature=temperature,
                                    top_k=top_k, top_p=top_p, generator=generator)
    finally:
        target.train(modes[0]), draft.train(modes[1])


@torch.no_grad()
def speculative_generate(target, draft, idx: torch.Tensor, max_new_tokens: int, k: int = 4,
                         **kwargs) -> torch.Tensor:
    """idx: (1, T) -> (1, T + max_new_tokens), as `GPT.generate` but with a draft model."""
    new = [int(t) for t in speculative_steps(target, draft, idx, max_new_tokens, k=k, **kwargs)]
    return torch.cat([idx, torch.tensor([new], dtype=idx.dtype, device=idx.device)], dim=1)
