"""Instruction data on disk -> conversations, each with the file and line it came from.

Three record shapes, in JSON Lines (one record a line) or a JSON array, mixed freely:

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}   chat, multi-turn
    {"prompt": "...", "completion": "..."}                                          -> user, assistant
    {"instruction": "...", "input": "...", "output": "..."}                          Alpaca ("input" optional)

Every record becomes a list of messages, so all three are rendered by the one chat format
(`render.py`). A record that cannot be used raises `LMForgeError("FILE:LINE: ...")`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import LMForgeError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Conversation:
    """messages: [{"role", "content"}], the last one an assistant answer. where: "FILE:LINE"."""

    messages: tuple[dict[str, str], ...]
    where: str


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """An Alpaca record's user turn: the instruction, then its input after a blank line."""
    return f"{instruction}\n\n{input_text}" if input_text.strip() else instruction


def _text(value: Any, what: str, where: str) -> str:
    if value is None:
        raise LMForgeError(f"{where}: {what} is missing")
    if not isinstance(value, str):
        raise LMForgeError(f"{where}: {what} must be a string, not {type(value).__name__}")
    return value


def _messages(record: Any, where: str) -> list[dict[str, str]]:
    """One record (any of the three shapes) as chat messages."""
    if not isinstance(record, dict):
        raise LMForgeError(f"{where}: a record must be a JSON object, not {type(record).__name__}")
    if "messages" in record:
        raw = record["messages"]
        if not isinstance(raw, list) or not raw:
            raise LMForgeError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        msgs = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or "role" not in m:
                raise LMForgeError(f"{where}: message {i} must be an object with 'role' and 'content'")
            if m["role"] not in ROLES:
                raise LMForgeError(f"{where}: message {i} has unknown role {m['role']!r}; "
                                   f"use one of {', '.join(ROLES)}")
            msgs.append({"role": m["role"], "content": _text(m.get("content"), f"message {i}'s content", where)})
        return msgs
    if "prompt" in record or "completion" in record:
        return [{"role": "user", "content": _text(record.get("prompt"), "'prompt'", where)},
                {"role": "assistant", "content": _text(record.get("completion"), "'completion'", where)}]
    if "instruction" in record or "output" in record:
        instruction = _text(record.get("instruction"), "'instruction'", where)
        input_text = _text(record.get("input") or "", "'input'", where)
        return [{"role": "user", "content": alpaca_prompt(instruction, input_text)},
                {"role": "assistant", "content": _text(record.get("output"), "'output'", where)}]
    raise LMForgeError(f"{where}: a record needs 'messages', 'prompt' + 'completion', or 'instruction' + "
                       f"'output'; this one has {sorted(record)}")


def check_conversation(msgs: list[dict[str, str]], where: str) -> None:
    """The shape every chat template accepts: an optional system message first, then user and
    assistant turns, each answer non-empty, ending in an answer."""
    for i, m in enumerate(msgs):
        if m["role"] == "system" and i != 0:
            raise LMForgeError(f"{where}: message {i} is a system message; only the first message may be one")
        if m["role"] == "assistant" and not m["content"].strip():
            raise LMForgeError(f"{where}: message {i} is an empty assistant turn; give it an answer or drop it")
    body = [m for m in msgs if m["role"] != "system"]
    if not any(m["role"] == "assistant" for m in body):
        raise LMForgeError(f"{where}: the conversation has no assistant turn, so there is nothing to learn")
    if body[0]["role"] != "user":
        raise LMForgeError(f"{where}: the conversation must start with a user turn (after any system message)")
    if body[-1]["role"] != "assistant":
        raise LMForgeError(f"{where}: the conversation ends with a {body[-1]['role']} turn that has no answer")


def _json_array(text: str, path: Path) -> Iterator[tuple[Any, int]]:
    """(element, line) for each element of a top-level JSON array, reading element by element
    so each one keeps the line it starts on."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    expect_item = True
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        line = text.count("\n", 0, pos) + 1
        if pos >= len(text):
            raise LMForgeError(f"{path}:{line}: the JSON array is not closed with ']'")
        if text[pos] == "]":
            return
        if not expect_item:
            if text[pos] != ",":
                raise LMForgeError(f"{path}:{line}: expected ',' or ']' between the array's records")
            pos += 1
            expect_item = True
            continue
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise LMForgeError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        yield value, line
        expect_item = False


def read_records(path: str | Path) -> Iterator[tuple[Any, str]]:
    """(parsed record, "FILE:LINE") for each record in a JSON Lines file or a JSON array."""
    path = Path(path)
    if not path.is_file():
        raise LMForgeError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark, as some editors write, is dropped
    except UnicodeDecodeError as e:
        raise LMForgeError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    if text.lstrip().startswith("["):
        for value, line in _json_array(text, path):
            yield value, f"{path}:{line}"
        return
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise LMForgeError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        yield value, f"{path}:{n}"


def read_conversations(path: str | Path) -> list[Conversation]:
    """Every record of the file, checked, as a Conversation."""
    out = []
    for record, where in read_records(path):
        msgs = _messages(record, where)
        check_conversation(msgs, where)
        out.append(Conversation(tuple(msgs), where))
    return out
