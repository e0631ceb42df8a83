import json

import numpy as np
import pytest
import torch

from lmforge.data import TokenBatches, TokenData, prepare
from lmforge.errors import LMForgeError
from lmforge.tokenizers import CharTokenizer, load_tokenizer


def test_prepare_char_roundtrip(tmp_path, small_corpus):
    meta = prepare([small_corpus], "char", tmp_path / "d", val_fraction=0.1, progress=False)
    text = small_corpus.read_text()
    tok = load_tokenizer(tmp_path / "d" / "tokenizer.json")
    train = np.fromfile(tmp_path / "d" / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "d" / "val.bin", dtype=np.uint16)
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val)
    # the two splits, decoded and joined, are exactly the input; val is about 10%
    assert tok.decode(train.tolist()) + tok.decode(val.tolist()) == text
    assert 0.08 < len(val) / (len(train) + len(val)) < 0.12
    assert json.loads((tmp_path / "d" / "meta.json").read_text())["dtype"] == "uint16"


def test_prepare_streams_in_chunks(tmp_path, small_corpus, monkeypatch):
    import sys

    p = sys.modules["lmforge.data.prepare"]

    monkeypatch.setattr(p, "CHUNK_BYTES", 1000)  # force many chunks
    prepare([small_corpus, small_corpus], "char", tmp_path / "d", progress=False)
    tok = load_tokenizer(tmp_path / "d" / "tokenizer.json")
    ids = np.concatenate([np.fromfile(tmp_path / "d" / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    assert tok.decode(ids.tolist()) == small_corpus.read_text() * 2


@pytest.mark.parametrize("tokenizer", ["char", "bpe:300"])
def test_prepare_in_worker_processes_writes_the_same_files(tmp_path, small_corpus, monkeypatch, tokenizer):
    import sys

    monkeypatch.setattr(sys.modules["lmforge.data.prepare"], "CHUNK_BYTES", 2000)  # many chunks, in order
    one = prepare([small_corpus], tokenizer, tmp_path / "one", progress=False)
    tok = str(tmp_path / "one" / "tokenizer.json")  # the same BPE for both
    two = prepare([small_corpus], tok, tmp_path / "two", progress=False, workers=2)
    assert one["train_tokens"] == two["train_tokens"] and one["val_tokens"] == two["val_tokens"]
    for split in ("train", "val"):
        assert (tmp_path / "one" / f"{split}.bin").read_bytes() == (tmp_path / "two" / f"{split}.bin").read_bytes()


def test_prepare_worker_errors_reach_the_caller_and_leave_no_file(tmp_path, small_corpus):
    tok = CharTokenizer.from_text("abc")  # the corpus has other characters
    with pytest.raises(LMForgeError, match="not in the"):
        prepare([small_corpus], tok, tmp_path / "d", progress=False, workers=2)
    assert not (tmp_path / "d" / "train.bin").exists()


def test_prepare_bpe_spec(tmp_path, small_corpus):
    meta = prepare([small_corpus], "bpe:300", tmp_path / "d", progress=False)
    assert meta["vocab_size"] == 300


@pytest.mark.parametrize("bad", ["missing.txt", "empty.txt"])
def test_prepare_rejects_bad_input_and_writes_nothing(tmp_path, bad):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(LMForgeError, match="not found|empty"):
        prepare([tmp_path / bad], "char", tmp_path / "d", progress=False)
    assert not (tmp_path / "d" / "train.bin").exists()


def test_batches_are_shifted_blocks(tmp_path, small_corpus):
    prepare([small_corpus], "char", tmp_path / "d", progress=False)
    data = TokenData(tmp_path / "d")
    batches = TokenBatches(data, batch_size=4, block_size=16, seed=0)
    x, y = batches.get_batch("train")
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    # the generator state reproduces the same next batch
    state = batches.state_dict()
    a = batches.get_batch("train")
    batches.load_state_dict(state)
    b = batches.get_batch("train")
    assert torch.equal(a[0], b[0])


def test_tokenizer_mismatch_is_detected(tmp_path, small_corpus):
    prepare([small_corpus], "char", tmp_path / "d", progress=False)
    with pytest.raises(LMForgeError, match="does not match"):
        TokenData(tmp_path / "d").check_tokenizer(CharTokenizer("abc"))
