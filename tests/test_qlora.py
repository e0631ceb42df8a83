"""LoRA on a frozen bf16 / int8 / nf4 base: the frozen layers against explicit dequantized-weight
references, gradients only for the adapters, and `lmforge finetune --base-dtype` end to end."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.cli.main import main
from lmforge.models import build_model
from lmforge.nn import quantized_base as qb
from lmforge.nn.lora import LoRALinear, apply_lora, lora_state_dict
from lmforge.nn.quantized_base import NF4_LEVELS, FrozenEmbedding, FrozenLinear
from lmforge.train.frozen_base import load_frozen_base

# a Llama-shaped toy: RMSNorm, SwiGLU, RoPE, grouped-query attention, tied embeddings; every
# input width a multiple of nf4's block of 64
LLAMA = dict(vocab_size=96, block_size=32, n_layer=2, n_head=2, n_kv_head=1, n_embd=64, bias=False,
             pos_encoding="rope", norm="rmsnorm", mlp="swiglu", mlp_hidden_size=128, tie_embeddings=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def weight(out_f=80, in_f=128, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # rows of very different sizes, so a scale shared across rows would show
    return torch.randn(out_f, in_f, generator=g) * torch.logspace(-3, 0, out_f)[:, None]


def int8_reference(w: torch.Tensor) -> torch.Tensor:
    s = w.abs().amax(dim=1, keepdim=True) / 127
    return torch.round(w / s) * s


def nf4_reference(w: torch.Tensor) -> torch.Tensor:
    """Nearest NF4 level times the block's absmax, by brute force over the 16 levels."""
    blocks = w.reshape(w.shape[0], -1, 64)
    a = blocks.abs().amax(dim=-1, keepdim=True)
    levels = torch.tensor(NF4_LEVELS)
    idx = ((blocks / a)[..., None] - levels).abs().argmin(dim=-1)
    return (levels[idx] * a).reshape(w.shape)


REFERENCES = {"bfloat16": lambda w: w.bfloat16().double(), "int8": int8_reference, "nf4": nf4_reference}


@pytest.mark.parametrize("chunk", [qb.CHUNK_ELEMENTS, 1024])  # 1024: ten row chunks of 8
@pytest.mark.parametrize("fmt", ["bfloat16", "int8", "nf4"])
def test_frozen_linear_matches_dequantized_reference(fmt, chunk, monkeypatch):
    monkeypatch.setattr(qb, "CHUNK_ELEMENTS", chunk)
    w, bias = weight(), torch.randn(80)
    layer = FrozenLinear(w, bias, fmt)
    w_ref = REFERENCES[fmt](w).double()
    # the stored weight is the reference's, up to one rounding to bf16 (2^-9 relative)
    assert torch.allclose(layer.dequantize(slice(None)).double(), w_ref, rtol=2 ** -8, atol=0)
    x = torch.randn(3, 7, 128, dtype=torch.float32, requires_grad=True)
    dy = torch.randn(3, 7, 80)
    y = layer(x)
    y.backward(dy)
    y_ref = x.detach().double() @ w_ref.T + bias.double()
    dx_ref = dy.double() @ w_ref
    assert y.dtype == x.dtype and x.grad.dtype == x.dtype
    # bf16 activations: each product carries ~2^-9 relative rounding; over 128 terms < 1e-2
    assert rel_err(y, y_ref) < 1e-2
    assert rel_err(x.grad, dx_ref) < 1e-2


def test_int8_storage_is_one_scale_per_row():
    w = weight()
    layer = FrozenLinear(w, None, "int8")
    s = w.abs().amax(dim=1) / 127
    assert layer.qweight.dtype == torch.int8 and torch.equal(layer.qweight, torch.round(w / s[:, None]).to(torch.int8))
    assert torch.allclose(layer.scale, s, rtol=1e-6)
    assert (int8_reference(w) - w).abs().le(s[:, None] / 2 + 1e-9).all()  # rounding error <= half a step
    assert layer.storage_bytes() == 80 * 128 + 80 * 4


def test_nf4_codes_are_the_nearest_level_and_pack_two_per_byte():
    w = weight()
    layer = FrozenLinear(w, None, "nf4")
    assert layer.packed.shape == (80, 64) and layer.absmax.shape == (80, 2)
    assert torch.allclose(layer.dequantize(slice(None)).double(), nf4_reference(w).double(), rtol=2 ** -8, atol=0)
    with pytest.raises(ValueError, match="divisible by 64"):
        FrozenLinear(torch.randn(8, 96), None, "nf4")


def base_checkpoint(tmp_path, config=LLAMA):
    torch.manual_seed(0)
    model = build_model("gpt", config)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}, str(path))
    return model, path


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_only_adapters_get_gradients_and_they_match_the_float_base(fmt, tmp_path):
    model, path = base_checkpoint(tmp_path)
    frozen = load_frozen_base(path, "gpt", LLAMA, fmt)
    assert isinstance(frozen.tok_emb, FrozenEmbedding) and frozen.tok_emb.table is frozen.lm_head  # still tied
    assert frozen.lm_head.tied and not frozen.blocks[0].mlp.fc.tied
    targets = ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]
    grads = {}
    for name, m in (("float", model), (fmt, frozen)):
        torch.manual_seed(1)
        apply_lora(m, targets, r=4, alpha=8, dropout=0.0)
        with torch.no_grad():  # B != 0, so A gets a gradient too
            for layer in m.modules():
                if isinstance(layer, LoRALinear):
                    layer.lora_B.normal_(std=0.02, generator=torch.Generator().manual_seed(layer.out_features))
        idx = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(2))
        _, loss = m(idx[:, :-1], idx[:, 1:])
        loss.backward()
        grads[name] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        trainable = {n for n, p in m.named_parameters() if p.requires_grad}
        assert trainable == set(grads[name]) == {f"{k}" for k in lora_state_dict(m)}
    assert all(not b.requires_grad for b in frozen.buffers())
    assert len(grads[fmt]) == 2 * 2 * len(targets)
    # the same adapters on the quantized base get nearly the float base's gradients
    for n, g in grads["float"].items():
        tol = 0.05 if fmt == "int8" else 0.3  # nf4 perturbs the weights ~10x more than int8
        assert rel_err(grads[fmt][n], g) < tol, n


