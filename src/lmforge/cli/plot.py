"""`lmforge plot`: draw a run's loss curves."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("plot", help="plot a run's loss curves to RUN/loss.png",
                       description="Plot train and val loss against tokens seen.")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--out", default=None, help="image path (default RUN/loss.png)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..plot import plot_run

    print(f"wrote {plot_run(args.run, args.out)}")
    return 0
