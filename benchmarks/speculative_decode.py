"""Speculative decoding on a trained pair: a character-level target of shakespeare-small's shape
(10.8M parameters) and one-layer drafts, one trained on the bundled corpus and one on text the
target wrote; batch-1 greedy decoding and sampling with and without a draft, alternating in one
process, fp32 and bf16.

    python benchmarks/speculative_decode.py [--target RUN --draft RUN] [--tokens 128] [--rounds 3]

Without --target/--draft it trains both first with `lmforge prepare` + `lmforge train` into
--work (about 35 minutes on 2 cores; --target-iters / --draft-iters change it), then the distilled
draft (--distill-chars characters of the target's continuations; a few minutes). Reports tok/s,
the speed-up, the share of guesses kept, and what one round costs: a target step over one token
and over k + 1, and a draft step. Greedy outputs are checked equal. Writes its table into
docs/benchmarks.md between <!-- speculative_decode:begin --> and <!-- speculative_decode:end -->.
"""

from __future__ import annotations

import argparse
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
        train(data, work / name, iters, extra)
    return work / "target", work / "draft"


def train(data: Path, out: Path, iters: int, extra: list[str]) -> None:
    if not (out / "model.safetensors").exists():
        lmforge("train", "--data", str(data), "--out", str(out), "--preset", "shakespeare-small", "--set",
                f"max_iters={iters}", f"lr_decay_iters={iters}", f"eval_interval={iters}", *TRAIN, *extra)