def test_merging_into_a_quantized_base_is_refused(tmp_path):
    from lmforge.errors import LMForgeError
    from lmforge.nn.lora import merge_lora

    _, path = base_checkpoint(tmp_path)
    frozen = load_frozen_base(path, "gpt", LLAMA, "int8")
    apply_lora(frozen, ["attn.qkv"], r=2)
    with pytest.raises(LMForgeError, match="full-precision base"):
        merge_lora(frozen)


# ---- the CLI, end to end ---------------------------------------------------------------------
def cli(*args) -> None:
    assert main([*map(str, args)]) == 0


def sets(*pairs: str) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


SHAPE = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in LLAMA.items() if k != "vocab_size"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A char-level Llama-shaped base trained briefly, and new text to adapt it to."""
    root = tmp_path_factory.mktemp("qlora")
    from conftest import SHAKESPEARE

    text = SHAKESPEARE.read_text(encoding="utf-8")
    (root / "a.txt").write_text(text[:40_000], encoding="utf-8")
    # new text the base never saw, easy to learn: the adapters move the loss far, so a few
    # per cent between bases measures them (a wrong input gradient lands well outside)
    (root / "b.txt").write_text("Speak again, bright angel! O Romeo, Romeo!\n" * 700, encoding="utf-8")
    cli("prepare", "--input", root / "a.txt", "--out", root / "data", "--no-progress")
    cli("train", "--data", root / "data", "--out", root / "base",
        *sets(*SHAPE, "batch_size=4", "eval_iters=2", "max_iters=120", "eval_interval=120", "learning_rate=1e-2"),
        "--no-progress")
    cli("prepare", "--input", root / "b.txt", "--tokenizer", root / "base" / "tokenizer.json",
        "--out", root / "new", "--no-progress")
    return root


FT = sets("max_iters=40", "eval_interval=20", "eval_iters=4", "learning_rate=1e-2", "warmup_iters=0",
          "batch_size=4")
TARGETS = ["--lora-targets", "attn.qkv", "attn.proj", "mlp.fc", "mlp.proj", "--lora-r", "4"]


def finetune(root, out, *extra) -> dict:
    cli("finetune", "--base", root / "base", "--data", root / "new", "--out", out, "--no-progress",
        *TARGETS, *FT, *extra)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in log if "val_loss" in r][-1]


@pytest.fixture(scope="module")
def float_run(runs):
    return finetune(runs, runs / "ft_float32")


@pytest.mark.parametrize("fmt", ["bfloat16", "int8", "nf4"])
def test_quantized_base_finetune_loss_sample_and_merge(fmt, runs, float_run, tmp_path, capsys):
    out = tmp_path / fmt
    start = json.loads((runs / "base" / "metrics.jsonl").read_text().splitlines()[-1])
    res = finetune(runs, out, "--base-dtype", fmt)
    assert json.loads((out / "finetune.json").read_text())["base_dtype"] == fmt
    # the adapters moved the loss well beyond the tolerances below (about 3.5 -> 2.4 on this text)
    assert float_run["train_loss"] < 0.9 * start["train_loss"]
    # the same steps on the same batches from the same adapter init: within a few per cent
    tol = {"bfloat16": 0.01, "int8": 0.02, "nf4": 0.04}[fmt]
    for key in ("train_loss", "val_loss"):
        assert abs(res[key] - float_run[key]) / float_run[key] < tol, (key, res[key], float_run[key])
    ours = load_file(str(out / "adapter.safetensors"))
    theirs = load_file(str(runs / "ft_float32" / "adapter.safetensors"))
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    assert json.loads((out / "adapter_config.json").read_text())["targets"] == TARGETS[1:5]

    capsys.readouterr()
    cli("sample", "--run", runs / "base", "--adapter", out, "--max-new-tokens", "20", "--temperature", "0",
        "--prompt", "ROMEO:")
    assert capsys.readouterr().out.startswith("ROMEO:")
    cli("merge", "--base", runs / "base", "--adapter", out, "--out", tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_resume_keeps_the_base_dtype(runs, tmp_path):
    out = tmp_path / "int8"
    finetune(runs, out, "--base-dtype", "int8")
    assert main(["finetune", "--out", str(out), "--resume", "--base-dtype", "nf4", "--data", str(runs / "new"),
                 "--no-progress"]) == 2
    cli("finetune", "--out", out, "--resume", "--data", runs / "new", "--no-progress", *sets("max_iters=50"))
    assert json.loads((out / "finetune.json").read_text())["base_dtype"] == "int8"
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["iter"] == 50


def test_base_dtype_errors(runs, tmp_path, capsys):
    args = ["finetune", "--base", str(runs / "base"), "--data", str(runs / "new"), "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a"), "--method", "full", "--base-dtype", "int8"]) == 2
    assert "needs --method lora" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert main([*args, "--out", str(tmp_path / "b"), "--base-dtype", "int8", "--lora-targets", "tok_emb"]) == 2
    assert "picks the embedding tok_emb" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
