"""Character-level tokenizer: one id per distinct character of the training text.

The simplest tokenizer that works (char-level Shakespeare in nanoGPT): no merges, no special
tokens. Ids are the positions of the characters in the sorted vocabulary string.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import LMForgeError
from .base import AllowedSpecial, Tokenizer, as_id_list


class CharTokenizer(Tokenizer):
    """Maps each character of `chars` to its index.

    >>> tok = CharTokenizer.train("hello")
    >>> tok.chars, tok.encode("hole")
    ('ehlo', [1, 3, 2, 0])
    >>> tok.decode([1, 0])
    'he'
    """

    kind = "char"

    def __init__(self, chars: str):
        if not isinstance(chars, str) or not chars:
            raise LMForgeError("a character tokenizer needs a non-empty string of characters")
        if len(set(chars)) != len(chars):
            dup = next(c for c in chars if chars.count(c) > 1)
            raise LMForgeError(f"character {dup!r} appears twice in the vocabulary; the file is corrupt")
        self.chars = chars
        self._id_of = {c: i for i, c in enumerate(chars)}

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        """Vocabulary = the sorted set of characters in `text`."""
        if not text:
            raise LMForgeError("cannot train a character tokenizer on empty text")
        return cls("".join(sorted(set(text))))

    from_text = train

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str, allowed_special: AllowedSpecial = "all") -> list[int]:
        """`allowed_special` is accepted for interface compatibility; there are no specials."""
        id_of = self._id_of
        try:
            return [id_of[c] for c in text]
        except KeyError as e:
            raise LMForgeError(
                f"character {e.args[0]!r} is not in the vocabulary: the tokenizer was trained on "
                "other text; retrain it on text that contains this character"
            ) from None

    def token_to_id(self, text: str) -> int | None:
        return self._id_of.get(text)

    def id_to_token(self, i: int) -> str | None:
        return self.chars[i] if type(i) is int and 0 <= i < len(self.chars) else None

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        chars, n = self.chars, len(self.chars)
        ids = as_id_list(ids)
        for i in ids:
            if not (isinstance(i, int) and 0 <= i < n):
                raise LMForgeError(f"token id {i!r} is out of range for this tokenizer (vocab size {n})")
        return "".join([chars[i] for i in ids])

    def _fields(self) -> dict[str, Any]:
        return {"chars": self.chars}

    @classmethod
    def _from_fields(cls, d: dict[str, Any]) -> CharTokenizer:
        chars = d.get("chars")
        if not isinstance(chars, str) or not chars:
            raise LMForgeError('char tokenizer file has no "chars" string; the file is corrupt')
        return cls(chars)
