"""Many requests scored or continued at once, by the model's own forward passes: what the
evaluation harness (`lmforge.harness`) runs, with no lm-eval needed here.

Requests are scored in batches, with three savings over running each request as a sequence of
its own (what lm-eval's `hf` model does):
- the choices of a multiple-choice question share its context: the context and the choices go
  into one row, each choice attending to the context and to itself only (a block mask;
  positions restart after the context), so the context runs once, not once per choice;
- only scored positions go through the vocabulary projection, a chunk at a time (on GPT-2 the
  head over every position is a quarter of a forward's time, and (B, T, 50,257) floats);
- generation decodes a batch of rows together with a KV cache, left-padded, each row at its
  own positions.
Scores equal a one-request-at-a-time forward to float rounding."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from .errors import LMForgeError
from .nn.softcap import softcap
from .sampling import sample_next

Pair = tuple[list[int], list[int]]  # (context ids, continuation ids)
HEAD_LOGITS = 2**26  # logits made at once by the vocabulary projection (256 MB in fp32)


@dataclass
class _Row:
    """One sequence of a batch: a shared prefix, then each member's continuation inputs."""
    tokens: list[int]
    positions: list[int]
    segments: list[int]  # 0: the prefix; k: member k's tokens
    members: list[tuple[int, list[int], list[int]]] = field(default_factory=list)  # (request, logit slots, targets)

    def add(self, request: int, rest: list[int], targets: list[int]) -> None:
        n, start = self.segments.count(0), len(self.tokens)
        self.tokens += rest
        self.positions += range(n, n + len(rest))
        self.segments += [len(self.members) + 1] * len(rest)
        # the prefix's last position predicts the first target; each fed token the next one
        self.members.append((request, [n - 1, *range(start, start + len(rest))], targets))


def pack_rows(pairs: Sequence[Pair], max_length: int, share: bool = True) -> list[_Row]:
    """Each request as lm-eval's `hf` model feeds it, (context + continuation) cut to its last
    max_length + 1 tokens, minus the last; requests with the same prefix (the part before the
    continuation's second token) share one row when `share`, up to max_length tokens a row."""
    groups: dict[Any, tuple[list[int], list]] = {}
    for i, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise ValueError("every request needs a context and a continuation token")
        if len(cont) > max_length:
            raise LMForgeError(f"a continuation of {len(cont)} tokens exceeds the model's context of "
                               f"{max_length}; shorten the task's targets")
        inp = (ctx + cont)[-(max_length + 1):][:-1]
        cut = len(inp) - len(cont) + 1
        groups.setdefault(tuple(inp[:cut]) if share else i, (inp[:cut], []))[1].append((i, inp[cut:], cont))
    rows = []
    for prefix, members in groups.values():
        row = None
        for i, rest, cont in members:
            if row is None or len(row.tokens) + len(rest) > max_length:
                row = _Row(list(prefix), list(range(len(prefix))), [0] * len(prefix))
                rows.append(row)
            row.add(i, rest, cont)
    return rows


class _KeepHidden(nn.Module):
    """Stands in for the vocabulary projection during a forward: keeps the final hidden states
    (B, T, C), so the caller projects only the positions it scores."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.hidden = x
        return x[..., :0]


def final_hidden(model, idx: torch.Tensor, **kwargs) -> torch.Tensor:
    """The model's own forward up to its final norm: (B, T) ids -> (B, T, C)."""
    head, keep = model.lm_head, _KeepHidden()
    model.lm_head = keep
    try:
        model(idx, **kwargs)
    finally:
        model.lm_head = head
    return keep.hidden


def project(model, hidden: torch.Tensor) -> torch.Tensor:
    """(N, C) final hidden states -> (N, V) float32 logits, as the model's forward makes them."""
    return softcap(model.lm_head(hidden), model.config.final_softcap).float()


def _row_hidden(model, rows: list[_Row]) -> torch.Tensor:
    device = next(model.parameters()).device
    B, T = len(rows), max(len(r.tokens) for r in rows)
    idx = torch.zeros(B, T, dtype=torch.long)
    for b, r in enumerate(rows):
        idx[b, :len(r.tokens)] = torch.tensor(r.tokens)
    if all(len(r.members) == 1 for r in rows):  # plain sequences, right-padded: causality hides the pads
        return final_hidden(model, idx.to(device))
    pos, seg = torch.zeros(B, T, dtype=torch.long), torch.full((B, T), -1)
    for b, r in enumerate(rows):
        pos[b, :len(r.tokens)], seg[b, :len(r.tokens)] = torch.tensor(r.positions), torch.tensor(r.segments)
    # a token sees the prefix and its own segment, causally; a pad sees pads (never an empty row)
    mask = ((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])) & torch.ones(T, T, dtype=torch.bool).tril()
    return final_hidden(model, idx.to(device), positions=pos.to(device), mask=mask[:, None].to(device))


