"""Domain adaptation study: LoRA vs full fine-tuning (results in docs/finetuning.md).

1. Pretrain the shakespeare-small shape (6 layers, 6 heads, 384 wide) with a BPE tokenizer
   on tinyshakespeare, with `lmforge train`.
2. Adapt it to English image captions with `lmforge.train.finetune` (the code behind
   `lmforge finetune`): LoRA r=8 on the targets each variant names (LORA_TARGETS below), and
   full fine-tuning, with the same steps, batches and tokens. Training text: Multi30k train.en without its last
   --dev-lines lines, which are the dev set that picks each method's learning rate; the
   reported val loss is over all of val.en, which plays no part in any choice.
3. Each method runs in its own subprocess, so its peak RSS (VmHWM) is its own.
4. Merge the adapter and time sampling: base vs merged vs unmerged adapter, interleaved
   repeats in one process.

    python benchmarks/finetune_study.py --work /tmp/ft-study --multi30k ../shared/data/multi30k --threads 2

The study's table goes into docs/finetuning.md (section `finetune_study`, with the command line
and the machine); --no-doc prints it only, --markdown FILE writes it there instead.

The Multi30k files are read from --multi30k; nothing of them is written into the repo.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc_tables import add_doc_args, block, command_line, publish  # noqa: E402

# LoRA variants: the modules each adapts (tok_emb: the token embedding and the LM head tied to it)
LORA_TARGETS = {"lora": ["attn.qkv", "attn.proj"], "lora-all": ["all-linear"],
                "lora-emb": ["attn.qkv", "attn.proj", "tok_emb"], "lora-qkv-emb": ["attn.qkv", "tok_emb"],
                # the MLP's output projection in blocks 1-5 (all six would be 1.04% with the embedding)
                "lora-mlp-emb": ["blocks.[1-5].mlp.proj", "tok_emb"]}
SHAKESPEARE = REPO / "src" / "lmforge" / "assets" / "tinyshakespeare.txt"


def sh(*args: str, threads: int = 1) -> None:
    print("$", " ".join(args), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, "-m", "lmforge", *args], check=True, env=env)


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


# ---- data ------------------------------------------------------------------------------------

def prepare_pair(base: Path, first: Path, second: Path, out: Path) -> dict:
    """train.bin = first, val.bin = second, both with the base run's tokenizer. `prepare`
    splits one text at a fraction, moved forward to the next line break: a cut one byte before
    the first file's final newline therefore lands exactly where the second starts."""
    from lmforge.data import prepare
    from lmforge.tokenizers import load_tokenizer

    total = first.stat().st_size + second.stat().st_size
    meta = prepare([first, second], str(base / "tokenizer.json"), out, (second.stat().st_size + 0.5) / total,
                   progress=False)
    expected = len(load_tokenizer(base / "tokenizer.json").encode(second.read_text(encoding="utf-8")))
    assert meta["val_tokens"] == expected, (meta["val_tokens"], expected)
    return meta


def prepare_captions(base: Path, multi30k: Path, work: Path, dev_lines: int) -> dict:
    """captions/: train = train.en less its last `dev_lines` lines, val = those lines (the dev
    set: the trainer's evals and the learning-rate choice). captions-val/: val = all of val.en
    (the reported loss; its train split, the dev lines, is unused)."""
    lines = (multi30k / "train.en").read_text(encoding="utf-8").splitlines(keepends=True)
    src = work / "captions-src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "train-head.en").write_text("".join(lines[:-dev_lines]), encoding="utf-8")
    (src / "dev.en").write_text("".join(lines[-dev_lines:]), encoding="utf-8")
    train_meta = prepare_pair(base, src / "train-head.en", src / "dev.en", work / "captions")
    val_meta = prepare_pair(base, src / "dev.en", multi30k / "val.en", work / "captions-val")
    return {"train_tokens": train_meta["train_tokens"], "dev_tokens": train_meta["val_tokens"],
            "val_tokens": val_meta["val_tokens"], "dev_lines": dev_lines}


# ---- one fine-tuning method, in its own process ---------------------------------------------

