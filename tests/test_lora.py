import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lmforge
from lmforge import GPT, GPTConfig
from lmforge.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, config_hash, load_adapter, save_adapter
from lmforge.checkpoint import read_run_config, save_run
from lmforge.errors import LMForgeError
from lmforge.models.presets import get_preset
from lmforge.nn import MultiHeadAttention
from lmforge.nn.lora import (LoRAEmbedding, LoRALinear, LoRATiedLinear, apply_lora, linear_kind,
                             lora_state_dict, merge_lora, unmerge_lora)
from lmforge.tokenizers import CharTokenizer

TINY = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)
ALL4 = ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]


def tiny_gpt(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **kw}))


def train_a_few_steps(model: GPT, steps: int = 5, seed: int = 0) -> None:
    """Adam on the LoRA parameters, so A and B move far from their initial values."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, TINY["vocab_size"], (4, 16), generator=g)
        _, loss = model(idx, targets=torch.roll(idx, -1, dims=1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


# ---- the layer ----------------------------------------------------------------------------

def test_layer_is_the_formula_and_keeps_linear_names():
    torch.manual_seed(0)
    base = nn.Linear(12, 20)
    layer = LoRALinear(base, r=4, alpha=8.0, dropout=0.0)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 5, 12)
    expected = x @ base.weight.T + base.bias + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)  # alpha/r = 2
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    assert layer.lora_A.shape == (4, 12) and layer.lora_B.shape == (20, 4)
    assert not layer.weight.requires_grad and layer.lora_A.requires_grad


def test_init_a_kaiming_uniform_b_zero_and_rslora_scaling():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(256, 64), r=16, alpha=32.0)
    bound = 1 / math.sqrt(256)  # kaiming_uniform with a=sqrt(5), as nn.Linear's weight
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound
    assert torch.count_nonzero(layer.lora_B) == 0
    assert layer.scaling == 2.0
    assert LoRALinear(nn.Linear(8, 8), r=16, alpha=32.0, rslora=True).scaling == 8.0  # alpha/sqrt(r)


def test_merge_twice_and_unmerge_unmerged_are_errors():
    layer = LoRALinear(nn.Linear(8, 8), r=2, alpha=2.0)
    with pytest.raises(LMForgeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(LMForgeError, match="already merged"):
        layer.merge()


# ---- on a whole model ----------------------------------------------------------------------

@pytest.mark.parametrize("targets,rslora", [(None, False), (ALL4, False), (["all-linear"], True)])
def test_adapted_model_equals_base_bitwise_before_training(targets, rslora):
    model = tiny_gpt()
    idx = torch.randint(0, 50, (2, 16))
    model.eval()
    before = model(idx)
    kw = {} if targets is None else {"targets": targets}
    apply_lora(model, r=8, alpha=16, dropout=0.1, rslora=rslora, **kw)
    assert torch.equal(model(idx), before)
    model.train()  # adapter dropout active: B = 0 still adds exactly nothing
    assert torch.equal(model(idx), before)


def test_merged_equals_unmerged_after_training_and_unmerge_restores_w():
    model = tiny_gpt()
    base_w = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_lora(model, targets=ALL4, r=4, alpha=8, dropout=0.0)
    train_a_few_steps(model)
    assert all(torch.count_nonzero(m.lora_B) > 0 for m in model.modules() if isinstance(m, LoRALinear))
    idx = torch.randint(0, 50, (3, 16))
    with torch.no_grad():
        unmerged = model(idx)
        merge_lora(model)
        merged = model(idx)
        assert (merged - unmerged).abs().max().item() <= 1e-5
        unmerge_lora(model)
        for n, p in model.named_parameters():  # frozen weights are back to the base's (float rounding)
            if "lora_" not in n:
                torch.testing.assert_close(p, base_w[n], rtol=0, atol=1e-6)
        assert (model(idx) - unmerged).abs().max().item() <= 1e-6


def test_unload_gives_the_plain_architecture_with_merged_weights():
    model = tiny_gpt()
    apply_lora(model, targets=ALL4, r=4, alpha=8, dropout=0.0)
    train_a_few_steps(model)
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        adapted = model(idx)
        merge_lora(model, unload=True)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        assert set(model.state_dict()) == set(tiny_gpt().state_dict())
        assert (model(idx) - adapted).abs().max().item() <= 1e-5


def test_gradients_reach_only_lora_parameters():
    model = tiny_gpt()
    report = apply_lora(model, targets=["attn.qkv", "mlp.proj"], r=4, alpha=4, dropout=0.0)
    train_a_few_steps(model, steps=1)  # B is non-zero now, so A receives a gradient too
    idx = torch.randint(0, 50, (2, 16))
    model.train()
    _, loss = model(idx, targets=idx)
    loss.backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert report.trainable == n_lora == 2 * 4 * ((32 + 96) + (128 + 32))
    assert report.total == sum(p.numel() for p in model.parameters())
    assert report.modules == ["blocks.0.attn.qkv", "blocks.0.mlp.proj", "blocks.1.attn.qkv", "blocks.1.mlp.proj"]


def test_glob_targets_pick_single_layers():
    """A character class picks layers by index (the study's `blocks.[1-5].mlp.proj`)."""
    model = tiny_gpt(n_layer=3)
    report = apply_lora(model, targets=["blocks.[1-2].mlp.proj", "tok_emb"], r=8)
    assert report.modules == ["tok_emb", "blocks.1.mlp.proj", "blocks.2.mlp.proj"]
    assert report.trainable == 2 * 8 * (128 + 32) + 8 * (50 + 32)
    assert type(model.blocks[0].mlp.proj) is torch.nn.Linear


def test_unknown_target_lists_the_linear_modules():
    with pytest.raises(LMForgeError) as e:
        apply_lora(tiny_gpt(), targets=["attn.c_attn"])
    msg = str(e.value)
    assert "attn.c_attn" in msg
    for kind in ALL4:
        assert kind in msg


def test_tied_lm_head_is_never_wrapped():
    model = tiny_gpt()
    report = apply_lora(model, targets=["all-linear"])
    assert "lm_head" not in report.modules and len(report.modules) == 8
    assert model.lm_head.weight is model.tok_emb.weight
    with pytest.raises(LMForgeError, match=r"tied.*target the embedding \(tok_emb\)"):
        apply_lora(tiny_gpt(), targets=["lm_head"])
    untied = tiny_gpt(tie_embeddings=False)
    assert apply_lora(untied, targets=["lm_head"]).modules == ["lm_head"]  # explicit and untied: allowed


# ---- the token embedding (and the head tied to it) ---------------------------------------------

def test_embedding_adapter_is_the_formula_and_the_tied_head_follows():
    model = tiny_gpt().eval()
    base = tiny_gpt().eval()
    idx = torch.randint(0, 50, (2, 16))
    report = apply_lora(model, targets=["attn.qkv", "tok_emb"], r=4, alpha=8, dropout=0.0)
    assert report.modules == ["tok_emb", "blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    emb, head = model.tok_emb, model.lm_head
    assert isinstance(emb, LoRAEmbedding) and isinstance(head, LoRATiedLinear)
    assert head.weight is emb.weight  # still tied
    assert (emb.lora_A.shape, emb.lora_B.shape) == ((4, 32), (50, 4))
    with torch.no_grad():
        assert torch.equal(model(idx), base(idx))  # B = 0: the base model, bitwise
    train_a_few_steps(model)
    delta = emb.lora_B @ emb.lora_A * (8 / 4)  # E' = E + (alpha / r) B A, in both uses of E
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(emb(idx), (emb.weight + delta)[idx], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(head(x), x @ (emb.weight + delta).t(), atol=1e-5, rtol=1e-5)
    assert not torch.equal(delta, torch.zeros_like(delta))  # the head's path trained B too
    # the head holds no adapter tensors of its own: A and B are saved once, under tok_emb
    assert sorted(k for k in lora_state_dict(model) if "emb" in k or "head" in k) == ["tok_emb.lora_A", "tok_emb.lora_B"]


def test_embedding_adapter_merges_once_and_unloads_to_a_tied_plain_model():
    model = tiny_gpt()
    w0 = model.tok_emb.weight.detach().clone()
    apply_lora(model, targets=["tok_emb"], r=4, alpha=8, dropout=0.0)
    train_a_few_steps(model)
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        unmerged = model(idx)
        merge_lora(model)
        torch.testing.assert_close(model(idx), unmerged, atol=1e-5, rtol=1e-5)  # added once, not twice
        unmerge_lora(model)
        torch.testing.assert_close(model.tok_emb.weight, w0, atol=1e-6, rtol=0)
        merge_lora(model, unload=True)
        assert type(model.tok_emb) is nn.Embedding and type(model.lm_head) is nn.Linear
        assert model.lm_head.weight is model.tok_emb.weight
        torch.testing.assert_close(model(idx), unmerged, atol=1e-5, rtol=1e-5)


def test_embedding_gradients_reach_only_a_and_b():
    model = tiny_gpt()
    apply_lora(model, targets=["tok_emb"], r=2, alpha=2, dropout=0.0)
    idx = torch.randint(0, 50, (2, 16))
    _, loss = model(idx, targets=idx)
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"tok_emb.lora_A", "tok_emb.lora_B"}
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert model.tok_emb.lora_B.grad.abs().sum() > 0


def test_shared_seq2seq_embedding_is_adapted_under_both_names():
    from lmforge.models.seq2seq import Seq2SeqConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(Seq2SeqConfig(vocab_size=40, max_len=16, n_enc_layer=1, n_dec_layer=1, n_head=2,
                                      n_embd=16, ffn_hidden=32, pad_id=0, bos_id=1, eos_id=2)).eval()
    src, tgt = torch.randint(3, 40, (2, 6)), torch.randint(3, 40, (2, 5))
    with torch.no_grad():
        before = model(src, tgt)[0]
    apply_lora(model, targets=["src_emb"], r=2, alpha=4, dropout=0.0)
    assert model.src_emb is model.tgt_emb and isinstance(model.src_emb, LoRAEmbedding)
    assert isinstance(model.lm_head, LoRATiedLinear)
    with torch.no_grad():
        assert torch.equal(model(src, tgt)[0], before)


def test_applying_twice_is_an_error():
    model = tiny_gpt()
    apply_lora(model)
    with pytest.raises(LMForgeError, match="already has LoRA"):
        apply_lora(model)


class CrossBlock(nn.Module):
    """A decoder layer's two attentions, named as a seq2seq decoder names them."""

    def __init__(self):
        super().__init__()
        self.self_attn = MultiHeadAttention(32, 4, causal=True)
        self.cross_attn = MultiHeadAttention(32, 4, causal=False, cross=True)

    def forward(self, x, memory):
        x = x + self.self_attn(x)
        return x + self.cross_attn(x, memory=memory)


def test_cross_attention_targets():
    torch.manual_seed(0)
    model = nn.ModuleDict({"layers": nn.ModuleList([CrossBlock(), CrossBlock()])})
    x, mem = torch.randn(2, 5, 32), torch.randn(2, 7, 32)

    def run(m):
        for layer in m["layers"]:
            x_ = layer(x, mem)
        return x_

    before = run(model)
    report = apply_lora(model, targets=["attn.q", "attn.kv"], r=2, alpha=2, dropout=0.0)
    assert report.modules == ["layers.0.cross_attn.q", "layers.0.cross_attn.kv",
                              "layers.1.cross_attn.q", "layers.1.cross_attn.kv"]
    assert torch.equal(run(model), before)
    assert linear_kind("layers.1.cross_attn.kv") == "cross_attn.kv"
    assert apply_lora(CrossBlock(), targets="attn.qkv").modules == ["self_attn.qkv"]


# ---- adapter files ---------------------------------------------------------------------------

def save_base(tmp_path, model: GPT):
    tok = CharTokenizer("".join(chr(33 + i) for i in range(50)))
    assert tok.vocab_size == model.config.vocab_size
    save_run(tmp_path / "base", model, tok)
    return tmp_path / "base", read_run_config(tmp_path / "base")


def test_adapter_round_trip_through_load(tmp_path):
    model = tiny_gpt()
    base_dir, base_cfg = save_base(tmp_path, model)
    apply_lora(model, targets=["attn.qkv", "mlp.fc"], r=4, alpha=8, dropout=0.0)
    train_a_few_steps(model)
    save_adapter(model, tmp_path / "ad", base_cfg)
    cfg = json.loads((tmp_path / "ad" / ADAPTER_CONFIG).read_text())
    assert cfg["base_config_hash"] == config_hash(base_cfg)
    assert {k: cfg[k] for k in ("r", "alpha", "dropout", "targets", "rslora")} == dict(
        r=4, alpha=8.0, dropout=0.0, targets=["attn.qkv", "mlp.fc"], rslora=False)
    tensors = load_file(str(tmp_path / "ad" / ADAPTER_WEIGHTS))
    assert set(tensors) == set(lora_state_dict(model))
    assert all(k.endswith((".lora_A", ".lora_B")) for k in tensors)

    loaded, _ = lmforge.load(base_dir, adapter=tmp_path / "ad")
    assert not any(m.merged for m in loaded.modules() if isinstance(m, LoRALinear))
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


def test_adapter_on_a_different_base_is_a_clear_error(tmp_path):
    model = tiny_gpt()
    _, base_cfg = save_base(tmp_path, model)
    apply_lora(model)
    save_adapter(model, tmp_path / "ad", base_cfg)
    other = tiny_gpt(n_embd=64)
    other_cfg = {**base_cfg, "model_config": other.config.to_dict()}
    with pytest.raises(LMForgeError, match=r"different base model \(n_embd=32 vs 64"):
        load_adapter(other, tmp_path / "ad", other_cfg)
    # dropout changes training only: an adapter still fits a base trained with other dropout
    load_adapter(tiny_gpt(), tmp_path / "ad", {**base_cfg, "model_config": {**base_cfg["model_config"], "dropout": 0.3}})


def test_corrupt_or_missing_adapter_files(tmp_path):
    model = tiny_gpt()
    _, base_cfg = save_base(tmp_path, model)
    with pytest.raises(LMForgeError, match="no LoRA adapters"):
        save_adapter(model, tmp_path / "ad", base_cfg)
    with pytest.raises(LMForgeError, match="not found"):
        load_adapter(tiny_gpt(), tmp_path / "nowhere", base_cfg)
    apply_lora(model)
    save_adapter(model, tmp_path / "ad", base_cfg)
    (tmp_path / "ad" / ADAPTER_WEIGHTS).write_bytes(b"\x00garbage")
    with pytest.raises(LMForgeError, match="corrupt"):
        load_adapter(tiny_gpt(), tmp_path / "ad", base_cfg)


def test_adapter_file_is_small_for_shakespeare_small(tmp_path):
    """r=8 on the attention projections of the shakespeare-small shape (char vocabulary):
    the adapter holds only LoRA tensors and is under 2% of the base checkpoint. Built
    in-process, not trained: sizes depend only on shapes."""
    preset = get_preset("shakespeare-small")
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**preset["model_config"], "vocab_size": 65}))
    tok = CharTokenizer("".join(chr(32 + i) for i in range(65)))
    save_run(tmp_path / "base", model, tok)
    report = apply_lora(model, r=8)
    save_adapter(model, tmp_path / "ad", read_run_config(tmp_path / "base"))
    base_size = (tmp_path / "base" / "model.safetensors").stat().st_size
    adapter_size = (tmp_path / "ad" / ADAPTER_WEIGHTS).stat().st_size
    assert set(load_file(str(tmp_path / "ad" / ADAPTER_WEIGHTS))) == set(lora_state_dict(model))
    assert report.trainable == 6 * 8 * ((384 + 3 * 384) + (384 + 384))
    assert adapter_size < 0.02 * base_size, (adapter_size, base_size)
