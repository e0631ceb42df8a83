"""`lmforge translate` in all four forms, end to end on a 200-line slice of Multi30k (read from
../shared/data/multi30k, never copied into the package) and on the bundled Tatoeba pairs."""

import io
import json
import sys
from pathlib import Path

import pytest
import torch

from lmforge.cli.main import main

MULTI30K = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"
TINY = ["n_enc_layer=1", "n_dec_layer=1", "n_embd=32", "n_head=2", "ffn_hidden=64", "vocab_size=400",
        "max_iters=4", "eval_interval=2", "eval_iters=1", "log_interval=1", "warmup_iters=1",
        "max_tokens=512", "bleu_sentences=5", "bleu_every=1", "device=cpu"]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def slice_files(tmp_path_factory):
    if not (MULTI30K / "train.de").is_file():
        pytest.skip(f"Multi30k not found at {MULTI30K} (the shared data folder); the CLI end-to-end test needs it")
    d = tmp_path_factory.mktemp("m30k")
    for split, n in (("train", 200), ("val", 20)):
        for lang in ("de", "en"):
            lines = (MULTI30K / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()[:n]
            (d / f"{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def trained_run(slice_files, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    d = slice_files
    args = ["translate", "train", "--train-src", str(d / "train.de"), "--train-tgt", str(d / "train.en"),
            "--val-src", str(d / "val.de"), "--val-tgt", str(d / "val.en"), "--out", str(run), "--no-progress"]
    for s in TINY:
        args += ["--set", s]
    assert main(args) == 0
    return run


def test_train_writes_a_run_with_val_bleu(trained_run, capsys):
    cfg = json.loads((trained_run / "config.json").read_text())
    assert cfg["model"] == "seq2seq" and cfg["model_config"]["n_embd"] == 32
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["iter"] for r in evals] == [2, 4] and all("val_bleu" in r for r in evals)


def test_resume_continues_the_run(trained_run, slice_files, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    assert main(["translate", "train", "--out", str(run), "--resume", "--set", "max_iters=6",
                 "--no-progress"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["iter"] for r in records) == 6


def test_translate_sentence_and_options_after_it(trained_run, capsys):
    assert main(["translate", "--run", str(trained_run), "--beam", "2", "Ein Hund läuft.", "Zwei Männer."]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(["translate", "--run", str(trained_run), "Ein Hund läuft.", "--beam", "1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_translate_lines_on_stdin(trained_run, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Ein Hund.\nEine Frau.\nEin Kind.\n"))
    assert main(["translate", "--run", str(trained_run), "--beam", "1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_eval_prints_bleu_with_signature_and_writes_hypotheses(trained_run, slice_files, tmp_path, capsys):
    hyp = tmp_path / "hyp.en"
    tok_ref = tmp_path / "val.tok.en"
    from lmforge.translate.bleu import moses_tokenize

    tok_ref.write_text("".join(moses_tokenize(line) + "\n" for line in
                               (slice_files / "val.en").read_text().splitlines()))
    assert main(["translate", "eval", "--run", str(trained_run), "--src", str(slice_files / "val.de"),
                 "--ref", str(slice_files / "val.en"), "--tok-ref", str(tok_ref), "--beam", "2",
                 "--hyp-out", str(hyp)]) == 0
    out = capsys.readouterr().out
    assert "sacreBLEU" in out and "tok:13a" in out and "tokenized lower-cased BLEU" in out
    assert len(hyp.read_text().splitlines()) == 20


def test_user_errors_exit_2(trained_run, slice_files, tmp_path, capsys):
    bad = tmp_path / "short.en"
    bad.write_text("one line\n")
    assert main(["translate", "eval", "--run", str(trained_run), "--src", str(slice_files / "val.de"),
                 "--ref", str(bad)]) == 2
    assert "has no partner" in capsys.readouterr().err
    assert main(["translate", "Hallo"]) == 2  # no --run
    assert main(["translate", "train", "--out", str(tmp_path / "r"), "--train-src", "x"]) == 2


def test_demo_small(tmp_path, capsys):
    assert main(["translate", "demo", "--max-iters", "2", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Wo wohnst du?  ->" in out
    assert (tmp_path / "demo" / "run" / "model.safetensors").is_file()
    assert (tmp_path / "demo" / "run" / "loss.png").is_file()
