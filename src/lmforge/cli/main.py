"""Entry point: builds the argument parser from the command modules and turns user errors
into one line on stderr with exit code 2 (no traceback)."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import LMForgeError

# Modules under lmforge.cli; each defines `register(subparsers)`, which adds its command(s)
# and sets `func`. They import torch and friends inside their handlers so `--help` stays fast.
COMMANDS = [
    "demo",
    "tokenizer",
    "prepare",
    "train",
    "sample",
    "chat",  # interactive chat with a run
    "eval",
    "plot",
    "finetune",  # finetune
    "merge",  # merge a LoRA adapter into its base
    "translate",  # translate, translate train/eval/demo
    "interop",  # import-hf, export-hf
    "gguf",  # export-gguf
    "serve",
    "bench",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge",
        description="Train, sample, fine-tune and serve language models built from first principles.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"lmforge.cli.{name}")
        except ModuleNotFoundError as e:  # a command whose module is not written yet
            if e.name == f"lmforge.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LMForgeError as e:
        print(f"lmforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `lmforge sample ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
