"""`lmforge train`: train a model on a prepared data directory."""

from __future__ import annotations

import argparse


def add_training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="starting point: char-tiny (default), shakespeare-small, gpt2, ...")
    p.add_argument("--model", default=None, metavar="KIND",
                   help="model kind (gpt, nnlm, ...): starts from the first preset of that kind")
    p.add_argument("--config", default=None, metavar="FILE.toml", help="TOML file of settings (flat keys, as --set)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override settings, e.g. --set max_iters=500 n_layer=6 (or repeat --set)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (not always faster)")
    from .common import add_progress_flag
    add_progress_flag(p)


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model",
                       description="Train a model on DIR (made by `lmforge prepare`). Checkpoints "
                                   "go to RUN at every eval, at the end and on Ctrl-C; --resume continues exactly.",
                       epilog="settings: max_iters batch_size block_size learning_rate min_lr warmup_iters "
                              "lr_decay_iters weight_decay beta1 beta2 grad_clip gradient_accumulation_steps "
                              "dropout eval_interval eval_iters log_interval seed device dtype compile fsdp, and the "
                              "model's shape (n_layer n_head n_embd ...). Several processes: torchrun "
                              "--nproc-per-node N -m lmforge train ... (DDP; with --set fsdp=true, sharded)")
    p.add_argument("--data", required=True, metavar="DIR", help="prepared data directory")
    p.add_argument("--out", required=True, metavar="RUN", help="run directory to write")
    add_training_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train.setup import build_trainer
    from .common import show_progress

    overrides = list(args.overrides) + (["compile=true"] if args.compile else [])
    if getattr(args, "model", None) and not args.resume:
        from ..models.presets import preset_for_model

        args.preset = preset_for_model(args.model, args.preset)
    from ..train import distributed

    main_rank = distributed.env_rank() == 0  # under torchrun, only rank 0 prints
    trainer = build_trainer(args.data, args.out, args.preset, args.config, overrides,
                            resume=args.resume, progress=show_progress(args), verbose=main_rank)
    try:
        res = trainer.fit()
    finally:
        distributed.cleanup()
    if "val_loss" in res and main_rank:
        print(f"done: iter {trainer.iter}, train loss {res['train_loss']:.4f}, val loss {res['val_loss']:.4f}; "
              f"run saved in {args.out}")
    return 0
