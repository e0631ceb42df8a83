"""A conversation -> token ids and the loss mask: which tokens are the assistant's answers.

The mask comes from the rendered text itself, so it holds for any chat template:

1. Render the whole conversation (no generation prompt).
2. For each assistant message i, render messages[:i] with the generation prompt (what the model
   is given at chat time) and messages[:i+1] without it. The answer's characters run from the
   end of the first to the end of the second, cut after the last special token written after
   the answer's own text (its end-of-turn token: <|im_end|>, <|eot_id|>, <end_of_turn>, </s>),
   so that token is learned and what the template writes after it (a newline before the next
   turn) is not. A template that writes no special token after the answer trains the whole turn.
3. Tokenize the text segment by segment (prompt, answer, prompt, ...): a token never straddles
   an answer's edge, and the answer's first token is the one the model must produce after the
   prompt's tokens, as at chat time, where the prompt is encoded alone.

Runs without a template use the plain "User:/Assistant:" format (`chat.plain`), where each
answer ends with the tokenizer's end-of-text token (generation stops there), or, for a
tokenizer without one (the character tokenizer), with the newline that ends its line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..chat.format import ChatFormat
from ..chat.plain import ROLE_NAMES
from ..errors import LMForgeError
from .records import Conversation


@dataclass(frozen=True)
class Example:
    """ids: the conversation's tokens. answer: True where a token is part of an assistant turn
    (its end-of-turn token included). loss: True where predicting the token counts in the loss
    (answer, or every token with --train-on-prompt)."""

    ids: np.ndarray  # (L,) int64
    answer: np.ndarray  # (L,) bool
    loss: np.ndarray  # (L,) bool
    conversation: Conversation
    edges_match: bool | None = None  # the same ids as the whole text encoded at once (None: not checked)

    def __len__(self) -> int:
        return len(self.ids)

    def inputs_and_targets(self) -> tuple[np.ndarray, np.ndarray]:
        """x = ids[:-1], y = ids[1:] with -1 (ignored) where the predicted token does not count."""
        return self.ids[:-1], np.where(self.loss[1:], self.ids[1:], -1)


def end_markers(fmt: ChatFormat, tokenizer) -> list[str]:
    """The strings that may end an assistant turn: the tokenizer's special tokens, the
    template's special-token strings and the text of each of the run's EOS ids."""
    marks = set(getattr(tokenizer, "special_tokens", {}) or {})
    if fmt.template is not None:
        marks.update(fmt.template.special_tokens.values())
    marks.update(tokenizer.id_to_token(i) for i in fmt.eos_ids)
    return sorted(m for m in marks if m)


def end_of_turn(turn: str, content: str, marks: list[str]) -> int:
    """Where the answer ends in `turn` (the text the template writes for it): after the last
    special token that follows the answer's own text (its end-of-turn token), else at the end."""
    body = turn.rfind(content.strip()) if content.strip() else -1
    after = body + len(content.strip()) if body >= 0 else 0
    return max((turn.rfind(m) + len(m) for m in marks if turn.find(m, after) >= 0), default=len(turn))


def plain_eos(tokenizer) -> str | None:
    """The text of the tokenizer's end-of-text token, which ends each plain-format answer."""
    eot = getattr(tokenizer, "eot_id", None)
    return None if eot is None else tokenizer.id_to_token(eot)


def render_plain_spans(messages: Sequence[Mapping[str, str]], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The plain format with its answers' spans:
    "User: Hi\\nAssistant: Hello!<|endoftext|>" and [(19, 39)] (the answer " Hello!<|endoftext|>")."""
    eos = plain_eos(tokenizer)
    text, spans = "", []
    for i, m in enumerate(messages):
        text += ("\n" if i else "") + f"{ROLE_NAMES[m['role']]}:"
        start = len(text)
        text += f" {m['content']}" + (eos if m["role"] == "assistant" and eos is not None else "")
        if m["role"] == "assistant":  # without an EOS token, the newline that ends the line ends the answer
            spans.append((start, len(text) + (eos is None)))
    if eos is None and messages and messages[-1]["role"] == "assistant":
        text += "\n"
    return text, spans


def render_template_spans(fmt: ChatFormat, messages: Sequence[Mapping[str, str]], tokenizer,
                          where: str) -> tuple[str, list[tuple[int, int]]]:
    """The template's rendering of the conversation and its answers' character spans."""
    full = fmt.render(messages, tokenizer, add_generation_prompt=False)
    marks = end_markers(fmt, tokenizer)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = fmt.render(messages[:i], tokenizer, add_generation_prompt=True)
        upto = fmt.render(messages[:i + 1], tokenizer, add_generation_prompt=False)
        if not upto.startswith(prompt) or not full.startswith(upto):
            raise LMForgeError(f"{where}: the chat template renders the turns before answer {i} differently "
                               f"once the answer follows, so the answer's tokens cannot be found; "
                               f"train on whole texts with --train-on-prompt or use another template")
        turn = upto[len(prompt):]
        cut = end_of_turn(turn, m["content"], marks)
        if not turn[:cut].strip():
            raise LMForgeError(f"{where}: the chat template wrote nothing for answer {i}")
        spans.append((len(prompt), len(prompt) + cut))
    return full, spans


def render_spans(fmt: ChatFormat, messages: Sequence[Mapping[str, str]], tokenizer,
                 where: str = "conversation") -> tuple[str, list[tuple[int, int]]]:
    """(text, [(start, end) of each answer]) in the run's chat format."""
    if fmt.template is None:
        return render_plain_spans(messages, tokenizer)
    return render_template_spans(fmt, messages, tokenizer, where)


def encode_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Tokenize text segment by segment at the span edges: (ids, True for a span's tokens).
    BOS is prepended when the tokenizer adds one and the text does not start with it (as
    `ChatFormat.encode` does)."""
    ids: list[int] = []
    answer: list[bool] = []
    pos = 0
    for start, end in spans + [(len(text), len(text))]:
        for piece, inside in ((text[pos:start], False), (text[start:end], True)):
            if piece:
                part = tokenizer.encode(piece)
                ids += part
                answer += [inside] * len(part)
        pos = end
    bos = getattr(tokenizer, "bos_id", None)
    if getattr(tokenizer, "add_bos", False) and bos is not None and ids[:1] != [bos]:
        ids, answer = [bos] + ids, [False] + answer
    return ids, answer


def encode_conversation(conv: Conversation, tokenizer, fmt: ChatFormat, train_on_prompt: bool = False,
                        check_edges: bool = False) -> Example:
    """One conversation as an Example (not yet cut to any length). check_edges: also encode the
    text whole and record whether its ids are the same (`Example.edges_match`)."""
    text, spans = render_spans(fmt, conv.messages, tokenizer, conv.where)
    try:
        ids, answer = encode_spans(tokenizer, text, spans)
        match = fmt.encode(tokenizer, text) == ids if check_edges else None
    except LMForgeError as e:  # e.g. a character the character tokenizer has never seen
        raise LMForgeError(f"{conv.where}: {e}") from None
    answer_arr = np.array(answer, dtype=bool)
    loss = np.ones_like(answer_arr) if train_on_prompt else answer_arr
    return Example(np.array(ids, dtype=np.int64), answer_arr, loss, conv, match)
