"""LoRA on a quantized base: peak memory, speed and loss of `lmforge finetune --base-dtype` on a
Llama-3.2-1B-shaped model.

    python benchmarks/qlora_memory.py [--steps 5] [--tokens 256] [--formats bfloat16 int8 nf4]
                                      [--dtype float32] [--workdir DIR] [--no-doc]

Makes a random-init run of Llama 3.2 1B's shape (16 layers, hidden 2048, 32 heads, 8 KV heads,
MLP 8192, vocabulary 128,256, tied embeddings; weights stored in bf16, as an imported
checkpoint is) and a small prepared text (Shakespeare, a 512-token BPE, ids inside the
model's vocabulary). Then, for each base dtype, in a fresh process: `build_finetune_trainer`
(LoRA r=8 on attn.qkv, attn.proj, mlp.fc, mlp.proj; batch 1 x --tokens tokens; the same seed,
so the same adapter init and the same batches), --steps optimizer steps, one evaluation.
Reports the peak RSS (VmHWM) above the floor the process had with torch and lmforge imported,
the part of it the loaded base holds, seconds per step (mean over the steps after the
first) and the losses. Writes the table into docs/finetuning.md between the qlora_memory
markers (qlora_memory_bfloat16 with --dtype bfloat16). Deletes its files afterwards (about
2.5 GB on disk while it runs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc_tables import add_doc_args, block, command_line, publish  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(vocab_size=128256, n_embd=2048, n_layer=16, n_head=32, n_kv_head=8, mlp_hidden_size=8192,
             bias=False, pos_encoding="rope", rope_theta=500000.0, rope_scaling="llama3", rope_factor=32.0,
             rope_original_max_position=8192, norm="rmsnorm", mlp="swiglu", tie_embeddings=True)
TARGETS = ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]

MAKE = r"""
import torch
from safetensors.torch import save_file
from lmforge.checkpoint import params_on_meta, RUN_FORMAT
from lmforge.data.prepare import prepare
from lmforge.fileio import write_json
from lmforge.models import build_model
from lmforge.tokenizers import BPETokenizer
run, data, text = {run!r}, {data!r}, {text!r}
cfg = {cfg!r}
tok = BPETokenizer.train([text], 512, progress=False)
import pathlib
pathlib.Path(run).mkdir(parents=True)
tok.save(run + "/tokenizer.json")
prepare([text], run + "/tokenizer.json", data, progress=False)
with params_on_meta():
    model = build_model("gpt", cfg)
g = torch.Generator().manual_seed(0)
state = {{}}
for name, p in model.named_parameters():  # tied weights once, under their first name
    t = torch.ones(p.shape) if p.dim() == 1 else torch.randn(p.shape, generator=g) * 0.02
    state[name] = t.to(torch.bfloat16)
save_file(state, run + "/model.safetensors", metadata={{"format": "pt"}})
write_json(pathlib.Path(run) / "config.json", {{"format": RUN_FORMAT, "version": 1, "model": "gpt",
           "model_config": model.config.to_dict(), "train_config": {{}}}})
"""

STEP = r"""
import sys, json, time
sys.path.insert(0, {bench!r})
from memory_common import rss_mib, set_mmap_threshold
set_mmap_threshold(1 << 20)
import torch
from lmforge.nn.lora import LoRAConfig
from lmforge.nn.quantized_base import FrozenLinear
from lmforge.train.finetune import build_finetune_trainer
floor = rss_mib("VmRSS")
lora = LoRAConfig(r=8, alpha=16.0, dropout=0.0, targets={targets!r})
sets = ["max_iters={steps}", "batch_size=1", "eval_iters=2", "eval_interval=1000000", "log_interval=1",
        "learning_rate=5e-3", "warmup_iters=0", "device=cpu", "seed=0", "dtype={dtype}",
        "activation_checkpointing={ckpt}"]
tr = build_finetune_trainer({run!r}, {data!r}, {out!r}, "lora", lora, overrides=sets, progress=False,
                            verbose=False, base_dtype={fmt!r})
