"""Token data on disk: `prepare` turns text files into train.bin / val.bin; `TokenBatches`
draws random blocks from them."""

from .loader import TokenBatches, TokenData
from .prepare import prepare, resolve_tokenizer

__all__ = ["TokenBatches", "TokenData", "prepare", "resolve_tokenizer"]
