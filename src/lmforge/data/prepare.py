"""Text files -> token ids on disk, streamed in chunks so a corpus larger than memory works.

The last `val_fraction` of the input bytes (cut at a line break) becomes the validation split:
held-out text the model never trains on, for an honest estimate of how well it generalises."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from ..errors import LMForgeError
from ..fileio import atomic_path, write_json
from ..tokenizers import BPETokenizer, CharTokenizer, load_tokenizer
from ..tokenizers.batching import can_fork

CHUNK_BYTES = 1 << 20
DATA_FORMAT = "lmforge-data"


def check_inputs(paths: list[str | Path]) -> list[Path]:
    if not paths:
        raise LMForgeError("no input files given")
    out = []
    for p in map(Path, paths):
        if not p.is_file():
            raise LMForgeError(f"input file not found: {p}")
        if p.stat().st_size == 0:
            raise LMForgeError(f"input file is empty: {p}")
        out.append(p)
    return out


def iter_text(paths: list[Path], start: int = 0, stop: int | None = None) -> Iterator[str]:
    """Yield the text of the concatenated files from byte `start` to `stop`, about
    CHUNK_BYTES at a time, each piece ending on a line break so no word is cut in two."""
    offset, carry = 0, b""
    for path in paths:
        size = path.stat().st_size
        if offset + size <= start:
            offset += size
            continue
        with open(path, "rb") as f:
            f.seek(max(0, start - offset))
            pos = max(offset, start)
            while True:
                want = CHUNK_BYTES if stop is None else min(CHUNK_BYTES, stop - pos)
                block = f.read(want) if want > 0 else b""
                if not block:
                    break
                pos += len(block)
                data = carry + block
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    carry = data
                    continue
                carry = data[cut:]
                yield data[:cut].decode("utf-8", errors="replace")
        offset += size
        if stop is not None and offset >= stop:
            break
    if carry:
        yield carry.decode("utf-8", errors="replace")


def split_point(paths: list[Path], val_fraction: float) -> int:
    """Byte offset where validation starts: moved forward to just after a line break."""
    total = sum(p.stat().st_size for p in paths)
    cut = int(total * (1.0 - val_fraction))
    offset = 0
    for p in paths:
        size = p.stat().st_size
        if offset + size > cut:
            with open(p, "rb") as f:
                f.seek(cut - offset)
                nl = f.read(CHUNK_BYTES).find(b"\n")
            return cut + nl + 1 if nl >= 0 else offset + size
        offset += size
    return total


def resolve_tokenizer(spec: str, inputs: list[Path], progress: bool = True):
    """`char`, `bpe:N` (train on the inputs) or a path to a tokenizer JSON file."""
    if spec == "char":
        chars: set[str] = set()
        for text in iter_text(inputs):
            chars.update(text)
        return CharTokenizer("".join(sorted(chars)))
    if spec.startswith("bpe:"):
        try:
            vocab_size = int(spec[4:])
        except ValueError:
            raise LMForgeError(f"--tokenizer bpe:N needs an integer vocabulary size, got {spec!r}") from None
        return BPETokenizer.train([str(p) for p in inputs], vocab_size, progress=progress)
    if not Path(spec).exists():
        raise LMForgeError(f"tokenizer {spec!r} is neither 'char', 'bpe:N' nor an existing file")
    return load_tokenizer(spec)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


_worker_tokenizer = None  # what forked encoding workers inherit


def _encode_chunk(text: str) -> tuple[np.ndarray, int]:
    return _worker_tokenizer.encode_to_array(text), len(text.encode("utf-8", errors="replace"))


def _encode_range(tok, paths: list[Path], start: int, stop: int, out: Path, dtype, bar, workers: int) -> int:
    """Encode bytes start..stop of the inputs into `out`, chunk by chunk, in order. With
    workers > 1, forked processes encode the chunks (each ~1 MB) and this one writes them."""
    global _worker_tokenizer
    n = 0
    _worker_tokenizer = tok
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 and can_fork() else None
    try:
        chunks = iter_text(paths, start, stop)
        encoded = pool.imap(_encode_chunk, chunks) if pool is not None else map(_encode_chunk, chunks)
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            for ids, n_bytes in encoded:
                ids.astype(dtype, copy=False).tofile(f)
                n += len(ids)
                bar.update(n_bytes)
    finally:
        if pool is not None:
            pool.terminate()
        _worker_tokenizer = None
    return n


def prepare(inputs: list[str | Path], tokenizer: str, out_dir: str | Path,
            val_fraction: float = 0.1, progress: bool = True, workers: int = 1) -> dict:
    """Tokenize `inputs` into out_dir/{train.bin, val.bin, meta.json, tokenizer.json}.
    `workers` > 1 encodes in that many forked processes (Linux, macOS)."""
    paths = check_inputs(list(inputs))
    if not 0.0 < val_fraction < 1.0:
        raise LMForgeError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if workers < 1:
        raise LMForgeError(f"--workers must be at least 1, got {workers}")
    tok = resolve_tokenizer(tokenizer, paths, progress) if isinstance(tokenizer, str) else tokenizer
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tok.vocab_size)
    total = sum(p.stat().st_size for p in paths)
    cut = split_point(paths, val_fraction)
    if cut >= total:
        raise LMForgeError("the input is too small to hold out a validation split; add text or raise --val-fraction")
    with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not progress) as bar:
        n_train = _encode_range(tok, paths, 0, cut, out_dir / "train.bin", dtype, bar, workers)
        n_val = _encode_range(tok, paths, cut, total, out_dir / "val.bin", dtype, bar, workers)
    tok.save(out_dir / "tokenizer.json")
    meta = {"format": DATA_FORMAT, "version": 1, "vocab_size": tok.vocab_size, "dtype": dtype.name,
            "train_tokens": n_train, "val_tokens": n_val, "tokenizer": "tokenizer.json",
            "inputs": [os.fspath(p) for p in paths]}
    write_json(out_dir / "meta.json", meta)
    return meta

