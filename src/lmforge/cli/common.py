"""Small helpers shared by the command modules."""

from __future__ import annotations

import argparse
import sys


def add_progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="do not draw progress bars")


def show_progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "no_progress", False)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="0 = greedy; below 1 sharper, above 1 more random (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with this much probability")
    p.add_argument("--seed", type=int, default=None, help="random seed, for reproducible samples")


def add_draft_args(p: argparse.ArgumentParser, help: str) -> None:
    """--draft RUN and --draft-tokens K: speculative decoding (`help` says what it does here)."""
    p.add_argument("--draft", default=None, metavar="RUN", help=help)
    p.add_argument("--draft-tokens", type=int, default=4, metavar="K", help="tokens the draft proposes a round (default 4)")


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights' dtype for inference (default float32)")
    p.add_argument("--int8", action="store_true",
                   help="CPU: store the linear layers' weights as int8, one scale per row (a quarter "
                        "of fp32's bytes; the fastest batch-1 decoding here; outputs shift slightly)")
    p.add_argument("--int4", action="store_true",
                   help="CPU: store the linear layers' weights as int4 with a scale and offset per "
                        "64 inputs (an eighth of fp32's bytes; outputs shift more than with --int8)")


def device_and_dtype(args: argparse.Namespace):
    import torch

    from ..train.trainer import resolve_device

    return resolve_device(args.device), getattr(torch, args.dtype)


def err(msg: str) -> None:
    print(msg, file=sys.stderr)
