"""Exact answers after SFT: lmforge (LoRA, full, LoRA --train-on-prompt) against TRL's
SFTTrainer + PEFT LoRA on the same model, data and settings (results in docs/finetuning.md).

1. The task (benchmarks/sft_task.py): addition asked in words, answered in digits, seeded
   train / val / test JSONL chats; no test pair is trained on, in either order.
2. A base pretrained here with `lmforge prepare` (a BPE on tinyshakespeare plus counting and
   "forty-five is written 45." lines: the task's vocabulary, never a sum) and `lmforge train`.
3. Each fine-tuning run is a child process: `lmforge finetune` through lmforge's CLI, or TRL's
   SFTTrainer on the base exported with `lmforge export-hf`. Same steps, batch size (examples),
   lr schedule (warm-up, cosine to lr/10), AdamW betas, no weight decay, grad clip 1.0, float32,
   LoRA r / alpha / dropout on the attention projections (lmforge attn.qkv attn.proj = GPT-2's
   c_attn, attn.c_proj), loss on the answer tokens only. TRL gets prompt / completion records
   (the prompt as lmforge renders it, the completion the answer; TRL appends the end-of-text
   token) and the worker checks that its token ids and loss mask equal lmforge's, example by
   example. The lmforge and TRL LoRA runs alternate (--repeats).
4. Scoring: greedy, stopped at the end-of-text token, exact match on test; TRL's adapter is
   read back with `lmforge import-hf --adapter` and scored by the same code.

Tokens: the input positions of the trained examples, padding excluded (each example of n ids
gives n - 1 positions with a target), counted from the batches each trainer drew. Tokens/s:
those tokens over the training loop's wall time (lmforge: its metrics' log intervals, which
leave out the final eval and checkpoint; TRL: on_train_begin to on_train_end, no eval, saved
after). Peak memory: the child's VmHWM minus its VmRSS after importing its framework and
creating a torch optimizer, before any weight exists.

    python benchmarks/sft_study.py --work /tmp/sft-study            # the docs' table
    python benchmarks/sft_study.py --work /tmp/sft-quick --quick    # a few minutes, no docs

--no-doc prints the table only, --markdown FILE writes it there.
"""

from __future__ import annotations

import argparse
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
import sft_task  # noqa: E402
from doc_tables import add_doc_args, block, command_line, publish  # noqa: E402

SHAKESPEARE = REPO / "src" / "lmforge" / "assets" / "tinyshakespeare.txt"
LMFORGE_TARGETS = ["attn.qkv", "attn.proj"]
PEFT_TARGETS = {"gpt2": ["c_attn", "attn.c_proj"]}  # lmforge's attention projections in each HF family


def rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def child_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}


def sh(args: argparse.Namespace, *cmd: str) -> None:
    print("$ lmforge", " ".join(cmd), flush=True)
    subprocess.run([sys.executable, "-m", "lmforge", *cmd], check=True, env=child_env(args.threads))


