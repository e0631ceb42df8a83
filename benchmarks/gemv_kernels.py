"""How fast each matrix-vector kernel streams weights: every linear weight of the GPT-2 124M
shape (48 block matrices and the 50,257 x 768 head, too large to stay in cache) multiplied by
one vector, layer after layer as a decoding step does, with the read bandwidth measured in the
same run. Batch-1 decoding is these products plus about 10% of other ops, so a kernel's GB/s
here caps the share of the bandwidth bound a whole step can reach.

    python benchmarks/gemv_kernels.py [--reps 10]   (--no-doc: print only)

Kernels: fp32 `F.linear` on weights stored (in, out) (what `prepare_for_decoding` does in fp32);
bf16 oneDNN-packed (`PackedLinear`) and bf16 (in, out); int8 weight-only
(`_weight_int8pack_mm`, lmforge's `--int8`), and the same product compiled by inductor from
plain ops (compiled once per shape before timing); int8 weights with activations quantised to uint8
per vector (oneDNN's `qlinear_pointwise`, the activation rounding llama.cpp's q8_0 also does, in
its case per block of 32); int4 weight-only (`--int4`, group 64). Writes its table into
docs/benchmarks.md between <!-- gemv_kernels:begin --> and <!-- gemv_kernels:end -->.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc_tables import add_doc_args, block, command_line, publish  # noqa: E402
from timing import memory_bandwidth  # noqa: E402

SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + [(50257, 768)]  # (out, in)


def _int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(1).clamp(min=1e-12) / 127
    return torch.round(w / scale[:, None]).to(torch.int8).contiguous(), scale


@torch.compile(dynamic=False)
def _compiled_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The int8 product written for inductor to fuse, as gpt-fast does on a GPU: one reduction
    that reads each int8 weight once and converts it in registers."""
    return (x[:, None, :] * q.to(x.dtype)).sum(-1) * scale


def kernels() -> dict[str, tuple[int, callable, callable]]:
    """name -> (bytes per weight, prepare(w) -> state, product(x fp32 (1, in), state))."""
    from lmforge.models.decoding import PackedLinear
    from lmforge.models.quantize import Int4Linear

    def qlinear_prep(w):
        q, s = _int8(w)
        return torch.ops.onednn.qlinear_prepack(q, [1, w.shape[1]]), s, torch.zeros(len(s), dtype=torch.long)

    def qlinear(x, st):
        xs = float(x.abs().max()) / 127
        qx = (torch.round(x / xs) + 128).clamp(0, 255).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise(qx, xs, 128, st[0], st[1], st[2], None, 1.0, 0, torch.float32,
                                                  "none", [], "")

    def linear(w, dtype):
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data = w.to(dtype)
        return lin

    return {
        "fp32, (in, out)": (4, lambda w: w.t().contiguous().t(), lambda x, w: F.linear(x, w)),
        "bf16, oneDNN packed": (2, lambda w: PackedLinear(linear(w, torch.bfloat16)), lambda x, m: m(x.bfloat16())),
        "bf16, (in, out)": (2, lambda w: w.bfloat16().t().contiguous().t(), lambda x, w: F.linear(x.bfloat16(), w)),
        "int8 weight-only (`--int8`)": (1, lambda w: (lambda q, s: (q, s.bfloat16()))(*_int8(w)),
                                        lambda x, st: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), *st)),
        "int8 weight-only, inductor (dequantised inside the reduction)":
            (1, lambda w: (lambda q, s: (q, s.bfloat16()))(*_int8(w)), lambda x, st: _compiled_int8(x.bfloat16(), *st)),
        "int8 x uint8 activations (oneDNN)": (1, qlinear_prep, qlinear),
        "int4 weight-only, group 64 (`--int4`)": (0.5 + 4 / 64, lambda w: Int4Linear(linear(w, torch.float32), 64),
                                                  lambda x, m: m(x)),
    }


def bench(reps: int) -> dict:
    torch.manual_seed(0)
    weights = [torch.randn(o, i) * 0.02 for o, i in SHAPES]
    n = sum(o * i for o, i in SHAPES)
    xs = {i: torch.randn(1, i) for i in {i for _, i in SHAPES}}
    rows = {}
    with torch.no_grad():
        for name, (nbytes, prep, product) in kernels().items():
            try:
                states = [prep(w) for w in weights]
            except (RuntimeError, NotImplementedError) as e:  # a kernel this build lacks
                rows[name] = {"error": str(e).splitlines()[0][:80]}
                continue
            for _ in range(2):
                for st, (_, i) in zip(states, SHAPES):
                    product(xs[i], st)
            t0 = time.perf_counter()
            for _ in range(reps):
                for st, (_, i) in zip(states, SHAPES):
                    product(xs[i], st)
            sec = (time.perf_counter() - t0) / reps
            rows[name] = {"ms": sec * 1e3, "gb_s": n * nbytes / sec / 1e9, "mb": n * nbytes / 1e6}
            del states
    return {"rows": rows, "bandwidth": memory_bandwidth(), "params": n, "reps": reps}


def markdown(d: dict) -> str:
    bw = d["bandwidth"]["read_gb_s"]
    lines = [f"All {len(SHAPES)} linear weights of the GPT-2 124M shape ({d['params'] / 1e6:.1f}M weights), one "
             f"vector each, in order, mean of {d['reps']} passes. Read bandwidth in the same run: {bw:.1f} GB/s "
             "(torch `sum` over a filled 1 GiB tensor).", "",
             "| kernel | weight MB | ms per pass | GB/s of weights | share of read bandwidth |", "|---|---|---|---|---|"]
    for name, r in d["rows"].items():
        if "error" in r:
            lines.append(f"| {name} | | not available: {r['error']} | | |")
        else:
            lines.append(f"| {name} | {r['mb']:.0f} | {r['ms']:.2f} | {r['gb_s']:.1f} | {r['gb_s'] / bw:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    add_doc_args(ap, "docs/benchmarks.md")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    publish(args, {"gemv_kernels": block(command_line("benchmarks/gemv_kernels.py", argv), markdown(bench(args.reps)))})


if __name__ == "__main__":
    main()
