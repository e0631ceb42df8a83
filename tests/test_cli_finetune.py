"""End to end on a tiny slice: prepare -> train -> finetune (lora, full) -> sample -> merge ->
resume, through the CLI entry point (in-process, so each step takes about a second)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import lmforge
from lmforge.cli.main import main

SHAPE = ["n_layer=2", "n_head=2", "n_embd=32", "block_size=32", "batch_size=4", "eval_iters=2"]


def cli(*args: str) -> None:
    assert main([*map(str, args)]) == 0


def sets(*pairs: str) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A char-level run trained 20 iterations, and a second data directory to adapt to."""
    root = tmp_path_factory.mktemp("ft")
    from conftest import SHAKESPEARE

    text = SHAKESPEARE.read_text(encoding="utf-8")
    (root / "a.txt").write_text(text[:40_000], encoding="utf-8")
    seen = set(text[:40_000])  # the char vocabulary of the base: keep the new text inside it
    (root / "b.txt").write_text("".join(c for c in text[-30_000:] if c in seen), encoding="utf-8")
    cli("prepare", "--input", root / "a.txt", "--out", root / "data", "--no-progress")
    cli("train", "--data", root / "data", "--out", root / "base", *sets(*SHAPE, "max_iters=20", "eval_interval=10"),
        "--no-progress")
    cli("prepare", "--input", root / "b.txt", "--tokenizer", root / "base" / "tokenizer.json",
        "--out", root / "new", "--no-progress")
    return root


def finetune(root, out, *extra: str) -> None:
    cli("finetune", "--data", root / "new", "--out", out, "--no-progress", *extra)


