"""Loading a base run as a frozen, compactly stored model (LoRA on a bf16 / int8 / nf4 base).

The point of a quantized base is memory, so loading must not undo it: the model is built with
its parameters on the meta device (no random init), and the checkpoint is read one tensor at
a time with plain file reads and turned into its compact form before the next is read.
(`safetensors.safe_open` maps the whole file, and every page it touches counts toward the
process's resident memory until the map closes: the full-precision checkpoint again.)
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import params_on_meta
from ..errors import LMForgeError
from ..models import build_model
from ..nn.lora import _matches, parse_targets
from ..nn.quantized_base import BASE_DTYPES, FrozenEmbedding, freeze_base

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}


class SafetensorsReader:
    """Reads single tensors of a .safetensors file by seeking to them (no memory map)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.file = open(self.path, "rb")
            (n,) = struct.unpack("<Q", self.file.read(8))
            header = json.loads(self.file.read(n))
        except (OSError, struct.error, ValueError) as e:
            raise LMForgeError(f"{self.path} is not a readable safetensors file ({e}); the checkpoint is corrupt")
        header.pop("__metadata__", None)
        self.entries: dict[str, dict[str, Any]] = header
        self.data_start = 8 + n

    def names(self) -> set[str]:
        return set(self.entries)

    def __call__(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        begin, end = e["data_offsets"]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        self.file.seek(self.data_start + begin)
        if self.file.readinto(memoryview(buf.numpy())) != end - begin:
            raise LMForgeError(f"{self.path} is truncated (tensor {name}); the checkpoint is corrupt")
        return buf.view(_DTYPES[e["dtype"]]).reshape(e["shape"])

    def close(self) -> None:
        self.file.close()


def load_frozen_base(weights: str | Path, kind: str, model_config: dict[str, Any], fmt: str) -> nn.Module:
    """The base model with every linear layer and embedding frozen in `fmt` (bfloat16, int8 or
    nf4) and every other parameter frozen in float32; ready for apply_lora."""
    if fmt not in BASE_DTYPES[1:]:
        raise LMForgeError(f"base dtype must be one of {', '.join(BASE_DTYPES)}, not {fmt!r}")
    with params_on_meta():
        model = build_model(kind, model_config)
    reader = SafetensorsReader(weights)
    try:
        freeze_base(model, fmt, reader, reader.names())
    except KeyError as e:
        raise LMForgeError(f"{weights} does not match the model in config.json (missing {e})") from None
    except ValueError as e:  # a layer the format cannot hold (e.g. nf4 and a width not divisible by 64)
        raise LMForgeError(f"cannot store the base in {fmt}: {e}; use --base-dtype int8 or bfloat16") from None
    finally:
        reader.close()
    return model


def check_targets(model: nn.Module, targets: list[str], fmt: str) -> None:
    """LoRA on an embedding needs the float table it adds to (LoRAEmbedding): say so, instead of
    the generic 'matches no linear module'."""
    for pattern in parse_targets(targets):
        hit = next((n for n, m in model.named_modules() if isinstance(m, FrozenEmbedding) and _matches(n, pattern)),
                   None)
        if hit is not None:
            raise LMForgeError(f"LoRA target {pattern!r} picks the embedding {hit}, which a {fmt} base stores "
                               f"quantized; adapt it with --base-dtype float32, or target linear layers only")