loaded = rss_mib("VmRSS") - floor
load_peak = rss_mib("VmHWM") - floor
base_bytes = sum(m.storage_bytes() for m in tr.model.modules() if isinstance(m, FrozenLinear))
base_bytes += sum(p.numel() * p.element_size() for p in tr.model.parameters() if not p.requires_grad)
tr.model.train()
times, losses = [], []
for _ in range({steps}):
    t0 = time.perf_counter()
    losses.append(tr.step().item())
    times.append(time.perf_counter() - t0)
ev = tr.evaluate()
print(json.dumps({{"floor": floor, "loaded": loaded, "load_peak": load_peak, "peak": rss_mib("VmHWM") - floor,
                  "base_mib": base_bytes / 2**20, "times": times, "losses": losses, **ev}}))
"""

LABELS = {"float32": "float32 (plain nn.Linear)", "bfloat16": "bfloat16", "int8": "int8, one scale per row",
          "nf4": "nf4, blocks of 64"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=256, help="tokens per step (batch 1, block_size)")
    ap.add_argument("--formats", nargs="+", default=["bfloat16", "int8", "nf4"],
                    choices=["float32", "bfloat16", "int8", "nf4"],
                    help="base dtypes to run (the first is the reference of the x column)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the trainer's compute dtype")
    ap.add_argument("--activation-checkpointing", action="store_true",
                    help="train with activation_checkpointing=true (each block recomputed in backward)")
    ap.add_argument("--workdir", default=None, help="where to write the ~2.5 GB of files (default: a temp dir)")
    add_doc_args(ap, "docs/finetuning.md")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qlora_memory.", dir=args.workdir))
    try:
        run, data = work / "run", work / "data"
        text = ROOT / "src" / "lmforge" / "assets" / "tinyshakespeare.txt"
        cfg = {**SHAPE, "block_size": args.tokens}
        subprocess.run([sys.executable, "-c", MAKE.format(run=str(run), data=str(data), text=str(text), cfg=cfg)],
                       check=True)
        results = {}
        for fmt in args.formats:
            script = STEP.format(bench=str(ROOT / "benchmarks"), targets=TARGETS, steps=args.steps,
                                 dtype=args.dtype, run=str(run), data=str(data), out=str(work / f"ft_{fmt}"), fmt=fmt,
                                 ckpt=str(args.activation_checkpointing).lower())
            res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
            if res.returncode:
                sys.exit(f"{fmt}: the fine-tuning process failed:\n{res.stderr[-3000:]}")
            results[fmt] = r = json.loads(res.stdout.strip().splitlines()[-1])
            print(fmt, json.dumps(r), flush=True)
        ref = results[args.formats[0]]
        rows = []
        for fmt, r in results.items():
            sps = sum(r["times"][1:]) / max(len(r["times"]) - 1, 1)
            rows.append(f"| {LABELS[fmt]} | {r['base_mib']:,.0f} | {r['loaded']:,.0f} | {r['peak']:,.0f} | "
                        f"{r['peak'] / ref['peak']:.2f} | {sps:.1f} | {r['losses'][0]:.4f} | {r['losses'][-1]:.4f} | "
                        f"{r['val_loss']:.4f} | {100 * (r['val_loss'] / ref['val_loss'] - 1):+.2f}% |")
        table = "\n".join([
            f"| frozen base | base in memory (MiB) | RSS after load (MiB) | peak (MiB) | x {args.formats[0]} | "
            f"s / step | loss, step 1 | loss, step {args.steps} | val loss after | vs {args.formats[0]} |",
            "|---|---|---|---|---|---|---|---|---|---|", *rows])
        note = (f"Llama-3.2-1B shape (1.24 B parameters, tied), random init, bf16 checkpoint; LoRA r=8 on "
                f"{', '.join(TARGETS)} ({args.steps} steps, batch 1 x {args.tokens} tokens, AdamW lr 5e-3, "
                f"trainer dtype {args.dtype}, activation checkpointing "
                f"{'on' if args.activation_checkpointing else 'off'}, the same seed and batches for every base). "
                "Memory is RSS above "
                f"the process floor (torch and lmforge imported), each base in its own process; "
                f"'val loss after' is the mean over 2 held-out batches after the last step.")
        name = ("qlora_memory" if args.dtype == "float32" else f"qlora_memory_{args.dtype}") + \
            ("_checkpointed" if args.activation_checkpointing else "")
        publish(args, {name: block(command_line("benchmarks/qlora_memory.py"), table, note)})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
