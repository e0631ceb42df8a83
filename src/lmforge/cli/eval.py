"""`lmforge eval`: loss and perplexity of a run on a data directory's validation split, or
lm-evaluation-harness tasks (`--tasks`) scored by lmforge's harness model."""

from __future__ import annotations

import argparse
import math
import sys


def register(sub) -> None:
    p = sub.add_parser("eval", help="validation loss and perplexity, or lm-eval tasks, of a run",
                       description="With --data: mean cross-entropy over the whole validation split, in "
                                   "non-overlapping blocks of block_size tokens, and its perplexity exp(loss). "
                                   "With --tasks: lm-evaluation-harness tasks (needs lm-eval installed).")
    p.add_argument("--run", required=True, metavar="RUN")
    p.add_argument("--data", default=None, metavar="DIR", help="a prepared data directory (perplexity mode)")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens of the split")
    p.add_argument("--adapter", default=None, metavar="DIR", help="apply a LoRA adapter")
    p.add_argument("--tasks", nargs="+", default=None, metavar="NAME",
                   help="lm-eval task or group names (space- or comma-separated)")
    p.add_argument("--include-path", default=None, metavar="DIR", help="also read task YAML files from DIR")
    p.add_argument("--limit", type=float, default=None,
                   help="examples per task: a count, or a fraction below 1")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt")
    p.add_argument("--apply-chat-template", nargs="?", const=True, default=False, metavar="NAME",
                   help="render each prompt as a conversation with the run's chat template (or the named "
                        "variant; without one, the plain User:/Assistant: format); few-shot examples become turns")
    p.add_argument("--system-instruction", default=None, metavar="TEXT",
                   help="a system message before each prompt (with --apply-chat-template)")
    p.add_argument("--output", default=None, metavar="FILE.json", help="also write the task results as JSON")
    from .common import add_device_args, add_progress_flag
    add_device_args(p)
    add_progress_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import LMForgeError
    from ..train.trainer import BF16_NOTE, emulated_bf16
    from .sample import load_for_inference

    if args.data is None and not args.tasks:
        raise LMForgeError("give --data DIR (validation perplexity) or --tasks NAME... (lm-eval tasks)")
    if args.data is not None and args.tasks:
        raise LMForgeError("--data and --tasks are two modes; run them one at a time")
    if args.batch_size < 1:
        raise LMForgeError("--batch-size must be >= 1")
    if args.tasks:
        from ..harness import model_class
        model_class()  # a missing lm-eval is reported before the model loads
    model, tok = load_for_inference(args)
    if args.dtype == "bfloat16" and emulated_bf16(next(model.parameters()).device):
        print(BF16_NOTE.format(what="evaluation in bfloat16"), file=sys.stderr)
    if args.tasks:
        return run_tasks(args, model, tok)
    from ..data import TokenData
    from ..evaluate import split_loss
    from .common import show_progress

    data = TokenData(args.data)
    data.check_tokenizer(tok)
    loss, n = split_loss(model, data, args.split, args.batch_size, args.max_tokens, progress=show_progress(args))
    print(f"{args.split} loss {loss:.4f}, perplexity {math.exp(loss):.2f} ({n:,} tokens)")
    return 0


def run_tasks(args: argparse.Namespace, model, tok) -> int:
    import json

    from lm_eval.utils import handle_non_serializable, make_table

    from ..chat import chat_format
    from ..checkpoint import read_run_config
    from ..errors import LMForgeError
    from ..fileio import atomic_open
    from ..harness import model_class

    if args.limit is not None and args.limit <= 0:
        raise LMForgeError("--limit must be > 0")
    if args.system_instruction is not None and not args.apply_chat_template:
        raise LMForgeError("--system-instruction needs --apply-chat-template")
    lm = model_class()(model=model, tokenizer=tok, batch_size=args.batch_size,
                       generation=read_run_config(args.run).get("generation"), chat=chat_format(tok, args.run))
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = evaluate_tasks(lm, args.tasks, args.include_path, limit, args.num_fewshot,
                             apply_chat_template=args.apply_chat_template, system_instruction=args.system_instruction)
    print(make_table(results))
    if args.output:
        with atomic_open(args.output) as f:
            f.write(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    return 0


def evaluate_tasks(lm, tasks: list[str], include_path: str | None, limit: float | None,
                   num_fewshot: int | None, **chat) -> dict:
    """lm-eval's simple_evaluate on task names (lm-eval's own, or YAML files under include_path)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from ..errors import LMForgeError

    names = [t for name in tasks for t in name.split(",") if t]
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or not all(manager.match_tasks([t]) for t in names):
        manager = TaskManager(include_path=include_path)  # lm-eval's own 15,000 tasks: ~10 s to index
    unknown = [t for t in names if not manager.match_tasks([t])]
    if unknown:
        raise LMForgeError(f"unknown task {unknown[0]!r}: not one of lm-eval's tasks"
                           + (f" nor defined under {include_path}" if include_path else "; see `lm-eval ls tasks`"))
    results = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                              log_samples=False, **chat)  # apply_chat_template, system_instruction
    return {k: results[k] for k in ("results", "versions", "n-shot", "higher_is_better", "n-samples") if k in results}
