"""Measurement primitives the benchmarks share: alternating timings and memory bandwidth."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch


def median_time(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Run each contender once per round, alternating, and keep every round's seconds (so a
    slow spell on a shared machine hits every contender alike)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def memory_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict[str, float]:
    """GB/s reading a large tensor (torch sum) and copying it (read + write bytes); best of n."""
    x = torch.ones(int(gib * 2**30 / 4))
    y = torch.empty_like(x)
    best_sum = best_copy = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter(); x.sum(); t1 = time.perf_counter()
        y.copy_(x); t2 = time.perf_counter()
        best_sum = max(best_sum, x.numel() * 4 / (t1 - t0) / 1e9)
        best_copy = max(best_copy, 2 * x.numel() * 4 / (t2 - t1) / 1e9)
    return {"read_gb_s": best_sum, "copy_gb_s": best_copy}
