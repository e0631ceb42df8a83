"""`lmforge tokenizer train|encode|decode`: build a tokenizer file and try it out."""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a BPE tokenizer, or encode/decode text with one",
                       description="Train a byte-level BPE tokenizer (GPT-2/GPT-4 style) on text files, "
                                   "and encode or decode text with a saved tokenizer file.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    t = actions.add_parser("train", help="learn BPE merges from text files and save tok.json",
                           description="Learn byte-level BPE merges from UTF-8 text files. The vocabulary "
                                       "holds the 256 bytes, the merges and the special tokens. Files are "
                                       "read in blocks, so they may be larger than memory.")
    t.add_argument("--input", nargs="+", required=True, metavar="FILE", help="UTF-8 text file(s) to train on")
    t.add_argument("--vocab-size", type=int, default=None, metavar="N",
                   help="total vocabulary size, bytes and special tokens included (required for bpe)")
    t.add_argument("--kind", choices=["bpe", "char"], default="bpe",
                   help="bpe (default), or char: one token per distinct character, no --vocab-size")
    t.add_argument("--pattern", choices=["gpt2", "gpt4"], default="gpt4",
                   help="pre-tokenization regex: GPT-2's or GPT-4's cl100k one (default gpt4)")
    t.add_argument("--special", nargs="*", default=None, metavar="TOK",
                   help="special tokens, given ids after the merges (default <|endoftext|>; "
                        "--special alone for none)")
    t.add_argument("--out", required=True, metavar="FILE", help="where to write the tokenizer JSON")
    from .common import add_progress_flag
    add_progress_flag(t)
    t.set_defaults(func=train)

    e = actions.add_parser("encode", help="text -> token ids",
                           description="Encode text from stdin (or --text) and print the ids on one line, "
                                       "space-separated. Special-token text such as <|endoftext|> becomes "
                                       "its id unless --no-special is given.")
    e.add_argument("--tokenizer", required=True, metavar="FILE", help="tokenizer JSON file")
    e.add_argument("--text", default=None, help="text to encode (default: read stdin)")
    e.add_argument("--no-special", action="store_true", help="encode special-token text as ordinary text")
    e.set_defaults(func=encode)

    d = actions.add_parser("decode", help="token ids -> text",
                           description="Decode whitespace-separated ids from stdin (or --ids) and write the "
                                       "text to stdout exactly (no newline added). Bytes that are not valid "
                                       "UTF-8 show as U+FFFD.")
    d.add_argument("--tokenizer", required=True, metavar="FILE", help="tokenizer JSON file")
    d.add_argument("--ids", default=None, help='ids to decode, e.g. "15496 995" (default: read stdin)')
    d.set_defaults(func=decode)


def train(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from ..errors import LMForgeError
    from ..tokenizers import BPETokenizer, CharTokenizer
    from .common import show_progress

    for path in map(Path, args.input):
        if not path.is_file():
            raise LMForgeError(f"input file not found: {path}")
    if all(Path(path).stat().st_size == 0 for path in args.input):
        raise LMForgeError("the input files are empty; give some text to train on")
    start = time.perf_counter()
    if args.kind == "char":
        from ..tokenizers.bpe_train import read_blocks

        chars: set[str] = set()
        for block in read_blocks(args.input):
            chars.update(block)
        tok = CharTokenizer("".join(sorted(chars)))
    else:
        if args.vocab_size is None:
            raise LMForgeError("--vocab-size is required for a bpe tokenizer (e.g. --vocab-size 4096)")
        specials = ["<|endoftext|>"] if args.special is None else args.special
        tok = BPETokenizer.train(args.input, args.vocab_size, pattern=args.pattern,
                                 special_tokens=specials, progress=show_progress(args))
    seconds = time.perf_counter() - start
    tok.save(args.out)
    print(f"trained a {args.kind} tokenizer with vocab size {tok.vocab_size:,} in {seconds:.1f} s "
          f"-> {args.out}")
    return 0


def encode(args: argparse.Namespace) -> int:
    from ..tokenizers import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    text = sys.stdin.read() if args.text is None else args.text
    ids = tok.encode(text, allowed_special="none" if args.no_special else "all")
    print(" ".join(map(str, ids)))
    return 0


def decode(args: argparse.Namespace) -> int:
    from ..errors import LMForgeError
    from ..tokenizers import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    words = (sys.stdin.read() if args.ids is None else args.ids).split()
    ids = []
    for word in words:
        try:
            ids.append(int(word))
        except ValueError:
            raise LMForgeError(f"not a token id: {word!r}; give whitespace-separated integers") from None
    sys.stdout.write(tok.decode(ids))
    sys.stdout.flush()
    return 0
