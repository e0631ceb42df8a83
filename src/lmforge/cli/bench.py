"""`lmforge bench`: run benchmarks/model_zoo.py (lmforge against transformers, HF tokenizers
and sentencepiece) from a source checkout. The peers come with `pip install -e .[bench]`."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from ..errors import LMForgeError

SUITE = Path(__file__).resolve().parents[3] / "benchmarks" / "model_zoo.py"


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark lmforge against real peers (training, decoding, tokenizers, quality)",
                       description="Runs, in one process and alternating the contenders: a) training tok/s vs "
                                   "transformers GPT-2, b) batch-1 decoding tok/s vs transformers generate, "
                                   "c) BPE training and encoding vs HF tokenizers and sentencepiece, d) val loss "
                                   "after a fixed budget. Prints markdown tables; --json writes the numbers.")
    p.add_argument("--parts", default="a,b,c,d", help="which of a,b,c,d to run (default all)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: min(2, cores))")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per timing (default 5)")
    p.add_argument("--train-steps", type=int, default=10, help="optimizer steps per training round (default 10)")
    p.add_argument("--train-presets", default="char-tiny,shakespeare-small", metavar="NAMES",
                   help="part a's shapes, comma-separated (default char-tiny,shakespeare-small)")
    p.add_argument("--quality-iters", type=int, default=2000, help="iterations per model in part d (default 2000)")
    p.add_argument("--corpus", default=None, metavar="FILE",
                   help="the 11 MB corpus for part c (make it with shared/data/make-pydocs-corpus.sh)")
    p.add_argument("--big-vocab", type=int, default=32768, help="vocabulary for the corpus (default 32768)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    p.add_argument("--markdown", default=None, metavar="FILE", help="write the tables as markdown")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    if not parts or parts - set("abcd"):
        raise LMForgeError(f"--parts takes letters from a,b,c,d separated by commas (e.g. --parts a,b), "
                           f"got {args.parts!r}")
    if args.corpus is not None and not Path(args.corpus).is_file():
        raise LMForgeError(f"corpus file not found: {args.corpus}")
    if not SUITE.is_file():
        raise LMForgeError(f"the benchmark suite {SUITE} is not here; run lmforge bench from a source "
                           f"checkout (git clone ... && pip install -e .[bench])")
    try:
        import sentencepiece  # noqa: F401
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise LMForgeError(f"the benchmark peers are not installed ({e.name}); pip install -e .[bench]") from None
    spec = importlib.util.spec_from_file_location("lmforge_bench_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    names = [x.strip() for x in args.train_presets.split(",") if x.strip()]
    if not names or set(names) - module.TRAIN_STEPS_DIVISOR.keys():
        raise LMForgeError(f"--train-presets takes {','.join(module.TRAIN_STEPS_DIVISOR)} separated by commas, "
                           f"got {args.train_presets!r}")
    argv = [f"--parts={args.parts}", f"--rounds={args.rounds}", f"--train-steps={args.train_steps}",
            f"--train-presets={args.train_presets}",
            f"--quality-iters={args.quality_iters}", f"--big-vocab={args.big_vocab}"]
    for flag, value in (("--threads", args.threads), ("--corpus", args.corpus), ("--json", args.json),
                        ("--markdown", args.markdown)):
        if value is not None:
            argv.append(f"{flag}={value}")
    module.main(argv)
    return 0
