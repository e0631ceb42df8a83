"""Encoding many texts at once: Python-side costs that a per-text loop pays.

Encoding a short line is a fast call into tiktoken; what remains is Python's: building a list
of ints per text, and the cyclic garbage collector scanning those lists as they pile up.
`gc_paused` removes the second. `encode_in_processes` spreads a large batch over forked
processes, since threads cannot help a loop that holds the GIL between calls."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import pickle
from collections.abc import Callable, Iterator, Sequence
from itertools import accumulate

EncodeSlice = Callable[[Sequence[str]], list[list[int]]]
MIN_TEXTS_PER_PROCESS = 1000  # below this, starting a process costs more than it saves

_job: tuple[EncodeSlice, Sequence[str]] | None = None  # what forked workers inherit


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector (reference counting still frees everything) and
    restore its previous state, also on errors. Lists of ints cannot form cycles, so its
    passes over them are wasted work."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def balanced_slices(texts: Sequence[str], parts: int) -> list[tuple[int, int]]:
    """Contiguous (start, stop) ranges holding about the same number of characters each."""
    ends = list(accumulate(len(t) for t in texts))
    total = ends[-1] if ends else 0
    bounds, start, i = [], 0, 0
    for k in range(1, parts):
        while i < len(ends) and ends[i] < total * k / parts:
            i += 1
        stop = max(start, min(i + 1, len(texts)))
        bounds.append((start, stop))
        start = stop
    bounds.append((start, len(texts)))
    return bounds


def can_fork() -> bool:
    """Whether this process may fork workers: not on Windows, not from a daemonic worker."""
    return ("fork" in multiprocessing.get_all_start_methods()
            and not multiprocessing.current_process().daemon)


def _encode_range(bounds: tuple[int, int]) -> bytes:
    assert _job is not None, "only called in a worker forked by encode_in_processes"
    encode_slice, texts = _job
    with gc_paused():
        # pickled here, so the parent unpickles in its main thread with the collector paused
        return pickle.dumps(encode_slice(texts[bounds[0]:bounds[1]]), protocol=pickle.HIGHEST_PROTOCOL)


def encode_in_processes(encode_slice: EncodeSlice, texts: Sequence[str], workers: int) -> list[list[int]]:
    """encode_slice(texts), computed in `workers` processes: this one takes the first share,
    forked children the others (they inherit the tokenizer; nothing but results is pickled).
    Falls back to one process for small batches or where forking is not possible."""
    global _job
    if workers <= 1 or len(texts) < workers * MIN_TEXTS_PER_PROCESS or not can_fork():
        return encode_slice(texts)
    bounds = balanced_slices(texts, workers)
    _job = (encode_slice, texts)
    try:
        with multiprocessing.get_context("fork").Pool(workers - 1) as pool:
            pending = pool.map_async(_encode_range, bounds[1:])
            out = encode_slice(texts[bounds[0][0]:bounds[0][1]])
            blobs = pending.get()
    finally:
        _job = None
    with gc_paused():
        for blob in blobs:
            out.extend(pickle.loads(blob))
    return out
