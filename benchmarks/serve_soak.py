"""Soak test with faults for `lmforge serve`: for --minutes (default 5), 64 concurrent clients
on loopback mix streaming and whole answers, completions and chat, with clients that hang up
mid-stream, slow readers, malformed JSON, wrong types, invalid UTF-8, unknown fields, n above
the limit, prompts longer than the context, bodies over the size limit, and bursts past the
wait-queue limit.

    python benchmarks/serve_soak.py              (writes its table into docs/serving.md; --no-doc: print only)

Reports 5xx answers (must be 0), hung requests (no answer within --hang-s; must be 0), whether
every cancelled sequence's slot came back (the engine's /health counters once the clients stop),
the server's RSS growth after warm-up, p50/p95 time to first token and tokens/s. The server is a
subprocess on a random-init model (character tokenizer), so the clients do not share its
interpreter. Every loop is bounded by the deadline and stops by itself; the exit status is 1
when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs/serving.md"
KEY = "sk-soak"
NAME = "soak"
BLOCK = 256
MAX_BATCH, MAX_QUEUE, MAX_BODY = 16, 48, 64 * 1024
# kind -> statuses it may get (429 wherever the queue can be full)
EXPECTED = {
    "completion": {200, 429}, "completion_stream": {200, 429}, "chat": {200, 429}, "chat_stream": {200, 429},
    "disconnect": {200, 429}, "slow_reader": {200, 429}, "unknown_fields": {200, 429}, "burst": {200, 429},
    "malformed_json": {400}, "wrong_types": {422}, "invalid_utf8": {400, 422}, "n_too_big": {400},
    "prompt_too_long": {400}, "body_too_large": {413},
}
MIX = (["completion", "completion_stream", "chat", "chat_stream"] * 4
       + ["disconnect", "slow_reader", "unknown_fields", "malformed_json", "wrong_types", "invalid_utf8",
          "n_too_big", "prompt_too_long", "body_too_large"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_run(run_dir: Path) -> None:
    from lmforge.checkpoint import save_run
    from lmforge.models.gpt import GPT, GPTConfig
    from lmforge.tokenizers import CharTokenizer

    text = (REPO / "src/lmforge/assets/tinyshakespeare.txt").read_text(encoding="utf-8")
    tok = CharTokenizer.train(text)
    torch.manual_seed(0)
    save_run(run_dir, GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=BLOCK, n_layer=2, n_head=2,
                                    n_embd=64, dropout=0.0)), tok)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Soak:
    def __init__(self, url: str, deadline: float, hang_s: float, rng: random.Random):
        self.url, self.deadline, self.hang_s, self.rng = url, deadline, hang_s, rng
        self.statuses: Counter = Counter()  # (kind, status)
        self.ttft: list[float] = []
        self.tokens = 0
        self.hung = 0
        self.disconnects = 0
        self.h = {"Authorization": f"Bearer {KEY}"}

    def body(self, kind: str) -> tuple[str, dict]:
        r = self.rng
        prompt = r.choice(["ROMEO:", "To be, or not", "O", "First Citizen:\nBefore we proceed"])
        chat = kind.startswith("chat")
        route = "/v1/chat/completions" if chat else "/v1/completions"
        b = {"model": NAME, "max_tokens": r.randint(4, 48), "temperature": 0.8, "seed": r.randint(0, 9999)}
        b.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
        if kind.endswith("stream") or kind in ("disconnect", "slow_reader"):
            b["stream"] = True
        if kind in ("disconnect", "slow_reader"):
            b["max_tokens"] = 120
        if kind == "unknown_fields":
            b.update({"frobnicate": [1, 2], "user": "x", "logit_bias": {"1": 2}})
        if kind == "wrong_types":
            b[r.choice(["max_tokens", "temperature", "n", "stream"])] = r.choice(["many", [1], {"a": 1}])
        if kind == "n_too_big":
            b["n"] = MAX_BATCH + 1
        if kind == "prompt_too_long":
            b["prompt"] = "x" * (BLOCK + 10)
        if kind == "body_too_large":
            b["prompt"] = "y" * (MAX_BODY + 10)
        return route, b

    async def one(self, client: httpx.AsyncClient, kind: str, who: int) -> None:
        route, b = self.body(kind)
        content = json.dumps(b).encode()
        if kind == "malformed_json":
            content = content[: len(content) // 2]
        if kind == "invalid_utf8":
            content = content.replace(b'"O"', b'"\xff\xfe"').replace(b'"ROMEO:"', b'"\xc3\x28"')
            content = content if b"\xff" in content or b"\xc3" in content else content[:-1] + b', "x": "\xff"}'
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.hang_s):
                async with client.stream("POST", self.url + route, content=content,
                                         headers={**self.h, "Content-Type": "application/json"}) as resp:
                    status = resp.status_code
                    if status == 200 and b.get("stream"):
                        await self.read_stream(resp, kind, t0)
                    else:
                        data = await resp.aread()
                        if status == 200:
                            self.tokens += json.loads(data)["usage"]["completion_tokens"]
                        elif status >= 400:
                            assert "error" in json.loads(data), data[:200]
        except TimeoutError:
            self.hung += 1
            status = "hung"
        except httpx.TransportError as e:  # the server dropped the connection: a failure
            status = f"error:{type(e).__name__} (client {who})"
        self.statuses[kind, status] += 1
        if status == 429 and kind != "burst":  # as the official client does: wait as the server asks
            await asyncio.sleep(float(resp.headers.get("retry-after", 1)) * self.rng.uniform(0.5, 1.0))

    async def read_stream(self, resp, kind: str, t0: float) -> None:
        first, chunks = None, 0
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise RuntimeError(ev)
            chunks += 1
            if first is None:
                first = time.perf_counter() - t0
            if kind == "disconnect" and chunks >= 3:
                self.disconnects += 1
                return  # leaving the block closes the connection mid-stream
            if kind == "slow_reader":
                await asyncio.sleep(0.05)
        self.tokens += chunks
        if first is not None and kind != "slow_reader":
            self.ttft.append(first)

    async def client_loop(self, i: int) -> None:
        async with httpx.AsyncClient(timeout=None) as client:
            n = 0
            while time.monotonic() < self.deadline:
                if i == 0 and n % 10 == 9:  # a burst: 3x the queue limit at once, as many new clients
                    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=None)) as c:
                        await asyncio.gather(*(self.one(c, "burst", i) for _ in range(3 * MAX_QUEUE)))
                else:
                    await self.one(client, self.rng.choice(MIX), i)
                n += 1


async def soak(url: str, pid: int, seconds: float, warmup: float, hang_s: float, clients: int, seed: int):
    start = time.monotonic()
    s = Soak(url, start + seconds, hang_s, random.Random(seed))
    rss: list[tuple[float, int]] = []

    async def sample_rss():
        while time.monotonic() < s.deadline:
            rss.append((time.monotonic() - start, rss_kib(pid)))
            await asyncio.sleep(2.0)
        rss.append((time.monotonic() - start, rss_kib(pid)))

    await asyncio.gather(sample_rss(), *(s.client_loop(i) for i in range(clients)))
    elapsed = time.monotonic() - start
    async with httpx.AsyncClient(timeout=10) as c:  # the clients stopped: every slot must come back
        for _ in range(200):
            health = (await c.get(url + "/health")).json()
            if health["active"] == 0 and health["queued"] == 0:
                break
            await asyncio.sleep(0.05)
        metrics = (await c.get(url + "/metrics")).text
    after = [kib for t, kib in rss if t >= warmup]
    return s, health, metrics, elapsed, after


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def machine() -> str:
    info = Path("/proc/cpuinfo").read_text()
    model = re.search(r"model name\s*:\s*(.*)", info)
    flags = set(re.search(r"flags\s*:\s*(.*)", info).group(1).split())
    bf16 = ", ".join(f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags) or "none"
    return (f"{model.group(1) if model else platform.processor()}; bf16/AMX flags: {bf16}; "
            f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads); "
            f"{datetime.date.today().isoformat()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--warmup-s", type=float, default=30.0, help="RSS growth is measured after this")
    ap.add_argument("--hang-s", type=float, default=60.0, help="a request unanswered for this long is hung")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-doc", action="store_true", help="print the table only")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        make_run(run)
        port = free_port()
        env = {**os.environ, "LMFORGE_API_KEY": ""}
        proc = subprocess.Popen(
            [sys.executable, "-m", "lmforge", "serve", "--run", str(run), "--port", str(port), "--api-key", KEY,
             "--model-name", NAME, "--device", "cpu", "--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE),
             "--max-body-bytes", str(MAX_BODY), "--request-timeout", "120", "--shutdown-timeout", "10"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    httpx.get(url + "/health", timeout=1)
                    break
                except httpx.TransportError:
                    if proc.poll() is not None:
                        raise SystemExit(proc.stdout.read())
                    time.sleep(0.1)
            s, health, metrics, elapsed, rss = asyncio.run(
                soak(url, proc.pid, args.minutes * 60, args.warmup_s, args.hang_s, args.clients, args.seed))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = "killed"
    fivexx = sum(v for (k, st), v in s.statuses.items() if isinstance(st, int) and st >= 500)
    unexpected = {f"{k}:{st}": v for (k, st), v in s.statuses.items() if st not in EXPECTED[k]}
    growth = (max(rss) / rss[0] - 1) * 100 if rss else float("nan")
    freed = health["active"] == 0 and health["queued"] == 0
    total = sum(s.statuses.values())
    by_kind: dict[str, Counter] = {}
    for (k, st), v in s.statuses.items():
        by_kind.setdefault(k, Counter())[st] += v
    rows = [
        ("duration", f"{elapsed:.0f} s, {args.clients} clients"),
        ("requests", f"{total:,}"),
        ("responses 5xx", f"{fivexx}"),
        ("hung requests (no answer in {:.0f} s)".format(args.hang_s), f"{s.hung}"),
        ("statuses outside the expected ones", json.dumps(unexpected) if unexpected else "none"),
        ("429 (queue full)", f"{sum(c[429] for c in by_kind.values()):,}"),
        ("mid-stream disconnects / engine's cancelled sequences", f"{s.disconnects:,} / {health['cancelled']:,}"),
        ("slots free once clients stop (active, queued)", f"{'yes' if freed else 'NO'} ({health['active']}, {health['queued']})"),
        ("server RSS after warm-up: first -> max", f"{rss[0] / 1024:.0f} -> {max(rss) / 1024:.0f} MiB (+{growth:.1f}%)"),
        ("time to first token p50 / p95 (streams)", f"{pct(s.ttft, .5) * 1000:.0f} / {pct(s.ttft, .95) * 1000:.0f} ms"),
        ("completion tokens/s (all clients)", f"{s.tokens / elapsed:.0f}"),
        ("exit status after SIGTERM", f"{code}"),
    ]
    kinds = "; ".join(f"{k} {dict(sorted(c.items(), key=str))}" for k, c in sorted(by_kind.items()))
    cmd = "python benchmarks/serve_soak.py" + (f" --minutes {args.minutes:g}" if args.minutes != 5 else "")
    table = "\n".join(["| check | result |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows])
    text = (f"`{cmd}` on {machine()}. The machine is shared with other jobs, so tokens/s and latencies are "
            f"as measured under that load.\n\n{table}\n\nStatuses by kind: {kinds}.\n")
    print(text)
    ok = fivexx == 0 and s.hung == 0 and freed and not unexpected and growth <= 5 and code == 0
    if not args.no_doc:
        doc = DOC.read_text(encoding="utf-8")
        begin, end = "<!-- serve_soak:begin -->", "<!-- serve_soak:end -->"
        if begin in doc:
            head, rest = doc.split(begin, 1)
            doc = head + begin + "\n" + text + end + rest.split(end, 1)[1]
        else:
            doc = doc.rstrip("\n") + f"\n\n{begin}\n{text}{end}\n"
        tmp = DOC.with_suffix(".md.tmp")
        tmp.write_text(doc, encoding="utf-8")
        tmp.replace(DOC)
    print("all checks passed" if ok else "a check FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
