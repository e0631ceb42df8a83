"""The SFT study's task generator (benchmarks/sft_task.py): seeded, test disjoint from train,
answers correct, and the files load as lmforge instruction data."""

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sft_task  # noqa: E402

WORD_VALUES = {w: i for i, w in enumerate(sft_task.UNITS)} | {w: 10 * i for i, w in enumerate(sft_task.TENS) if w}


def parse(text: str) -> int:
    """Words -> number, independently of sft_task.words: "three hundred twelve" -> 312."""
    total = 0
    for part in text.split():
        if part == "hundred":
            total *= 100
        else:
            total += sum(WORD_VALUES[w] for w in part.split("-"))
    return total


def operands(question: str) -> tuple[int, int]:
    pattern = "|".join(re.escape(p).replace(r"\{a\}", "(.+)").replace(r"\{b\}", "(.+)") for p in sft_task.PHRASINGS)
    m = re.fullmatch(pattern, question, flags=re.IGNORECASE)
    assert m, question
    a, b = [g for g in m.groups() if g is not None]
    return parse(a), parse(b)


def test_words():
    assert [sft_task.words(n) for n in (0, 7, 19, 20, 45, 90, 100, 312, 999)] == [
        "zero", "seven", "nineteen", "twenty", "forty-five", "ninety", "one hundred", "three hundred twelve",
        "nine hundred ninety-nine"]
    assert all(parse(sft_task.words(n)) == n for n in range(1000))
    with pytest.raises(ValueError):
        sft_task.words(1000)


def test_splits_seeded_disjoint_and_correct():
    splits = sft_task.make_splits(600, 50, 80, max_operand=40, seed=3)
    assert splits == sft_task.make_splits(600, 50, 80, max_operand=40, seed=3)
    assert splits != sft_task.make_splits(600, 50, 80, max_operand=40, seed=4)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [600, 50, 80]
    pairs = {}
    for name, rows in splits.items():
        pairs[name] = set()
        for r in rows:
            (user, assistant) = r["messages"]
            assert user["role"] == "user" and assistant["role"] == "assistant"
            a, b = operands(user["content"])
            assert 0 <= a <= 40 and 0 <= b <= 40
            assert assistant["content"] == str(a + b)
            pairs[name].add(frozenset((a, b)))
    assert not pairs["test"] & pairs["train"] and not pairs["val"] & pairs["train"]
    assert not pairs["test"] & pairs["val"]


def test_number_text_has_no_sums():
    text = sft_task.number_text(200, seed=1)
    assert "plus" not in text and "sum" not in text and "add" not in text.lower()
    for line in text.splitlines():
        m = re.fullmatch(r"(.+) is written (\d+)\.", line)
        if m:
            assert parse(m.group(1).lower()) == int(m.group(2))


def test_files_load_as_instruction_data(tmp_path):
    from lmforge.chat import chat_format
    from lmforge.sft import load_examples
    from lmforge.tokenizers.char import CharTokenizer

    paths = sft_task.write_splits(tmp_path, sft_task.make_splits(30, 5, 5, max_operand=20))
    rows = [json.loads(line) for line in paths["test"].read_text().splitlines()]
    text = "".join(m["content"] + "\n" for r in rows for m in r["messages"])
    tok = CharTokenizer.train(text + "".join(sft_task.PHRASINGS) + "UserAssistant: 0123456789" + "".join(
        sft_task.UNITS + sft_task.TENS) + " -,.?")
    data = load_examples(paths["test"], tok, chat_format(tok), max_length=512)
    assert len(data.examples) == 5
