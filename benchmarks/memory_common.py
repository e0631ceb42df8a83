"""What the memory benchmarks share: reading this process's RSS, glibc's mmap threshold, and
random-token batches for the Trainer (memory and time are measured, not learning). Their tables
go into docs/benchmarks.md through doc_tables.publish."""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch


def rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (the peak so far) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def set_mmap_threshold(nbytes: int) -> None:
    """glibc: blocks above nbytes go back to the OS when freed, so RSS follows live memory
    (0 leaves glibc's default, which keeps freed blocks of up to 32 MB in the heap)."""
    if nbytes:
        ctypes.CDLL(None).mallopt(-3, nbytes)  # -3: M_MMAP_THRESHOLD


class RandomTokens:
    """Random (x, y) batches of `batch` x `block` tokens; each rank draws its own stream."""

    def __init__(self, vocab: int, batch: int, block: int):
        self.vocab, self.batch, self.block = vocab, batch, block
        self.gen = torch.Generator().manual_seed(0)

    def for_rank(self, rank: int) -> None:
        self.gen.manual_seed(rank)

    def get_batch(self, split, generator=None):
        xy = torch.randint(0, self.vocab, (self.batch, self.block + 1), generator=generator or self.gen)
        return xy[:, :-1], xy[:, 1:]

    def tokens_per_batch(self) -> int:
        return self.batch * self.block

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass
