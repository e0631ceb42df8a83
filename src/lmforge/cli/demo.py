"""`lmforge demo`: the whole pipeline on the bundled Shakespeare, in a few minutes on a CPU."""

from __future__ import annotations

import argparse
from importlib import resources


def bundled_corpus() -> str:
    return str(resources.files("lmforge") / "assets" / "tinyshakespeare.txt")


def register(sub) -> None:
    p = sub.add_parser("demo", help="train a character-level GPT on the bundled Shakespeare and sample from it",
                       description="Prepare the bundled tinyshakespeare with the char tokenizer, train "
                                   "char-tiny (about 2,000 iterations, a few minutes on 2 CPU cores), "
                                   "print the val loss, plot the loss curve and sample 300 characters.")
    p.add_argument("--out", default="lmforge-demo", metavar="DIR", help="where data and run go (default ./lmforge-demo)")
    p.add_argument("--max-iters", type=int, default=2000, help="training iterations (default 2000)")
    p.add_argument("--seed", type=int, default=1337)
    from .common import add_progress_flag
    add_progress_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .. import generate, load
    from ..data import prepare
    from ..errors import LMForgeError
    from ..plot import plot_run
    from ..train.setup import build_trainer
    from .common import show_progress

    if args.max_iters < 1:
        raise LMForgeError("--max-iters must be at least 1")
    out = Path(args.out)
    run_dir = out / "run"
    if (run_dir / "trainer.pt").exists():
        raise LMForgeError(f"{run_dir} already holds a demo run; remove it or pass another --out")
    progress = show_progress(args)
    print(f"[1/4] preparing the bundled tinyshakespeare (char tokenizer) in {out / 'data'}")
    prepare([bundled_corpus()], "char", out / "data", progress=progress)
    print(f"[2/4] training char-tiny for {args.max_iters} iterations")
    eval_interval = max(1, min(250, args.max_iters))
    trainer = build_trainer(out / "data", run_dir, "char-tiny",
                            overrides=[f"max_iters={args.max_iters}", f"lr_decay_iters={args.max_iters}",
                                       f"eval_interval={eval_interval}", f"seed={args.seed}"],
                            progress=progress)
    res = trainer.fit()
    print(f"      val loss {res['val_loss']:.4f} (train {res['train_loss']:.4f})")
    print(f"[3/4] loss curve: {plot_run(run_dir)}")
    print("[4/4] 300 characters sampled at temperature 0.8:\n")
    model, tok = load(run_dir)
    print(generate(model, tok, "\n", max_new_tokens=300, temperature=0.8, seed=args.seed))
    print(f"\nrun saved in {run_dir}: try `lmforge sample --run {run_dir} --prompt 'ROMEO:'`")
    return 0
