"""The command line end to end, as a user runs it, and its answers to bad input."""

import json
import subprocess
import sys

import pytest

from lmforge.cli.main import main


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


def test_end_to_end(tmp_path, small_corpus, capsys):
    tok, data, run = tmp_path / "tok.json", tmp_path / "data", tmp_path / "run"
    assert run_cli("tokenizer", "train", "--input", small_corpus, "--vocab-size", "300", "--out", tok) == 0
    assert run_cli("prepare", "--input", small_corpus, "--tokenizer", tok, "--out", data, "--no-progress") == 0
    # one --set may take several settings, and --set may repeat
    fast = ["--set", "n_layer=2", "n_embd=32", "n_head=2", "--set", "batch_size=4",
            "--set", "eval_iters=2", "--set", "eval_interval=25"]
    assert run_cli("train", "--data", data, "--out", run, "--set", "max_iters=50", *fast, "--no-progress") == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "trainer.pt", "metrics.jsonl"):
        assert (run / name).is_file()
    saved = json.loads((run / "config.json").read_text())["model_config"]
    assert (saved["n_layer"], saved["n_embd"], saved["n_head"]) == (2, 32, 2)
    capsys.readouterr()
    assert run_cli("sample", "--run", run, "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "1") == 0
    first = capsys.readouterr().out
    assert first.startswith("ROMEO:") and len(first) > len("ROMEO:\n")
    assert run_cli("sample", "--run", run, "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "1") == 0
    assert capsys.readouterr().out == first  # same seed, same text
    assert run_cli("sample", "--run", run, "--prompt", "ROMEO:", "--max-new-tokens", "20",
                   "--temperature", "0", "--stream") == 0
    greedy = capsys.readouterr().out
    assert greedy.startswith("ROMEO:")
    # several samples decode as one batch (its fp32 weights get a packed copy): greedy, each is the one above
    assert run_cli("sample", "--run", run, "--prompt", "ROMEO:", "--max-new-tokens", "20",
                   "--temperature", "0", "--num-samples", "3") == 0
    assert capsys.readouterr().out == "".join(f"--- sample {i} ---\n{greedy}" for i in (1, 2, 3))
    assert run_cli("eval", "--run", run, "--data", data, "--no-progress") == 0
    out = capsys.readouterr().out
    assert "val loss" in out and "perplexity" in out
    assert run_cli("eval", "--run", run, "--data", data, "--no-progress", "--int8") == 0  # int8 weights
    loss = float(out.split("val loss ")[1].split(",")[0])
    loss8 = float(capsys.readouterr().out.split("val loss ")[1].split(",")[0])
    assert abs(loss8 - loss) < 0.02 * loss
    assert run_cli("sample", "--run", run, "--prompt", "ROMEO:", "--max-new-tokens", "5", "--int8") == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    assert run_cli("train", "--data", data, "--out", run, "--resume", "--set", "max_iters=60", "--no-progress") == 0
    iters = [json.loads(line)["iter"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(iters) == 60
    assert run_cli("plot", run) == 0 and (run / "loss.png").stat().st_size > 1000


def test_demo_short(tmp_path, capsys):
    assert run_cli("demo", "--max-iters", "20", "--out", tmp_path / "demo", "--no-progress") == 0
    out = capsys.readouterr().out
    assert "val loss" in out and (tmp_path / "demo" / "run" / "loss.png").is_file()


@pytest.mark.parametrize("args, message", [
    (["prepare", "--input", "nope.txt", "--out", "d"], "input file not found"),
    (["train", "--data", "nodata", "--out", "r"], "data directory not found"),
    (["sample", "--run", "norun"], "run directory not found"),
    (["plot", "norun"], "not found"),
    (["bench", "--parts", "z"], "--parts takes letters from a,b,c,d"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_corrupt_checkpoint_and_wrong_tokenizer(tmp_path, small_corpus, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    run_cli("prepare", "--input", small_corpus, "--out", data, "--no-progress")
    run_cli("train", "--data", data, "--out", run, "--set", "max_iters=2", "--set", "eval_iters=1", "--no-progress")
    other = tmp_path / "other"
    run_cli("prepare", "--input", small_corpus, "--tokenizer", "bpe:280", "--out", other, "--no-progress")
    capsys.readouterr()
    assert run_cli("eval", "--run", run, "--data", other, "--no-progress") == 2
    assert "does not match" in capsys.readouterr().err
    (run / "model.safetensors").write_bytes(b"garbage")
    assert run_cli("sample", "--run", run) == 2
    assert "corrupt" in capsys.readouterr().err
    assert run_cli("train", "--data", data, "--out", run, "--no-progress") == 2
    assert "--resume" in capsys.readouterr().err


def test_unknown_setting_lists_valid_keys(tmp_path, small_corpus, capsys):
    run_cli("prepare", "--input", small_corpus, "--out", tmp_path / "d", "--no-progress")
    assert run_cli("train", "--data", tmp_path / "d", "--out", tmp_path / "r", "--set", "learning_rte=1") == 2
    err = capsys.readouterr().err
    assert "did you mean learning_rate" in err and "valid keys" in err
    assert not (tmp_path / "r" / "config.json").exists()


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "lmforge", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("demo", "prepare", "train", "sample", "eval", "plot"):
        assert cmd in out.stdout


@pytest.mark.parametrize("native", [False, True], ids=["emulated-bf16", "native-bf16"])
def test_bf16_on_a_cpu_without_bf16_instructions_gets_a_note(tmp_path, small_corpus, capsys, monkeypatch, native):
    import platform

    import torch

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    data, run = tmp_path / "data", tmp_path / "run"
    run_cli("prepare", "--input", small_corpus, "--out", data, "--no-progress")
    tiny = ["--set", "n_layer=1", "n_embd=16", "n_head=2", "batch_size=2", "eval_iters=1", "max_iters=1"]
    capsys.readouterr()
    assert run_cli("train", "--data", data, "--out", run, *tiny, "--set", "dtype=bfloat16", "--no-progress") == 0
    assert ("no bf16 instructions" in capsys.readouterr().err) is not native
    assert run_cli("eval", "--run", run, "--data", data, "--dtype", "bfloat16", "--max-tokens", "64",
                   "--no-progress") == 0
    assert ("no bf16 instructions" in capsys.readouterr().err) is not native
    assert run_cli("eval", "--run", run, "--data", data, "--max-tokens", "64", "--no-progress") == 0
    assert "bf16" not in capsys.readouterr().err  # float32 gets no note
