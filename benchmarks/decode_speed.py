"""Part b of benchmarks/model_zoo.py: batch-1 greedy decoding, GPT-2 124M shape, lmforge vs
transformers `generate` (KV cache on), with this machine's memory bandwidth measured in the
same run and the tokens/s it bounds: decoding one token reads every weight once."""

from __future__ import annotations

import copy
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from timing import median_time, memory_bandwidth

SHAKESPEARE = Path(__file__).resolve().parents[1] / "src/lmforge/assets/tinyshakespeare.txt"


def imported_run(hf_model, tmp: Path) -> Path:
    """hf_model saved as a Hugging Face directory (with a small BPE tokenizer trained here),
    then brought in by `lmforge import-hf`, the way a user gets a GPT-2 checkpoint in."""
    from lmforge.interop.hf_tokenizer import write_hf_tokenizer
    from lmforge.tokenizers import BPETokenizer

    hf_dir, run = tmp / "hf", tmp / "run"
    hf_model.save_pretrained(hf_dir)
    write_hf_tokenizer(BPETokenizer.train(SHAKESPEARE.read_text(encoding="utf-8")[:100_000], 512), hf_dir)
    subprocess.run([sys.executable, "-m", "lmforge", "import-hf", str(hf_dir), "--out", str(run)], check=True)
    return run


def bench_decoding(rounds: int, new_tokens: int = 128, prompt_len: int = 16) -> dict[str, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    import lmforge
    from lmforge.models.decoding import generate_ids, prepare_for_decoding
    from lmforge.models.gpt import GPT, GPTConfig
    from lmforge.models.presets import get_preset

    torch.manual_seed(0)
    base = GPT(GPTConfig(**get_preset("gpt2")["model_config"])).eval()
    hf32 = GPT2LMHeadModel(GPT2Config(attn_implementation="sdpa")).eval()
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        loaded, _ = lmforge.load(imported_run(hf32, Path(tmp)))  # the Python API's path, fp32
    lmf = {"lmforge plain fp32": base,  # nn.Linear layout, generate_ids straight
           "lmforge fp32": prepare_for_decoding(copy.deepcopy(base)),
           "lmforge plain bf16": copy.deepcopy(base).to(torch.bfloat16),
           "lmforge bf16": prepare_for_decoding(copy.deepcopy(base), dtype=torch.bfloat16),
           "lmforge int8": prepare_for_decoding(copy.deepcopy(base), int8=True)}
    prompt = torch.randint(0, 50257, (1, prompt_len), generator=torch.Generator().manual_seed(1))

    def ours(m):
        return lambda: generate_ids(m, prompt, new_tokens, temperature=0.0)

    def theirs(m):
        return lambda: m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)

    fns = {"transformers fp32": theirs(hf32), "transformers bf16": theirs(hf16),
           "lmforge.load(import-hf run) + model.generate fp32":
               lambda: loaded.generate(prompt, new_tokens, temperature=0.0)}
    fns.update({k: ours(m) for k, m in lmf.items()})
    with torch.no_grad():
        for fn in fns.values():  # warm-up
            fn()
        times = median_time(fns, rounds)
    bw = memory_bandwidth()
    n_params = base.num_params() - base.pos_emb.weight.numel()  # one position row is read per token
    out: dict[str, Any] = {"new_tokens": new_tokens, "prompt": prompt_len, "rounds": rounds,
                           "bandwidth": bw, "weight_params_per_token": n_params, "results": {}}
    bytes_per_param = {"fp32": 4, "bf16": 2, "int8": 1}
    for name, ts in times.items():
        tok_s = new_tokens / statistics.median(ts)
        bound = bw["read_gb_s"] * 1e9 / (n_params * bytes_per_param[name.split()[-1]])
        out["results"][name] = {"tok_s": tok_s, "rounds_s": ts, "bound_tok_s": bound, "of_bound": tok_s / bound}
    r = out["results"]
    out["ratio_fp32"] = r["lmforge fp32"]["tok_s"] / r["transformers fp32"]["tok_s"]
    out["ratio_bf16"] = r["lmforge bf16"]["tok_s"] / r["transformers bf16"]["tok_s"]
    out["ratio_api"] = (r["lmforge.load(import-hf run) + model.generate fp32"]["tok_s"]
                        / r["transformers fp32"]["tok_s"])
    return out


def decoding_markdown(d: dict[str, Any]) -> str:
    bw = d["bandwidth"]
    lines = [f"Batch 1, {d['prompt']}-token prompt, {d['new_tokens']} greedy tokens, median of {d['rounds']} "
             f"alternating rounds. Memory bandwidth in the same run: {bw['read_gb_s']:.1f} GB/s read (torch `sum` "
             f"over 1 GiB), {bw['copy_gb_s']:.1f} GB/s copy; bound = read bandwidth / bytes of weights per token "
             f"({d['weight_params_per_token'] / 1e6:.1f}M parameters).", "",
             "| contender | tok/s | bandwidth bound tok/s | share of bound |", "|---|---|---|---|"]
    for name, r in d["results"].items():
        lines.append(f"| {name} | {r['tok_s']:.1f} | {r['bound_tok_s']:.0f} | {r['of_bound']:.0%} |")
    lines += ["", f"lmforge / transformers: fp32 **{d['ratio_fp32']:.2f}x**, bf16 **{d['ratio_bf16']:.2f}x**; "
              f"`lmforge.load` + `model.generate` vs transformers fp32 **{d['ratio_api']:.2f}x**."]
    return "\n".join(lines)
