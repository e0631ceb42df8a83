"""German -> English on Multi30k: train for a wall-clock budget, then score test2016.

    OMP_NUM_THREADS=1 nice python benchmarks/translation.py train --out runs/m30k --minutes 35 \
        --set max_iters=800 --set warmup_iters=100
    OMP_NUM_THREADS=1 python benchmarks/translation.py report --run runs/m30k

`train` is `lmforge translate train` (same trainer, preset transformer-multi30k) plus a clock:
at 15, 30, 45 and 60 minutes of training it saves a snapshot of the model (RUN/at-15min, ...),
and at --minutes it stops (as Ctrl-C does: the checkpoint is saved). `report` scores every
snapshot and the final model on test2016 with sacreBLEU (13a, cased) and the papers' metric
(lower-cased Moses-tokenized references), measures decode speed with the KV cache against the
same model decoding without it (the peer), and writes docs/translation.md.
Multi30k is read from --data (default ../shared/data/multi30k); it is never copied."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "multi30k"
MARKS = (15, 30, 45, 60)


def _minutes_trained(run_dir: Path) -> float:
    """Training minutes at the last checkpoint (every eval records them)."""
    from lmforge.plot import read_metrics

    return max([r["minutes"] for r in read_metrics(run_dir) if "minutes" in r] or [0.0])


def cmd_train(args: argparse.Namespace) -> None:
    from lmforge.checkpoint import save_run
    from lmforge.translate.train import build_translation_trainer

    d = Path(args.data)
    trainer = build_translation_trainer(str(d / "train.de"), str(d / "train.en"), str(d / "val.de"),
                                        str(d / "val.en"), args.out, args.preset, args.overrides,
                                        resume=args.resume, progress=not args.no_progress)
    done_before = args.clock_offset if args.clock_offset is not None else (
        _minutes_trained(Path(args.out)) if args.resume else 0.0)  # the clock goes on after a resume
    clock = {"start": time.perf_counter() - 60 * done_before,
             "marks": [m for m in MARKS if done_before < m < args.minutes] + [args.minutes]}
    inner = trainer.eval_hook

    def hook(tr):
        res = inner(tr) if inner else {}
        minutes = (time.perf_counter() - clock["start"]) / 60
        res["minutes"] = round(minutes, 2)
        while clock["marks"] and minutes >= clock["marks"][0]:
            mark = clock["marks"].pop(0)
            if mark < args.minutes:
                save_run(Path(args.out) / f"at-{mark}min", tr.model, tr.tokenizer,
                         {"iter": tr.iter, "minutes": round(minutes, 2)})
            else:
                signal.raise_signal(signal.SIGINT)  # the trainer saves and stops after this step
        return res

    trainer.eval_hook = hook
    res = trainer.fit()
    print(json.dumps({"iter": trainer.iter, **res}))


def cmd_report(args: argparse.Namespace) -> None:
    from report_translation import write_report  # noqa: E402  (same folder)

    write_report(args)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", required=True)
    t.add_argument("--data", default=str(DEFAULT_DATA))
    t.add_argument("--preset", default="transformer-multi30k")
    t.add_argument("--minutes", type=float, default=60.0)
    t.add_argument("--set", dest="overrides", action="append", default=[])
    t.add_argument("--resume", action="store_true")
    t.add_argument("--clock-offset", type=float, default=None,
                   help="minutes trained before this resume (default: the last eval's record)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)
    r = sub.add_parser("report")
    r.add_argument("--run", required=True)
    r.add_argument("--data", default=str(DEFAULT_DATA))
    r.add_argument("--beam", type=int, default=5)
    r.add_argument("--doc", default=str(ROOT / "docs" / "translation.md"))
    r.add_argument("--command", default="", help="the exact training command, for the doc")
    r.set_defaults(func=cmd_report)
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    args.func(args)


if __name__ == "__main__":
    main()
