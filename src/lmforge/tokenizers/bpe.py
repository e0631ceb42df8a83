"""Byte-level BPE tokenizer (GPT-2 / GPT-4 style), encoding fast through tiktoken.

The model is `ranks: dict[bytes, int]`, tiktoken's representation: the bytes of every token
and its id, which is also its merge priority (a lower rank merges first). Ids 0..255 are the
256 single bytes (identity order for trained tokenizers; GPT-2 permutes them), merged tokens
follow, special tokens come last. `merges` (pairs of ids in rank order) are derived from the
ranks and are what the JSON file stores:

    {"format": "lmforge-tokenizer", "version": 1, "kind": "bpe", "pattern": "gpt4",
     "merges": [[32, 116], ...], "special_tokens": {"<|endoftext|>": 4095}}

plus "byte_order" (the byte value of ids 0..255) only when it is not the identity.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import regex

from ..errors import LMForgeError
from .base import EOT, AllowedSpecial, Tokenizer, as_id_list
from .batching import encode_in_processes, gc_paused
from .byte_table import str_to_token, token_to_str
from .bpe_train import count_chunks, read_blocks, train_merges

# Pre-tokenization: text is split into chunks with these regexes, and merges never cross a
# chunk boundary (so " dog" and "dog." stay separate words). Copied from tiktoken.
PATTERNS = {
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
}


def resolve_pattern(pattern: str) -> str:
    """A pattern name ("gpt2", "gpt4") or a regex -> the regex. A bare word must be a name."""
    if isinstance(pattern, str) and pattern in PATTERNS:
        return PATTERNS[pattern]
    if not isinstance(pattern, str) or regex.fullmatch(r"\w*", pattern):
        raise LMForgeError(f"unknown split pattern {pattern!r}: use one of {', '.join(PATTERNS)} or a regex")
    try:
        regex.compile(pattern)
    except regex.error as e:
        raise LMForgeError(f"split pattern is not a valid regex ({e}): {pattern!r}") from None
    return pattern


def bpe_parts(ranks: dict[bytes, int], chunk: bytes, max_rank: int | None = None) -> list[bytes]:
    """Split one chunk into tokens: start from single bytes and repeatedly merge the adjacent
    pair whose merged bytes have the lowest rank (leftmost on a tie), until no pair is a token.

    This is the reference the tiktoken path is tested against. With `max_rank`, only tokens
    ranked below it may be used, which recovers the merge that created the token `max_rank`.

    >>> ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"abc": 4}
    >>> bpe_parts(ranks, b"abcab")
    [b'abc', b'ab']
    >>> bpe_parts(ranks, b"abc", max_rank=4)  # token 4 was made by merging (ab, c)
    [b'ab', b'c']
    """
    parts = [chunk[i : i + 1] for i in range(len(chunk))]
    while len(parts) > 1:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (max_rank is None or rank < max_rank):
                if best_rank is None or rank < best_rank:
                    best_rank, best_i = rank, i
        if best_rank is None:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def ranks_from_merges(
    merges: Sequence[Sequence[int]], byte_order: Sequence[int] | None = None
) -> dict[bytes, int]:
    """Id i < 256 is the byte `byte_order[i]`; merge k makes id 256 + k from two earlier ids.

    >>> ranks = ranks_from_merges([(104, 105), (256, 33)])
    >>> ranks[b"hi"], ranks[b"hi!"]
    (256, 257)
    """
    if byte_order is None:
        byte_order = range(256)
    elif sorted(byte_order) != list(range(256)):
        raise LMForgeError("byte_order must list each of the 256 byte values once; the file is corrupt")
    corrupt = "the merges are inconsistent (a corrupt or edited file?)"
    vocab = [bytes([b]) for b in byte_order]
    ranks = {token: i for i, token in enumerate(vocab)}
    for k, pair in enumerate(merges):
        new_id = 256 + k
        ok = isinstance(pair, (list, tuple)) and len(pair) == 2
        if not (ok and all(type(i) is int and 0 <= i < new_id for i in pair)):
            raise LMForgeError(f"merge #{k} {pair!r} is not a pair of earlier ids (< {new_id}); {corrupt}")
        token = vocab[pair[0]] + vocab[pair[1]]
        if token in ranks:
            old = ranks[token]
            raise LMForgeError(f"merge #{k} {list(pair)} makes {token!r}, already token {old}; {corrupt}")
        vocab.append(token)
        ranks[token] = new_id
    return ranks


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[int, int]]:
    """Recover the merge pair of every token of 2+ bytes, in rank order (as minbpe does for GPT-4).

    >>> merges_from_ranks({**{bytes([b]): b for b in range(256)}, b"hi": 256, b"hi!": 257})
    [(104, 105), (256, 33)]
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            parts = bpe_parts(ranks, token, max_rank=rank)
            if len(parts) != 2:
                raise LMForgeError(f"token {rank} {token!r} cannot be made by merging two earlier tokens")
            merges.append((ranks[parts[0]], ranks[parts[1]]))
    return merges


