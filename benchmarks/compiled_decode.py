"""Batch-1 greedy decoding of the GPT-2 124M shape: lmforge's eager step (weights laid out by
`prepare_for_decoding`) against the compiled step (`CompiledDecoder`, torch.compile over a
static KV cache), fp32, bf16 and int8, alternating in one process, with the read bandwidth
measured in the same run; then a profile of one eager bf16 step and of the compiled bf16 and int8
steps (inductor's kernels named), to show where a token's time goes.

    python benchmarks/compiled_decode.py [--tokens 64] [--rounds 3]   (--no-doc: print only)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc_tables import add_doc_args, block, command_line, publish  # noqa: E402
from timing import median_time, memory_bandwidth  # noqa: E402


KINDS = ("fp32", "bf16", "int8")
BYTES = {"fp32": 4, "bf16": 2, "int8": 1}


def profile_step(model, prompt: torch.Tensor, top: int = 8) -> dict:
    """One cached eager step: its wall-clock ms without the profiler, the ms its ops take
    (the profiler's self CPU time; the rest is Python and dispatch between ops), and
    [(op, share of the ops' time, calls a step)], each over 8 steps."""
    from torch.profiler import ProfilerActivity, profile

    cache = model.make_cache(1, prompt.shape[1] + 32)
    tok = prompt[:, -1:]
    with torch.no_grad():
        model(prompt, cache=cache)
        model(tok, cache=cache)  # warm-up
        t0 = time.perf_counter()
        for _ in range(8):
            model(tok, cache=cache)
        wall_ms = (time.perf_counter() - t0) / 8 * 1e3
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(8):
                model(tok, cache=cache)
            step_ms = (time.perf_counter() - t0) / 8 * 1e3
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return {"wall_ms": wall_ms, "profiled_ms": step_ms, "op_ms": total / 8 / 1e3,
            "ops": [(e.key, e.self_cpu_time_total / total, e.count // 8) for e in events[:top]]}


def profile_compiled(model, prompt: torch.Tensor, top: int = 8) -> dict:
    """The compiled step of `model` as `profile_step` reports the eager one, over 16 steps. It is
    compiled with inductor's kernel profiling on, so each generated kernel shows under its name
    (graph_0_...: GEMM templates and fused pointwise kernels); the `## Call CompiledFxGraph`
    and `TorchDynamo Cache Lookup` rows are the compiled graph's entry: guards and wrapper."""
    from torch.profiler import ProfilerActivity, profile

    from lmforge.models.compiled import CompiledDecoder

    dec = CompiledDecoder(model, max_len=prompt.shape[1] + 64)
    with torch.no_grad(), torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
        steps = dec.steps(prompt, 60, temperature=0.0)
        for _ in range(20):  # compiles, then warms up
            next(steps)
        t0 = time.perf_counter()
        for _ in range(16):
            next(steps)
        wall_ms = (time.perf_counter() - t0) / 16 * 1e3
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(16):
                next(steps)
            step_ms = (time.perf_counter() - t0) / 16 * 1e3
        steps.close()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    name = lambda key: key if len(key) <= 60 else key[:57] + "..."  # noqa: E731
    return {"wall_ms": wall_ms, "profiled_ms": step_ms, "op_ms": total / 16 / 1e3,
            "ops": [(name(e.key), e.self_cpu_time_total / total, e.count // 16) for e in events[:top]]}


def bench(tokens: int, rounds: int, prompt_len: int) -> dict:
    from lmforge.models.compiled import CompiledDecoder
    from lmforge.models.decoding import generate_ids, prepare_for_decoding
    from lmforge.models.gpt import GPT, GPTConfig
    from lmforge.models.presets import get_preset

    torch.manual_seed(0)
    base = GPT(GPTConfig(**get_preset("gpt2")["model_config"])).eval().requires_grad_(False)
    prompt = torch.randint(0, 50257, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    plain = {"fp32": lambda: base, "bf16": lambda: copy.deepcopy(base).to(torch.bfloat16),
             "int8": lambda: prepare_for_decoding(copy.deepcopy(base), int8=True)}
    eager = {"fp32": prepare_for_decoding(copy.deepcopy(base)),
             "bf16": prepare_for_decoding(copy.deepcopy(base), dtype=torch.bfloat16), "int8": plain["int8"]()}
    compiled = {kind: CompiledDecoder(make(), max_len=prompt_len + tokens) for kind, make in plain.items()}
    fns, outs = {}, {}
    for kind in KINDS:
        fns[f"eager {kind}"] = lambda m=eager[kind]: generate_ids(m, prompt, tokens, temperature=0.0)
        fns[f"compiled {kind}"] = lambda d=compiled[kind]: d.generate(prompt, tokens, temperature=0.0)
    with torch.no_grad():
        for name, fn in fns.items():  # warm-up; the compiled ones compile here
            outs[name] = fn()
        times = median_time(fns, rounds)
    bw = memory_bandwidth()
    n_params = base.num_params() - base.pos_emb.weight.numel()  # one position row is read per token
    res = {"tokens": tokens, "rounds": rounds, "prompt": prompt_len, "bandwidth": bw, "params": n_params,
           "results": {}, "compile_s": {k: d.compile_seconds for k, d in compiled.items()},
           "same": {k: bool(torch.equal(outs[f"eager {k}"], outs[f"compiled {k}"])) for k in KINDS}}
    for name, ts in times.items():
        tok_s = tokens / statistics.median(ts)
        bound = bw["read_gb_s"] * 1e9 / (n_params * BYTES[name.split()[1]])
        res["results"][name] = {"tok_s": tok_s, "bound": bound, "share": tok_s / bound}
    del compiled, fns
    res["profile"] = profile_step(eager["bf16"], prompt)
    res["compiled_profiles"] = {k: profile_compiled(plain[k](), prompt) for k in ("bf16", "int8")}
    return res


def markdown(d: dict) -> str:
    bw = d["bandwidth"]
    lines = [f"Batch 1, {d['prompt']}-token prompt, {d['tokens']} greedy tokens, median of {d['rounds']} "
             f"alternating rounds; read bandwidth in the same run {bw['read_gb_s']:.1f} GB/s (torch `sum` over a "
             f"filled 1 GiB tensor), bound = bandwidth / weight bytes per token ({d['params'] / 1e6:.1f}M "
             "parameters).", "", "| path | tok/s | bandwidth bound tok/s | share of bound |", "|---|---|---|---|"]
    for name, r in d["results"].items():
        lines.append(f"| {name} | {r['tok_s']:.1f} | {r['bound']:.0f} | {r['share']:.0%} |")
    r, p = d["results"], d["profile"]
    ratios = ", ".join(f"{k} **{r[f'compiled {k}']['tok_s'] / r[f'eager {k}']['tok_s']:.2f}x**" for k in KINDS)
    compiles = ", ".join(f"{k} {d['compile_s'][k]:.0f} s" for k in KINDS)
    same = ", ".join(f"{k} {d['same'][k]}" for k in KINDS)
    lines += ["", f"Compiled / eager: {ratios}. Compile time (first step, kept out of tok/s): {compiles}. "
              f"Greedy tokens equal to eager's: {same}.", "",
              f"Where one eager bf16 step's time goes: {p['wall_ms']:.1f} ms a step without the profiler, of "
              f"which {p['op_ms']:.1f} ms ({p['op_ms'] / p['wall_ms']:.0%}) inside ops (the profiler's self CPU "
              f"time; {p['profiled_ms']:.1f} ms a step under it); the rest is Python and dispatch between ops. "
              "The ops' time by op:", "", "| op | share of op time | calls a step |", "|---|---|---|"]
    lines += [f"| `{name}` | {share:.0%} | {calls} |" for name, share, calls in p["ops"]]
    for kind, c in d["compiled_profiles"].items():
        lines += ["", f"The compiled {kind} step: {c['wall_ms']:.1f} ms a step without the profiler, "
                  f"{c['op_ms']:.1f} ms ({c['op_ms'] / c['wall_ms']:.0%}) inside ops. `graph_0_...` rows are "
                  "kernels inductor generated (its GEMM templates and fused pointwise ops), `aten::` rows the "
                  "library kernels the graph calls; "
                  "`## Call CompiledFxGraph` and `TorchDynamo Cache Lookup` are the graph's entry (guards and "
                  "its Python wrapper):", "", "| op | share of op time | calls a step |", "|---|---|---|"]
        lines += [f"| `{name}` | {share:.0%} | {calls} |" for name, share, calls in c["ops"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens per generation (default 64)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens (default 16)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    add_doc_args(ap, "docs/benchmarks.md")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = bench(args.tokens, args.rounds, args.prompt)
    publish(args, {"compiled_decode": block(command_line("benchmarks/compiled_decode.py", argv), markdown(res))})


if __name__ == "__main__":
    main()
