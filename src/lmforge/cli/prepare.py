"""`lmforge prepare`: text files -> token files for training."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize text files into train.bin / val.bin",
                       description="Tokenize text files into DIR/train.bin, DIR/val.bin and DIR/meta.json "
                                   "(the tokenizer is copied to DIR/tokenizer.json). Reads in chunks, "
                                   "so the corpus may be larger than memory.")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="text file(s), UTF-8")
    p.add_argument("--tokenizer", default="char",
                   help="'char' (one token per character), 'bpe:N' (train an N-token BPE on the input) "
                        "or a tokenizer JSON file (default: char)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the text held out for validation (default 0.1)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="encode in N processes (default 1; worth it for corpora of many MB)")
    from .common import add_progress_flag
    add_progress_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data import prepare
    from .common import show_progress

    meta = prepare(args.input, args.tokenizer, args.out, args.val_fraction, progress=show_progress(args),
                   workers=args.workers)
    print(f"wrote {args.out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens, "
          f"vocabulary {meta['vocab_size']:,} ({meta['dtype']})")
    return 0
