"""GPT-2 / Hugging Face tokenizer files <-> BPETokenizer, checked against tiktoken, the
`tokenizers` library and transformers. Ids must be equal exactly."""

import json
import shutil

import pytest
import regex

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, GPT2TokenizerFast  # noqa: E402

from conftest import SHARED  # noqa: E402
from lmforge.errors import LMForgeError  # noqa: E402
from lmforge.interop.hf_tokenizer import (  # noqa: E402
    bytes_to_unicode, read_hf_tokenizer, str_to_token, token_to_str, write_hf_tokenizer)
from lmforge.tokenizers import BPETokenizer, CharTokenizer  # noqa: E402

GPT2_TOK = SHARED / "data" / "gpt2-tokenizer"

MULTILINGUAL = (
    "Hello, world! It's a test; they'll see what we've done.\n"
    "Grüße aus München: Straße, Äpfel und Übermut — schön!\n"
    "你好，世界！我们今天训练一个分词器。\n"
    "Emoji: 🙂🚀👍🏽 👩‍👩‍👧 ✨\n"
    "def square(x: int) -> int:\n    return x ** 2  # 12345678 == 0x1F\n\n\n"
    "\ttabs\t\tand   runs of   spaces   \n  \n   trailing   "
)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """GPT-2's files under the names Hugging Face uses (see shared/data/gpt2-tokenizer/SOURCE.md)."""
    if not GPT2_TOK.is_dir():
        pytest.skip("GPT-2 tokenizer files not found in shared/data")
    d = tmp_path_factory.mktemp("gpt2tok")
    shutil.copy(GPT2_TOK / "encoder.json", d / "vocab.json")
    shutil.copy(GPT2_TOK / "vocab.bpe", d / "merges.txt")
    return d


@pytest.fixture(scope="module")
def corpus(shakespeare_text) -> str:
    return shakespeare_text[:60_000] + MULTILINGUAL.replace("\n", " ") * 3


def test_bytes_to_unicode_is_a_printable_bijection():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert token_to_str(b" world\n") == "Ġworld\u010a"
    assert str_to_token("Ġworld") == b" world"
    every = bytes(range(256))
    assert str_to_token(token_to_str(every)) == every


def test_gpt2_import_matches_tiktoken_and_transformers(gpt2_dir, monkeypatch):
    """The reference is tiktoken's own "gpt2" encoding, built from the same two files
    (tiktoken_ext.openai_public.gpt2 does the same from a URL, with these files' hashes)."""
    from tiktoken import Encoding
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the files directly, cache nothing
    ranks = data_gym_to_mergeable_bpe_ranks(str(gpt2_dir / "merges.txt"), str(gpt2_dir / "vocab.json"))
    reference = Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                         special_tokens={"<|endoftext|>": 50256})
    tok = read_hf_tokenizer(gpt2_dir)
    hf = GPT2TokenizerFast.from_pretrained(gpt2_dir)
    assert tok.vocab_size == 50257 and tok.eot_id == 50256 and tok.pattern == "gpt2"
    assert tok.encode("Hello world") == [15496, 995]
    for text in (MULTILINGUAL, "Hello world", " leading space", "<|endoftext|>x", "a\n\n\nb   "):
        ids = tok.encode(text)
        assert ids == reference.encode(text, allowed_special="all")
        assert ids == hf(text)["input_ids"]
        assert tok.decode(ids) == text


def test_gpt2_original_file_names_are_read(gpt2_dir):
    if not GPT2_TOK.is_dir():
        pytest.skip("GPT-2 tokenizer files not found in shared/data")
    assert read_hf_tokenizer(GPT2_TOK).ranks == read_hf_tokenizer(gpt2_dir).ranks


def test_gpt2_export_is_byte_identical_in_content(gpt2_dir, tmp_path):
    tok = read_hf_tokenizer(gpt2_dir)
    write_hf_tokenizer(tok, tmp_path)
    assert json.loads((tmp_path / "vocab.json").read_text()) == json.loads((gpt2_dir / "vocab.json").read_text())
    ours = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    theirs = [m for m in (gpt2_dir / "merges.txt").read_text(encoding="utf-8").splitlines()[1:] if m]
    assert ours == theirs


def test_trained_tokenizer_export_gives_gpt2tokenizerfast_the_same_ids(corpus, tmp_path):
    tok = BPETokenizer.train(corpus, 1000, pattern="gpt2")
    write_hf_tokenizer(tok, tmp_path)
    for hf in (GPT2TokenizerFast.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)):
        ids = tok.encode(MULTILINGUAL)
        assert hf(MULTILINGUAL)["input_ids"] == ids
        assert hf.decode(ids) == MULTILINGUAL == tok.decode(ids)
        assert hf.eos_token_id == tok.eot_id
        assert hf("x<|endoftext|>y")["input_ids"] == tok.encode("x<|endoftext|>y")
    back = read_hf_tokenizer(tmp_path)
    assert back.ranks == tok.ranks and back.special_tokens == tok.special_tokens and back.pattern == "gpt2"


