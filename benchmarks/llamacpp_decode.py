"""Batch-1 CPU decoding, lmforge against llama.cpp (through llama-cpp-python), on the same
weights: each model is a random-init lmforge run, exported with `lmforge export-gguf` and loaded
by llama.cpp, so both decode the same function. Same thread count, 16-token prompt, 128 greedy
tokens, each side's own greedy loop (argmax of the last logits, one token fed back per step).

Per weight type: lmforge fp32 / bf16 / int8 (weight-only, `prepare_for_decoding(int8=True)`), each
also with the compiled step (`CompiledDecoder`, what `--compile` runs), against llama.cpp f32 /
bf16 and f16 / q8_0; each contender's share of the memory-bandwidth bound
(decoding a token reads every weight once: bound = read bandwidth / bytes of weights per token,
with the bandwidth measured in every round between the contenders, since a shared machine's
bandwidth drifts by 20-30% over a run).

    python benchmarks/llamacpp_decode.py --threads 2 --rounds 3 --shapes gpt2 llama-1b [--compiled fp32 bf16 int8]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc_tables import add_doc_args, block, command_line, publish  # noqa: E402
from timing import median_time, memory_bandwidth  # noqa: E402

SHAPES = {
    "gpt2": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "llama-1b": dict(vocab_size=128256, block_size=2048, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048,
                     mlp_hidden_size=8192, bias=False, pos_encoding="rope", norm="rmsnorm", mlp="swiglu",
                     norm_eps=1e-5, rope_theta=500000.0, rope_scaling="llama3", rope_factor=32.0,
                     rope_original_max_position=8192, tie_embeddings=True),
}
LABELS = {"gpt2": "GPT-2 124M shape", "llama-1b": "Llama-3.2-1B shape"}
# (lmforge contender, llama.cpp contenders, bytes per weight of each)
PAIRS = [("fp32", ["f32"]), ("bf16", ["bf16", "f16"]), ("int8", ["q8_0"])]
BYTES = {"fp32": 4, "f32": 4, "bf16": 2, "f16": 2, "int8": 1, "q8_0": 34 / 32}
PROBE = """
import sys, llama_cpp
from llama_cpp import llama_cpp as lib
if sys.argv[2] == "0":
    d = lib.llama_model_default_params
    def p():
        q = d(); q.use_extra_bufts = False; return q
    lib.llama_model_default_params = p
