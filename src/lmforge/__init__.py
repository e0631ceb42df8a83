"""lmforge: language models from first principles on PyTorch.

    import lmforge
    model, tok = lmforge.load("RUN")
    text = lmforge.generate(model, tok, "To be", max_new_tokens=50, temperature=0.8, top_k=50, seed=0)

Names are imported on first use, so `lmforge --help` does not wait for torch to load.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load": ("lmforge.checkpoint", "load_run"),
    "generate": ("lmforge.generation", "generate"),
    "stream": ("lmforge.generation", "stream"),
    "GPT": ("lmforge.models.gpt", "GPT"),
    "GPTConfig": ("lmforge.models.gpt", "GPTConfig"),
    "BPETokenizer": ("lmforge.tokenizers", "BPETokenizer"),
    "CharTokenizer": ("lmforge.tokenizers", "CharTokenizer"),
    "LMForgeError": ("lmforge.errors", "LMForgeError"),
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