@torch.no_grad()
def score_pairs(model, pairs: Sequence[Pair], max_length: int, batch_size: int = 16,
                share: bool = True, progress=None) -> list[tuple[float, bool]]:
    """(sum of the continuation's log-probabilities, whether greedy decoding gives it) per pair."""
    rows = sorted(pack_rows(pairs, max_length, share), key=lambda r: -len(r.tokens))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        hidden = _row_hidden(model, batch)  # (B, T, C)
        T = hidden.shape[1]
        slots, targets, spans = [], [], []
        for b, row in enumerate(batch):
            for i, logit_slots, cont in row.members:
                spans.append((i, len(targets), len(cont)))
                slots += [b * T + s for s in logit_slots]
                targets += cont
        picked = hidden.reshape(-1, hidden.shape[-1])[torch.tensor(slots, device=hidden.device)]  # (N, C)
        tgt = torch.tensor(targets, device=hidden.device)
        logp, greedy = [], []
        step = max(1, HEAD_LOGITS // model.config.vocab_size)
        for s in range(0, len(targets), step):
            logits = project(model, picked[s:s + step])  # (n, V)
            logp.append(torch.log_softmax(logits, dim=-1).gather(1, tgt[s:s + step, None])[:, 0])
            greedy.append(logits.argmax(dim=-1) == tgt[s:s + step])
        lp, gr = torch.cat(logp).double().cpu(), torch.cat(greedy).cpu()
        for i, s, n in spans:
            out[i] = (float(lp[s:s + n].sum()), bool(gr[s:s + n].all()))
        if progress is not None:
            progress(sum(len(r.members) for r in batch))
    return out


def window_of(model) -> int | None:
    """The smallest sliding attention window of any layer (None: full attention everywhere)."""
    windows = [b.attn.window for b in getattr(model, "blocks", []) if getattr(b.attn, "window", None)]
    return min(windows) if windows else None


@torch.no_grad()
def generate_batch(model, tokenizer, contexts: Sequence[list[int]], max_new_tokens: int, stop: Sequence[str] = (),
                   end_ids: frozenset[int] = frozenset(), temperature: float = 0.0, top_k: int | None = None,
                   top_p: float | None = None) -> list[str]:
    """Continue every context together (left-padded, KV cache); each text ends before an end id
    and is cut at its first stop string."""
    device = next(model.parameters()).device
    B, W = len(contexts), max(len(c) for c in contexts)
    pads = torch.tensor([W - len(c) for c in contexts], device=device)[:, None]  # (B, 1)
    idx = torch.zeros(B, W, dtype=torch.long)
    for b, c in enumerate(contexts):
        idx[b, W - len(c):] = torch.tensor(c)
    cache = model.make_cache(B, W + max_new_tokens)
    padded = bool(pads.any())
    if padded:  # each row at its own positions; pads are never looked at (a pad sees itself only)
        valid = torch.arange(W + max_new_tokens, device=device)[None] >= pads  # (B, S)
        positions = (torch.arange(W, device=device)[None] - pads).clamp(min=0)
        mask = valid[:, None, :W] | torch.eye(W, dtype=torch.bool, device=device)
        hidden = final_hidden(model, idx.to(device), cache=cache, positions=positions, mask=mask[:, None])
    else:
        hidden = final_hidden(model, idx.to(device), cache=cache)
    logits = project(model, hidden[:, -1])
    generated: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    tail = 4 * max((len(s) for s in stop), default=0) + 1  # tokens that hold a stop string ending now
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p)  # (B,)
        for b, t in enumerate(nxt.tolist()):
            if done[b]:
                continue
            if t in end_ids:
                done[b] = True
                continue
            generated[b].append(t)
            text = tokenizer.decode(generated[b][-tail:], skip_special_tokens=True)
            done[b] = any(s and s in text for s in stop)
        if all(done) or step == max_new_tokens - 1:
            break
        if padded:
            hidden = final_hidden(model, nxt[:, None], cache=cache, positions=W + step - pads,
                                  mask=valid[:, None, None, :W + step + 1])
        else:
            hidden = final_hidden(model, nxt[:, None], cache=cache)
        logits = project(model, hidden[:, -1])
    texts = []
    for g in generated:
        text = tokenizer.decode(g, skip_special_tokens=True)
        for s in stop:  # lm-eval's post-processing: cut at each stop string in turn
            text = text.split(s)[0] if s else text
        texts.append(text)
    return texts