def child(args: argparse.Namespace, mode: str, payload: dict) -> dict:
    """Run this script in `mode` as a child process; its last RESULT line."""
    cmd = [sys.executable, __file__, "--work", args.work, f"--{mode}", json.dumps(payload)]
    print("$", mode, json.dumps(payload), flush=True)
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=child_env(args.threads))
    if out.returncode:
        sys.stderr.write(out.stdout[-4000:] + out.stderr[-4000:])
        raise SystemExit(f"{mode} failed (exit {out.returncode})")
    res = json.loads([line for line in out.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    res["process_s"] = time.perf_counter() - t
    return res


# ---- child: `lmforge finetune` through the CLI ---------------------------------------------

def lmforge_worker(payload: dict) -> None:
    import torch

    torch.set_num_threads(payload["threads"])
    from lmforge.cli.main import main as cli

    # the runtime floor: torch, lmforge, and what creating any torch optimizer imports
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    floor = rss_mib("VmRSS")
    out = Path(payload["out"])
    shutil.rmtree(out, ignore_errors=True)
    rc = cli(payload["argv"])
    if rc:
        raise SystemExit(rc)
    peak = rss_mib("VmHWM")
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "tok_per_s" in r]
    loop_s, prev = 0.0, 0
    for r in steps:
        loop_s += (r["tokens"] - prev) / r["tok_per_s"]
        prev = r["tokens"]
    evals = [r for r in log if "val_loss" in r]
    print("RESULT " + json.dumps({"floor_mib": floor, "peak_mib": peak, "tokens": steps[-1]["tokens"],
                                  "steps": steps[-1]["iter"], "loop_s": loop_s, "train_loss": steps[-1]["loss"],
                                  "val_loss": evals[-1]["val_loss"] if evals else None}), flush=True)


# ---- child: TRL SFTTrainer + PEFT LoRA -------------------------------------------------------

def trl_worker(payload: dict) -> None:
    import torch

    torch.set_num_threads(payload["threads"])
    import datasets
    import peft
    import transformers
    import trl

    # the same floor: the frameworks' classes resolved (they import lazily) and a torch optimizer
    _ = (transformers.AutoModelForCausalLM, transformers.AutoTokenizer, transformers.TrainerCallback,
         trl.SFTTrainer, trl.SFTConfig, peft.LoraConfig, datasets.Dataset)
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    floor = rss_mib("VmRSS")
    hf, out, p = Path(payload["hf"]), Path(payload["out"]), payload
    shutil.rmtree(out, ignore_errors=True)
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, resid_pdrop=0.0,
                                                              embd_pdrop=0.0, attn_pdrop=0.0)
    rows = [json.loads(line) for line in Path(p["train"]).read_text(encoding="utf-8").splitlines()]
    data = datasets.Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    cfg = trl.SFTConfig(
        output_dir=str(out), max_steps=p["steps"], per_device_train_batch_size=p["batch_size"],
        learning_rate=p["lr"], lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": p["lr"] / 10},
        warmup_steps=p["warmup"], weight_decay=0.0, adam_beta1=0.9, adam_beta2=p["beta2"], max_grad_norm=1.0,
        max_length=p["max_length"], completion_only_loss=True, bf16=False, fp16=False,
        gradient_checkpointing=p["gradient_checkpointing"], use_cpu=True, seed=p["seed"], logging_steps=10,
        save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0)
    lora = peft.LoraConfig(r=p["r"], lora_alpha=p["alpha"], lora_dropout=p["dropout"], target_modules=p["targets"],
                           bias="none", task_type="CAUSAL_LM")
    drawn = {"tokens": 0, "examples": 0}
    timing: dict[str, float] = {}

    class Clock(transformers.TrainerCallback):
        def on_train_begin(self, *a, **k):
            timing["begin"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            timing["end"] = time.perf_counter()

    trainer = trl.SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, peft_config=lora,
                             callbacks=[Clock()])
    collate = trainer.data_collator

    def counting(features):
        drawn["tokens"] += sum(len(f["input_ids"]) - 1 for f in features)
        drawn["examples"] += len(features)
        return collate(features)

    trainer.data_collator = counting
    same_ids, same_mask = check_tokens(trainer.train_dataset, p["expected"])
    res = trainer.train()
    peak_train = rss_mib("VmHWM")
    trainer.model.save_pretrained(out / "adapter")
    print("RESULT " + json.dumps({
        "floor_mib": floor, "peak_mib": rss_mib("VmHWM"), "peak_train_mib": peak_train, "tokens": drawn["tokens"],
        "examples": drawn["examples"], "steps": res.global_step, "loop_s": timing["end"] - timing["begin"],
        "train_loss": [h["loss"] for h in trainer.state.log_history if "loss" in h][-1],
        "ids_equal": same_ids, "mask_equal": same_mask, "n_examples": len(trainer.train_dataset),
        "adapter": str(out / "adapter"), "optim": str(cfg.optim)}), flush=True)


