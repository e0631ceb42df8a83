"""Encoding speed of tokenizer.json BPE files: lmforge vs the `tokenizers` library, one thread.

    python benchmarks/tokenizer_speed.py [--chars 1000000] [--rounds 5] [--no-doc]

Trains the reference files here (byte-level BPE in Llama 3's style with the `tokenizers`
library; SentencePiece BPE with byte_fallback, converted by transformers), checks that both
give the same ids on the bundled Shakespeare, then times encoding it, alternating the
contenders round by round, and writes the table into docs/benchmarks.md between
<!-- tokenizer_speed:begin --> and <!-- tokenizer_speed:end -->.
"""

from __future__ import annotations

import os

os.environ["RAYON_NUM_THREADS"] = "1"        # the peer's thread pool: one thread, like ours
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- tokenizer_speed:begin -->", "<!-- tokenizer_speed:end -->"
sys.path.insert(0, str(ROOT / "tests"))


def build(style: str, text: str, tmp: Path):
    """(tokenizers' Tokenizer, lmforge's HFBPETokenizer) for one style, from the test helpers."""
    from test_hf_tokenizers import _byte_level, _sentencepiece
    from tokenizers import Tokenizer

    from lmforge.tokenizers import HFBPETokenizer

    hf = _sentencepiece(tmp, style == "sp-legacy", text[:300_000]) if style.startswith("sp") else \
        _byte_level(style, text[:300_000])
    path = tmp / f"{style}.json"
    hf.save(str(path))
    return Tokenizer.from_file(str(path)), HFBPETokenizer(json.loads(path.read_text(encoding="utf-8")))


def machine() -> str:
    cpu, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown CPU":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    import tokenizers
    import torch
    marks = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return (f"{cpu} ({', '.join(marks) or 'no bf16/AMX flags'}), {os.cpu_count()} cores, 1 thread per contender; "
            f"Python {platform.python_version()}, torch {torch.__version__}, tokenizers {tokenizers.__version__}; "
            f"{datetime.date.today().isoformat()}")


def timed(fn, text: str) -> tuple[float, list[int]]:
    start = time.perf_counter()
    ids = fn(text)
    return time.perf_counter() - start, ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chars", type=int, default=1_000_000, help="characters of Shakespeare to encode")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-doc", action="store_true", help="print the table only")
    args = p.parse_args()
    text = (ROOT / "src" / "lmforge" / "assets" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:args.chars]
    rows = ["| file style | input | ids equal | tokens | `tokenizers` MB/s | lmforge MB/s | lmforge / tokenizers "
            "| lmforge path |", "|---|---|---|---|---|---|---|---|"]
    mb = len(text.encode("utf-8")) / 1e6
    from tokenizers import Tokenizer

    from lmforge.tokenizers import HFBPETokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for style in ("llama3", "qwen", "smollm2", "gpt2", "sp-legacy", "sp-metaspace"):
            hf, ours = build(style, text, Path(tmp))
            lines = text.splitlines(keepends=True)
            contenders = {
                "one string": {"hf": lambda t: hf.encode(t, add_special_tokens=False).ids, "ours": ours.encode},
                "line by line": {"hf": lambda t: [i for line in lines for i in
                                                  hf.encode(line, add_special_tokens=False).ids],
                                 "ours": lambda t: [i for line in lines for i in ours.encode(line)]}}
            file = Path(tmp) / f"{style}.json"
            contenders["one string, cold"] = {  # fresh objects each round: empty word caches
                "hf": lambda: Tokenizer.from_file(str(file)).encode,
                "ours": lambda: HFBPETokenizer(json.loads(file.read_text(encoding="utf-8"))).encode}
            for mode, fns in contenders.items():
                times: dict[str, list[float]] = {"hf": [], "ours": []}
                ids = {}
                for r in range(args.rounds):  # alternate, and alternate who goes first
                    for name in (("hf", "ours") if r % 2 == 0 else ("ours", "hf")):
                        fn = fns[name]
                        if mode.endswith("cold"):  # built outside the timing
                            encode = fn()
                            fn = (lambda e: lambda t: e(t, add_special_tokens=False).ids)(encode) \
                                if name == "hf" else encode
                        seconds, ids[name] = timed(fn, text)
                        times[name].append(seconds)
                t_hf, t_ours = statistics.median(times["hf"]), statistics.median(times["ours"])
                path = "tiktoken" if ours.fast else "pair-merge BPE (Python)"
                rows.append(f"| {style} | {mode} | {ids['hf'] == ids['ours']} | {len(ids['ours']):,} | "
                            f"{mb / t_hf:.2f} | {mb / t_ours:.2f} | {t_hf / t_ours:.2f}x | {path} |")
                print(rows[-1], flush=True)
    command = f"python benchmarks/tokenizer_speed.py --chars {args.chars} --rounds {args.rounds}"
    section = "\n".join([
        BEGIN, "", f"`{command}`: encode {args.chars:,} characters of the bundled Shakespeare as one string "
        f"and line by line (one `encode` call per line), median of {args.rounds} rounds alternating the "
        "contenders (both keep word caches, warm after the first round; \"cold\" builds both tokenizers "
        "afresh each round, outside the timing). Reference files trained by "
        "the benchmark as in tests/test_hf_tokenizers.py (vocabularies of 1,200 and 900 tokens).", "",
        *rows, "", f"Machine: {machine()}.", "", END])
    print(section)
    if not args.no_doc:
        doc = DOC.read_text(encoding="utf-8")
        if BEGIN in doc and END in doc:
            doc = doc[:doc.index(BEGIN)] + section + doc[doc.index(END) + len(END):]
        else:
            doc = doc.rstrip("\n") + "\n\n## Encoding tokenizer.json files\n\n" + section + "\n"
        DOC.write_text(doc, encoding="utf-8")


if __name__ == "__main__":
    main()
