"""Memory per process: replicated (DDP) vs sharded (FSDP) training, 2 CPU processes (gloo).

DDP keeps the whole model, its gradients and both AdamW moments in every process (16 bytes
per fp32 parameter); FSDP keeps 1/N of each and gathers one block's weights at a time. This
trains the same model a few steps both ways with lmforge's Trainer and reports each rank's
peak RSS, the part of it above the process's resident size before the model was built, and
the step time. One process with the same per-rank batch is the reference.

    python benchmarks/sharding_memory.py --preset gpt2 --steps 4

The table goes into docs/benchmarks.md (section `fsdp_memory`; `fsdp_memory_glibc_default` with
--mmap-threshold 0); --no-doc prints it only, --markdown FILE writes it there instead.

Random token data (the quantity measured is memory, not what the model learns).

glibc keeps freed blocks of up to 32 MB in the heap once a block that size has been freed, so
by default RSS also counts memory the program no longer uses (the full model FSDP built
before sharding it, each layer's weights gathered and dropped again). `--mmap-threshold`
(default 64 KiB; 0 leaves glibc's default) makes larger blocks go straight back to the OS,
so RSS follows the live memory; every run gets the same setting.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from doc_tables import add_doc_args, block, command_line, publish
from memory_common import RandomTokens, rss_mib, set_mmap_threshold

REPO = Path(__file__).resolve().parents[1]


def run(rank: int, world: int, port: int, mode: str, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    set_mmap_threshold(args.mmap_threshold)
    torch.set_num_threads(args.threads)
    from lmforge.models import build_model
    from lmforge.models.presets import get_preset
    from lmforge.tokenizers import CharTokenizer
    from lmforge.train import TrainConfig, Trainer, distributed

    mc = {**get_preset(args.preset)["model_config"], "block_size": args.block, "dropout": 0.0}
    before = rss_mib("VmRSS")
    torch.manual_seed(0)
    model = build_model("gpt", mc)
    cfg = TrainConfig(max_iters=args.steps, batch_size=args.batch, log_interval=1, eval_interval=10**9,
                      eval_iters=1, warmup_iters=1, device="cpu", fsdp=mode == "fsdp")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, RandomTokens(mc["vocab_size"], args.batch, args.block), cfg, tmp,
                          CharTokenizer.from_text("ab"), progress=False)
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            trainer.step()
            times.append(time.perf_counter() - t)
    res = {"mode": mode, "rank": rank, "world": world, "params": sum(p.numel() for p in model.parameters()),
           "rss_before_model_mib": before, "peak_rss_mib": rss_mib("VmHWM"),
           "step_s": statistics.median(times[1:]) if len(times) > 1 else times[0]}
    Path(out, f"{mode}-{rank}.json").write_text(json.dumps(res))
    distributed.cleanup()


def spawn(mode: str, world: int, args: argparse.Namespace, out: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if world == 1:  # a fresh process too, so its peak is its own
        mp.spawn(run, args=(1, port, mode, args, out), nprocs=1, join=True)
    else:
        mp.spawn(run, args=(world, port, mode, args, out), nprocs=world, join=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2", help="model shape (default gpt2: 124M parameters)")
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2, help="sequences per process per step")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--mmap-threshold", type=int, default=65536,
                    help="glibc M_MMAP_THRESHOLD in bytes (0: glibc's default, see above)")
    add_doc_args(ap, "docs/benchmarks.md")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    with tempfile.TemporaryDirectory() as out:
        spawn("single", 1, args, out)
        spawn("ddp", 2, args, out)
        spawn("fsdp", 2, args, out)
        rows = [json.loads(p.read_text()) for p in sorted(Path(out).glob("*.json"))]
    order = {"single": 0, "ddp": 1, "fsdp": 2}
    rows.sort(key=lambda r: (order[r["mode"]], r["rank"]))
    lines = [f"{args.preset} shape, {rows[0]['params'] / 1e6:.1f}M parameters, batch {args.batch} x {args.block} "
             f"tokens per process, {args.steps} AdamW steps, {args.threads} torch thread(s) per process, glibc "
             f"M_MMAP_THRESHOLD {args.mmap_threshold or 'default'}.", "",
             "| run | rank | peak RSS (MiB) | above the pre-model RSS (MiB) | s/step |", "|---|---|---|---|---|"]
    for r in rows:
        name = {"single": "1 process", "ddp": "2 processes, DDP", "fsdp": "2 processes, FSDP"}[r["mode"]]
        lines.append(f"| {name} | {r['rank']} | {r['peak_rss_mib']:.0f} | "
                     f"{r['peak_rss_mib'] - r['rss_before_model_mib']:.0f} | {r['step_s']:.2f} |")
    torch.set_num_threads(args.threads)  # so the machine line names the per-process thread count
    section = "fsdp_memory" if args.mmap_threshold else "fsdp_memory_glibc_default"
    publish(args, {section: block(command_line("benchmarks/sharding_memory.py", argv), "\n".join(lines))})


if __name__ == "__main__":
    main()
