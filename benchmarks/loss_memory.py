"""Memory of a training step with a large vocabulary: whole logits vs the chunked loss.

With GPT-2's 50,257 tokens, a batch of 4 x 256 tokens has 206 MB of float32 logits, and a
step that makes them whole also holds their softmax and its gradient. lmforge's trainer asks
the model for the loss alone, and the model computes it a chunk of tokens at a time
(`lmforge.nn.loss`). This trains a few AdamW steps of the same shape, each contender in a
fresh process, and reports its peak RSS, the part above the process's resident size before
the model was built, and the step time:

- transformers `GPT2LMHeadModel` (the peer; its loss needs the whole logits),
- lmforge with the chunk size raised above the batch's logits (whole logits, as before),
- lmforge as shipped (chunked),
- and both again for LoRA r=8 on the attention projections, where the frozen weights have
  no gradients or AdamW moments and the logits are a larger share of the step;
- with `--only eval-transformers,eval-lmforge-whole,eval-lmforge`: the loss of one batch
  without gradients, as `lmforge eval` computes it (`lmforge.evaluate.split_loss`, whose
  default batch is 16 blocks: 16 x 1024 x 50,257 logits are 3.3 GB for GPT-2).

    python benchmarks/loss_memory.py --preset gpt2 --batch 4 --block 256 --steps 3

The table goes into docs/benchmarks.md (section `loss_memory`, or `eval_memory` for the eval
contenders); --no-doc prints it only, --markdown FILE writes it there instead.

Random tokens (memory and time are measured, not learning). `--mmap-threshold` as in
benchmarks/sharding_memory.py: glibc otherwise keeps freed blocks in the heap and RSS counts
them, hiding what is no longer used.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from doc_tables import add_doc_args, block, command_line, publish
from memory_common import RandomTokens, rss_mib, set_mmap_threshold

REPO = Path(__file__).resolve().parents[1]
CONTENDERS = ("transformers", "lmforge-whole", "lmforge", "lmforge-lora-whole", "lmforge-lora",
              "eval-transformers", "eval-lmforge-whole", "eval-lmforge")
TRAINING = CONTENDERS[:5]


def lmforge_steps(name: str, mc: dict, args: argparse.Namespace) -> tuple[list[float], list[float], int, int]:
    import lmforge.nn.loss as loss_module
    from lmforge.models import build_model
    from lmforge.nn.lora import apply_lora
    from lmforge.tokenizers import CharTokenizer
    from lmforge.train import TrainConfig, Trainer

    if name.endswith("-whole"):  # one chunk covers every token: the logits exist whole
        loss_module.CHUNK_ELEMENTS = 1 << 62
    model = build_model("gpt", mc)
    if "-lora" in name:
        apply_lora(model, ["attn.qkv", "attn.proj"], r=8, alpha=16.0, dropout=0.0)
    cfg = TrainConfig(max_iters=args.steps, batch_size=args.batch, log_interval=1, eval_interval=10**9,
                      eval_iters=1, warmup_iters=1, weight_decay=0.0, device="cpu")
    times, losses = [], []
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, RandomTokens(mc["vocab_size"], args.batch, args.block), cfg, tmp,
                          CharTokenizer.from_text("ab"), progress=False)
        for _ in range(args.steps):
            t = time.perf_counter()
            losses.append(trainer.step().item())
            times.append(time.perf_counter() - t)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return times, losses, trainable, sum(p.numel() for p in model.parameters())


def transformers_steps(mc: dict, args: argparse.Namespace) -> tuple[list[float], list[float], int, int]:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=mc["vocab_size"], n_positions=mc["block_size"],
                                       n_embd=mc["n_embd"], n_layer=mc["n_layer"], n_head=mc["n_head"],
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
    data = RandomTokens(mc["vocab_size"], args.batch, args.block)
    times, losses = [], []
    for _ in range(args.steps):
        t = time.perf_counter()
        x, _ = data.get_batch("train")
        loss = model(input_ids=x, labels=x).loss  # the model shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - t)
    n = sum(p.numel() for p in model.parameters())
    return times, losses, n, n


def eval_loss(name: str, mc: dict, args: argparse.Namespace) -> tuple[list[float], list[float], int, int]:
    """One batch's loss without gradients, `args.steps` times."""
    import numpy as np

    tokens = np.random.default_rng(0).integers(0, mc["vocab_size"], size=args.batch * args.block + 1)
    if name == "eval-transformers":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(vocab_size=mc["vocab_size"], n_positions=mc["block_size"],
                                           n_embd=mc["n_embd"], n_layer=mc["n_layer"], n_head=mc["n_head"])).eval()
        x = torch.as_tensor(tokens[:-1], dtype=torch.long).view(args.batch, args.block)

        def loss() -> float:
            with torch.no_grad():
                return model(input_ids=x, labels=x).loss.item()
    else:
        import types

        import lmforge.nn.loss as loss_module
        from lmforge.evaluate import split_loss
        from lmforge.models import build_model

        if name.endswith("-whole"):
            loss_module.CHUNK_ELEMENTS = 1 << 62
        model = build_model("gpt", mc)
        data = types.SimpleNamespace(splits={"val": tokens})

        def loss() -> float:
            return split_loss(model, data, "val", batch_size=args.batch)[0]
    times, losses = [], []
    for _ in range(args.steps):
        t = time.perf_counter()
        losses.append(loss())
        times.append(time.perf_counter() - t)
    n = sum(p.numel() for p in model.parameters())
    return times, losses, 0, n


