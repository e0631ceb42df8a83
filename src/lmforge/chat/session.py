"""A conversation with a model: the history, each reply streamed as it is generated, and the
oldest turns dropped when the rendered history no longer fits the model's context."""

from __future__ import annotations

from typing import Iterator

from .format import ChatFormat


class ChatSession:
    """messages so far (the system message first, if any); `reply` adds a user turn and streams
    the assistant's answer, which joins the history once it is complete (or interrupted)."""

    def __init__(self, model, tokenizer, fmt: ChatFormat, system: str | None = None,
                 max_new_tokens: int = 256, seed: int | None = None, context: int | None = None, **sampling):
        self.model, self.tokenizer, self.fmt = model, tokenizer, fmt
        self.context = min(context or model.config.block_size, model.config.block_size)  # positions a turn may use
        self.system, self.max_new_tokens, self.seed, self.sampling = system, max_new_tokens, seed, sampling
        self.messages: list[dict[str, str]] = []
        self.turns = 0  # replies so far: turn t samples with seed + t
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self) -> list[int]:
        """The history rendered and encoded; while it leaves no room for max_new_tokens in the
        context, the oldest user/assistant exchange is dropped (never the system message or the
        latest user turn)."""
        block = self.context
        while True:
            ids = self.fmt.prompt_ids(self.tokenizer, self.messages)
            first = 1 if self.messages[0]["role"] == "system" else 0
            if len(ids) + self.max_new_tokens <= block or len(self.messages) - first <= 1:
                return ids  # what still does not fit slides out of the window as generation goes on
            del self.messages[first:first + 2]

    def reply(self, text: str) -> Iterator[str]:
        """Add the user's message and yield the answer's text piece by piece."""
        from ..generation import stream

        self.messages.append({"role": "user", "content": text})
        try:
            ids = self.prompt_ids()
        except Exception:  # e.g. the template refuses the conversation: it stays as it was
            self.messages.pop()
            raise
        seed = None if self.seed is None else self.seed + self.turns
        self.turns += 1
        answer = []
        try:
            for pieces in stream(self.model, self.tokenizer, ids, self.max_new_tokens, seed=seed,
                                 stop=self.fmt.stop_strings, stop_ids=self.fmt.eos_ids, **self.sampling):
                answer.append(pieces[0])
                yield pieces[0]
        finally:  # also when the caller stops early (Ctrl-C): the partial answer is what was said
            self.messages.append({"role": "assistant", "content": "".join(answer).strip()})
