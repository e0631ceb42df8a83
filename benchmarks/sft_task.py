"""A fine-tuning task with exact answers: addition asked in words, answered in digits.

    {"messages": [{"role": "user", "content": "What is forty-five plus thirty-seven?"},
                  {"role": "assistant", "content": "82"}]}

Operands run from 0 to --max-operand (99 by default), written in English words ("forty-five",
"three hundred twelve"); the question takes one of PHRASINGS at random; the answer is the sum in
digits, so it can be checked exactly. The split is by unordered operand pair: a test (or val)
pair appears in train in neither order, and test and val share no pair either. Everything is
seeded, so the same arguments write the same files.

    python benchmarks/sft_task.py --out /tmp/sft-task            # train/val/test.jsonl

`number_text` is the pretraining side: counting and "N is written D" lines over the same
number words, which give a base model the task's vocabulary without a single sum.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
         "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
PHRASINGS = ["What is {a} plus {b}?", "Add {a} and {b}.", "What is the sum of {a} and {b}?",
             "Compute {a} plus {b}.", "If you add {a} to {b}, what do you get?", "How much is {a} plus {b}?"]


def words(n: int) -> str:
    """0 <= n <= 999 in words: 7 -> "seven", 45 -> "forty-five", 312 -> "three hundred twelve"."""
    if not 0 <= n <= 999:
        raise ValueError(f"{n} is outside 0..999")
    if n < 20:
        return UNITS[n]
    if n < 100:
        return TENS[n // 10] + ("-" + UNITS[n % 10] if n % 10 else "")
    rest = n % 100
    return f"{UNITS[n // 100]} hundred" + (f" {words(rest)}" if rest else "")


def conversation(a: int, b: int, rng: random.Random) -> dict:
    question = rng.choice(PHRASINGS).format(a=words(a), b=words(b))
    return {"messages": [{"role": "user", "content": question[0].upper() + question[1:]},
                         {"role": "assistant", "content": str(a + b)}]}


def make_splits(n_train: int, n_val: int, n_test: int, max_operand: int = 99, seed: int = 0) -> dict[str, list[dict]]:
    """{"train", "val", "test"}: conversations over disjoint unordered operand pairs (train may
    hold both orders of a pair; test and val hold one order, drawn at random)."""
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(a, max_operand + 1)]
    rng = random.Random(seed)
    rng.shuffle(pairs)
    if n_val + n_test >= len(pairs):
        raise ValueError(f"only {len(pairs)} operand pairs for {n_val} val and {n_test} test examples")
    test, val, rest = pairs[:n_test], pairs[n_test:n_test + n_val], pairs[n_test + n_val:]
    ordered = [(a, b) for a, b in rest] + [(b, a) for a, b in rest if a != b]
    rng.shuffle(ordered)
    if n_train > len(ordered):
        raise ValueError(f"only {len(ordered)} ordered training pairs for {n_train} examples")

    def held_out(ps: list[tuple[int, int]]) -> list[dict]:
        return [conversation(*(p if rng.random() < 0.5 else p[::-1]), rng) for p in ps]

    return {"train": [conversation(a, b, rng) for a, b in ordered[:n_train]], "val": held_out(val),
            "test": held_out(test)}


def write_splits(out: str | Path, splits: dict[str, list[dict]]) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in splits.items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return paths


def number_text(n_lines: int, max_operand: int = 99, seed: int = 0) -> str:
    """Pretraining lines over the task's number words, never a sum: counting runs
    ("forty-five, forty-six, forty-seven.") and "Forty-five is written 45." """
    rng = random.Random(seed + 1)
    lines = []
    for _ in range(n_lines):
        n = rng.randint(0, max_operand)
        if rng.random() < 0.5:
            run = [words(k) for k in range(n, min(n + rng.randint(3, 8), max_operand + 1))]
            lines.append(", ".join(run).capitalize() + ".")
        else:
            lines.append(f"{words(n).capitalize()} is written {n}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for train.jsonl, val.jsonl, test.jsonl")
    p.add_argument("--train", type=int, default=8000)
    p.add_argument("--val", type=int, default=200)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--max-operand", type=int, default=99)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    paths = write_splits(args.out, make_splits(args.train, args.val, args.test, args.max_operand, args.seed))
    print(", ".join(str(v) for v in paths.values()))


if __name__ == "__main__":
    main()
