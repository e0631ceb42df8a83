"""lm-evaluation-harness runs: lmforge's model class against lm-eval's own `hf` model on the same
model, the GPT-2 124M shape (random weights, GPT-2's tokenizer) as an lmforge run and exported
to Hugging Face format by `lmforge export-hf`.

    python benchmarks/harness_speed.py [--rounds 3] [--batch-size 8] [--no-doc]

Three tasks defined here from local JSONL files (nothing is downloaded): multiple choice in
HellaSwag's shape (a context of a few lines, four one-line endings), generation until a stop
string, and rolling perplexity of documents longer than the context. Each task is a whole
`simple_evaluate` run (lm-eval's own per-run work, the same for both, included); the
contenders alternate round by round in one process, and the table reports medians, whether
both gave the same metrics, and the largest log-likelihood difference. It also times the model's
own method inside each run (`loglikelihood`, `generate_until`, `loglikelihood_rolling`): the
rest of a run is lm-eval's per-run work, which no model class can shorten. Writes its table into
docs/benchmarks.md between <!-- harness_speed:begin --> and <!-- harness_speed:end -->.
"""

from __future__ import annotations

import os

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before `datasets` is imported: local files only
os.environ["HF_HUB_OFFLINE"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from doc_tables import add_doc_args, block, command_line, publish  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "data" / "gpt2-tokenizer"
TASKS = {
    "multiple choice": ("multiple_choice", 'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
                        "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"),
    "generation": ("generate_until", 'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
                   'generation_kwargs:\n  until: ["\\n\\n"]\n  max_gen_toks: 16\n  do_sample: false\n'
                   "metric_list:\n  - metric: exact_match\n"),
    "rolling perplexity": ("loglikelihood_rolling", 'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
                           "  - metric: word_perplexity\n  - metric: bits_per_byte\n"),
}


def make_models(tmp: Path) -> tuple[Path, Path]:
    """A random GPT-2 124M with GPT-2's tokenizer -> an lmforge run -> `lmforge export-hf`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmforge.interop import export_hf, import_hf

    if not TOKENIZER.is_dir():
        sys.exit(f"GPT-2 tokenizer files not found in {TOKENIZER}")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(tmp / "src")
    shutil.copy(TOKENIZER / "encoder.json", tmp / "src" / "vocab.json")
    shutil.copy(TOKENIZER / "vocab.bpe", tmp / "src" / "merges.txt")
    import_hf(tmp / "src", tmp / "run")
    export_hf(tmp / "run", tmp / "hf")
    return tmp / "run", tmp / "hf"


def make_tasks(tmp: Path, n_choice: int, n_gen: int, n_docs: int) -> dict[str, str]:
    text = (ROOT / "src" / "lmforge" / "assets" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    lines = [line for line in text[:400_000].split("\n") if len(line) > 30]
    docs = {
        "multiple choice": [{"context": " ".join(lines[10 * i:10 * i + 4]), "label": i % 4,
                             "choices": [" " + lines[10 * i + 4 + k] for k in range(4)]} for i in range(n_choice)],
        "generation": [{"prompt": " ".join(lines[5000 + 3 * i:5003 + 3 * i]), "answer": lines[5003 + 3 * i]}
                       for i in range(n_gen)],
        "rolling perplexity": [{"text": text[500_000 + 7000 * i:500_000 + 7000 * i + 5000]} for i in range(n_docs)],
    }
    names = {}
    for label, (kind, body) in TASKS.items():
        name = "bench_" + label.split()[0]
        data = tmp / f"{name}.jsonl"
        data.write_text("\n".join(json.dumps(d) for d in docs[label]) + "\n", encoding="utf-8")
        (tmp / "tasks").mkdir(exist_ok=True)
        (tmp / "tasks" / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\noutput_type: {kind}\n{body}", encoding="utf-8")
        names[label] = name
    return names


def responses(result: dict, task: str) -> list:
    return [r for s in sorted(result["samples"][task], key=lambda s: s["doc_id"]) for r in s["resps"]]


def agreement(a: dict, b: dict, task: str) -> tuple[bool, str]:
    """(same metrics, the largest log-likelihood difference or whether the texts are equal)."""
    ra, rb = a["results"][task], b["results"][task]
    same = all(k in rb and (v == rb[k] if not isinstance(v, float) else abs(v - rb[k]) <= 1e-6 * max(1, abs(v)))
               for k, v in ra.items() if "stderr" not in k)
    xa, xb = responses(a, task), responses(b, task)
    if isinstance(xa[0][0], str):
        return same, "texts equal" if xa == xb else "texts differ"
    lla = [x[0][0] if isinstance(x[0], (list, tuple)) else x[0] for x in xa]
    llb = [x[0][0] if isinstance(x[0], (list, tuple)) else x[0] for x in xb]
    diff = max(abs(p - q) for p, q in zip(lla, llb))
    rel = max(abs(p - q) / max(abs(q), 1e-30) for p, q in zip(lla, llb))
    return same, f"log-likelihoods within {diff:.1e} ({rel:.0e} relative)"


METHODS = ("loglikelihood", "generate_until", "loglikelihood_rolling")


def time_methods(model, seconds: list[float]) -> None:
    """Wrap the model's request methods so each call adds its wall time to seconds[-1]."""
    for name in METHODS:
        method = getattr(model, name)

        def timed(*args, _method=method, **kwargs):
            t0 = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                seconds[-1] += time.perf_counter() - t0
        setattr(model, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--choice-docs", type=int, default=16, help="multiple-choice questions (4 choices each)")
    ap.add_argument("--gen-docs", type=int, default=8)
    ap.add_argument("--ppl-docs", type=int, default=2, help="documents of 5,000 characters (~1,300 tokens)")
    add_doc_args(ap, "docs/benchmarks.md")
    args = ap.parse_args()

    import datasets.config
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from lmforge.harness import LMForgeLM

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        datasets.config.HF_DATASETS_CACHE = str(tmp / "datasets")
        run, hf_dir = make_models(tmp)
        names = make_tasks(tmp, args.choice_docs, args.gen_docs, args.ppl_docs)
        manager = TaskManager(include_path=str(tmp / "tasks"), include_defaults=False)
        models = {"lmforge": LMForgeLM(run=str(run), batch_size=args.batch_size),
                  "hf": HFLM(pretrained=str(hf_dir), batch_size=args.batch_size, device="cpu", dtype="float32")}
        times: dict[tuple[str, str], list[float]] = {}
        inside = {name: [] for name in models}  # seconds inside the model's methods, per run
        for name, model in models.items():
            time_methods(model, inside[name])
        in_model: dict[tuple[str, str], list[float]] = {}
        last: dict[tuple[str, str], dict] = {}
        for r in range(args.rounds):
            for label, task in names.items():
                for name in (("lmforge", "hf") if r % 2 == 0 else ("hf", "lmforge")):
                    inside[name].append(0.0)
                    t0 = time.perf_counter()
                    last[label, name] = simple_evaluate(model=models[name], tasks=[task], task_manager=manager,
                                                        log_samples=True)
                    times.setdefault((label, name), []).append(time.perf_counter() - t0)
                    in_model.setdefault((label, name), []).append(inside[name][-1])
                    print(f"round {r + 1} {label:<18} {name:<8} {times[label, name][-1]:6.2f} s "
                          f"({inside[name][-1]:.2f} s in the model)", flush=True)

    rows = ["| task | requests | lmforge s | `hf` s | speed-up | in the model: lmforge s | `hf` s | speed-up "
            "| same metrics | agreement |", "|---|---|---|---|---|---|---|---|---|---|"]
    total = {"lmforge": 0.0, "hf": 0.0}
    total_model = {"lmforge": 0.0, "hf": 0.0}
    for label, task in names.items():
        med = {n: statistics.median(times[label, n]) for n in ("lmforge", "hf")}
        mod = {n: statistics.median(in_model[label, n]) for n in ("lmforge", "hf")}
        for n in total:
            total[n] += med[n]
            total_model[n] += mod[n]
        same, agree = agreement(last[label, "lmforge"], last[label, "hf"], task)
        n_req = sum(len(s["resps"]) for s in last[label, "hf"]["samples"][task])
        rows.append(f"| {label} | {n_req} | {med['lmforge']:.2f} | {med['hf']:.2f} | "
                    f"{med['hf'] / med['lmforge']:.2f}x | {mod['lmforge']:.2f} | {mod['hf']:.2f} | "
                    f"{mod['hf'] / mod['lmforge']:.2f}x | {'yes' if same else 'no'} | {agree} |")
    rows.append(f"| all three | | {total['lmforge']:.2f} | {total['hf']:.2f} | {total['hf'] / total['lmforge']:.2f}x "
                f"| {total_model['lmforge']:.2f} | {total_model['hf']:.2f} | "
                f"{total_model['hf'] / total_model['lmforge']:.2f}x | | |")
    note = (f"GPT-2 124M shape, fp32, batch size {args.batch_size} for both; medians of {args.rounds} rounds, "
            "each a whole `simple_evaluate` run of one task (lm-eval's own per-run work included); *in the model*: "
            "the part of that run spent inside the model class's request method.")
    publish(args, {"harness_speed": block(command_line("benchmarks/harness_speed.py"), "\n".join(rows), note)})


if __name__ == "__main__":
    main()
