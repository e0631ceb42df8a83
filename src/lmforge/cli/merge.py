"""`lmforge merge`: fold a LoRA adapter into its base weights, giving a plain run."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("merge", help="merge a LoRA adapter into its base run",
                       description="Write OUT, a plain run directory whose weights are W + (alpha/r) B A "
                                   "for every adapted layer: it samples at the base model's speed and "
                                   "loads like any other run (`lmforge sample --run OUT`).")
    p.add_argument("--base", required=True, metavar="RUN", help="the run the adapter was trained on")
    p.add_argument("--adapter", required=True, metavar="ADAPTER", help="adapter directory (from `lmforge finetune`)")
    p.add_argument("--out", required=True, metavar="RUN2", help="new run directory to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import merge_adapter_into_run

    out = merge_adapter_into_run(args.base, args.adapter, args.out)
    print(f"merged {args.adapter} into {args.base}: wrote {out} (use it with `lmforge sample --run {out}`)")
    return 0