def test_lora_finetune_sample_merge_and_resume(base, tmp_path, capsys):
    ft = sets("max_iters=10", "eval_interval=5", "learning_rate=1e-2", "warmup_iters=0")
    finetune(base, tmp_path / "ad", "--base", base / "base", "--lora-r", "4", *ft)
    files = {p.name for p in (tmp_path / "ad").iterdir()}
    assert {"adapter_config.json", "adapter.safetensors", "trainer.pt", "metrics.jsonl", "finetune.json"} <= files
    assert "model.safetensors" not in files  # the adapter directory does not copy the base
    tensors = load_file(str(tmp_path / "ad" / "adapter.safetensors"))
    assert tensors and all(k.endswith((".lora_A", ".lora_B")) for k in tensors)
    assert any(torch.count_nonzero(t) > 0 for k, t in tensors.items() if k.endswith("lora_B"))
    log = [json.loads(line) for line in (tmp_path / "ad" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log if "val_loss" in r] == [5, 10]

    capsys.readouterr()
    greedy = ["--max-new-tokens", "40", "--temperature", "0", "--prompt", "ROMEO:"]
    cli("sample", "--run", base / "base", "--adapter", tmp_path / "ad", *greedy)
    adapted = capsys.readouterr().out
    cli("merge", "--base", base / "base", "--adapter", tmp_path / "ad", "--out", tmp_path / "merged")
    capsys.readouterr()
    cli("sample", "--run", tmp_path / "merged", *greedy)
    assert capsys.readouterr().out == adapted

    # the merged run is a plain run: same keys as the base, and the same logits as base + adapter
    m, _ = lmforge.load(tmp_path / "merged")
    a, _ = lmforge.load(base / "base", adapter=tmp_path / "ad")
    b, _ = lmforge.load(base / "base")
    assert set(m.state_dict()) == set(b.state_dict())
    idx = torch.randint(0, b.config.vocab_size, (2, 32))
    with torch.no_grad():
        assert (m(idx) - a(idx)).abs().max().item() <= 1e-5
        assert (m(idx) - b(idx)).abs().max().item() > 1e-4  # fine-tuning changed something

    # exact resume: 5 iterations, then 5 more, equals 10 in one go (bitwise)
    finetune(base, tmp_path / "half", "--base", base / "base", "--lora-r", "4",
             *sets("max_iters=5", "eval_interval=5", "learning_rate=1e-2", "warmup_iters=0", "lr_decay_iters=10"))
    finetune(base, tmp_path / "half", "--resume", *sets("max_iters=10"))
    straight = load_file(str(tmp_path / "ad" / "adapter.safetensors"))
    resumed = load_file(str(tmp_path / "half" / "adapter.safetensors"))
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_full_finetune_is_a_plain_run_and_resumes_exactly(base, tmp_path, capsys):
    ft = ["--method", "full", "--base", base / "base"]
    finetune(base, tmp_path / "full", *ft, *sets("max_iters=6", "eval_interval=3", "lr_decay_iters=6"))
    finetune(base, tmp_path / "part", *ft, *sets("max_iters=3", "eval_interval=3", "lr_decay_iters=6"))
    finetune(base, tmp_path / "part", "--resume", *sets("max_iters=6"))
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    cli("sample", "--run", tmp_path / "full", "--max-new-tokens", "10", "--seed", "0")
    assert capsys.readouterr().out.strip()


def run_err(args, capsys) -> str:
    capsys.readouterr()
    assert main([*map(str, args)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    return err


def test_error_cases(base, tmp_path, capsys):
    new, run = base / "new", base / "base"
    one = sets("max_iters=1", "eval_interval=1")
    assert "--base RUN is required" in run_err(["finetune", "--data", new, "--out", tmp_path / "x"], capsys)
    assert "matches no linear module" in run_err(
        ["finetune", "--base", run, "--data", new, "--out", tmp_path / "x", "--lora-targets", "c_attn"], capsys)
    assert "cannot change the model's n_layer" in run_err(
        ["finetune", "--base", run, "--data", new, "--out", tmp_path / "x", *sets("n_layer=3")], capsys)
    assert "must differ from --base" in run_err(["finetune", "--base", run, "--data", new, "--out", run], capsys)
    assert "cannot resume" in run_err(["finetune", "--data", new, "--out", tmp_path / "x", "--resume"], capsys)

    # data prepared with another tokenizer
    (tmp_path / "other.txt").write_text("xyz\n" * 2000, encoding="utf-8")
    cli("prepare", "--input", tmp_path / "other.txt", "--out", tmp_path / "otherdata", "--no-progress")
    assert "tokenizer does not match" in run_err(
        ["finetune", "--base", run, "--data", tmp_path / "otherdata", "--out", tmp_path / "x"], capsys)

    # an adapter on a differently shaped base
    finetune(base, tmp_path / "ad", "--base", run, *one)
    cli("train", "--data", base / "data", "--out", tmp_path / "wide", "--no-progress",
        *sets(*SHAPE, "n_embd=48", "max_iters=1", "eval_interval=1"))
    assert "different base model" in run_err(
        ["sample", "--run", tmp_path / "wide", "--adapter", tmp_path / "ad", "--max-new-tokens", "2"], capsys)
    assert "holds a LoRA adapter, not a run: pass the base run as --run and --adapter" in run_err(
        ["sample", "--run", tmp_path / "ad", "--max-new-tokens", "2"], capsys)
    assert "already holds a training run" in run_err(
        ["finetune", "--base", run, "--data", new, "--out", tmp_path / "ad", *one], capsys)
    assert "is a lora fine-tuning run" in run_err(
        ["finetune", "--data", new, "--out", tmp_path / "ad", "--resume", "--method", "full"], capsys)

    # merge: the output must be new; a merged run refuses its own adapter again
    cli("merge", "--base", run, "--adapter", tmp_path / "ad", "--out", tmp_path / "m")
    assert "already holds a run" in run_err(
        ["merge", "--base", run, "--adapter", tmp_path / "ad", "--out", tmp_path / "m"], capsys)
    assert "already merged" in run_err(
        ["sample", "--run", tmp_path / "m", "--adapter", tmp_path / "ad", "--max-new-tokens", "2"], capsys)
    assert "adapter config not found" in run_err(
        ["merge", "--base", run, "--adapter", base / "data", "--out", tmp_path / "m2"], capsys)
