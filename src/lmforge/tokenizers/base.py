"""What every lmforge tokenizer offers, and the JSON file format they share.

A tokenizer file is one JSON object:

    {"format": "lmforge-tokenizer", "version": 1, "kind": "bpe", ...kind-specific fields}

`Tokenizer.load` / `Tokenizer.from_dict` read the header and hand the rest to the class
registered for that "kind" (each subclass registers itself by setting `kind`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from types import MappingProxyType
from typing import Any, ClassVar, Literal, TypeVar, Union

import numpy as np

from ..errors import LMForgeError
from ..fileio import atomic_open, read_json
from .batching import encode_in_processes

FORMAT = "lmforge-tokenizer"
VERSION = 1
EOT = "<|endoftext|>"

# "all": special-token text becomes the special id; "none": it is encoded as ordinary text;
# a set: only those special tokens are recognised.
AllowedSpecial = Union[Literal["all", "none"], "set[str]", "frozenset[str]"]

T = TypeVar("T", bound="Tokenizer")
_KINDS: dict[str, type[Tokenizer]] = {}


class Tokenizer:
    """Base class: text <-> list of token ids, saved as one JSON file."""

    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            _KINDS[cls.kind] = cls

    # --- what a subclass implements -------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids: every id the tokenizer produces is in range(vocab_size)."""
        raise NotImplementedError

    @property
    def eot_id(self) -> int | None:
        """Id of `<|endoftext|>`, or None if the tokenizer has no such token."""
        return None

    def encode(self, text: str, allowed_special: AllowedSpecial = "all") -> list[int]:
        """Text -> ids. Never adds BOS/EOS itself (see `add_bos`)."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids -> text. Special tokens are kept by default (as transformers' decode does), so
        decode(encode(text)) gives the text back; skip_special_tokens=True drops them."""
        raise NotImplementedError

    # --- what chat templates, model import and generation read (defaults for simple kinds) ---
    special_tokens: dict[str, int] = MappingProxyType({})  # type: ignore[assignment]  # text -> id
    add_bos = False  # whether a Hugging Face pipeline prepends BOS to a single sequence

    @property
    def bos_id(self) -> int | None:
        return None

    @property
    def eos_id(self) -> int | None:
        return self.eot_id

    def token_to_id(self, text: str) -> int | None:
        """A token's text (special tokens by name) -> its id, or None."""
        return self.special_tokens.get(text)

    def id_to_token(self, i: int) -> str | None:
        return next((t for t, j in self.special_tokens.items() if j == i), None)

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.id_to_token(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self.id_to_token(self.eos_id)

    @property
    def unk_token(self) -> str | None:
        return None

    @property
    def pad_token(self) -> str | None:
        return None

    def _fields(self) -> dict[str, Any]:
        """The kind-specific part of `to_dict`."""
        raise NotImplementedError

    @classmethod
    def _from_fields(cls: type[T], d: dict[str, Any]) -> T:
        """Build from a dict whose header `from_dict` has already checked."""
        raise NotImplementedError

    # --- shared -----------------------------------------------------------------------------
    def encode_to_array(self, text: str, allowed_special: AllowedSpecial = "all") -> np.ndarray:
        """`encode` as a uint32 array: for long texts headed for a file, where a list of
        Python ints would be built only to be thrown away."""
        return np.asarray(self.encode(text, allowed_special), dtype=np.uint32)

    def encode_batch(
        self, texts: Sequence[str], allowed_special: AllowedSpecial = "all", num_workers: int = 1
    ) -> list[list[int]]:
        """Each text's ids; `num_workers` > 1 spreads a large batch over forked processes."""
        return encode_in_processes(lambda part: [self.encode(text, allowed_special) for text in part],
                                   texts, num_workers)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "kind": self.kind, **self._fields()}

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as JSON; atomic, so a crash never leaves half a file."""
        with atomic_open(path) as f:
            f.write(dumps(self.to_dict()))

    @classmethod
    def from_dict(cls: type[T], d: Any) -> T:
        """Rebuild a tokenizer from `to_dict()` output; on the base class, any kind."""
        kind = check_header(d)
        klass = _KINDS.get(kind)
        if klass is None:
            known = ", ".join(sorted(_KINDS))
            raise LMForgeError(f"unknown tokenizer kind {kind!r} (known: {known}); is lmforge too old?")
        if not issubclass(klass, cls):
            raise LMForgeError(f"this is a {kind!r} tokenizer, not {cls.kind!r}; use load_tokenizer()")
        return klass._from_fields(d)

    @classmethod
    def load(cls: type[T], path: str | os.PathLike) -> T:
        d = read_json(path, what="tokenizer file")
        try:
            return cls.from_dict(d)
        except LMForgeError as e:
            raise LMForgeError(f"{path}: {e}") from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


def check_header(d: Any) -> str:
    """Check the format marker and version of a tokenizer dict; return its kind."""
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        if isinstance(d, dict) and "model" in d and ("added_tokens" in d or "pre_tokenizer" in d):
            raise LMForgeError(
                "this looks like a Hugging Face tokenizer.json, not an lmforge tokenizer file; import its "
                "directory with `lmforge import-hf` (or lmforge.interop.read_hf_tokenizer), or train one "
                "with `lmforge tokenizer train`"
            )
        raise LMForgeError(
            f'not an lmforge tokenizer file (no "format": "{FORMAT}" marker); '
            "create one with `lmforge tokenizer train`"
        )
    version = d.get("version")
    if version != VERSION:
        raise LMForgeError(
            f"unsupported tokenizer file version {version!r} (this lmforge reads version {VERSION}); "
            "upgrade lmforge or retrain the tokenizer"
        )
    kind = d.get("kind")
    if not isinstance(kind, str):
        raise LMForgeError('tokenizer file has no "kind" field; the file is corrupt')
    return kind


def dumps(d: dict[str, Any]) -> str:
    """JSON with one field per line and one line per item of a list of lists (the merges).

    >>> print(dumps({"kind": "bpe", "merges": [[32, 116], [104, 101]]}))
    {
      "kind": "bpe",
      "merges": [
        [32, 116],
        [104, 101]
      ]
    }
    <BLANKLINE>
    """
    fields = []
    for key, value in d.items():
        if isinstance(value, list) and value and all(isinstance(item, list) for item in value):
            items = ",\n".join(f"    {json.dumps(item)}" for item in value)
            fields.append(f"  {json.dumps(key)}: [\n{items}\n  ]")
        else:
            fields.append(f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}")
    return "{\n" + ",\n".join(fields) + "\n}\n"


def as_id_list(ids: Iterable[int]) -> list[int]:
    """Accept a list, a tuple, or a numpy array / torch tensor of ids (via `.tolist()`)."""
    tolist = getattr(ids, "tolist", None)
    return tolist() if tolist is not None else list(ids)
