"""Asking a fine-tuned model the held-out questions: its answer to a conversation's last turn,
and the share of answers that match the reference exactly."""

from __future__ import annotations

from typing import Mapping, Sequence

from ..chat.format import ChatFormat
from .render import Example


def answer(model, tokenizer, fmt: ChatFormat, messages: Sequence[Mapping[str, str]],
           max_new_tokens: int = 64) -> str:
    """The model's greedy answer to `messages` (ending in a user turn), as `lmforge chat` would
    give it: the conversation rendered with the generation prompt, stopped at the format's EOS
    ids or stop strings, surrounding whitespace removed."""
    from ..generation import generate

    ids = fmt.prompt_ids(tokenizer, messages)
    return generate(model, tokenizer, ids, max_new_tokens, temperature=0.0, stop=fmt.stop_strings,
                    stop_ids=fmt.eos_ids).strip()


def exact_match(model, tokenizer, fmt: ChatFormat, examples: Sequence[Example], max_new_tokens: int = 64) -> float:
    """Share of examples whose last answer the model reproduces exactly (after stripping
    whitespace on both sides), given the conversation before it."""
    hits = 0
    for ex in examples:
        msgs = ex.conversation.messages
        hits += answer(model, tokenizer, fmt, msgs[:-1], max_new_tokens) == msgs[-1]["content"].strip()
    return hits / max(len(examples), 1)