def prompt_starts(n_chars: int, prompts: int) -> list[int]:
    """Where the timed prompts begin: spread over the text."""
    return [n_chars * (i + 1) // (prompts + 1) for i in range(prompts)]


def distill_draft(target_run: Path, work: Path, chars: int, iters: int, temperature: float,
                  avoid: list[int]) -> Path:
    """A draft trained on text the target wrote (sequence-level distillation): the
    continuations (224 characters) of 32-character prompts, half greedy and half sampled at
    `temperature`, tokenized with the target's own tokenizer. A draft that learns the target's
    choices, not the corpus's, keeps more of its guesses. No prompt starts within 1,000
    characters of a timed prompt (`avoid`)."""
    from lmforge import load

    out, text_path = work / "draft-distilled", work / "distill.txt"
    if not text_path.exists():
        target, tok = load(target_run)
        corpus = CORPUS.read_text(encoding="utf-8")
        rng, pieces, total, batch = torch.Generator().manual_seed(0), [], 0, 0
        with torch.no_grad():
            while total < chars:
                starts = [s for s in torch.randint(0, len(corpus) - 64, (96,), generator=rng).tolist()
                          if all(abs(s - a) > 1000 for a in avoid)][:64]
                idx = torch.tensor([tok.encode(corpus[s:s + 32]) for s in starts])
                t = 0.0 if batch % 2 == 0 else temperature
                new = target.generate(idx, 224, temperature=t, generator=rng)[:, idx.shape[1]:]
                pieces += [tok.decode(row) for row in new.tolist()]
                total, batch = total + new.numel(), batch + 1
                print(f"distillation text: {total:,} of {chars:,} characters", flush=True)
        tmp = text_path.with_suffix(".tmp")
        tmp.write_text("\n\n".join(pieces), encoding="utf-8")
        tmp.rename(text_path)
    data = work / "distill-data"
    if not (data / "meta.json").exists():
        lmforge("prepare", "--input", str(text_path), "--tokenizer", str(target_run / "tokenizer.json"),
                "--out", str(data))
    train(data, out, iters, DRAFT_SHAPE)
    return out


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


def corpus_val_loss(model, tok, text: str, n_chars: int = 65536) -> float:
    """Mean cross-entropy on the first n_chars of the corpus's validation split (its last 10%),
    so drafts trained on different data are scored on the same text."""
    ids = torch.tensor(tok.encode(text[int(len(text) * 0.9):][:n_chars]))
    T = model.config.block_size
    rows = ids[:len(ids) // (T + 1) * (T + 1)].view(-1, T + 1)
    with torch.no_grad():
        losses = [model(r[None, :-1].clone(), targets=r[None, 1:].clone())[1].item() for r in rows]
    return sum(losses) / len(losses)


def bench(target_run: Path, drafts: dict[str, Path], tokens: int, rounds: int, ks: list[int], prompts: int,
          temperature: float) -> dict:
    import lmforge
    from lmforge.models.decoding import generate_ids
    from lmforge.models.speculative import SpeculativeStats, speculative_generate

    text = CORPUS.read_text(encoding="utf-8")
    res = {"tokens": tokens, "rounds": rounds, "prompts": prompts, "ks": ks, "dtypes": {}, "temperature": temperature,
           "drafts": {}}
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        target, tok = lmforge.load(target_run, dtype=dtype)
        models = {name: lmforge.load(run, dtype=dtype)[0] for name, run in drafts.items()}
        if label == "fp32":
            res["target"] = {"params": target.num_params(), "n_layer": target.config.n_layer,
                             "n_embd": target.config.n_embd, "val_loss": corpus_val_loss(target, tok, text)}
            res["drafts"] = {name: {"params": m.num_params(), "n_layer": m.config.n_layer, "n_embd": m.config.n_embd,
                                    "val_loss": corpus_val_loss(m, tok, text)} for name, m in models.items()}
        idxs = [torch.tensor([tok.encode(text[s:s + 64])]) for s in prompt_starts(len(text), prompts)]
        runs = {}  # row name -> (draft name, k)
        stats = {}
        fns = {}
        for t in (0.0, temperature):  # greedy, then sampled (seeded: each round draws the same tokens)
            fns[("target alone", t)] = lambda t=t: [generate_ids(target, i, tokens, temperature=t,
                                                                 generator=torch.Generator().manual_seed(n))
                                                    for n, i in enumerate(idxs)]
            for dname, draft in models.items():
                for k in ks:
                    name = f"{dname} draft, k={k}"
                    runs[name], stats[name, t] = (dname, k), SpeculativeStats()
                    fns[name, t] = lambda draft=draft, k=k, t=t, st=stats[name, t]: [
                        speculative_generate(target, draft, i, tokens, k=k, temperature=t, stats=st,
                                             generator=torch.Generator().manual_seed(n)) for n, i in enumerate(idxs)]
        with torch.no_grad():
            outs = {name: fn() for name, fn in fns.items()}  # warm-up, and the outputs to compare
            for st in stats.values():
                st.rounds = st.proposed = st.accepted = 0
            times = median_time(fns, rounds)
        rows = {}
        for (name, t), ts in times.items():
            base = statistics.median(times["target alone", t])
            st = stats.get((name, t))
            rows[name, t] = {"tok_s": prompts * tokens / statistics.median(ts), "speedup": base / statistics.median(ts),
                             "same": all(torch.equal(a, b) for a, b in zip(outs[name, t], outs["target alone", t])),
                             "acceptance": st.acceptance_rate if st else None,
                             "per_round": (st.accepted + st.rounds) / st.rounds if st else None}
        res["greedy_text"] = tok.decode(outs["target alone", 0.0][0][0, idxs[0].shape[1]:].tolist())
        costs = {"target 1": step_ms(target, 1)}
        costs.update({f"target {k + 1}": step_ms(target, k + 1) for k in ks})
        costs["draft 1"] = step_ms(next(iter(models.values())), 1)
        res["dtypes"][label] = {"rows": rows, "costs": costs}
    return res


DRAFT_TEXT = {"corpus": "trained on the corpus", "distilled": "trained on text the target wrote"}


def markdown(d: dict) -> str:
    t = d["target"]
    drafts = "; ".join(f"*{name}* draft: {r['n_layer']} layer(s) x {r['n_embd']} ({r['params'] / 1e6:.2f}M, "
                       f"{DRAFT_TEXT.get(name, name)}, val loss {r['val_loss']:.3f})" for name, r in d["drafts"].items())
    lines = [f"Target: {t['n_layer']} layers x {t['n_embd']} ({t['params'] / 1e6:.1f}M parameters, val loss "
             f"{t['val_loss']:.3f}); {drafts}. All character-level with one tokenizer, trained here; val loss on the "
             f"same 64K characters of the corpus's validation split. Batch 1, {d['prompts']} prompts of 64 "
             f"characters, {d['tokens']} tokens each, median of {d['rounds']} alternating rounds.", ""]
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
                  f"a draft over 1 token {c['draft 1']:.2f} ms.", ""]
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
    ap.add_argument("--distill-chars", type=int, default=1_000_000,
                    help="also train a draft on this many characters the target wrote (0: no distilled draft)")
    ap.add_argument("--target-set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="settings for training the target besides shakespeare-small's, e.g. n_layer=4 n_embd=1024")
    ap.add_argument("--section", default="speculative_decode", help="the docs section the table goes in")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--k", type=int, nargs="+", default=[2, 3, 4], help="draft tokens a round to try")
    ap.add_argument("--threads", type=int, default=None)
    add_doc_args(ap, "docs/benchmarks.md")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.target is None) != (args.draft is None):
        sys.exit("give both --target and --draft, or neither (then both are trained)")
    target, draft = (args.target, args.draft) if args.target else train_pair(args.work, args.target_iters,
                                                                             args.draft_iters, args.target_set)
    drafts = {"corpus": draft}
    if args.distill_chars:
        drafts["distilled"] = distill_draft(target, args.work, args.distill_chars, args.draft_iters, args.temperature,
                                            prompt_starts(len(CORPUS.read_text(encoding="utf-8")), args.prompts))
    res = bench(target, drafts, args.tokens, args.rounds, args.k, args.prompts, args.temperature)
    publish(args, {args.section: block(command_line("benchmarks/speculative_decode.py", argv), markdown(res))})


if __name__ == "__main__":
    main()
