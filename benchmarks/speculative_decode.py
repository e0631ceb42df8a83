"""Speculative decoding on a trained pair: a character-level target of shakespeare-small's shape
(10.8M parameters) and a one-layer draft, both trained on the bundled corpus, batch-1 greedy
decoding and sampling with and without the draft, alternating in one process, fp32 and bf16.

    python benchmarks/speculative_decode.py [--target RUN --draft RUN] [--tokens 128] [--rounds 3]

Without --target/--draft it trains both first with `lmforge prepare` + `lmforge train` into
--work (about 35 minutes on 2 cores; --target-iters / --draft-iters change it). Reports tok/s,
the speed-up, the share of guesses kept, and what one round costs: a target step over one token
and over k + 1, and a draft step. Greedy outputs are checked equal. Writes its table into
docs/benchmarks.md between <!-- speculative_decode:begin --> and <!-- speculative_decode:end -->.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc_tables import add_doc_args, block, command_line, publish  # noqa: E402
from timing import median_time  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "src" / "lmforge" / "assets" / "tinyshakespeare.txt"
TRAIN = ["batch_size=16", "dtype=bfloat16", "eval_iters=20", "warmup_iters=40"]
DRAFT_SHAPE = ["n_layer=1", "n_head=4", "n_embd=128", "block_size=256", "dropout=0.0"]


def lmforge(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "lmforge", *args, "--no-progress"], check=True)


def train_pair(work: Path, target_iters: int, draft_iters: int, target_set: list[str]) -> tuple[Path, Path]:
    data = work / "data"
    if not (data / "meta.json").exists():
        lmforge("prepare", "--input", str(CORPUS), "--out", str(data))
    for name, preset, iters, extra in (("target", "shakespeare-small", target_iters, ["dropout=0.1", *target_set]),
                                       ("draft", "shakespeare-small", draft_iters, DRAFT_SHAPE)):
        if not (work / name / "model.safetensors").exists():
            lmforge("train", "--data", str(data), "--out", str(work / name), "--preset", preset, "--set",
                    f"max_iters={iters}", f"lr_decay_iters={iters}", f"eval_interval={iters}", *TRAIN, *extra)
    return work / "target", work / "draft"


def val_loss(run: Path) -> float | None:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    return rows[-1]["val_loss"] if rows else None


def step_ms(model, T: int, reps: int = 100) -> float:
    """One cached forward over T new tokens after a 64-token context."""
    cache = model.make_cache(1, 64 + T)
    x = torch.randint(0, model.config.vocab_size, (1, T))
    with torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (1, 64)), cache=cache)
        for _ in range(10):
            cache.pos = 64
            model(x, cache=cache)
        t0 = time.perf_counter()
        for _ in range(reps):
            cache.pos = 64
            model(x, cache=cache)
    return (time.perf_counter() - t0) / reps * 1e3


def bench(target_run: Path, draft_run: Path, tokens: int, rounds: int, ks: list[int], prompts: int,
          temperature: float) -> dict:
    import lmforge
    from lmforge.models.decoding import generate_ids
    from lmforge.models.speculative import SpeculativeStats, speculative_generate

    text = CORPUS.read_text(encoding="utf-8")
    res = {"tokens": tokens, "rounds": rounds, "prompts": prompts, "ks": ks, "dtypes": {}, "temperature": temperature,
           "val_loss": {"target": val_loss(target_run), "draft": val_loss(draft_run)}}
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        target, tok = lmforge.load(target_run, dtype=dtype)
        draft, _ = lmforge.load(draft_run, dtype=dtype)
        res["params"] = {"target": target.num_params(), "draft": draft.num_params()}
        res["shape"] = {n: {"n_layer": m.config.n_layer, "n_embd": m.config.n_embd} for n, m in
                        (("target", target), ("draft", draft))}
        starts = [len(text) * (i + 1) // (prompts + 1) for i in range(prompts)]  # spread over the text
        idxs = [torch.tensor([tok.encode(text[s:s + 64])]) for s in starts]
        stats = {(k, t): SpeculativeStats() for k in ks for t in (0.0, temperature)}
        fns = {}
        for t in (0.0, temperature):  # greedy, then sampled (seeded: each round draws the same tokens)
            fns[("target alone", t)] = lambda t=t: [generate_ids(target, i, tokens, temperature=t,
                                                                 generator=torch.Generator().manual_seed(n))
                                                    for n, i in enumerate(idxs)]
            for k in ks:
                fns[(f"k={k}", t)] = lambda k=k, t=t: [
                    speculative_generate(target, draft, i, tokens, k=k, temperature=t, stats=stats[k, t],
                                         generator=torch.Generator().manual_seed(n)) for n, i in enumerate(idxs)]
        with torch.no_grad():
            outs = {name: fn() for name, fn in fns.items()}  # warm-up, and the outputs to compare
            for s in stats.values():
                s.rounds = s.proposed = s.accepted = 0
            times = median_time(fns, rounds)
        rows = {}
        for (name, t), ts in times.items():
            base = statistics.median(times["target alone", t])
            k = None if name == "target alone" else int(name[2:])
            st = stats[k, t] if k else None
            rows[name, t] = {"tok_s": prompts * tokens / statistics.median(ts), "speedup": base / statistics.median(ts),
                             "same": all(torch.equal(a, b) for a, b in zip(outs[name, t], outs["target alone", t])),
                             "acceptance": st.acceptance_rate if st else None,
                             "per_round": (st.accepted + st.rounds) / st.rounds if st else None}
        res["greedy_text"] = tok.decode(outs["target alone", 0.0][0][0, idxs[0].shape[1]:].tolist())
        res["prompt_text"] = tok.decode(idxs[0][0].tolist())
        costs = {"target 1": step_ms(target, 1), "draft 1": step_ms(draft, 1), "draft 2": step_ms(draft, 2)}
        costs.update({f"target {k + 1}": step_ms(target, k + 1) for k in ks})
        res["dtypes"][label] = {"rows": rows, "costs": costs}
    return res


def markdown(d: dict) -> str:
    p, vl, t, dr = d["params"], d["val_loss"], d["shape"]["target"], d["shape"]["draft"]
    lines = [f"Target: {t['n_layer']} layers x {t['n_embd']} ({p['target'] / 1e6:.1f}M parameters, val loss "
             f"{vl['target']:.3f}); draft: {dr['n_layer']} layer(s) x {dr['n_embd']} ({p['draft'] / 1e6:.2f}M, "
             f"val loss {vl['draft']:.3f}); "
             f"both character-level, trained here on the bundled corpus. Batch 1, {d['prompts']} prompts of 64 "
             f"characters, {d['tokens']} greedy tokens each, median of {d['rounds']} alternating rounds.", ""]
    for label, r in d["dtypes"].items():
        lines += [f"**{label}**", "", "| temperature | decoding | tok/s | speed-up | kept guesses | tokens a round | "
                  "output equal to the target's |", "|---|---|---|---|---|---|---|"]
        for (name, t), row in r["rows"].items():
            acc = "" if row["acceptance"] is None else f"{row['acceptance']:.0%}"
            per = "" if row["per_round"] is None else f"{row['per_round']:.2f}"
            same = ("yes" if row["same"] else "no") if t == 0 else "sampled: distribution tested, not tokens"
            lines.append(f"| {t:g} | {name} | {row['tok_s']:.0f} | {row['speedup']:.2f}x | {acc} | {per} | {same} |")
        c = r["costs"]
        verify = ", ".join(f"{n.split()[1]} tokens {c[n]:.2f} ms" for n in c if n.startswith("target ") and n != "target 1")
        lines += ["", f"One cached forward: target over 1 token {c['target 1']:.2f} ms, over {verify}; "
                  f"draft over 1 token {c['draft 1']:.2f} ms, over 2 {c['draft 2']:.2f} ms.", ""]
    shown = d["greedy_text"][:120].replace("\n", " / ")
    lines += [f"What the target decodes greedily after the first prompt (fp32, newlines as ` / `): `{shown}`"]
    return "\n".join(lines).rstrip()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=Path, default=None, help="target run (default: train one into --work)")
    ap.add_argument("--draft", type=Path, default=None, help="draft run with the same tokenizer")
    ap.add_argument("--work", type=Path, default=Path("speculative-work"), help="where to train the pair")
    ap.add_argument("--target-iters", type=int, default=1600)
    ap.add_argument("--draft-iters", type=int, default=1600)
    ap.add_argument("--temperature", type=float, default=0.8, help="the sampled runs' temperature (default 0.8)")
    ap.add_argument("--target-set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="settings for training the target besides shakespeare-small's, e.g. n_layer=4 n_embd=1024")
    ap.add_argument("--section", default="speculative_decode", help="the docs section the table goes in")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--k", type=int, nargs="+", default=[2, 3, 4, 6], help="draft tokens a round to try")
    ap.add_argument("--threads", type=int, default=None)
    add_doc_args(ap, "docs/benchmarks.md")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.target is None) != (args.draft is None):
        sys.exit("give both --target and --draft, or neither (then both are trained)")
    target, draft = (args.target, args.draft) if args.target else train_pair(args.work, args.target_iters,
                                                                             args.draft_iters, args.target_set)
    res = bench(target, draft, args.tokens, args.rounds, args.k, args.prompts, args.temperature)
    publish(args, {args.section: block(command_line("benchmarks/speculative_decode.py", argv), markdown(res))})


if __name__ == "__main__":
    main()
