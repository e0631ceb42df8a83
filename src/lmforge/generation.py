"""Text in, text out: encode a prompt, decode the sampled ids, stop at end-of-sequence ids and
stop strings, and stream text as it is produced."""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping, Sequence

import torch

from .detokenize import Detokenizer
from .errors import LMForgeError
from .models.decoding import decode_steps
from .models.speculative import speculative_steps


def _prompt_ids(model, tokenizer, prompt: str | Sequence[int]) -> list[int]:
    if not isinstance(prompt, str):  # already token ids (e.g. a rendered chat)
        return list(prompt)
    ids = tokenizer.encode(prompt) if prompt else []
    if not ids:  # an empty prompt starts from the end-of-text token, or a newline
        eot = getattr(tokenizer, "eot_id", None)
        ids = [eot] if eot is not None else tokenizer.encode("\n")
    return ids


def eos_ids(tokenizer, generation: Mapping | None = None) -> frozenset[int]:
    """The ids that end a sequence: the tokenizer's end-of-text token plus a run's
    `generation.eos_token_id` (one id or a list: instruction-tuned models end a turn with a
    token of their own as well as end-of-text). `generation` is RUN/config.json's "generation"."""
    ids = set()
    eot = getattr(tokenizer, "eot_id", None)
    if eot is not None:
        ids.add(eot)
    eos = (generation or {}).get("eos_token_id")
    if isinstance(eos, int):
        eos = [eos]
    if eos is not None and not (isinstance(eos, list) and all(isinstance(i, int) for i in eos)):
        raise LMForgeError(f"generation.eos_token_id must be an id or a list of ids, not {eos!r}; "
                           "fix the run's config.json")
    return frozenset(ids.union(eos or ()))


def stream(model, tokenizer, prompt: str | Sequence[int], max_new_tokens: int = 100, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
           stop: Sequence[str] = (), num_samples: int = 1, draft=None,
           draft_tokens: int = 4, draft_stats=None, stop_ids: Iterable[int] = (),
           compiled=None) -> Iterator[list[str]]:
    """Yield, at each step, the new text of each of the num_samples continuations (a list of
    strings, '' where a sample has finished or its text is held back: bytes that do not yet form
    a whole character, or what may be the start of a stop string; shown text is never taken back).
    prompt: text, or token ids as they are (e.g. a rendered chat). A sample ends at the
    tokenizer's end-of-text id, at any of stop_ids (e.g. `eos_ids` of a run) or a stop string.
    draft: a smaller model with the same tokenizer for speculative decoding (it proposes
    draft_tokens tokens a round; the output is distributed as the model's own); draft_stats, a
    `SpeculativeStats`, collects how many proposals the model kept. compiled: a
    `models.compiled.CompiledDecoder` of `model`, whose compiled one-token step then decodes."""
    device = next(model.parameters()).device
    ids = _prompt_ids(model, tokenizer, prompt)
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device).manual_seed(seed)
    end = eos_ids(tokenizer) | set(stop_ids)
    detoks = [Detokenizer(tokenizer, stop) for _ in range(num_samples)]
    done = [False] * num_samples
    if draft is not None and compiled is not None:
        raise LMForgeError("speculative decoding runs eager; use a draft or the compiled step, not both")
    if draft is not None:
        if num_samples != 1:
            raise LMForgeError("speculative decoding makes one sample at a time; use num_samples=1 with a draft")
        steps = speculative_steps(model, draft, idx, max_new_tokens, k=draft_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p, generator=gen, stats=draft_stats)
    elif compiled is not None:
        room = compiled.max_len - idx.shape[1]
        if room < 1:
            raise LMForgeError(f"the prompt has {idx.shape[1]} tokens, more than the compiled step's "
                               f"{compiled.max_len} positions")
        steps = compiled.steps(idx, min(max_new_tokens, room), temperature=temperature, top_k=top_k,
                               top_p=top_p, generator=gen)
    else:
        steps = decode_steps(model, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, generator=gen)
    for nxt in steps:
        pieces = []
        for i, t in enumerate(nxt.tolist()):
            if done[i]:
                pieces.append("")
            elif t in end:
                done[i] = True
                pieces.append(detoks[i].flush())
            else:
                pieces.append(detoks[i].push(t))
                done[i] = detoks[i].stopped
        yield pieces
        if all(done):
            break
    tail = [d.flush() for d in detoks]  # what was held back when max_new_tokens ran out
    if any(tail):
        yield tail


def generate(model, tokenizer, prompt: str | Sequence[int], max_new_tokens: int = 100, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop: Sequence[str] = (), num_samples: int = 1, draft=None,
             draft_tokens: int = 4, stop_ids: Iterable[int] = (), compiled=None) -> str | list[str]:
    """The prompt's continuation (without the prompt). With num_samples > 1, a list.
    draft, stop_ids, compiled: see `stream`."""
    if max_new_tokens < 0:
        raise LMForgeError("max_new_tokens must be >= 0")
    texts = [""] * num_samples
    for pieces in stream(model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p,
                         seed, stop, num_samples, draft, draft_tokens, stop_ids=stop_ids, compiled=compiled):
        texts = [t + p for t, p in zip(texts, pieces)]
    return texts[0] if num_samples == 1 else texts