def worker(args: argparse.Namespace) -> None:
    import torch

    from lmforge.data import TokenData
    from lmforge.evaluate import split_loss
    from lmforge.nn.lora import LoRAConfig
    from lmforge.train.finetune import build_finetune_trainer

    if args.mmap_threshold:  # glibc: blocks above this size go back to the OS when freed
        ctypes.CDLL(None).mallopt(-3, args.mmap_threshold)  # -3: M_MMAP_THRESHOLD
    torch.set_num_threads(args.threads)
    # The runtime floor: torch, lmforge, and what creating any torch optimizer imports (its
    # compiler stack, about 70 MiB); every method pays it before holding a single weight.
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    rss_floor = rss_kib("VmRSS")
    method = "full" if args.method == "full" else "lora"
    lora = None
    if method == "lora":
        lora = LoRAConfig(r=args.lora_r, alpha=2.0 * args.lora_r, dropout=0.0, targets=LORA_TARGETS[args.method])
    lr = args.lr
    out = Path(args.work) / f"ft-{args.method}-{lr:g}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time
    sets = [f"max_iters={args.ft_iters}", f"batch_size={args.batch_size}", f"learning_rate={lr}",
            f"min_lr={lr / 10}", "warmup_iters=5", f"eval_interval={args.ft_iters}", "eval_iters=5",
            "log_interval=1", "dropout=0.0", "weight_decay=0.0", "device=cpu",
            "dtype=float32"]  # pinned: fine-tuning otherwise inherits the base run's dtype
    trainer = build_finetune_trainer(Path(args.work) / "base", Path(args.work) / "captions", out, method,
                                     lora, overrides=sets, progress=False)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    rss_before = rss_kib("VmRSS")
    t0 = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - t0
    peak = rss_kib("VmHWM")
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tokens_per_step = args.batch_size * trainer.model.config.block_size
    step_s = [tokens_per_step / r["tok_per_s"] for r in log if "tok_per_s" in r][3:]  # skip warm-up steps
    dev_after, _ = split_loss(trainer.model, TokenData(Path(args.work) / "captions"), "val", batch_size=16)
    val_after, n_tok = split_loss(trainer.model, TokenData(Path(args.work) / "captions-val"), "val", batch_size=16)
    ckpt = out / ("adapter.safetensors" if method == "lora" else "model.safetensors")
    print("RESULT " + json.dumps({
        "method": args.method, "lr": lr, "out": str(out), "trainable": trainable, "total": total, "dev_after": dev_after, "val_after": val_after,
        "val_tokens": n_tok, "s_per_step": statistics.median(step_s), "s_per_step_all": step_s,
        "train_wall_s": wall, "rss_floor_mib": rss_floor / 1024, "rss_before_fit_mib": rss_before / 1024,
        "peak_rss_mib": peak / 1024,
        "weights_bytes": ckpt.stat().st_size, "trainer_state_bytes": (out / "trainer.pt").stat().st_size,
        "tokens": trainer.tokens}), flush=True)


def run_worker(args: argparse.Namespace, spec: str) -> dict:
    method, _, lr = spec.partition("@")
    cmd = [sys.executable, __file__, "--worker", method, "--lr", lr, *forwarded(args)]
    print("$", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    sys.stderr.write(out.stderr[-2000:])
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])