def run(_: int, name: str, args: argparse.Namespace, out: str) -> None:
    set_mmap_threshold(args.mmap_threshold)
    torch.set_num_threads(args.threads)
    from lmforge.models.presets import get_preset

    mc = {**get_preset(args.preset)["model_config"], "block_size": args.block, "dropout": 0.0,
          "vocab_size": args.vocab}
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # what any optimizer imports, for both
    before = rss_mib("VmRSS")
    torch.manual_seed(0)
    if name.startswith("eval-"):
        times, losses, trainable, total = eval_loss(name, mc, args)
    elif name == "transformers":
        times, losses, trainable, total = transformers_steps(mc, args)
    else:
        times, losses, trainable, total = lmforge_steps(name, mc, args)
    Path(out, f"{name}.json").write_text(json.dumps({
        "name": name, "rss_before_model_mib": before, "peak_rss_mib": rss_mib("VmHWM"),
        "step_s": statistics.median(times[1:]) if len(times) > 1 else times[0], "losses": losses,
        "trainable": trainable, "total": total}))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2", help="model shape (default gpt2: 124M parameters)")
    ap.add_argument("--vocab", type=int, default=50257, help="vocabulary size (default GPT-2's)")
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="AdamW steps; the first is not timed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mmap-threshold", type=int, default=65536,
                    help="glibc M_MMAP_THRESHOLD in bytes (0: glibc's default, see above)")
    ap.add_argument("--only", default=",".join(TRAINING),
                    help=f"comma-separated contenders, of: {', '.join(CONTENDERS)} (default: the training ones)")
    add_doc_args(ap, "docs/benchmarks.md")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(CONTENDERS))
    if unknown:
        ap.error(f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(CONTENDERS)}")
    sys.path.insert(0, str(REPO / "src"))
    with tempfile.TemporaryDirectory() as out:
        for name in names:  # a fresh process each, so each peak is its own
            mp.spawn(run, args=(name, args, out), nprocs=1, join=True)
        rows = [json.loads(Path(out, f"{n}.json").read_text()) for n in names]
    lines = [f"{args.preset} shape, vocabulary {args.vocab}, batch {args.batch} x {args.block} tokens, "
             f"{args.steps} {'batches' if names[0].startswith('eval-') else 'AdamW steps'}, each contender in a fresh "
             f"process, glibc M_MMAP_THRESHOLD {args.mmap_threshold or 'default'}.", "",
             "| contender | trainable params | peak RSS (MiB) | above the pre-model RSS (MiB) | s/step | first loss |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['trainable'] / 1e6:.2f}M of {r['total'] / 1e6:.1f}M | "
                     f"{r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] - r['rss_before_model_mib']:.0f} | "
                     f"{r['step_s']:.2f} | {r['losses'][0]:.3f} |")
    torch.set_num_threads(args.threads)  # so the machine line names the contenders' thread count
    name = "eval_memory" if all(n.startswith("eval-") for n in names) else "loss_memory"
    publish(args, {name: block(command_line("benchmarks/loss_memory.py", argv), "\n".join(lines))})


if __name__ == "__main__":
    main()
