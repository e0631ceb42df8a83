"""Token ids -> text as they are generated, for streaming: a shown piece is never taken back.

The detokenizer holds back (1) a trailing U+FFFD, which may be the first bytes of a character
whose other bytes are still to come, and (2) any tail that could be the beginning of a stop
string. `lmforge.generation.stream` and the server use it."""

from __future__ import annotations

from typing import Sequence


def stop_hold(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string.

    >>> stop_hold("Hello\\nUs", ["\\nUser:"])
    3
    """
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class Detokenizer:
    """Accumulates the ids of one sequence; `push` returns the new text that is safe to show."""

    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.shown = 0  # characters of the decoded text already returned
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one id. Returns the text to show now; sets `stopped` when a stop string appeared
        (the stop string and what follows it are never shown)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        cuts = [i for i in (text.find(s, max(0, self.shown - len(s))) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped = True
            end = max(min(cuts), self.shown)
            piece, self.shown = text[self.shown:end], end
            return piece
        end = len(text.rstrip("\ufffd"))  # maybe half a character: wait for its other bytes
        end -= stop_hold(text[:end], self.stops)
        if end <= self.shown:
            return ""
        piece, self.shown = text[self.shown:end], end
        return piece

    def flush(self) -> str:
        """The held-back tail, once the sequence has ended without a stop string."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids)
        piece, self.shown = text[self.shown:], len(text)
        return piece
