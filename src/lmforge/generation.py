"""Text in, text out: encode a prompt, decode the sampled ids, stop at stop strings, and
stream text as it is produced."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .errors import LMForgeError
from .models.decoding import decode_steps
from .models.speculative import speculative_steps


def _prompt_ids(model, tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.encode(prompt) if prompt else []
    if not ids:  # an empty prompt starts from the end-of-text token, or a newline
        eot = getattr(tokenizer, "eot_id", None)
        ids = [eot] if eot is not None else tokenizer.encode("\n")
    return ids


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stop if s and s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


def stream(model, tokenizer, prompt: str, max_new_tokens: int = 100, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
           stop: Sequence[str] = (), num_samples: int = 1, draft=None,
           draft_tokens: int = 4, draft_stats=None) -> Iterator[list[str]]:
    """Yield, at each step, the new text of each of the num_samples continuations (a list of
    strings, '' where a sample has finished or its bytes do not yet form a whole character).
    draft: a smaller model with the same tokenizer for speculative decoding (it proposes
    draft_tokens tokens a round; the output is distributed as the model's own); draft_stats, a
    `SpeculativeStats`, collects how many proposals the model kept."""
    device = next(model.parameters()).device
    ids = _prompt_ids(model, tokenizer, prompt)
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device).manual_seed(seed)
    new: list[list[int]] = [[] for _ in range(num_samples)]
    shown = [""] * num_samples
    done = [False] * num_samples
    eot = getattr(tokenizer, "eot_id", None)
    if draft is not None:
        if num_samples != 1:
            raise LMForgeError("speculative decoding makes one sample at a time; use num_samples=1 with a draft")
        steps = speculative_steps(model, draft, idx, max_new_tokens, k=draft_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p, generator=gen, stats=draft_stats)
    else:
        steps = decode_steps(model, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, generator=gen)
    for nxt in steps:
        pieces = []
        for i, t in enumerate(nxt.tolist()):
            if done[i] or t == eot:
                done[i] = True
                pieces.append("")
                continue
            new[i].append(t)
            text = tokenizer.decode(new[i])
            text, hit = _cut_at_stop(text, stop)
            if hit:
                done[i] = True
            elif text.endswith("\ufffd"):  # maybe half a character: wait for its other bytes
                pieces.append("")
                continue
            pieces.append(text[len(shown[i]):])
            shown[i] = text
        yield pieces
        if all(done):
            break
    # flush what was held back (e.g. a truly invalid byte at the very end)
    tail = []
    for i in range(num_samples):
        text, _ = _cut_at_stop(tokenizer.decode(new[i]), stop)
        tail.append(text[len(shown[i]):] if text.startswith(shown[i]) else "")
    if any(tail):
        yield tail


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 100, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop: Sequence[str] = (), num_samples: int = 1, draft=None,
             draft_tokens: int = 4) -> str | list[str]:
    """The prompt's continuation (without the prompt). With num_samples > 1, a list.
    draft: see `stream`."""
    if max_new_tokens < 0:
        raise LMForgeError("max_new_tokens must be >= 0")
    texts = [""] * num_samples
    for pieces in stream(model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p,
                         seed, stop, num_samples, draft, draft_tokens):
        texts = [t + p for t, p in zip(texts, pieces)]
    return texts[0] if num_samples == 1 else texts
