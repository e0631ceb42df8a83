"""One fp32 decode step over B rows (B sequences decoding together, as `lmforge serve` and the
harness batch them), GPT-2 124M shape, random weights: lmforge with its weights laid out for
batch-1 decoding, lmforge with the packed copy a batched decoder gets (`prepare_for_batches`),
and transformers' GPT-2 (the same weights) with its KV cache.

    python benchmarks/batched_step.py [--threads 1 2] [--batches 1 2 4 8 16 32] [--rounds 5] [--no-doc]

Each step feeds one token per row after a 32-token prompt; the contenders alternate, and each
timing is the median of `--rounds` steps after a warm-up. Writes its table into
docs/benchmarks.md between <!-- batched_step:begin --> and <!-- batched_step:end -->.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from doc_tables import add_doc_args, block, command_line, publish

SHAPE = dict(vocab_size=50257, n_positions=1024, n_layer=12, n_head=12, n_embd=768)


def models(tmp: Path):
    """(lmforge plain, lmforge batched, transformers), all holding the same weights: a random
    transformers GPT-2 brought in by `lmforge import-hf`."""
    from decode_speed import imported_run
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmforge.checkpoint import load_run
    from lmforge.models.decoding import prepare_for_batches

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(**SHAPE)).eval()
    run = imported_run(hf, tmp)
    plain, _ = load_run(run)  # laid out for batch-1 decoding, as `lmforge sample` loads it
    batched, _ = load_run(run)
    if not prepare_for_batches(batched):
        raise SystemExit("prepare_for_batches did not pack (no oneDNN, or not enough free memory)")
    return plain, batched, hf


def step_times(plain, batched, hf, batch: int, rounds: int, prompt: int = 32) -> tuple[dict[str, float], float]:
    """Median seconds of one step per contender, and the largest |logit| difference to plain's."""
    idx = torch.randint(0, 50000, (batch, prompt), generator=torch.Generator().manual_seed(batch))
    token = torch.randint(0, 50000, (batch, 1), generator=torch.Generator().manual_seed(batch + 1))
    steps, logits = {}, {}
    with torch.no_grad():
        for name, m in (("plain", plain), ("batched", batched)):
            cache = m.make_cache(batch, prompt + rounds + 2)
            m(idx, cache=cache)

            def step(m=m, cache=cache):
                return m(token, cache=cache)[:, -1]
            steps[name] = step
        out = hf(idx, use_cache=True)

        def hf_step(past=out.past_key_values):
            return hf(token, past_key_values=past, use_cache=True, logits_to_keep=1).logits[:, -1]
        steps["transformers"] = hf_step
        times: dict[str, list[float]] = {n: [] for n in steps}
        for n, f in steps.items():
            logits[n] = f()  # warm-up
        for _ in range(rounds):
            for n, f in steps.items():
                t0 = time.perf_counter()
                f()
                times[n].append(time.perf_counter() - t0)
    diff = (logits["batched"] - logits["plain"]).abs().max().item()
    return {n: statistics.median(t) for n, t in times.items()}, diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--rounds", type=int, default=5)
    add_doc_args(ap, "docs/benchmarks.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plain, batched, hf = models(Path(tmp))
    rows = ["| threads | rows | lmforge, batch-1 layout ms | lmforge, packed copy ms | transformers ms | "
            "packed / batch-1 layout | packed / transformers | largest logit difference |",
            "|---|---|---|---|---|---|---|---|"]
    for threads in args.threads:
        torch.set_num_threads(threads)
        for b in args.batches:
            t, diff = step_times(plain, batched, hf, b, args.rounds)
            print(f"threads {threads} rows {b}: " + ", ".join(f"{n} {1e3 * s:.1f} ms" for n, s in t.items()),
                  flush=True)
            rows.append(f"| {threads} | {b} | {1e3 * t['plain']:.1f} | {1e3 * t['batched']:.1f} | "
                        f"{1e3 * t['transformers']:.1f} | {t['plain'] / t['batched']:.2f}x | "
                        f"{t['transformers'] / t['batched']:.2f}x | {diff:.1e} |")
    torch.set_num_threads(max(args.threads))
    note = (f"GPT-2 124M shape, fp32, one step (one new token per row after a 32-token prompt), median of "
            f"{args.rounds} alternating steps. *packed copy*: `prepare_for_batches` (what `lmforge serve` with "
            "--max-batch > 1 and the harness with batch_size > 1 run); one row takes the batch-1 layout in both.")
    publish(args, {"batched_step": block(command_line("benchmarks/batched_step.py"), "\n".join(rows), note)})


if __name__ == "__main__":
    main()
