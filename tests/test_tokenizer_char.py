"""Character-level tokenizer: vocabulary, errors and the JSON file format."""

import doctest
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.errors import LMForgeError
from lmforge.tokenizers import BPETokenizer, CharTokenizer, load_tokenizer, tokenizer_from_dict
from lmforge.tokenizers import char


def test_doctests():
    assert doctest.testmod(char).failed == 0


def test_vocab_is_sorted_characters(shakespeare_text):
    tok = CharTokenizer.train(shakespeare_text)
    assert tok.chars == "".join(sorted(set(shakespeare_text)))
    assert tok.vocab_size == 65 and tok.eot_id is None and tok.kind == "char"
    assert tok.encode("\n !") == [0, 1, 2]
    assert CharTokenizer.from_text("ba").chars == "ab"


def test_roundtrip(shakespeare_text):
    tok = CharTokenizer.train(shakespeare_text)
    sample = shakespeare_text[:5000]
    assert tok.decode(tok.encode(sample)) == sample
    assert tok.encode_batch(["ab", ""]) == [tok.encode("ab"), []]
    assert tok.encode_to_array("ab").tolist() == tok.encode("ab")
    batch = ["ab" * (i % 5) for i in range(2500)]
    assert tok.encode_batch(batch, num_workers=2) == tok.encode_batch(batch)


@settings(max_examples=50, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1))
def test_roundtrip_any_text(s):
    tok = CharTokenizer.train(s)
    assert tok.decode(tok.encode(s)) == s


def test_unknown_character_names_it():
    tok = CharTokenizer.train("hello")
    with pytest.raises(LMForgeError, match=r"character '🎉' is not in the vocabulary.*trained on other text"):
        tok.encode("hel🎉lo")


def test_decode_out_of_range():
    tok = CharTokenizer.train("abc")
    assert tok.decode([2, 1, 0]) == "cba"
    for bad in (3, -1):
        with pytest.raises(LMForgeError, match=f"token id {bad} is out of range"):
            tok.decode([0, bad])


def test_empty_text():
    with pytest.raises(LMForgeError, match="empty text"):
        CharTokenizer.train("")


def test_save_load(tmp_path):
    tok = CharTokenizer.train("hello, wörld 🎉\n")
    tok.save(tmp_path / "tok.json")
    d = json.loads((tmp_path / "tok.json").read_text(encoding="utf-8"))
    assert d == {"format": "lmforge-tokenizer", "version": 1, "kind": "char", "chars": tok.chars}
    for loaded in (load_tokenizer(tmp_path / "tok.json"), CharTokenizer.load(tmp_path / "tok.json"), tokenizer_from_dict(d)):
        assert isinstance(loaded, CharTokenizer) and loaded.chars == tok.chars


@pytest.mark.parametrize(
    "fields, message",
    [({}, 'no "chars" string'), ({"chars": ""}, 'no "chars" string'), ({"chars": "abca"}, "'a' appears twice")],
)
def test_load_rejects_corrupt(tmp_path, fields, message):
    path = tmp_path / "tok.json"
    path.write_text(json.dumps({"format": "lmforge-tokenizer", "version": 1, "kind": "char", **fields}))
    with pytest.raises(LMForgeError, match=message):
        load_tokenizer(path)


def test_bpe_file_is_not_a_char_tokenizer(tmp_path):
    BPETokenizer.train("hello hello", vocab_size=260).save(tmp_path / "bpe.json")
    with pytest.raises(LMForgeError, match="'bpe' tokenizer, not 'char'"):
        CharTokenizer.load(tmp_path / "bpe.json")
