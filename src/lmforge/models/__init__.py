"""Model kinds by name. A run directory's config.json names its kind; the class is imported
only when needed, so adding a model is one line here."""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from ..errors import LMForgeError

# kind -> "module:Class"; each class has a `config_class` attribute (a ConfigBase dataclass).
MODEL_KINDS = {
    "gpt": "lmforge.models.gpt:GPT",
    "nnlm": "lmforge.models.nnlm:NNLM",
    "seq2seq": "lmforge.models.seq2seq:Transformer",
}


def model_class(kind: str) -> type[nn.Module]:
    if kind not in MODEL_KINDS:
        raise LMForgeError(f"unknown model kind {kind!r}; known kinds: {', '.join(MODEL_KINDS)}")
    module, _, name = MODEL_KINDS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def build_model(kind: str, config: dict[str, Any]) -> nn.Module:
    cls = model_class(kind)
    return cls(cls.config_class.from_dict(config, where=f"{kind} model config"))
