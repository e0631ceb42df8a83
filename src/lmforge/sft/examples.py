"""A data file -> Examples cut to --max-length, and the held-out split.

Over-long examples (more tokens than max_length) are truncated (the end is cut off) or
dropped; either way they are counted. An example whose prompt alone fills max_length (no
answer token would remain to learn) is an error, as is a file with no usable example."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..chat.format import ChatFormat
from ..errors import LMForgeError
from .records import read_conversations
from .render import Example, encode_conversation

OVERLONG = ("truncate", "drop")
VAL_FRACTION = 0.05


@dataclass
class ExampleSet:
    """The usable examples of one file, and what happened to the rest."""

    path: Path
    examples: list[Example] = field(default_factory=list)
    records: int = 0  # records read
    truncated: int = 0
    dropped: int = 0
    split_edges: int = 0  # examples whose segment-wise tokens differ from the whole text's

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self):
        return iter(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    def summary(self, max_length: int) -> str:
        """One line for the user: how many examples, and how many were cut or dropped."""
        parts = [f"{self.path}: {len(self.examples)} examples"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to --max-length {max_length}")
        if self.dropped:
            parts.append(f"{self.dropped} dropped as longer than --max-length {max_length}")
        if self.split_edges:
            parts.append(f"{self.split_edges} tokenized at an answer's edge differently than as one text")
        return ", ".join(parts)


def fit_length(ex: Example, max_length: int, overlong: str) -> Example | None:
    """The example cut to max_length tokens (None: dropped)."""
    if not ex.answer.any():
        raise LMForgeError(f"{ex.conversation.where}: the answer has no tokens")
    prompt = int(ex.answer.argmax())  # tokens before the first answer token
    if prompt >= max_length:
        raise LMForgeError(f"{ex.conversation.where}: the prompt alone is {prompt} tokens, so --max-length "
                           f"{max_length} leaves no room for the answer; shorten it or raise --max-length")
    if len(ex) <= max_length:
        return ex
    if overlong == "drop":
        return None
    return replace(ex, ids=ex.ids[:max_length], answer=ex.answer[:max_length], loss=ex.loss[:max_length])


def load_examples(path: str | Path, tokenizer, chat_format: ChatFormat, max_length: int,
                  overlong: str = "truncate", train_on_prompt: bool = False,
                  check_edges: bool = True) -> ExampleSet:
    """Read, render, tokenize and cut every record of a chat / prompt-completion / Alpaca file.
    check_edges: also encode each text whole and count those whose tokens differ (reported)."""
    if overlong not in OVERLONG:
        raise LMForgeError(f"--overlong must be one of {', '.join(OVERLONG)}, not {overlong!r}")
    if max_length < 2:
        raise LMForgeError(f"--max-length must be at least 2 tokens, not {max_length}")
    out = ExampleSet(Path(path))
    for conv in read_conversations(path):
        out.records += 1
        ex = encode_conversation(conv, tokenizer, chat_format, train_on_prompt, check_edges)
        out.split_edges += ex.edges_match is False
        fitted = fit_length(ex, max_length, overlong)
        if fitted is None:
            out.dropped += 1
            continue
        out.truncated += len(fitted) < len(ex)
        out.examples.append(fitted)
    if not out.examples:
        why = f" ({out.dropped} longer than --max-length {max_length}, dropped)" if out.dropped else ""
        raise LMForgeError(f"{path}: no usable example{why}; the file needs at least one conversation "
                           f"with an answer")
    return out


def hold_out(examples: list[Example], seed: int, fraction: float = VAL_FRACTION) -> tuple[list[Example], list[Example]]:
    """(train, val): a seeded random `fraction` of the examples (at least one) for validation."""
    n = len(examples)
    if n < 2:
        raise LMForgeError(f"{n} usable example cannot be split into training and validation; "
                           f"add examples or pass --val FILE")
    n_val = max(1, round(fraction * n))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in val], [examples[i] for i in sorted(val)]
