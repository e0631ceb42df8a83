"""`lmforge finetune`: adapt a trained run to new data, with LoRA adapters or all weights."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    from .common import add_progress_flag

    p = sub.add_parser("finetune", help="fine-tune a run on new data (LoRA or full)",
                       description="Continue training the run BASE on DIR (prepared with BASE's tokenizer: "
                                   "`lmforge prepare --tokenizer BASE/tokenizer.json`), or on an instruction "
                                   "FILE: JSON Lines (or a JSON array) of chat records {\"messages\": [{\"role\", "
                                   "\"content\"}, ...]}, {\"prompt\", \"completion\"} or Alpaca {\"instruction\", "
                                   "\"input\", \"output\"}, rendered with BASE's chat template (or the plain "
                                   "User:/Assistant: format) with the loss on the answers only. With --method lora "
                                   "(default) only low-rank adapters train and OUT holds the adapter: use it "
                                   "as `lmforge sample --run BASE --adapter OUT`, or make a plain run with "
                                   "`lmforge merge`. With --method full, OUT is a plain run. Checkpoints, "
                                   "metrics, Ctrl-C and --resume work as in `lmforge train`.",
                       epilog="training settings start from BASE's and take --config / --set as in train "
                              "(max_iters learning_rate batch_size ...); of the model's settings only "
                              "dropout may change.")
    p.add_argument("--base", default=None, metavar="RUN", help="the trained run to start from (not needed with --resume)")
    p.add_argument("--data", required=True, metavar="DIR|FILE",
                   help="prepared data directory (BASE's tokenizer), or an instruction file (.jsonl / .json)")
    p.add_argument("--val", default=None, metavar="FILE",
                   help="instruction file for validation (default: a seeded 5%% of --data is held out)")
    p.add_argument("--max-length", type=int, default=None, metavar="N",
                   help="most tokens an example may have (default: BASE's block_size)")
    p.add_argument("--overlong", choices=["truncate", "drop"], default=None,
                   help="what to do with longer examples: truncate (default) or drop; the count is printed")
    p.add_argument("--train-on-prompt", action="store_true",
                   help="count every token in the loss, not only the assistant's answers")
    p.add_argument("--pack", action="store_true",
                   help="pack several examples into each row (attention kept within each example) "
                        "instead of padding one example a row")
    p.add_argument("--out", required=True, metavar="OUT", help="where the adapter (lora) or run (full) goes")
    p.add_argument("--method", choices=["lora", "full"], default=None, help="lora (default) or full")
    p.add_argument("--lora-r", type=int, default=8, help="adapter rank r (default 8)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="the update is scaled by alpha/r (default 16)")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the adapter input (default 0.05)")
    p.add_argument("--lora-targets", nargs="+", default=["attn.qkv", "attn.proj"], metavar="PATTERN",
                   help="modules to adapt: attn.qkv attn.proj mlp.fc mlp.proj, all-linear, a glob (quoted, e.g. "
                        "'blocks.[1-5].mlp.proj'), or the token embedding tok_emb (its tied LM head follows); "
                        "for text unlike the base's, 'blocks.[1-5].mlp.proj' tok_emb did best in "
                        "docs/finetuning.md (default: attn.qkv attn.proj)")
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    p.add_argument("--base-dtype", choices=["float32", "bfloat16", "int8", "nf4"], default=None,
                   help="how the frozen base is stored while LoRA trains: float32 (default), bfloat16, int8 "
                        "(one scale per row) or nf4 (4-bit, blocks of 64); the adapter is the same either way "
                        "(docs/finetuning.md)")
    p.add_argument("--config", default=None, metavar="FILE.toml", help="TOML file of training settings")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override settings, e.g. --set max_iters=200 learning_rate=1e-3 (or repeat --set)")
    p.add_argument("--resume", action="store_true", help="continue the fine-tuning run in OUT")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (not always faster)")
    add_progress_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..nn.lora import LoRAConfig, parse_targets
    from ..train.finetune import build_finetune_trainer
    from .common import show_progress

    lora = None
    if not args.resume and (args.method or "lora") == "lora":
        lora = LoRAConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                          targets=parse_targets(args.lora_targets), rslora=args.rslora)
    overrides = list(args.overrides) + (["compile=true"] if args.compile else [])
    trainer = build_finetune_trainer(args.base, args.data, args.out, args.method, lora, args.config,
                                     overrides, resume=args.resume, progress=show_progress(args),
                                     base_dtype=args.base_dtype,
                                     sft={"val": args.val, "max_length": args.max_length, "overlong": args.overlong,
                                          "train_on_prompt": args.train_on_prompt, "pack": args.pack})
    res = trainer.fit()
    if trainer.rank != 0:  # under torchrun, only rank 0 reports
        return 0
    if "val_loss" in res:
        print(f"done: iter {trainer.iter}, train loss {res['train_loss']:.4f}, val loss {res['val_loss']:.4f}")
    base = trainer.record["base_run"]
    use = "chat" if trainer.record.get("sft") else "sample"  # instruction data: the adapter answers chats
    if trainer.method == "lora":
        print(f"adapter saved in {args.out}; use it with `lmforge {use} --run {base} --adapter {args.out}` "
              f"or merge it with `lmforge merge --base {base} --adapter {args.out} --out RUN`")
    else:
        print(f"run saved in {args.out}")
    return 0