def test_gpt4_pattern_exports_through_tokenizer_json(corpus, tmp_path):
    """transformers' GPT2Tokenizer always splits with GPT-2's regex, so a GPT-4-pattern
    tokenizer is declared PreTrainedTokenizerFast and runs tokenizer.json's Split step."""
    from tokenizers import Tokenizer as HFTokenizer

    tok = BPETokenizer.train(corpus, 1000, pattern="gpt4", special_tokens=["<|endoftext|>", "<|pad|>"])
    write_hf_tokenizer(tok, tmp_path)
    ids = tok.encode(MULTILINGUAL)
    hf_file = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf_file.encode(MULTILINGUAL).ids == ids
    # the split itself agrees too (GPT-4's \p{N}{1,3}+ needs translating for Oniguruma)
    chunks = [token_to_str(c.encode("utf-8")) for c in regex.findall(tok.pat_str, MULTILINGUAL)]
    assert [c for c, _ in hf_file.pre_tokenizer.pre_tokenize_str(MULTILINGUAL)] == chunks
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf(MULTILINGUAL)["input_ids"] == ids
    assert hf.decode(ids) == MULTILINGUAL
    assert hf("<|pad|>12345")["input_ids"] == tok.encode("<|pad|>12345")
    back = read_hf_tokenizer(tmp_path)
    assert back.pattern == "gpt4" and back.ranks == tok.ranks and back.special_tokens == tok.special_tokens


def test_vocab_and_merges_alone_import_a_trained_tokenizer(corpus, tmp_path):
    tok = BPETokenizer.train(corpus, 700, pattern="gpt2")
    write_hf_tokenizer(tok, tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    back = read_hf_tokenizer(tmp_path)
    assert back.encode(MULTILINGUAL) == tok.encode(MULTILINGUAL)
    assert back.eot_id == tok.eot_id


def _tiny_files(d, vocab=None, merges="#version: 0.2\nh i\n"):
    table = bytes_to_unicode()
    base = {table[b]: i for i, b in enumerate(range(256))}
    vocab = vocab if vocab is not None else {**base, "hi": 256, "<|endoftext|>": 257}
    (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (d / "merges.txt").write_text(merges, encoding="utf-8")
    return vocab


def test_tiny_hand_made_vocabulary(tmp_path):
    _tiny_files(tmp_path)
    tok = read_hf_tokenizer(tmp_path)
    assert tok.encode("hi<|endoftext|>hih") == [256, 257, 256, ord("h")]


def test_vocabulary_numbered_otherwise_keeps_its_ids(tmp_path):
    """The merged token numbered away from its merge's position: imported with the file's ids."""
    vocab = _tiny_files(tmp_path)
    _tiny_files(tmp_path, {**vocab, "hi": 257, "<|endoftext|>": 256})
    tok = read_hf_tokenizer(tmp_path)
    assert tok.encode("hi<|endoftext|>hih") == [257, 256, 257, ord("h")]


@pytest.mark.parametrize("case, message", [
    ("missing", "no tokenizer"),
    ("unknown", "missing from the vocabulary"),
    ("gap", "gaps or repeats"),
    ("normalizer", "normalizer"),
    ("wordpiece", "only BPE"),
])
def test_import_errors(tmp_path, case, message):
    if case == "missing":
        (tmp_path / "vocab.json").write_text("{}")
    elif case == "unknown":
        _tiny_files(tmp_path, merges="#version: 0.2\nh i\nhi x\n")
    elif case == "gap":
        vocab = _tiny_files(tmp_path)
        _tiny_files(tmp_path, {**vocab, "<|endoftext|>": 300})
    else:
        tok = BPETokenizer.train("some text to train on " * 20, 270, pattern="gpt2")
        write_hf_tokenizer(tok, tmp_path)
        d = json.loads((tmp_path / "tokenizer.json").read_text())
        if case == "normalizer":
            d["normalizer"] = {"type": "BertNormalizer"}
        else:
            d["model"]["type"] = "WordPiece"
        (tmp_path / "tokenizer.json").write_text(json.dumps(d))
    with pytest.raises(LMForgeError, match=message):
        read_hf_tokenizer(tmp_path)


def test_char_tokenizer_does_not_export(tmp_path):
    with pytest.raises(LMForgeError, match="only byte-level BPE"):
        write_hf_tokenizer(CharTokenizer("abc"), tmp_path)
