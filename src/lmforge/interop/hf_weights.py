"""Weight files, a tensor at a time: read a Hugging Face checkpoint shard by shard, write
safetensors files without holding them whole.

A 1B-parameter bf16 model is 2.5 GB. Reading every shard into one dict, converting it, and
serialising the result would hold two or three copies; here the reader memory-maps each shard
(safetensors' `safe_open`, `torch.load(mmap=True)` for .bin files) and hands out one tensor
when asked, and the writer lays out the header from the shapes alone, then streams each
tensor's bytes to disk as it is produced. Peak memory is then the largest tensor or two, not
the model.

    model.safetensors                          one file
    model.safetensors.index.json + shards      {"weight_map": {name: shard file}}
    pytorch_model.bin (+ .index.json, shards)  PyTorch pickles (read with weights_only=True)
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open

from ..errors import LMForgeError
from ..fileio import atomic_path, read_json, write_json

ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
             torch.uint8: "U8", torch.bool: "BOOL"}
TORCH_DTYPES = {v: k for k, v in ST_DTYPES.items()}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class HFWeights:
    """The tensors of a Hugging Face model directory. Names, shapes and dtypes come from the
    headers; a tensor's bytes are read (from the memory map) only by `get`."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.where: dict[str, Path] = {}  # tensor name -> its file
        self._open: dict[Path, object] = {}
        for name in WEIGHT_FILES:
            single, index = self.directory / name, self.directory / f"{name}.index.json"
            if single.is_file():
                files = [single]
            elif index.is_file():
                weight_map = read_json(index, "weights index").get("weight_map")
                if not isinstance(weight_map, dict) or not weight_map:
                    raise LMForgeError(f"{index} has no weight_map; the index is corrupt")
                files = [self.directory / f for f in dict.fromkeys(weight_map.values())]
                for f in files:
                    if not f.is_file():
                        raise LMForgeError(f"weights shard not found: {f} (listed in {index.name}); "
                                           "the download is incomplete")
            else:
                continue
            for f in files:
                for tensor in self._handle(f).keys():
                    self.where[tensor] = f
            return
        raise LMForgeError(f"no weights in {self.directory}: expected model.safetensors or pytorch_model.bin "
                           "(single or sharded with its .index.json)")

    def _handle(self, path: Path):
        if path not in self._open:
            if path.suffix == ".safetensors":
                try:
                    self._open[path] = safe_open(str(path), framework="pt")
                except Exception as e:  # safetensors raises its own error type for a bad header
                    raise LMForgeError(f"{path} is not a readable safetensors file ({e})") from None
            else:
                try:  # weights_only: a pickle from the internet must not run code
                    try:
                        self._open[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                    except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped
                        self._open[path] = torch.load(path, map_location="cpu", weights_only=True)
                except Exception as e:
                    raise LMForgeError(f"{path} is not a readable PyTorch weights file ({e})") from None
        return self._open[path]

    def names(self) -> set[str]:
        return set(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        h = self._handle(self.where[name])
        return tuple(h[name].shape) if isinstance(h, dict) else tuple(h.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        h = self._handle(self.where[name])
        return h[name] if isinstance(h, dict) else h.get_tensor(name)

    def file_of(self, name: str) -> str:
        return self.where[name].name


# --- writing ----------------------------------------------------------------------------------
def open_run_weights(path: Path):
    """safetensors' handle on a run's model.safetensors, or a one-line error for a missing or
    corrupt file."""
    if not path.is_file():
        raise LMForgeError(f"weights not found: {path}")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors' own error type for a bad header
        raise LMForgeError(f"{path} is not a readable safetensors file ({e}); the checkpoint is corrupt") from None


def write_safetensors(path: str | Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                      produce: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file (atomically) whose tensors are `specs` (name, dtype, shape), in
    that order, calling `produce(name)` for each one only when its bytes are due. The format:
    8-byte little-endian header length, the JSON header (offsets into the data), the data."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape in specs:
        n = _nbytes(dtype, shape)
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, dtype, shape in specs:
            t = produce(name)
            assert t.dtype == dtype and tuple(t.shape) == tuple(shape), (name, t.dtype, t.shape, dtype, shape)
            f.write(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _nbytes(dtype: torch.dtype, shape: Iterable[int]) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        n *= d
    return n


def write_sharded(directory: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                  produce: Callable[[str], torch.Tensor], max_shard_bytes: int) -> list[str]:
    """Hugging Face's layout: model.safetensors, or model-0000k-of-0000n.safetensors shards of
    at most `max_shard_bytes` each (a larger tensor gets a shard of its own) and
    model.safetensors.index.json. Returns the files written."""
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        n = _nbytes(spec[1], spec[2])
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    if len(shards) == 1:
        write_safetensors(directory / "model.safetensors", specs, produce)
        return ["model.safetensors"]
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        write_safetensors(directory / name, shard, produce)
        weight_map.update({spec[0]: name for spec in shard})
    total = sum(_nbytes(s[1], s[2]) for s in specs)
    write_json(directory / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return [*names, "model.safetensors.index.json"]
