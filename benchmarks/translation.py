"""German -> English on Multi30k: train for a wall-clock budget, then score test2016.

    OMP_NUM_THREADS=1 nice python benchmarks/translation.py train --out runs/m30k --minutes 35 \
        --set max_iters=800 --set warmup_iters=100
    OMP_NUM_THREADS=1 python benchmarks/translation.py report --run runs/m30k

`train` is `lmforge translate train` (same trainer, preset transformer-multi30k) plus a clock:
at 15, 30, 45 and 60 minutes of training it saves a snapshot of the model (RUN/at-15min, ...),
and at --minutes it stops (as Ctrl-C does: the checkpoint is saved). `report` scores every
snapshot and the final model on test2016 with sacreBLEU (13a, cased) and the papers' metric
(lower-cased Moses-tokenized references), measures decode speed with the KV cache against the
same model decoding without it (the peer), and refreshes its tables in docs/translation.md
(between their markers; --no-doc prints them only, --markdown FILE writes them there).
Multi30k is read from --data (default ../shared/data/multi30k); it is never copied."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "multi30k"
MARKS = (15, 30, 45, 60)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc_tables import add_doc_args  # noqa: E402


def torch_no_grad(fn):
    import torch

    return torch.no_grad()(fn)


def _minutes_trained(run_dir: Path) -> float:
    """Training minutes at the last checkpoint (every eval records them)."""
    from lmforge.plot import read_metrics

    return max([r["minutes"] for r in read_metrics(run_dir) if "minutes" in r] or [0.0])


def cmd_train(args: argparse.Namespace) -> None:
    from lmforge.checkpoint import save_run
    from lmforge.translate.train import build_translation_trainer

    d = Path(args.data)
    trainer = build_translation_trainer(str(d / "train.de"), str(d / "train.en"), str(d / "val.de"),
                                        str(d / "val.en"), args.out, args.preset, args.overrides,
                                        resume=args.resume, progress=not args.no_progress)
    done_before = args.clock_offset if args.clock_offset is not None else (
        _minutes_trained(Path(args.out)) if args.resume else 0.0)  # the clock goes on after a resume
    clock = {"start": time.perf_counter() - 60 * done_before,
             "marks": [m for m in MARKS if done_before < m < args.minutes] + [args.minutes]}
    inner = trainer.eval_hook
    recent: deque = deque(maxlen=args.average_last)  # weights at the last K evals, for averaging

    def hook(tr):
        res = inner(tr) if inner else {}
        minutes = (time.perf_counter() - clock["start"]) / 60
        res["minutes"] = round(minutes, 2)
        if args.average_last:
            recent.append({k: v.detach().clone() for k, v in tr.model.state_dict().items()})
        while clock["marks"] and minutes >= clock["marks"][0]:
            mark = clock["marks"].pop(0)
            if mark < args.minutes:
                save_run(Path(args.out) / f"at-{mark}min", tr.model, tr.tokenizer,
                         {"iter": tr.iter, "minutes": round(minutes, 2)})
            else:
                signal.raise_signal(signal.SIGINT)  # the trainer saves and stops after this step
        return res

    trainer.eval_hook = hook
    res = trainer.fit()
    if len(recent) > 1:  # checkpoint averaging: the mean of the weights at the last K evals
        avg = {k: sum(sd[k].float() for sd in recent) / len(recent) for k in recent[0]}
        model = trainer.model
        model.load_state_dict({k: v.to(recent[0][k].dtype) for k, v in avg.items()})
        save_run(Path(args.out) / "averaged", model, trainer.tokenizer,
                 {"iter": trainer.iter, "averaged_evals": len(recent)})
    print(json.dumps({"iter": trainer.iter, **res}))


@torch_no_grad
def greedy_uncached(model, src):
    """The peer for decode speed: greedy decoding that reruns the whole decoder on the prefix at
    every step (no KV cache, cross-attention K/V re-projected each time). Same output."""
    import torch

    cfg = model.config
    memory, mask = model.encode(src)
    limits = [max(1, min(int(1.5 * n + 10), cfg.max_len - 1)) for n in (src != cfg.pad_id).sum(1).tolist()]
    ys = torch.full((src.shape[0], 1), cfg.bos_id, dtype=torch.long)
    done = torch.zeros(src.shape[0], dtype=torch.bool)
    for t in range(max(limits)):
        logits = model.decode(ys, memory, mask)[:, -1]  # (B, V), the whole prefix again
        logits[:, [cfg.pad_id, cfg.bos_id]] = float("-inf")
        nxt = logits.argmax(-1).masked_fill(done, cfg.eos_id)
        ys = torch.cat([ys, nxt[:, None]], dim=1)
        done |= (nxt == cfg.eos_id) | (torch.tensor(limits) <= t + 1)
        if bool(done.all()):
            break
    out = []
    for row, n in zip(ys[:, 1:].tolist(), limits):
        row = row[:n]
        out.append(row[:row.index(cfg.eos_id)] if cfg.eos_id in row else row)
    return out


def score(model, tok, src, refs, tok_refs, beam):
    from lmforge.translate import translate
    from lmforge.translate.bleu import sacre_bleu, tokenized_bleu

    t0 = time.perf_counter()
    hyps = translate(model, tok, src, beam=beam)
    dt = time.perf_counter() - t0
    (s, sig), (p, psig) = sacre_bleu(hyps, refs), tokenized_bleu(hyps, tok_refs)
    return {"sacrebleu": s, "sig": sig, "papers": p, "psig": psig, "seconds": dt, "hyps": hyps}


def cmd_report(args: argparse.Namespace) -> None:
    import torch

    from lmforge.plot import plot_run, read_metrics
    from lmforge.translate import load_translator
    from lmforge.translate.bleu import moses_tokenize
    from lmforge.translate.data import encode_sentences, pad_batch, read_lines, read_parallel
    from lmforge.translate.search import greedy_search

    torch.set_num_threads(1)
    d, run = Path(args.data), Path(args.run)
    src, refs = read_parallel(d / "test2016.de", d / "test2016.en")
    tok_refs = read_lines(d / "tok" / "test2016.lc.norm.tok.en")
    if args.limit:  # a quick check of the script itself
        src, refs, tok_refs = src[:args.limit], refs[:args.limit], tok_refs[:args.limit]
    parity = sum(moses_tokenize(r) == t.strip() for r, t in zip(refs, tok_refs))
    rows = []
    snaps = sorted(run.glob("at-*min"), key=lambda p: int(p.name[3:-3])) + [run]
    snaps += [run / "averaged"] if (run / "averaged" / "config.json").exists() else []
    for snap in snaps:
        model, tok = load_translator(snap)
        extra = json.loads((snap / "config.json").read_text())
        res = score(model, tok, src, refs, tok_refs, 1)
        rows.append((snap, extra, res))
        print(snap.name, extra.get("iter"), f"{res['sacrebleu']:.2f} {res['papers']:.2f}", flush=True)
    beams = {}
    for snap in snaps[-2 if snaps[-1].name == "averaged" else -1:]:
        model, tok = load_translator(snap)
        beams[snap.name] = score(model, tok, src, refs, tok_refs, args.beam)
        b = beams[snap.name]
        print("beam", snap.name, f"{b['sacrebleu']:.2f} {b['papers']:.2f} {b['seconds']:.1f}s", flush=True)
    beam = beams[snaps[-1].name]  # the samples and the speed are the best-trained model's
    model, tok = load_translator(run)
    # decode speed: cached greedy vs the uncached peer, same 200 sentences, same batches
    ids = encode_sentences(tok, src[:200], model.config.max_len)
    batches = [pad_batch(ids[i:i + 50], model.config.pad_id) for i in range(0, len(ids), 50)]
    t0 = time.perf_counter(); cached = [h for b in batches for h in greedy_search(model, b)]
    t_cached = time.perf_counter() - t0
    t0 = time.perf_counter(); uncached = [h for b in batches for h in greedy_uncached(model, b)]
    t_uncached = time.perf_counter() - t0
    same = sum(a == b for a, b in zip(cached, uncached))
    evals = [r for r in read_metrics(run) if "val_loss" in r]
    where = Path(args.markdown).parent if args.markdown else run if args.no_doc else Path(args.doc).parent
    plot = plot_run(run, where / "translation-loss.png")  # beside the page that shows it
    size = (run / "model.safetensors").stat().st_size
    write_doc(args, rows, beams, beam, parity, (t_cached, t_uncached, same, len(cached)), evals, plot, size, src, refs, model)


def write_doc(args, rows, beams, beam, parity, speed, evals, plot, size, src, refs, model) -> None:
    """Refresh the report's sections of docs/translation.md (the text around them stays)."""
    from doc_tables import block, command_line, publish

    t_cached, t_uncached, same, n_speed = speed
    n = len(src)
    final_iter = max(r["iter"] for r in evals) if evals else "?"
    c = model.config
    bleu = [f"Model: {model.num_params() / 1e6:.2f}M parameters ({c.n_enc_layer}+{c.n_dec_layer} layers, "
            f"d={c.n_embd}, {c.n_head} heads, d_ff={c.ffn_hidden}, {c.norm_position}-LN, shared BPE vocabulary of "
            f"{c.vocab_size}, tied embeddings, label smoothing {c.label_smoothing}); `model.safetensors` "
            f"{size / 1e6:.1f} MB.", "",
            "| model | iter | training minutes | decoding | sacreBLEU | papers' BLEU (tok, lc) |",
            "|---|---|---|---|---|---|"]
    for snap, extra, res in rows:
        it = extra.get("iter", final_iter)
        mins = extra.get("minutes", max((r.get("minutes", 0) for r in evals), default="?"))
        bleu.append(f"| {snap.name} | {it} | {mins} | greedy | {res['sacrebleu']:.2f} | {res['papers']:.2f} |")
    for name, b in beams.items():
        bleu.append(f"| {name} | {final_iter} | | beam {args.beam} | {b['sacrebleu']:.2f} | {b['papers']:.2f} |")
    bleu += ["", f"- sacreBLEU signature: `{beam['sig']}`",
             f"- papers' metric: `{beam['psig']}` against `tok/test2016.lc.norm.tok.en`, hypotheses lower-cased "
             f"and tokenized by `lmforge.translate.bleu.moses_tokenize`, which reproduces {parity} of the "
             f"{n} reference lines exactly from the raw `test2016.en`."]
    speed_md = [f"- beam {args.beam}, all {n} test sentences: {beam['seconds']:.1f} s = "
                f"**{n / beam['seconds']:.1f} sentences/s** (1 thread, batches of up to 4,096 tokens / beam).",
                f"- greedy, {n_speed} sentences in batches of 50: with the KV cache and cross-attention K/V computed "
                f"once {t_cached:.2f} s ({n_speed / t_cached:.1f} sentences/s); the same model re-decoding the whole "
                f"prefix every step {t_uncached:.2f} s: **{t_uncached / t_cached:.2f}x** faster with the cache; "
                f"{same}/{n_speed} outputs identical."]
    curve = ["val BLEU: sacreBLEU of greedy translations of the first 100 val sentences.", "",
             "| iter | training minutes | train loss | val loss | val BLEU |", "|---|---|---|---|---|"]
    for r in evals:
        vb = f"{r['val_bleu']:.2f}" if "val_bleu" in r else ""
        curve.append(f"| {r['iter']} | {r.get('minutes', '')} | {r['train_loss']:.3f} | {r['val_loss']:.3f} | {vb} |")
    curve += ["", f"Loss curve (`lmforge plot`): ![loss]({Path(plot).name})"]
    samples = ["| German | reference | lmforge |", "|---|---|---|"]
    samples += [f"| {src[i]} | {refs[i]} | {beam['hyps'][i]} |" for i in range(min(10, n))]
    cmd = command_line("benchmarks/translation.py")
    note = f"Trained with `{args.command.strip() or '(not given: pass --command)'}` on {args.machine}."
    publish(args, {"translation_bleu": block(cmd, "\n".join(bleu), note),
                   "translation_speed": block(cmd, "\n".join(speed_md)),
                   "translation_curve": block(cmd, "\n".join(curve), note),
                   "translation_samples": block(cmd, "\n".join(samples))})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", required=True)
    t.add_argument("--data", default=str(DEFAULT_DATA))
    t.add_argument("--preset", default="transformer-multi30k")
    t.add_argument("--minutes", type=float, default=60.0)
    t.add_argument("--set", dest="overrides", action="append", default=[])
    t.add_argument("--resume", action="store_true")
    t.add_argument("--clock-offset", type=float, default=None,
                   help="minutes trained before this resume (default: the last eval's record)")
    t.add_argument("--average-last", type=int, default=0,
                   help="also save RUN/averaged: the mean of the weights at the last K evals")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)
    r = sub.add_parser("report")
    r.add_argument("--run", required=True)
    r.add_argument("--data", default=str(DEFAULT_DATA))
    r.add_argument("--beam", type=int, default=5)
    r.add_argument("--limit", type=int, default=None, help="score only the first N test sentences")
    r.add_argument("--command", default="", help="the exact training command, for the doc")
    r.add_argument("--machine", default="the machine named below",
                   help="the machine training ran on, for the doc (the report names its own)")
    add_doc_args(r, "docs/translation.md")
    r.set_defaults(func=cmd_report)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