def check_tokens(dataset, expected_path: str) -> tuple[int, int]:
    """How many of TRL's tokenized examples have lmforge's ids, and lmforge's loss mask."""
    expected = [json.loads(line) for line in Path(expected_path).read_text().splitlines()]
    if len(expected) != len(dataset):
        raise SystemExit(f"TRL kept {len(dataset)} of {len(expected)} examples")
    same_ids = same_mask = 0
    for row, exp in zip(dataset, expected):
        same_ids += row["input_ids"] == exp["ids"]
        same_mask += [int(t != -100) for t in row["labels"]] == exp["loss"]
    return same_ids, same_mask


# ---- the parent: data, base, runs, scores, table ------------------------------------------------

def build_task(args: argparse.Namespace, work: Path) -> dict[str, Path]:
    splits = sft_task.make_splits(args.train, args.val, args.test, args.max_operand, args.seed)
    return sft_task.write_splits(work / "task", splits)


def pretrain(args: argparse.Namespace, work: Path) -> float:
    """The base run; seconds spent (0 when work/base is already there)."""
    if (work / "base" / "model.safetensors").is_file():
        return 0.0
    t = time.perf_counter()
    text = SHAKESPEARE.read_text(encoding="utf-8") + sft_task.number_text(args.number_lines, args.max_operand,
                                                                          args.seed)
    (work / "pretrain.txt").write_text(text, encoding="utf-8")
    sh(args, "prepare", "--input", str(work / "pretrain.txt"), "--tokenizer", f"bpe:{args.vocab}",
       "--out", str(work / "pretrain"), "--no-progress")
    sets = [f"n_layer={args.n_layer}", f"n_head={args.n_head}", f"n_embd={args.n_embd}",
            f"block_size={args.block_size}", f"batch_size={args.pretrain_batch_size}",
            f"max_iters={args.pretrain_iters}", "warmup_iters=50", "learning_rate=2e-3", "min_lr=2e-4",
            "dropout=0.0", f"eval_interval={args.pretrain_iters}", "eval_iters=10", "log_interval=50",
            "device=cpu", "dtype=float32"]
    sh(args, "train", "--data", str(work / "pretrain"), "--out", str(work / "base"), "--no-progress",
       "--set", *sets)
    return time.perf_counter() - t


def trl_records(base: Path, train: Path, out_records: Path, out_expected: Path) -> None:
    """TRL's prompt / completion file (the prompt rendered as lmforge renders it, the answer with
    the space the plain format puts after "Assistant:") and lmforge's ids + loss mask per example."""
    import lmforge
    from lmforge.chat import chat_format
    from lmforge.sft import load_examples

    _, tok = lmforge.load(base)
    fmt = chat_format(tok, base)
    data = load_examples(train, tok, fmt, max_length=10**6)
    recs, exps = [], []
    for ex in data.examples:
        msgs = ex.conversation.messages
        recs.append({"prompt": fmt.render(msgs[:-1], tok), "completion": " " + msgs[-1]["content"]})
        exps.append({"ids": [int(i) for i in ex.ids], "loss": [int(b) for b in ex.loss]})
    out_records.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    out_expected.write_text("".join(json.dumps(e) + "\n" for e in exps), encoding="utf-8")