def forwarded(args: argparse.Namespace) -> list[str]:
    keys = ("work", "multi30k", "ft_iters", "batch_size", "lora_r", "threads", "mmap_threshold")
    return [a for k in keys for a in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


# ---- sampling speed ------------------------------------------------------------------------

def sampling_speed(work: Path, adapter: Path, repeats: int, new_tokens: int) -> dict:
    """Seconds to generate `new_tokens` greedily (batch 1, KV cache), median over interleaved
    repeats, for the base, the merged run and the base with the adapter unmerged."""
    import torch

    import lmforge
    from lmforge.models.decoding import generate_ids

    models = {"base": lmforge.load(work / "base")[0], "merged": lmforge.load(work / "merged")[0],
              "adapter (unmerged)": lmforge.load(work / "base", adapter=adapter)[0]}
    tok = lmforge.load(work / "base")[1]
    prompt = torch.tensor([tok.encode("A man in a blue shirt")])
    outs, times = {}, {k: [] for k in models}
    for _ in range(repeats):
        for name, model in models.items():
            t = time.perf_counter()
            outs[name] = generate_ids(model, prompt, new_tokens, temperature=0.0)
            times[name].append(time.perf_counter() - t)
    res = {name: statistics.median(ts) for name, ts in times.items()}
    res["merged_equals_adapter_output"] = bool(torch.equal(outs["merged"], outs["adapter (unmerged)"]))
    res["merged_text"] = tok.decode(outs["merged"][0].tolist())
    return res


# ---- the study -------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="scratch directory (runs, data)")
    p.add_argument("--multi30k", default=str(REPO.parent / "shared" / "data" / "multi30k"))
    p.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary size")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="fine-tuning batch size")
    p.add_argument("--pretrain-batch-size", type=int, default=8)
    p.add_argument("--pretrain-iters", type=int, default=250)
    p.add_argument("--pretrain-warmup", type=int, default=20)
    p.add_argument("--pretrain-dropout", type=float, default=0.0)
    p.add_argument("--dev-lines", type=int, default=1000,
                   help="last lines of train.en held out as the dev set that picks learning rates")
    p.add_argument("--ft-iters", type=int, default=60)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--methods", default="lora@3e-3,lora@1e-2,full@3e-4,full@1e-3",
                   help="comma list of METHOD@LR; METHOD is full or a LoRA variant: lora (attention "
                        "projections), lora-all, lora-emb (attention + token embedding), lora-qkv-emb, lora-mlp-emb")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (use 1 on a busy shared machine: 2 threads then mostly wait on each other)")
    p.add_argument("--mmap-threshold", type=int, default=0,
                   help="glibc M_MMAP_THRESHOLD in bytes for the fine-tuning processes (0: glibc's default, "
                        "which keeps freed blocks of up to 32 MB in the heap, so RSS counts them)")
    p.add_argument("--lr", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--sample-repeats", type=int, default=5)
    p.add_argument("--sample-method", default="lora", choices=sorted(LORA_TARGETS),
                   help="the LoRA variant whose best run is merged and timed")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    add_doc_args(p, "docs/finetuning.md")
    args = p.parse_args()
    if args.worker:
        args.method = args.worker
        return worker(args)

    work, m30k = Path(args.work), Path(args.multi30k)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if not (work / "shk" / "meta.json").is_file():
        sh("prepare", "--input", str(SHAKESPEARE), "--tokenizer", f"bpe:{args.vocab}", "--out", str(work / "shk"),
           "--no-progress")
    if not (work / "base" / "trainer.pt").is_file():
        sh("train", "--preset", "shakespeare-small", "--data", str(work / "shk"), "--out", str(work / "base"),
           "--no-progress", *[a for s in (f"block_size={args.block_size}", f"batch_size={args.pretrain_batch_size}",
                                         f"max_iters={args.pretrain_iters}", f"dropout={args.pretrain_dropout}",
                                         f"warmup_iters={args.pretrain_warmup}",
                                         f"eval_interval={args.pretrain_iters}", "eval_iters=10", "device=cpu")
                              for a in ("--set", s)], threads=args.threads)
    t_pre = time.perf_counter() - t_start
    meta = prepare_captions(work / "base", m30k, work, args.dev_lines)

    import torch

    import lmforge
    from lmforge.checkpoint import merge_adapter_into_run
    from lmforge.data import TokenData
    from lmforge.evaluate import split_loss

    torch.set_num_threads(args.threads)
    base_model, _ = lmforge.load(work / "base")
    val_before, n_val = split_loss(base_model, TokenData(work / "captions-val"), "val", batch_size=16)
    dev_before, _ = split_loss(base_model, TokenData(work / "captions"), "val", batch_size=16)
    shk_val, _ = split_loss(base_model, TokenData(work / "shk"), "val", batch_size=16)
    del base_model
    results = [run_worker(args, m) for m in args.methods.split(",")]
    best_lora = min((r for r in results if r["method"] == args.sample_method), key=lambda r: r["dev_after"])
    shutil.rmtree(work / "merged", ignore_errors=True)
    merge_adapter_into_run(work / "base", best_lora["out"], work / "merged")
    speed = sampling_speed(work, Path(best_lora["out"]), args.sample_repeats, new_tokens=args.block_size - 8)
    summary = {"args": vars(args), "pretrain_s": t_pre, "captions_meta": meta, "val_before": val_before,
               "dev_before": dev_before, "val_tokens": n_val, "shakespeare_val_loss_of_base": shk_val, "methods": results,
               "sampling": speed, "total_s": time.perf_counter() - t_start}
    (work / "study.json").write_text(json.dumps(summary, indent=2))
    publish(args, {"finetune_study": block(command_line("benchmarks/finetune_study.py"), study_markdown(summary))})


def study_markdown(s: dict) -> str:
    """All runs, then each LoRA variant's best run (by dev loss) against full fine-tuning's best."""
    rows = s["methods"]
    best = {m: min((r for r in rows if r["method"] == m), key=lambda r: r["dev_after"])
            for m in dict.fromkeys(r["method"] for r in rows)}
    full = best.get("full")
    full_drop = s["val_before"] - full["val_after"] if full else None
    out = [f"Base: Shakespeare val loss {s['shakespeare_val_loss_of_base']:.4f}; captions val loss "
           f"{s['val_before']:.4f} over {s['val_tokens']:,} tokens (dev {s['dev_before']:.4f}). Wall time "
           f"{s['total_s']:.0f} s, pretraining {s['pretrain_s']:.0f} s of it.", "",
           "| method | lr | trainable params | dev loss after | val loss after | drop | share of full's drop | "
           "s/step | peak RSS (MiB) | weights file |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        drop = s["val_before"] - r["val_after"]
        share = f"{100 * drop / full_drop:.1f}%" if full and best[r["method"]] is r else ""
        name = f"**{r['method']} (best)**" if best[r["method"]] is r else r["method"]
        out.append(f"| {name} | {r['lr']:g} | {r['trainable']:,} ({100 * r['trainable'] / r['total']:.2f}%) | "
                   f"{r['dev_after']:.4f} | {r['val_after']:.4f} | {drop:.4f} | {share} | {r['s_per_step']:.3f} | "
                   f"{r['peak_rss_mib']:.0f} | {r['weights_bytes'] / 1e6:.2f} MB |")
    out.append("")
    for m, r in best.items():
        if full and m != "full":
            floor = (f", above the runtime floor {100 * (r['peak_rss_mib'] - r['rss_floor_mib']) / (full['peak_rss_mib'] - full['rss_floor_mib']):.1f}%"
                     if "rss_floor_mib" in r and "rss_floor_mib" in full else "")
            out.append(f"- {m} (lr {r['lr']:g}) against full (lr {full['lr']:g}): "
                       f"{100 * (s['val_before'] - r['val_after']) / full_drop:.1f}% of the val-loss drop; peak RSS "
                       f"{100 * r['peak_rss_mib'] / full['peak_rss_mib']:.1f}%{floor}; step time "
                       f"{r['s_per_step'] / full['s_per_step']:.2f}x; weights file "
                       f"{100 * r['weights_bytes'] / full['weights_bytes']:.2f}%.")
    sp = s["sampling"]
    out.append(f"- Sampling {s['args']['block_size'] - 8} greedy tokens (median s): base {sp['base']:.3f}, merged "
               f"{sp['merged']:.3f} ({sp['merged'] / sp['base']:.3f}x), adapter unmerged {sp['adapter (unmerged)']:.3f} "
               f"({sp['adapter (unmerged)'] / sp['base']:.3f}x); merged output equals the adapter's: "
               f"{sp['merged_equals_adapter_output']}.")
    return "\n".join(out)


if __name__ == "__main__":
    main()
