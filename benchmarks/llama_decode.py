"""Batch-1 bf16 decoding of the Llama-3.2-1B shape (16 layers, hidden 2048, 32 heads, 8 KV
heads, MLP 8192, vocabulary 128,256, tied, llama3 RoPE): lmforge against transformers on the
same random checkpoint, greedy, KV cache on, alternating in one process, with the machine's
read bandwidth measured in the same run and the tokens/s it bounds.

The checkpoint is written by the script (benchmarks/hf_memory.py's writer) as a Hugging Face
directory, brought in with `lmforge import-hf` and loaded by `lmforge.load`, the path a user
takes; transformers loads the same directory with `AutoModelForCausalLM.from_pretrained`."""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc_tables import add_doc_args, block, command_line, publish  # noqa: E402
from hf_memory import write_checkpoint  # noqa: E402
from timing import median_time, memory_bandwidth  # noqa: E402


def bench(work: Path, tokens: int, rounds: int, prompt_len: int) -> dict:
    from transformers import AutoModelForCausalLM

    import lmforge
    from lmforge.interop import import_hf

    hf_dir, run = work / "hf", work / "run"
    write_checkpoint(hf_dir)
    import_hf(hf_dir, run)
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    ours, _ = lmforge.load(run)  # bf16 as stored, laid out for decoding
    ours_int8, _ = lmforge.load(run, inference=False)
    from lmforge.models.decoding import prepare_for_decoding

    prepare_for_decoding(ours_int8, int8=True)
    prompt = torch.randint(0, 128_000, (1, prompt_len), generator=torch.Generator().manual_seed(1))

    def hf_generate():
        return theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                               min_new_tokens=tokens, do_sample=False, use_cache=True, pad_token_id=0)

    fns = {"transformers bf16": hf_generate,
           "lmforge bf16": lambda: ours.generate(prompt, tokens, temperature=0.0),
           "lmforge int8": lambda: ours_int8.generate(prompt, tokens, temperature=0.0)}
    with torch.no_grad():
        outs = {name: fn()[0, prompt_len:].tolist() for name, fn in fns.items()}  # warm-up, and the tokens
        times = median_time(fns, rounds)
    bw = memory_bandwidth()
    # bytes read per token: every linear weight (the tied LM head reads the whole embedding
    # matrix) and one embedding row
    linear = sum(m.weight.numel() for m in theirs.modules() if isinstance(m, torch.nn.Linear))
    same = sum(a == b for a, b in zip(outs["lmforge bf16"], outs["transformers bf16"]))
    res = {"tokens": tokens, "rounds": rounds, "prompt": prompt_len, "bandwidth": bw, "linear_params": linear,
           "same_greedy": same, "results": {}}
    for name, ts in times.items():
        tok_s = tokens / statistics.median(ts)
        bound = bw["read_gb_s"] * 1e9 / (linear * (1 if "int8" in name else 2))
        res["results"][name] = {"tok_s": tok_s, "bound": bound, "share": tok_s / bound}
    r = res["results"]
    res["ratio"] = r["lmforge bf16"]["tok_s"] / r["transformers bf16"]["tok_s"]
    return res


def markdown(d: dict) -> str:
    bw = d["bandwidth"]
    lines = [f"Batch 1, {d['prompt']}-token prompt, {d['tokens']} greedy tokens, median of {d['rounds']} "
             f"alternating rounds. Read bandwidth in the same run: {bw['read_gb_s']:.1f} GB/s (torch `sum` over a "
             f"filled 1 GiB tensor); bound = bandwidth / bytes of linear weights per token "
             f"({d['linear_params'] / 1e6:,.0f}M parameters, the tied LM head included).", "",
             "| contender | tok/s | bandwidth bound tok/s | share of bound |", "|---|---|---|---|"]
    for name, r in d["results"].items():
        lines.append(f"| {name} | {r['tok_s']:.2f} | {r['bound']:.1f} | {r['share']:.0%} |")
    lines += ["", f"lmforge / transformers in bf16: **{d['ratio']:.2f}x**. Greedy tokens equal to transformers' "
              f"for {d['same_greedy']} of {d['tokens']} positions (bf16 rounding differs between the two "
              "kernels, and a random model's logits are close together, so paths part after a near tie)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens per generation (default 64)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens (default 16)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--workdir", default=None, help="where the ~5 GB of checkpoint files go (default: a temp dir)")
    add_doc_args(ap, "docs/benchmarks.md")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="llama_decode.", dir=args.workdir))
    try:
        res = bench(work, args.tokens, args.rounds, args.prompt)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    publish(args, {"llama_decode": block(command_line("benchmarks/llama_decode.py", argv), markdown(res))})


if __name__ == "__main__":
    main()