def score(run: Path, adapter: Path | None, test: Path, threads: int) -> tuple[float, int]:
    import torch

    import lmforge
    from lmforge.chat import chat_format
    from lmforge.sft import exact_match, load_examples

    torch.set_num_threads(threads)
    model, tok = lmforge.load(run, adapter=adapter)
    model.eval()
    fmt = chat_format(tok, run)
    exs = load_examples(test, tok, fmt, max_length=model.config.block_size).examples
    with torch.no_grad():
        return exact_match(model, tok, fmt, exs, max_new_tokens=8), len(exs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="scratch directory (base run, data, fine-tuned runs)")
    p.add_argument("--quick", action="store_true", help="a small run that shakes out the pipeline (no docs)")
    p.add_argument("--train", type=int, default=8000, help="training conversations")
    p.add_argument("--val", type=int, default=200)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--max-operand", type=int, default=99)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--number-lines", type=int, default=20000, help="counting / 'is written' lines in pretraining")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--pretrain-iters", type=int, default=500)
    p.add_argument("--pretrain-batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=600, help="fine-tuning steps, every method")
    p.add_argument("--batch-size", type=int, default=16, help="fine-tuning examples per step")
    p.add_argument("--lr", type=float, default=5e-3, help="LoRA learning rate (lmforge and TRL)")
    p.add_argument("--full-lr", type=float, default=1e-3, help="full fine-tuning's learning rate")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--repeats", type=int, default=2, help="alternating lmforge / TRL LoRA runs")
    p.add_argument("--trl-checkpointing", action="store_true",
                   help="also run TRL with its default gradient checkpointing (the main TRL rows turn it off, "
                        "as lmforge does not recompute activations)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in every process (1 on a busy shared machine: 2 threads then mostly wait on each other)")
    p.add_argument("--lmforge-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)
    add_doc_args(p, "docs/finetuning.md")
    args = p.parse_args()
    if args.lmforge_worker:
        return lmforge_worker(json.loads(args.lmforge_worker))
    if args.trl_worker:
        return trl_worker(json.loads(args.trl_worker))
    if args.quick:
        args.train, args.test, args.val, args.number_lines = 800, 60, 40, 3000
        args.pretrain_iters, args.steps, args.repeats, args.no_doc = 60, 20, 1, True

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ["HF_HUB_OFFLINE"] = "1"
    t_start = time.perf_counter()
    files = build_task(args, work)
    pretrain_s = pretrain(args, work)
    base = work / "base"
    shutil.rmtree(work / "hf", ignore_errors=True)
    sh(args, "export-hf", str(base), "--out", str(work / "hf"))
    family = json.loads((work / "hf" / "config.json").read_text())["model_type"]
    trl_records(base, files["train"], work / "task" / "trl-train.jsonl", work / "task" / "expected.jsonl")

    common = [f"max_iters={args.steps}", f"batch_size={args.batch_size}", f"warmup_iters={args.warmup}",
              "weight_decay=0.0", "beta1=0.9", "beta2=0.99", "grad_clip=1.0", "dropout=0.0", "device=cpu",
              "dtype=float32", f"eval_interval={args.steps}", "eval_iters=5", "log_interval=10",
              f"seed={args.seed}"]

    def lmforge_run(name: str, method: str, lr: float, extra: list[str]) -> dict:
        out = work / name
        argv = ["finetune", "--base", str(base), "--data", str(files["train"]), "--val", str(files["val"]),
                "--out", str(out), "--method", method, "--max-length", str(args.block_size), "--no-progress",
                *extra, "--set", *common, f"learning_rate={lr}", f"min_lr={lr / 10}"]
        if method == "lora":
            argv += ["--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha),
                     "--lora-dropout", str(args.lora_dropout), "--lora-targets", *LMFORGE_TARGETS]
        res = child(args, "lmforge-worker", {"threads": args.threads, "out": str(out), "argv": argv})
        res.update(run=str(base if method == "lora" else out), adapter=str(out) if method == "lora" else None)
        return res

    def trl_run(name: str, checkpointing: bool = False) -> dict:
        out = work / name
        res = child(args, "trl-worker", {
            "threads": args.threads, "hf": str(work / "hf"), "out": str(out),
            "train": str(work / "task" / "trl-train.jsonl"), "expected": str(work / "task" / "expected.jsonl"),
            "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup, "beta2": 0.99,
            "max_length": args.block_size, "gradient_checkpointing": checkpointing, "seed": args.seed,
            "r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
            "targets": PEFT_TARGETS[family]})
        imported = work / f"{name}-imported"
        shutil.rmtree(imported, ignore_errors=True)
        sh(args, "import-hf", str(work / "hf"), "--out", str(imported), "--adapter", res["adapter"])
        res.update(run=str(imported), adapter=str(imported / "adapter"))
        return res

    runs: list[tuple[str, dict]] = []
    for k in range(args.repeats):  # the pair being compared, alternating
        runs.append(("lmforge LoRA", lmforge_run(f"lora-{k}", "lora", args.lr, [])))
        runs.append(("TRL SFTTrainer + PEFT LoRA", trl_run(f"trl-{k}")))
    runs.append(("lmforge full", lmforge_run("full", "full", args.full_lr, [])))
    runs.append(("lmforge LoRA --train-on-prompt", lmforge_run("lora-prompt", "lora", args.lr, ["--train-on-prompt"])))
    if args.trl_checkpointing:
        runs.append(("TRL, gradient checkpointing on (its default)", trl_run("trl-gc", checkpointing=True)))

    base_em, n_test = score(base, None, files["test"], args.threads)
    for _, r in runs:
        r["exact_match"] = score(Path(r["run"]), Path(r["adapter"]) if r["adapter"] else None, files["test"],
                                 args.threads)[0]
    summary = {"args": vars(args), "family": family, "pretrain_s": pretrain_s, "base_exact_match": base_em,
               "n_test": n_test, "runs": runs, "total_s": time.perf_counter() - t_start}
    (work / "study.json").write_text(json.dumps(summary, indent=2))
    publish(args, {"sft_study": block(command_line("benchmarks/sft_study.py"), study_markdown(summary))})


def study_markdown(s: dict) -> str:
    a = s["args"]
    lines = [f"Base: {a['n_layer']} layers, {a['n_embd']} wide, {a['vocab']:,}-token BPE, pretrained "
             f"{a['pretrain_iters']} steps of {a['pretrain_batch_size']} x {a['block_size']} tokens"
             + (f" ({s['pretrain_s'] / 60:.1f} min)" if s["pretrain_s"] else "")
             + f". Fine-tuning: {a['steps']} steps of {a['batch_size']} examples from {a['train']:,} training "
             f"conversations; test: {s['n_test']} questions. Whole study {s['total_s'] / 60:.1f} min.", "",
             "| method | test exact match | train tokens/s | peak MiB above floor (floor) | steps | tokens | loop s |",
             "|---|---|---|---|---|---|---|",
             f"| base (no fine-tuning) | {100 * s['base_exact_match']:.1f}% | | | | | |"]
    for name, r in s["runs"]:
        lines.append(f"| {name} | {100 * r['exact_match']:.1f}% | {r['tokens'] / r['loop_s']:,.0f} | "
                     f"{r['peak_mib'] - r['floor_mib']:,.0f} ({r['floor_mib']:,.0f}) | {r['steps']} | "
                     f"{r['tokens']:,} | {r['loop_s']:.1f} |")
    ours = [r for n, r in s["runs"] if n == "lmforge LoRA"]
    peer = [r for n, r in s["runs"] if n == "TRL SFTTrainer + PEFT LoRA"]
    if ours and peer:
        med = lambda rs, f: statistics.median(f(r) for r in rs)  # noqa: E731
        speed = med(ours, lambda r: r["tokens"] / r["loop_s"]) / med(peer, lambda r: r["tokens"] / r["loop_s"])
        mem = med(ours, lambda r: r["peak_mib"] - r["floor_mib"]) / med(peer, lambda r: r["peak_mib"] - r["floor_mib"])
        acc = 100 * (med(ours, lambda r: r["exact_match"]) - med(peer, lambda r: r["exact_match"]))
        lines += ["", f"lmforge LoRA against TRL (medians over {len(ours)} alternating runs each): "
                      f"{speed:.2f}x the training tokens/s, {100 * mem:.0f}% of the peak memory above the floor, "
                      f"test exact match {acc:+.1f} points. TRL's token ids equal lmforge's in "
                      f"{peer[0]['ids_equal']:,} of {peer[0]['n_examples']:,} examples, its loss mask in "
                      f"{peer[0]['mask_equal']:,}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