class BPETokenizer(Tokenizer):
    """Byte-level BPE: lossless on any text, ids from `ranks`, specials never split."""

    kind = "bpe"

    def __init__(
        self, ranks: dict[bytes, int], pattern: str = "gpt4", special_tokens: dict[str, int] | None = None
    ):
        if sorted(ranks.values()) != list(range(len(ranks))) or len(ranks) < 256:
            raise LMForgeError("BPE ranks must number the tokens 0, 1, 2, ... with no gaps")
        if any(len(token) != 1 for token, i in ranks.items() if i < 256):
            raise LMForgeError("BPE ids 0..255 must be the 256 single bytes")
        special_tokens = dict(special_tokens or {})
        for text, i in special_tokens.items():
            if not isinstance(text, str) or not text or type(i) is not int or i < len(ranks):
                raise LMForgeError(
                    f"special token {text!r}: {i!r} needs a non-empty name and an id >= {len(ranks)}"
                )
        if len(set(special_tokens.values())) != len(special_tokens):
            raise LMForgeError("two special tokens share an id; the file is corrupt")
        self.ranks = ranks
        self.pattern = pattern  # a name from PATTERNS or a regex, kept as given for saving
        self.pat_str = resolve_pattern(pattern)
        self.special_tokens = special_tokens
        self._decoder = {i: token for token, i in ranks.items()}
        self._decoder.update({i: text.encode("utf-8") for text, i in special_tokens.items()})
        self._vocab_size = max(self._decoder) + 1
        self._merges: list[tuple[int, int]] | None = None  # derived lazily from ranks
        self._encoding = None  # tiktoken.Encoding, built lazily

    @classmethod
    def from_merges(
        cls,
        merges: Sequence[Sequence[int]],
        pattern: str = "gpt4",
        special_tokens: dict[str, int] | None = None,
        byte_order: Sequence[int] | None = None,
    ) -> BPETokenizer:
        """Build from merges in rank order; `byte_order[i]` is the byte of id i (default i)."""
        tok = cls(ranks_from_merges(merges, byte_order), pattern, special_tokens)
        tok._merges = [(a, b) for a, b in merges]
        return tok

    @classmethod
    def train(
        cls,
        text_or_files: str | os.PathLike | Iterable[str | os.PathLike],
        vocab_size: int,
        pattern: str = "gpt4",
        special_tokens: Sequence[str] = (EOT,),
        progress: bool = False,
    ) -> BPETokenizer:
        """Learn merges from a text (a str) or from files (a path or a list of paths).

        `vocab_size` counts the 256 bytes, the merges and the special tokens. If the text runs
        out of pairs first the vocabulary is smaller. Files are streamed in blocks, so they may
        be larger than memory; special-token text in the data is cut out before counting.
        """
        special_tokens = list(special_tokens)
        distinct = len(set(special_tokens)) == len(special_tokens)
        if not distinct or not all(isinstance(s, str) and s for s in special_tokens):
            raise LMForgeError(f"special tokens must be distinct non-empty strings, got {special_tokens!r}")
        smallest = 256 + len(special_tokens)
        if type(vocab_size) is not int or vocab_size < smallest:
            raise LMForgeError(
                f"vocab size {vocab_size} is too small: it must be at least 256 (bytes) "
                f"+ {len(special_tokens)} (special tokens) = {smallest}"
            )
        pat_str = resolve_pattern(pattern)
        if isinstance(text_or_files, str):
            blocks: Iterable[str] = [text_or_files]
        elif isinstance(text_or_files, os.PathLike):
            blocks = read_blocks([text_or_files])
        else:
            blocks = read_blocks(list(text_or_files))
        chunk_counts = count_chunks(blocks, pat_str, special_tokens)
        if not chunk_counts:
            raise LMForgeError("no training text: the input is empty")
        merges = train_merges(chunk_counts, vocab_size - smallest, progress)
        first = 256 + len(merges)
        return cls.from_merges(merges, pattern, {s: first + k for k, s in enumerate(special_tokens)})

    # --- properties ----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eot_id(self) -> int | None:
        return self.special_tokens.get(EOT)

    @property
    def merges(self) -> list[tuple[int, int]]:
        if self._merges is None:
            self._merges = merges_from_ranks(self.ranks)
        return self._merges

    @property
    def byte_order(self) -> list[int]:
        """byte_order[i] is the byte value of token id i, for i < 256."""
        return [self._decoder[i][0] for i in range(256)]

    # --- encoding --------------------------------------------------------------------------
    def encode(self, text: str, allowed_special: AllowedSpecial = "all") -> list[int]:
        """Text -> ids. "all": special-token text becomes its id; "none": it is ordinary text."""
        allowed = self._allowed(allowed_special)
        return self.encoding.encode(text, allowed_special=allowed, disallowed_special=())

    def encode_to_array(self, text: str, allowed_special: AllowedSpecial = "all") -> np.ndarray:
        allowed = self._allowed(allowed_special)
        return self.encoding.encode_to_numpy(text, allowed_special=allowed, disallowed_special=())

    def encode_batch(
        self, texts: Sequence[str], allowed_special: AllowedSpecial = "all", num_workers: int = 1
    ) -> list[list[int]]:
        """Each text's ids, as `encode` gives them. `num_workers` > 1 splits a large batch
        (thousands of texts) over that many forked processes (Linux and macOS)."""
        allowed = self._allowed(allowed_special)
        enc = self.encoding

        # A plain loop, not tiktoken's encode_batch: that submits every text separately to a
        # thread pool, which costs more than encoding a short line (10x slower on 250k lines of
        # prose here). Threads cannot share this loop either (1.5x slower: the GIL).
        # The garbage collector is paused meanwhile: scanning the growing batch of int lists
        # took a fifth of the time on 250k lines (docs/benchmarks.md).
        def encode_slice(part: Sequence[str]) -> list[list[int]]:
            with gc_paused():
                if not allowed:  # no special tokens to look for: the cheaper call
                    return [enc.encode_ordinary(text) for text in part]
                return [enc.encode(text, allowed_special=allowed, disallowed_special=()) for text in part]

        return encode_in_processes(encode_slice, texts, num_workers)

    def encode_reference(self, text: str, allowed_special: AllowedSpecial = "all") -> list[int]:
        """Slow pure-Python encoder with the same result as `encode` (for tests).

        One known difference: the `regex` module and tiktoken's Rust regex use different
        Unicode versions, so on code points assigned recently (e.g. U+A7CE, Unicode 16) the
        split into chunks, and so the ids, may differ. Both stay lossless.
        """
        allowed = sorted(self._allowed(allowed_special), key=len, reverse=True)
        segments = regex.split(f"({'|'.join(map(regex.escape, allowed))})", text) if allowed else [text]
        ids: list[int] = []
        for k, segment in enumerate(segments):
            if k % 2:  # odd positions are the special tokens the split captured
                ids.append(self.special_tokens[segment])
                continue
            for chunk in regex.findall(self.pat_str, segment):
                ids.extend(self.ranks[part] for part in bpe_parts(self.ranks, chunk.encode("utf-8")))
        return ids

    @property
    def encoding(self):
        """The `tiktoken.Encoding` for these ranks (built on first use, then cached)."""
        if self._encoding is None:
            import tiktoken

            try:
                self._encoding = tiktoken.Encoding(
                    name="lmforge-bpe",
                    pat_str=self.pat_str,
                    mergeable_ranks=self.ranks,
                    special_tokens=self.special_tokens,
                )
            except ValueError as e:
                raise LMForgeError(f"tiktoken cannot use this split pattern ({e})") from None
        return self._encoding

    def _allowed(self, allowed_special: AllowedSpecial) -> set[str]:
        if allowed_special == "all":
            return set(self.special_tokens)
        if allowed_special == "none":
            return set()
        if isinstance(allowed_special, str):
            raise LMForgeError(f'allowed_special must be "all", "none" or a set, not {allowed_special!r}')
        allowed = set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            has = sorted(self.special_tokens)
            raise LMForgeError(f"unknown special token {sorted(unknown)[0]!r}; this tokenizer has {has}")
        return allowed

    # --- decoding --------------------------------------------------------------------------
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = as_id_list(ids)
        decoder = self._decoder
        try:
            return b"".join([decoder[i] for i in ids])
        except (KeyError, TypeError):
            bad = next(i for i in ids if not isinstance(i, int) or i not in decoder)
            last = self.vocab_size - 1
            raise LMForgeError(f"token id {bad!r} is not in the tokenizer's vocabulary (0..{last})") from None

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids -> text; bytes that are not valid UTF-8 (a cut-off character) become U+FFFD."""
        if skip_special_tokens:
            specials = set(self.special_tokens.values())
            ids = [i for i in as_id_list(ids) if i not in specials]
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_to_id(self, text: str) -> int | None:
        """Special tokens by name, others in GPT-2's byte-table spelling ("Ġworld")."""
        if text in self.special_tokens:
            return self.special_tokens[text]
        try:
            return self.ranks.get(str_to_token(text))
        except LMForgeError:
            return None

    def id_to_token(self, i: int) -> str | None:
        token = self._decoder.get(i)
        if token is None or i in self.special_tokens.values():
            return super().id_to_token(i)
        return token_to_str(token)

    # --- saving ----------------------------------------------------------------------------
    def _fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "pattern": self.pattern,
            "merges": [list(pair) for pair in self.merges],
            "special_tokens": dict(self.special_tokens),
        }
        if self.byte_order != list(range(256)):
            fields["byte_order"] = self.byte_order
        return fields

    @classmethod
    def _from_fields(cls, d: dict[str, Any]) -> BPETokenizer:
        pattern, merges, specials = d.get("pattern"), d.get("merges"), d.get("special_tokens", {})
        if not isinstance(pattern, str):
            raise LMForgeError('bpe tokenizer file has no "pattern" string; the file is corrupt')
        if not isinstance(merges, list):
            raise LMForgeError('bpe tokenizer file has no "merges" list; the file is corrupt')
        if not isinstance(specials, dict):
            raise LMForgeError('"special_tokens" must map token text to id; the file is corrupt')
        return cls.from_merges(merges, pattern, specials, d.get("byte_order"))

    def __getstate__(self) -> dict[str, Any]:
        # tiktoken's Encoding is not picklable; rebuild it lazily after unpickling.
        return {**self.__dict__, "_encoding": None}
