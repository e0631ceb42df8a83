"""Tokenizers: text <-> token ids.

    from lmforge.tokenizers import BPETokenizer, load_tokenizer
    tok = BPETokenizer.train("input.txt-as-text", vocab_size=4096)   # or a list of file paths
    tok.save("tok.json")
    tok = load_tokenizer("tok.json")          # any kind, dispatched on the file's "kind"
    ids = tok.encode("To be, or not to be")   # list[int]; tok.decode(ids) gives the text back

Every tokenizer has `kind`, `vocab_size`, `eot_id` (id of <|endoftext|> / EOS or None), `encode`
(never adds BOS/EOS), `encode_batch`, `decode(ids, skip_special_tokens=False)`, `to_dict`, `save`,
`load`, and for chat templates and generation `bos_id`, `eos_id`, `add_bos`, `special_tokens`,
`token_to_id`, `id_to_token`, `bos_token`, `eos_token`, `unk_token`, `pad_token`.
`HFBPETokenizer` holds a Hugging Face tokenizer.json BPE (byte-level or SentencePiece-style).
"""

from __future__ import annotations

import os
from typing import Any

from .base import EOT, Tokenizer
from .bpe import PATTERNS, BPETokenizer
from .char import CharTokenizer
from .hf_bpe import HFBPETokenizer


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load any lmforge tokenizer file (bpe, char or hf-bpe)."""
    return Tokenizer.load(path)


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Rebuild any lmforge tokenizer from its `to_dict()` output (e.g. stored in a checkpoint)."""
    return Tokenizer.from_dict(d)


__all__ = [
    "Tokenizer", "CharTokenizer", "BPETokenizer", "HFBPETokenizer", "load_tokenizer", "tokenizer_from_dict", "PATTERNS", "EOT",
]
