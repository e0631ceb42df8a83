"""GPT-2's byte table: every byte drawn as a printable character, so that byte-level BPE
vocabularies can be stored as text (a space is "Ġ", a newline "Ċ"). The `tokenizers` library,
transformers and every byte-level tokenizer.json use it."""

from __future__ import annotations

from functools import lru_cache

from ..errors import LMForgeError


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """byte -> printable character. Bytes that print (and are not a space) keep their own
    character; the rest get 256, 257, ... in byte order.

    >>> bytes_to_unicode()[ord("A")], bytes_to_unicode()[ord(" ")], bytes_to_unicode()[ord("\\n")]
    ('A', 'Ġ', 'Ċ')
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


@lru_cache(maxsize=1)
def _latin1_to_table() -> dict[int, str]:
    return {b: c for b, c in bytes_to_unicode().items()}


def text_to_byte_chars(text: str) -> str:
    """The UTF-8 bytes of `text` drawn with the table: "é" -> "Ã©" (one pass in C).

    >>> text_to_byte_chars(" é")
    'ĠÃ©'
    """
    return text.encode("utf-8").decode("latin-1").translate(_latin1_to_table())


def token_to_str(token: bytes) -> str:
    """b" world" -> "Ġworld"."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def str_to_token(text: str) -> bytes:
    """"Ġworld" -> b" world"; a character outside the table is not byte-level BPE."""
    table = unicode_to_bytes()
    try:
        return bytes(table[c] for c in text)
    except KeyError as e:
        raise LMForgeError(f"token {text!r} has the character {e.args[0]!r}, which is not in GPT-2's "
                           "byte table; this is not a byte-level BPE vocabulary") from None
