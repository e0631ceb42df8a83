"""`lmforge tokenizer train|encode|decode` through the real entry point."""

import io
import json

import pytest

from lmforge.cli.main import main
from lmforge.tokenizers import load_tokenizer


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shakespeare_text):
    """A corpus file and a 400-token BPE tokenizer trained on it with the CLI."""
    d = tmp_path_factory.mktemp("tok")
    corpus = d / "corpus.txt"
    corpus.write_text(shakespeare_text[:30_000], encoding="utf-8")
    rc = main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "400", "--out", str(d / "tok.json"),
               "--no-progress"])
    assert rc == 0
    return corpus, d / "tok.json"


def run(capsys, *argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    rc = main(["tokenizer", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc, err, *words):
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("lmforge tokenizer: error: ")
    for word in words:
        assert word in err


def test_train(tmp_path, capsys, trained):
    corpus, _ = trained
    rc, out, _ = run(capsys, "train", "--input", corpus, corpus, "--vocab-size", 300, "--pattern", "gpt2",
                     "--special", "<|a|>", "<|b|>", "--out", tmp_path / "t.json", "--no-progress")
    assert rc == 0 and "vocab size 300" in out and " s " in out
    tok = load_tokenizer(tmp_path / "t.json")
    assert tok.pattern == "gpt2" and tok.special_tokens == {"<|a|>": 298, "<|b|>": 299} and tok.eot_id is None


def test_train_char(tmp_path, capsys, trained):
    rc, out, _ = run(capsys, "train", "--kind", "char", "--input", trained[0], "--out", tmp_path / "c.json")
    assert rc == 0 and load_tokenizer(tmp_path / "c.json").kind == "char"


def test_encode_decode_roundtrip(capsys, monkeypatch, trained):
    _, tok_path = trained
    text = "ROMEO: Grüße 🎉<|endoftext|>\n"
    rc, out, _ = run(capsys, "encode", "--tokenizer", tok_path, stdin=text, monkeypatch=monkeypatch)
    assert rc == 0 and out.endswith("\n") and "399" in out.split()  # <|endoftext|> is the last id
    rc, decoded, _ = run(capsys, "decode", "--tokenizer", tok_path, stdin=out, monkeypatch=monkeypatch)
    assert rc == 0 and decoded == text
    rc, out2, _ = run(capsys, "encode", "--tokenizer", tok_path, "--text", text, "--no-special")
    assert "399" not in out2.split()
    rc, decoded, _ = run(capsys, "decode", "--tokenizer", tok_path, "--ids", out2)
    assert decoded == text


def test_train_missing_input(tmp_path, capsys):
    out = tmp_path / "t.json"
    rc, _, err = run(capsys, "train", "--input", tmp_path / "nope.txt", "--vocab-size", 300, "--out", out)
    assert_user_error(rc, err, "not found", "nope.txt")
    assert list(tmp_path.iterdir()) == []


def test_train_empty_input(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    rc, _, err = run(capsys, "train", "--input", tmp_path / "empty.txt", "--vocab-size", 300,
                     "--out", tmp_path / "t.json")
    assert_user_error(rc, err, "empty")
    assert not (tmp_path / "t.json").exists()


@pytest.mark.parametrize("extra, words", [(["--vocab-size", "100"], ["too small", "257"]),
                                          ([], ["--vocab-size is required"])])
def test_train_bad_vocab_size(tmp_path, capsys, trained, extra, words):
    rc, _, err = run(capsys, "train", "--input", trained[0], *extra, "--out", tmp_path / "t.json")
    assert_user_error(rc, err, *words)
    assert list(tmp_path.iterdir()) == []  # no output, no temporary file left behind


def test_decode_errors(capsys, trained):
    rc, _, err = run(capsys, "decode", "--tokenizer", trained[1], "--ids", "12 1x3 5")
    assert_user_error(rc, err, "not a token id: '1x3'")
    rc, _, err = run(capsys, "decode", "--tokenizer", trained[1], "--ids", "12 4000")
    assert_user_error(rc, err, "token id 4000")


def test_bad_tokenizer_file(tmp_path, capsys):
    (tmp_path / "hf.json").write_text(json.dumps({"model": {}, "added_tokens": []}))
    rc, _, err = run(capsys, "encode", "--tokenizer", tmp_path / "hf.json", "--text", "hi")
    assert_user_error(rc, err, "Hugging Face")
    rc, _, err = run(capsys, "decode", "--tokenizer", tmp_path / "missing.json", "--ids", "1")
    assert_user_error(rc, err, "not found")


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["tokenizer", "train", "--help"])
    assert exit_info.value.code == 0 and "--vocab-size" in capsys.readouterr().out