llm = llama_cpp.Llama(sys.argv[1], n_ctx=64, n_threads=1, verbose=False)
llm.eval(list(range(1, 9)))
print("ok")
"""


def make_run(shape: str, tmp: Path):
    """A random-init run of the shape (bf16 weights for the 1B shape: 2.5 GB) with a small BPE
    tokenizer (the model's other embedding rows are padding to llama.cpp)."""
    from lmforge.checkpoint import save_run
    from lmforge.models.gpt import GPT, GPTConfig
    from lmforge.tokenizers import BPETokenizer

    torch.manual_seed(0)
    model = GPT(GPTConfig(**SHAPES[shape])).eval()
    if shape != "gpt2":
        model.to(torch.bfloat16)
    text = (Path(__file__).resolve().parents[1] / "src/lmforge/assets/tinyshakespeare.txt").read_text()[:50_000]
    run = tmp / shape
    save_run(run, model, BPETokenizer.train(text, 512))
    n_weights = model.num_params() - (model.pos_emb.weight.numel() if model.pos_emb is not None else 0)
    del model
    gc.collect()
    return run, n_weights


def repacking_works(path: Path) -> bool:
    """Whether llama.cpp decodes this file with its repacked CPU weight layouts (the "extra buffer
    types"); in a child process, because where it fails it crashes (seen for q8_0 on an AMX Xeon)."""
    r = subprocess.run([sys.executable, "-c", PROBE, str(path), "1"], capture_output=True, text=True)
    return r.returncode == 0 and "ok" in r.stdout


def open_llama(path: Path, threads: int, repack: bool):
    import llama_cpp
    from llama_cpp import llama_cpp as lib

    default = lib.llama_model_default_params
    if not repack:
        def params():
            p = default()
            p.use_extra_bufts = False
            return p
        lib.llama_model_default_params = params
    try:
        return llama_cpp.Llama(str(path), n_ctx=256, n_threads=threads, n_threads_batch=threads, verbose=False)
    finally:
        lib.llama_model_default_params = default


def llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    """llama.cpp's own logits of the last position (without logits_all, llama-cpp-python keeps
    none), argmax, feed back."""
    import llama_cpp

    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        out.append(int(np.argmax(logits)))
        llm.eval(out[-1:])
    return out


def lmforge_model(run: Path, kind: str):
    from lmforge.checkpoint import load_run
    from lmforge.models.decoding import prepare_for_decoding

    if kind == "int8":
        model, _ = load_run(run, inference=False, dtype=torch.float32)
        return prepare_for_decoding(model, int8=True)
    model, _ = load_run(run, dtype=torch.float32 if kind == "fp32" else torch.bfloat16)
    return model


def lmforge_compiled(run: Path, kind: str, positions: int):
    from lmforge.checkpoint import load_run
    from lmforge.models.compiled import CompiledDecoder
    from lmforge.models.decoding import prepare_for_decoding

    model, _ = load_run(run, inference=False, dtype=torch.bfloat16 if kind == "bf16" else torch.float32)
    return CompiledDecoder(prepare_for_decoding(model, int8=True) if kind == "int8" else model, max_len=positions)


def available_gb() -> float:
    """MemAvailable from /proc/meminfo (inf where there is none)."""
    try:
        line = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return float("inf")
    return int(line.split()[1]) / 1e6


def bench_shape(shape: str, threads: int, rounds: int, new_tokens: int, prompt_len: int,
                compiled_kinds: tuple[str, ...] = ()) -> dict[str, Any]:
    from lmforge.interop.gguf_export import export_gguf
    from lmforge.models.decoding import generate_ids

    torch.set_num_threads(threads)
    results: dict[str, list[float]] = {}
    same: dict[str, float] = {}  # llama.cpp's greedy tokens equal to lmforge's, per contender
    bandwidth: dict[str, float] = {}  # GB/s read in the same rounds, per contender
    compile_s: dict[str, float] = {}
    too_big: dict[str, str] = {}  # compiled contenders that would not fit in memory, and why
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        tmp = Path(d)
        run, n_weights = make_run(shape, tmp)
        prompt = torch.randint(3, 500, (1, prompt_len), generator=torch.Generator().manual_seed(1))
        for ours, theirs in PAIRS:  # one weight type at a time: its contenders in memory together
            paths = {}
            for qtype in theirs:  # files first: export's peak memory is then not beside the models
                paths[qtype] = tmp / f"{shape}.{qtype}.gguf"
                t0 = time.perf_counter()
                export_gguf(run, paths[qtype], qtype)
                print(f"{shape} {qtype}: exported {paths[qtype].stat().st_size / 1e9:.2f} GB in "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
            model = lmforge_model(run, ours)
            fns = {f"lmforge {ours}": lambda m=model: generate_ids(m, prompt, new_tokens, temperature=0.0)}
            with torch.no_grad():
                ids = fns[f"lmforge {ours}"]()[0, prompt_len:].tolist()  # also the warm-up
            compiled = None
            need = 3 * n_weights * BYTES[ours] / 1e9  # its model, the frozen copy, and packing on the way
            free = available_gb() - n_weights * BYTES[ours] / 1e9  # llama.cpp's file is still to load
            if ours in compiled_kinds and need > free:
                too_big[f"lmforge {ours} compiled"] = (f"needs about {need:.0f} GB for its model and the graph's "
                                                       f"frozen copy of the weights, with {free:.0f} GB free once "
                                                       "llama.cpp's file is loaded too")
            elif ours in compiled_kinds:  # `--compile`: the step compiled over a static cache
                compiled = lmforge_compiled(run, ours, prompt_len + new_tokens)
                fns[f"lmforge {ours} compiled"] = lambda d=compiled: d.generate(prompt, new_tokens, temperature=0.0)
                got = fns[f"lmforge {ours} compiled"]()[0, prompt_len:]  # compiles
                same[f"lmforge {ours} compiled"] = float(np.mean(got.numpy() == np.array(ids)))
                compile_s[f"lmforge {ours} compiled"] = compiled.compile_seconds
            llms = []
            for qtype, path in paths.items():
                repack = repacking_works(path)
                llm = open_llama(path, threads, repack)
                label = f"llama.cpp {qtype}" + ("" if repack else " (no weight repacking)")
                fns[label] = lambda llm=llm: llama_greedy(llm, prompt[0].tolist(), new_tokens)
                same[label] = float(np.mean(np.array(fns[label]()) == np.array(ids)))  # and warm-up
                llms.append(llm)
            read: list[float] = []  # the bandwidth bound, measured in every round beside the contenders
            fns["read bandwidth"] = lambda: read.append(memory_bandwidth(repeats=3)["read_gb_s"])
            with torch.no_grad():
                results.update(median_time(fns, rounds))  # rounds alternate between the contenders
            del results["read bandwidth"], fns["read bandwidth"]
            bandwidth.update({name: statistics.median(read) for name in fns})
            print(f"{shape} {ours}: {json.dumps({k: results[k] for k in fns})}, read GB/s {read}", flush=True)
            for llm in llms:
                llm.close()
            for path in paths.values():
                path.unlink()
            del model, compiled, llms, fns
            gc.collect()
    return {"n_weights": n_weights, "times": results, "same": same, "bandwidth": bandwidth, "compile_s": compile_s,
            "too_big": too_big}


def markdown(res: dict[str, Any]) -> str:
    lines = [f"Batch 1, {res['prompt']}-token prompt, {res['new_tokens']} greedy tokens, {res['threads']} threads "
             f"on both sides, median of {res['rounds']} alternating rounds after a warm-up. "
             "*read GB/s*: memory bandwidth (torch `sum` over 1 GiB, best of 3) measured in every one of those "
             "rounds, between the contenders, median; bound = that bandwidth / bytes of weights per token. "
             "*same* = share of the contender's greedy tokens equal to eager lmforge's at that weight type; "
             "*compiled*: `CompiledDecoder` (`--compile`), compiled before timing.", "",
             "| model | contender | tok/s | read GB/s | bound tok/s | share of bound | same tokens |",
             "|---|---|---|---|---|---|---|"]
    for shape, r in res["shapes"].items():
        if "skipped" in r:
            lines.append(f"| {LABELS[shape]} | not measured: {r['skipped']} | | | | | |")
            continue
        for name, ts in r["times"].items():
            tok_s = res["new_tokens"] / statistics.median(ts)
            kind = name.split()[1]
            bw = r["bandwidth"][name]
            bound = bw * 1e9 / (r["n_weights"] * BYTES[kind])
            same = r["same"].get(name)
            lines.append(f"| {LABELS[shape]} | {name} | {tok_s:.1f} | {bw:.1f} | {bound:.1f} | {tok_s / bound:.0%} | "
                         f"{'' if same is None else f'{same:.0%}'} |")
    compiles = [f"{LABELS[shape]} {name.split()[1]} {sec:.0f} s" for shape, r in res["shapes"].items()
                for name, sec in r.get("compile_s", {}).items()]
    if compiles:
        lines += ["", "Compile time of the compiled contenders (once, before timing): " + ", ".join(compiles) + "."]
    lines += [f"Not measured: {LABELS[shape]} {name}, which {why}." for shape, r in res["shapes"].items()
              for name, why in r.get("too_big", {}).items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--compiled", nargs="*", default=["fp32", "bf16", "int8"], choices=["fp32", "bf16", "int8"],
                    help="weight types that also get a compiled lmforge contender (default all three; compiling "
                         "takes 0.5-1.5 min each, kept out of tok/s; one that would not fit in memory is skipped)")
    ap.add_argument("--skip", action="append", default=[], metavar="SHAPE=REASON",
                    help="record SHAPE as not measured, with the reason")
    add_doc_args(ap, "docs/benchmarks.md")
    args = ap.parse_args(argv)
    res: dict[str, Any] = {"threads": args.threads, "rounds": args.rounds, "new_tokens": args.new_tokens,
                           "prompt": args.prompt, "shapes": {}}
    skipped = dict(s.split("=", 1) for s in args.skip)
    for shape in args.shapes:
        if shape in skipped:
            res["shapes"][shape] = {"skipped": skipped[shape]}
            continue
        res["shapes"][shape] = bench_shape(shape, args.threads, args.rounds, args.new_tokens, args.prompt,
                                           tuple(args.compiled))
    load = os.getloadavg()
    note = ("Both decode the same random-init weights: the GGUF files are `lmforge export-gguf` of the run lmforge "
            f"times. Load average at the end of the run: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
            f"(1 / 5 / 15 min) on {os.cpu_count()} cores.")
    publish(args, {"llamacpp_decode": block(command_line("benchmarks/llamacpp_decode.py", argv), markdown(res), note)})
    return res


if __name__ == "__main__":
    main()
