"""`lmforge import-hf` / `lmforge export-hf`: Hugging Face checkpoints (GPT-2, Llama, Mistral,
Qwen2, Qwen3, Gemma 2, Phi-3), tokenizers and LoRA adapters to and from Hugging Face's formats
(transformers, tokenizers, PEFT)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    i = sub.add_parser("import-hf", help="Hugging Face model directory -> lmforge run directory",
                       description="Read a Hugging Face model directory (config.json with model_type gpt2, "
                                   "llama, mistral, qwen2, qwen3, gemma2 or phi3; model.safetensors or "
                                   "pytorch_model.bin, single or sharded; generation_config.json; and "
                                   "vocab.json + merges.txt or tokenizer.json) into an lmforge run directory.")
    i.add_argument("dir", metavar="DIR", help="Hugging Face model directory (e.g. from save_pretrained)")
    i.add_argument("--out", required=True, metavar="RUN", help="run directory to write")
    i.add_argument("--tokenizer", default=None, metavar="TOKDIR",
                   help="read the tokenizer from this directory instead of DIR")
    i.add_argument("--adapter", default=None, metavar="PEFT_DIR",
                   help="also import this PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)")
    i.add_argument("--adapter-out", default=None, metavar="ADAPTER",
                   help="where to write the imported adapter (default RUN/adapter)")
    i.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="store the weights in this dtype (default: the checkpoint's own)")
    i.set_defaults(func=import_cmd)

    e = sub.add_parser("export-hf", help="lmforge GPT run -> Hugging Face model directory",
                       description="Write a run as a directory that transformers' "
                                   "AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained load, "
                                   "in the family it was imported from, or else the first of gpt2, llama, "
                                   "mistral, qwen2, qwen3, gemma2, phi3 that expresses its architecture.")
    e.add_argument("run", metavar="RUN", help="run directory")
    e.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    e.add_argument("--adapter", default=None, metavar="ADAPTER",
                   help="also write this lmforge LoRA adapter in PEFT's format")
    e.add_argument("--adapter-out", default=None, metavar="PEFT_DIR",
                   help="where to write the PEFT adapter (default DIR/adapter)")
    e.add_argument("--max-shard-size", type=int, default=None, metavar="BYTES",
                   help="split the weights into shards of at most this many bytes (default 5 GiB)")
    e.add_argument("--no-tokenizer", action="store_true",
                   help="write the model only (for runs whose tokenizer is not byte-level BPE)")
    e.set_defaults(func=export_cmd)


def import_cmd(args: argparse.Namespace) -> int:
    from ..interop import import_hf
    from ..interop.hf_model import describe

    out = import_hf(args.dir, args.out, tokenizer_dir=args.tokenizer, adapter=args.adapter,
                    adapter_out=args.adapter_out, dtype=args.dtype)
    print(f"imported {args.dir} -> {describe(out)}")
    if args.adapter:
        from pathlib import Path

        print(f"adapter -> {args.adapter_out or Path(out) / 'adapter'}")
    return 0


def export_cmd(args: argparse.Namespace) -> int:
    from ..interop import export_hf
    from ..interop.hf_model import DEFAULT_SHARD, describe

    out = export_hf(args.run, args.out, adapter=args.adapter, adapter_out=args.adapter_out,
                    tokenizer=not args.no_tokenizer, max_shard_size=args.max_shard_size or DEFAULT_SHARD)
    print(f"exported {args.run} -> {describe(out)}")
    if args.adapter:
        from pathlib import Path

        print(f"PEFT adapter -> {args.adapter_out or Path(out) / 'adapter'}")
    return 0
