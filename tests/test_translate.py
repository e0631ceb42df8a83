"""Parallel data, token-budget batches, BLEU and the Moses-style tokenizer."""

import pytest
import torch

from lmforge.errors import LMForgeError
from lmforge.translate.bleu import moses_tokenize, sacre_bleu, tokenized_bleu
from lmforge.translate.data import (Split, TranslationBatches, make_batches, padding_fraction, read_parallel)


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_line_count_mismatch_says_where(tmp_path):
    src = write(tmp_path / "a.de", ["eins", "zwei", "drei"])
    tgt = write(tmp_path / "a.en", ["one", "two"])
    with pytest.raises(LMForgeError, match=r"3 lines but .* has 2: line 3 of .*a\.de has no partner"):
        read_parallel(src, tgt)


def test_empty_line_on_one_side_is_an_error(tmp_path):
    src = write(tmp_path / "a.de", ["eins", "", "drei"])
    tgt = write(tmp_path / "a.en", ["one", "two", "three"])
    with pytest.raises(LMForgeError, match=r"line 2 of .*a\.de is empty"):
        read_parallel(src, tgt)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(LMForgeError, match="not found"):
        read_parallel(tmp_path / "nope.de", tmp_path / "nope.en")


def toy_split(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(2, 30, (n,), generator=g).tolist()  # a translation is about as long as its source
    noise = torch.randint(-2, 3, (n,), generator=g).tolist()
    return Split([[5] * a for a in lens], [[6] * max(1, a + d) for a, d in zip(lens, noise)])


def test_batches_respect_the_budget_and_cover_every_pair():
    split = toy_split()
    batches = make_batches(split, 200, torch.Generator().manual_seed(1))
    assert sorted(i for b in batches for i in b) == list(range(300))
    for b in batches:
        longest = max(max(len(split.src[i]), len(split.tgt[i]) + 1) for i in b)
        assert longest * len(b) <= 200


def test_sorting_by_length_keeps_padding_small():
    split = toy_split()
    sorted_batches = make_batches(split, 200, torch.Generator().manual_seed(1))
    random_batches = []  # the same batch sizes, sentences in random order
    order, i = torch.randperm(300, generator=torch.Generator().manual_seed(2)).tolist(), 0
    for b in sorted_batches:
        random_batches.append(order[i:i + len(b)])
        i += len(b)
    assert padding_fraction(split, sorted_batches) < 0.5 * padding_fraction(split, random_batches)


def test_batches_resume_exactly():
    splits = {"train": toy_split(), "val": toy_split(40, seed=3)}
    a = TranslationBatches(splits, 200, pad_id=0, bos_id=1, seed=7)
    for _ in range(5):
        a.get_batch("train")
    b = TranslationBatches(splits, 200, pad_id=0, bos_id=1, seed=99)
    b.load_state_dict(a.state_dict())
    for _ in range(len(a.order) + 3):  # across an epoch boundary
        for x, y in zip(a.get_batch("train"), b.get_batch("train")):
            assert torch.equal(x, y)


def test_batch_tensors_are_shifted_targets():
    splits = {"train": Split([[7, 8, 2]], [[9, 10, 2]]), "val": Split([[7, 2]], [[9, 2]])}
    data = TranslationBatches(splits, 64, pad_id=0, bos_id=1)
    src, tgt_in, tgt_out = data.get_batch("train")
    assert src.tolist() == [[7, 8, 2]]
    assert tgt_in.tolist() == [[1, 9, 10]] and tgt_out.tolist() == [[9, 10, 2]]
    assert data.tokens_per_batch() == 3


def test_budget_smaller_than_a_sentence_is_an_error():
    with pytest.raises(LMForgeError, match="max_tokens"):
        TranslationBatches({"train": toy_split(), "val": toy_split(5)}, 10, pad_id=0, bos_id=1)


@pytest.mark.parametrize("raw, tok", [
    ("A man's hat, 3,000 dollars.", "a man &apos;s hat , 3,000 dollars ."),
    ('A sign that says "Stop".', "a sign that says &quot; stop . &quot;"),
    ("Two dogs (one black) run... fast!", "two dogs ( one black ) run ... fast !"),
    ("Mr. Smith & a well-known dog.", "mr. smith &amp; a well-known dog ."),
])
def test_moses_tokenize(raw, tok):
    assert moses_tokenize(raw) == tok


def test_bleu_perfect_and_signature():
    refs = ["A dog runs in the park.", "Two men are talking."]
    score, sig = sacre_bleu(refs, refs)
    assert score == pytest.approx(100.0) and "tok:13a" in sig and "case:mixed" in sig
    score, sig = tokenized_bleu(refs, [moses_tokenize(r) for r in refs])
    assert score == pytest.approx(100.0) and "tok:none" in sig and "case:lc" in sig
    assert sacre_bleu(["a cat sleeps ."], ["A dog runs in the park."])[0] < 10


def test_training_starts_from_the_same_weights_every_time(tmp_path):
    """The seed fixes the initial weights: reruns reproduce, and every torchrun rank starts
    equal (FSDP does not broadcast weights, so unequal starts would silently diverge)."""
    from pathlib import Path

    from lmforge.translate.train import build_translation_trainer

    assets = Path(__file__).resolve().parents[1] / "src" / "lmforge" / "assets"
    de, en = str(assets / "tatoeba.deu-eng.de"), str(assets / "tatoeba.deu-eng.en")
    models = []
    for i in range(2):
        torch.rand(i + 1)  # the global random state differs between the two builds
        trainer = build_translation_trainer(de, en, de, en, tmp_path / f"run{i}", "transformer-tiny",
                                            ["vocab_size=300"], progress=False, verbose=False)
        models.append(trainer.model.state_dict())
    for name, w in models[0].items():
        assert torch.equal(w, models[1][name]), name
