"""The Llama-style presets: shapes, sizes, and that the modern options train end to end."""

import math

import torch

from lmforge import GPT, GPTConfig
from lmforge.data import prepare
from lmforge.models.presets import get_preset
from lmforge.train.setup import build_trainer


def build(preset: str, vocab: int = 65) -> GPT:
    cfg = GPTConfig(**{**get_preset(preset)["model_config"], "vocab_size": vocab})
    with torch.device("meta"):  # sizes only: no memory, no init time
        return GPT(cfg)


def test_llama_tiny_uses_the_modern_options_within_a_million_parameters():
    cfg = get_preset("llama-tiny")["model_config"]
    assert (cfg["norm"], cfg["mlp"], cfg["pos_encoding"], cfg["bias"]) == ("rmsnorm", "swiglu", "rope", False)
    assert cfg["n_kv_head"] < cfg["n_head"]  # grouped-query attention
    assert build("llama-tiny").num_params() <= 1_000_000
    assert get_preset("llama-tiny")["train"]["batch_size"] == 12 and cfg["block_size"] == 64


def test_llama_small_is_about_shakespeare_small():
    ours, theirs = build("llama-small").num_params(), build("shakespeare-small").num_params()
    assert abs(ours - theirs) / theirs < 0.05


def test_llama_block_has_no_biases_and_rms_norms():
    model = GPT(GPTConfig(**{**get_preset("llama-tiny")["model_config"], "vocab_size": 65, "n_layer": 1}))
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.endswith("bias") for n in names)
    assert isinstance(model.blocks[0].ln_1, torch.nn.RMSNorm)
    kv = model.blocks[0].attn
    assert kv.qkv.out_features == 128 + 2 * 2 * 32  # q: 4 heads, k and v: 2 heads of 32


def test_llama_tiny_trains_on_characters(tmp_path, small_corpus):
    prepare([small_corpus], "char", tmp_path / "data", progress=False)
    t = build_trainer(tmp_path / "data", tmp_path / "run", "llama-tiny",
                      overrides=["max_iters=40", "eval_interval=40", "eval_iters=2", "n_layer=2", "warmup_iters=5"],
                      progress=False, verbose=False)
    first = math.log(t.model.config.vocab_size)
    assert t.fit()["val_loss"] < first - 0.8
