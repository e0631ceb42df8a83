"""Peak memory of `import-hf`, `lmforge.load` and `export-hf` on a Llama-3.2-1B-shaped checkpoint.

    python benchmarks/hf_memory.py [--workdir DIR] [--no-doc]

Writes a random-init checkpoint of Llama 3.2 1B's shape (16 layers, hidden 2048, 32 heads,
8 KV heads, MLP 8192, vocabulary 128,256, tied embeddings, llama3 RoPE scaling, bf16) in
Hugging Face's names and layout, in two shards, straight with safetensors (no transformers),
then runs each step in a fresh process and reports its peak RSS (VmHWM) above the RSS it
had just before the step (the process floor: Python, torch, lmforge imported), against the
checkpoint's size S. Writes the table into docs/benchmarks.md between the hf_memory markers.
Deletes its files afterwards (about 7.5 GB on disk while it runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
             rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu", bos_token_id=128000,
             eos_token_id=128001, model_type="llama", architectures=["LlamaForCausalLM"],
             rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192}, dtype="bfloat16")

STEP = r"""
import sys, json
sys.path.insert(0, {bench!r})
from memory_common import rss_mib, set_mmap_threshold
set_mmap_threshold(1 << 20)
import torch, lmforge
from lmforge.interop import export_hf, import_hf
floor = rss_mib("VmRSS")
{code}
print(json.dumps({{"floor": floor, "peak": rss_mib("VmHWM")}}))
"""
STEPS = {
    "import-hf (HF shards -> run)": "import_hf({hf!r}, {run!r})",
    "lmforge.load(run, inference=False)": "m, t = lmforge.load({run!r}, inference=False)",
    "lmforge.load(run) (decoding layout)": "m, t = lmforge.load({run!r})",
    "export-hf (run -> HF shards)": "export_hf({run!r}, {out!r}, max_shard_size=2 * 2**30)",
}


def write_checkpoint(d: Path) -> int:
    """The random bf16 checkpoint in two shards, HF names; returns its size in bytes."""
    import torch
    from safetensors.torch import save_file

    from lmforge.interop import write_hf_tokenizer
    from lmforge.tokenizers import BPETokenizer

    d.mkdir(parents=True)
    h, kv, inter, L = SHAPE["hidden_size"], SHAPE["num_key_value_heads"] * 64, SHAPE["intermediate_size"], 16
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    layers = {}
    for i in range(L):
        p = f"model.layers.{i}."
        layers[i] = {p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                     p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                     p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
                     p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
                     p + "mlp.gate_proj.weight": rand(inter, h), p + "mlp.up_proj.weight": rand(inter, h),
                     p + "mlp.down_proj.weight": rand(h, inter)}
    shards = [{"model.embed_tokens.weight": rand(SHAPE["vocab_size"], h),
               **{k: v for i in range(8) for k, v in layers[i].items()}},
              {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
               **{k: v for i in range(8, L) for k, v in layers[i].items()}}]
    del layers
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file(shard, str(d / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        total += sum(t.numel() * t.element_size() for t in shard.values())
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps(SHAPE))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 128000, "eos_token_id": [128001, 128009]}))
    write_hf_tokenizer(BPETokenizer.train("a small text for a stand-in tokenizer. " * 50, 300), d)
    return total


def machine() -> str:
    info = Path("/proc/cpuinfo").read_text()
    model = re.search(r"model name\s*:\s*(.*)", info)
    flags = set(re.search(r"flags\s*:\s*(.*)", info).group(1).split()) if "flags" in info else set()
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags] or ["none"]
    import torch

    return (f"{model.group(1).strip() if model else platform.processor()}, bf16 flags: {', '.join(bf16)}, "
            f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{datetime.date.today().isoformat()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None, help="where to write the ~7.5 GB of files (default: a temp dir)")
    ap.add_argument("--no-doc", action="store_true", help="print the table only")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hf_memory.", dir=args.workdir))
    try:
        hf, run, out = work / "hf", work / "run", work / "export"
        size = write_checkpoint(hf)
        s_mib = size / 2**20
        rows = []
        for label, code in STEPS.items():
            script = STEP.format(bench=str(ROOT / "benchmarks"), code=code.format(hf=str(hf), run=str(run), out=str(out)))
            res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            above = r["peak"] - r["floor"]
            rows.append(f"| {label} | {r['floor']:,.0f} | {r['peak']:,.0f} | {above:,.0f} | {above / s_mib:.2f} |")
            print(rows[-1], flush=True)
        table = "\n".join([
            f"Checkpoint: Llama-3.2-1B shape, random bf16, 2 shards, S = {s_mib:,.0f} MiB. Machine: {machine()}.",
            "", "| step (fresh process) | floor RSS (MiB) | peak RSS (MiB) | peak above floor (MiB) | x S |",
            "|---|---|---|---|---|", *rows])
        print(table)
        if not args.no_doc:
            doc = ROOT / "docs" / "benchmarks.md"
            text = doc.read_text()
            begin, end = "<!-- hf_memory:begin -->", "<!-- hf_memory:end -->"
            if begin not in text:
                text += ("\n## Import / export memory\n\n`python benchmarks/hf_memory.py` (import-hf, lmforge.load "
                         "and export-hf, each in a fresh process; peak RSS above the floor the process had "
                         "with torch and lmforge imported).\n\n" + begin + "\n" + end + "\n")
            head, rest = text.split(begin, 1)
            doc.write_text(head + begin + "\n" + table + "\n" + end + rest.split(end, 1)[1])
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
