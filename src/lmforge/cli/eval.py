"""`lmforge eval`: loss and perplexity of a run on a data directory's validation split."""

from __future__ import annotations

import argparse
import math
import sys


def register(sub) -> None:
    p = sub.add_parser("eval", help="validation loss and perplexity of a run",
                       description="Mean cross-entropy over the whole validation split, in non-overlapping "
                                   "blocks of block_size tokens, and its perplexity exp(loss).")
    p.add_argument("--run", required=True, metavar="RUN")
    p.add_argument("--data", required=True, metavar="DIR")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens of the split")
    p.add_argument("--adapter", default=None, metavar="DIR", help="apply a LoRA adapter")
    from .common import add_device_args, add_progress_flag
    add_device_args(p)
    add_progress_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data import TokenData
    from ..evaluate import split_loss
    from .common import show_progress
    from .sample import load_for_inference

    from ..train.trainer import BF16_NOTE, emulated_bf16

    model, tok = load_for_inference(args)
    if args.dtype == "bfloat16" and emulated_bf16(next(model.parameters()).device):
        print(BF16_NOTE.format(what="evaluation in bfloat16"), file=sys.stderr)
    data = TokenData(args.data)
    data.check_tokenizer(tok)
    loss, n = split_loss(model, data, args.split, args.batch_size, args.max_tokens, progress=show_progress(args))
    print(f"{args.split} loss {loss:.4f}, perplexity {math.exp(loss):.2f} ({n:,} tokens)")
    return 0
