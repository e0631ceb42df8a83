"""Load test for `lmforge serve`: 50 concurrent streaming requests against the batching
scheduler, compared in the same run with the same 50 requests sent one after another.

    python benchmarks/serve_load.py            (refreshes its table in docs/serving.md; --no-doc: print only)

Starts `lmforge serve` as a subprocess (so the client does not share the server's
interpreter) on a random-init model of a preset's shape with the character tokenizer of the
embedded Shakespeare text; every request generates exactly --max-tokens tokens (a character
tokenizer has no end-of-text token and no stop strings are set), so the runs do equal work.
Also reports the library's own `lmforge.generate` speed, without HTTP, as a reference.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc_tables import add_doc_args, block, command_line, publish  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_run(run_dir: Path, preset: str) -> None:
    from lmforge.checkpoint import save_run
    from lmforge.models.gpt import GPT, GPTConfig
    from lmforge.models.presets import PRESETS
    from lmforge.tokenizers import CharTokenizer

    text = (REPO / "src/lmforge/assets/tinyshakespeare.txt").read_text(encoding="utf-8")
    tok = CharTokenizer.train(text)
    torch.manual_seed(0)
    cfg = {**PRESETS[preset]["model_config"], "vocab_size": tok.vocab_size, "dropout": 0.0}
    save_run(run_dir, GPT(GPTConfig(**cfg)), tok)


def prompts(n: int) -> list[str]:
    lines = ["ROMEO:", "First Citizen:\nBefore we proceed", "To be, or not to be", "KING RICHARD III:\nNow is",
             "O", "What light through yonder window breaks?"]
    return [lines[i % len(lines)] for i in range(n)]


TEMPERATURE = 0.8


async def one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, seed: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": TEMPERATURE, "seed": seed,
            "stream": True}
    t0 = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            tokens += 1
            if first is None:
                first = time.perf_counter() - t0
    return {"latency": time.perf_counter() - t0, "ttft": first, "tokens": tokens}


async def run_load(url: str, model: str, n: int, max_tokens: int, concurrent: bool) -> dict:
    limits = httpx.Limits(max_connections=n + 5, max_keepalive_connections=n + 5)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        ps = prompts(n)
        t0 = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(one(client, model, p, max_tokens, i) for i, p in enumerate(ps)),
                                           return_exceptions=True)
        else:
            results = []
            for i, p in enumerate(ps):
                try:
                    results.append(await one(client, model, p, max_tokens, i))
                except Exception as e:
                    results.append(e)
        wall = time.perf_counter() - t0
    ok = [r for r in results if isinstance(r, dict)]
    lat = sorted(r["latency"] for r in ok)
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
    return {"requests": n, "errors": n - len(ok), "tokens": sum(r["tokens"] for r in ok), "wall": wall,
            "tok_s": sum(r["tokens"] for r in ok) / wall, "p50": q[49], "p95": q[94],
            "ttft_p50": statistics.median(r["ttft"] for r in ok)}


def library_speed(run_dir: Path, n: int, max_tokens: int, dtype: str = "float32") -> dict:
    """`lmforge.generate`, one prompt at a time, in this process: the model alone, no HTTP."""
    import lmforge

    model, tok = lmforge.load(run_dir, device="cpu", dtype=getattr(torch, dtype))
    lmforge.generate(model, tok, "warm", max_new_tokens=4)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts(n)):
        lmforge.generate(model, tok, p, max_new_tokens=max_tokens, temperature=TEMPERATURE, seed=i)
    wall = time.perf_counter() - t0
    return {"tokens": n * max_tokens, "wall": wall, "tok_s": n * max_tokens / wall}


def start_server(run_dir: Path, port: int, max_batch: int, threads: int,
                 dtype: str = "float32", extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "lmforge", "serve", "--run", str(run_dir), "--port", str(port),
           "--max-batch", str(max_batch), "--device", "cpu", "--model-name", "bench", "--dtype", dtype, *extra]
    env = {**os.environ, "LMFORGE_API_KEY": "", "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600  # --compile compiles before it listens
    while True:
        try:
            httpx.get(f"{url}/health", timeout=2).raise_for_status()
            return proc, url
        except httpx.TransportError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"server did not start: {proc.stderr.read() if proc.stderr else ''}")
            time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="shakespeare-small", help="model shape (random init)")
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="rounds; each round runs every setting once, "
                                                            "interleaved, and the table shows medians")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server and the library run")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the server's dtype")
    ap.add_argument("--section", default="serve_load", help="the docs section the table goes in (default serve_load)")
    ap.add_argument("--run", type=Path, default=None, help="serve this run instead of a random-init --preset model")
    ap.add_argument("--draft", type=Path, default=None,
                    help="also run every setting against a server with --draft RUN (speculative decoding)")
    ap.add_argument("--compile", action="store_true",
                    help="also run every setting against a server with --compile (the compiled batch step)")
    ap.add_argument("--max-context", type=int, default=None,
                    help="every server's --max-context (the compiled step attends over all of it)")
    ap.add_argument("--temperature", type=float, default=0.8, help="the requests' temperature (default 0.8)")
    add_doc_args(ap, "docs/serving.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global TEMPERATURE
    TEMPERATURE = args.temperature
    n, m = args.requests, args.max_tokens
    settings = [("sequential (1 in flight)", n, False), (f"{n} concurrent, --max-batch {n}", n, True),
                (f"{n} concurrent, --max-batch 16", 16, True)]
    settings = list({label: (label, b, c) for label, b, c in settings}.values())  # n = 16: one concurrent row
    # the same settings against servers with each variant's options; keys are (max_batch, options)
    common = ("--max-context", str(args.max_context)) if args.max_context else ()
    variants = [("", common)] + [(f", {flag}", (*common, *opts)) for flag, opts, on in (
        ("--draft", ("--draft", str(args.draft)), args.draft), ("--compile", ("--compile",), args.compile)) if on]
    settings = [(lab + suffix, (b, opts), c) for suffix, opts in variants for lab, b, c in settings]
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in settings}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run or Path(tmp) / "run"
        if args.run is None:
            make_run(run_dir, args.preset)
        servers = {key: start_server(run_dir, free_port(), key[0], args.threads, args.dtype, extra=key[1])
                   for key in {key for _, key, _ in settings}}
        try:
            for b, (proc, url) in servers.items():
                asyncio.run(run_load(url, "bench", 2, 4, False))  # warm up
            lib = []
            for rnd in range(args.repeats):
                for label, b, concurrent in settings:
                    res = asyncio.run(run_load(servers[b][1], "bench", n, m, concurrent))
                    runs[label].append(res)
                    print(f"round {rnd}", label, {k: round(v, 3) if isinstance(v, float) else v
                                                   for k, v in res.items()}, flush=True)
                lib.append(library_speed(run_dir, min(n, 10), m, args.dtype))
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=30)

    def med(rs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rs)

    base = med(runs[settings[0][0]], "tok_s")
    table = ["| run | requests | errors (all rounds) | tokens | wall (s) | tokens/s | vs sequential | "
             "p50 latency (s) | p95 latency (s) | p50 first token (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, rs in runs.items():
        table.append(f"| {label} | {n} | {sum(r['errors'] for r in rs)} | {rs[0]['tokens']} | {med(rs, 'wall'):.2f} | "
                     f"{med(rs, 'tok_s'):.0f} | {med(rs, 'tok_s') / base:.2f}x | {med(rs, 'p50'):.2f} | "
                     f"{med(rs, 'p95'):.2f} | {med(rs, 'ttft_p50'):.3f} |")
    lt = med(lib, "tok_s")
    table.append(f"| library `lmforge.generate`, no HTTP, 1 at a time ({min(n, 10)} prompts) | - | - | "
                 f"{lib[0]['tokens']} | {med(lib, 'wall'):.2f} | {lt:.0f} | {lt / base:.2f}x | - | - | - |")
    model = (f"the run `{args.run.name}`" if args.run else
             f"random-init GPT of preset `{args.preset}` with the character tokenizer")
    drafted = (f", with the draft `{args.draft.name}` on the --draft rows" if args.draft else "") + \
        (f"; every server with --max-context {args.max_context}" if args.max_context else "")
    note = (f"Model: {model} in {args.dtype}{drafted}; {m} new tokens per "
            f"request, temperature {args.temperature:g}; medians of {args.repeats} interleaved rounds.")
    publish(args, {args.section: block(command_line("benchmarks/serve_load.py"), "\n".join(table), note)})


if __name__ == "__main__":
    main()
