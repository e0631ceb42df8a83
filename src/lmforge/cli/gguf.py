"""`lmforge export-gguf`: a run as one GGUF file for llama.cpp, Ollama and LM Studio."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Write a GPT run as one GGUF file (llama.cpp's format): weights, hyper-parameters, tokenizer
(byte-level BPE or SentencePiece-style), special token ids and the chat template.

The llama.cpp architecture follows from the run's settings: learned or sinusoidal positions with
LayerNorm and GELU -> gpt2; RoPE, RMSNorm and SwiGLU -> llama (qwen2 with Q/K/V biases, qwen3 with
QK-norm); Gemma 2's settings -> gemma2. A setting llama.cpp would not compute the same way (a sliding
window outside gemma2, a char tokenizer, an unknown split pattern) is refused with the reason.

Weight types: f32 (exact), f16, bf16 (matrices; norms and biases stay f32), q8_0 (8-bit blocks of 32,
about a quarter of f32's size).

Examples:
  lmforge export-gguf runs/shakespeare --out shakespeare.gguf --type q8_0
  llama-cli -m shakespeare.gguf -p "ROMEO:"      # or: ollama create NAME -f Modelfile (FROM ./x.gguf)
"""


def register(sub) -> None:
    p = sub.add_parser("export-gguf", help="lmforge GPT run -> GGUF file for llama.cpp / Ollama",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="run directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--out", required=True, metavar="FILE.gguf", help="GGUF file to write (replaced atomically)")
    p.add_argument("--type", default="f16", choices=("f32", "f16", "bf16", "q8_0"), dest="qtype",
                   help="weight type of the matrices (default f16)")
    p.set_defaults(func=export_cmd)


def export_cmd(args: argparse.Namespace) -> int:
    import os

    from ..interop.gguf_export import export_gguf

    out = export_gguf(args.run, args.out, qtype=args.qtype)
    print(f"exported {args.run} -> {out} ({os.path.getsize(out) / 2**20:.1f} MiB, {args.qtype})")
    return 0
