"""prepare_for_decoding changes how weights are stored, never what the model computes."""

import copy

import pytest
import torch

from lmforge import GPT, GPTConfig
from lmforge.models.decoding import (BatchPackedLinear, Int4Linear, Int8Linear, PackedLinear, can_pack,
                                     prepare_for_batches, prepare_for_decoding)

TINY = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=64)
LLAMA = dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False)


@pytest.fixture(params=[{}, LLAMA], ids=["gpt2-style", "llama-style"])
def model(request):
    torch.manual_seed(0)
    return GPT(GPTConfig(**TINY, **request.param)).eval()


def test_transposed_layout_gives_the_same_logits_and_tokens(model):
    idx = torch.randint(0, 97, (2, 6))
    fast = prepare_for_decoding(copy.deepcopy(model))
    w = fast.blocks[0].attn.qkv.weight
    assert w.t().is_contiguous() and not w.is_contiguous()  # stored (in, out)
    assert fast.lm_head.weight is fast.tok_emb.weight  # still tied
    assert fast.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(fast(idx), model(idx), atol=1e-5, rtol=1e-5)
        for b in (1, 2):
            a = model.generate(idx[:b], 20, temperature=0.0)
            assert torch.equal(fast.generate(idx[:b], 20, temperature=0.0), a)


def test_relaid_model_still_trains():
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(48, 80))
    ref = copy.deepcopy(lin)
    prepare_for_decoding(lin)
    x = torch.randn(3, 48)
    y = lin(x)
    torch.testing.assert_close(y, ref(x), atol=1e-5, rtol=1e-5)
    y.sum().backward()  # the view is still a leaf parameter with a gradient
    torch.testing.assert_close(lin[0].weight.grad, torch.ones(80, 1) @ x.sum(0, keepdim=True))


def test_bf16_and_int8_stay_close(model):
    idx = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        ref = model(idx)
        bf16 = prepare_for_decoding(copy.deepcopy(model), dtype=torch.bfloat16)(idx).float()
        q = prepare_for_decoding(copy.deepcopy(model), int8=True)
        assert isinstance(q.lm_head, Int8Linear)
        int8 = q(idx)
    scale = ref.abs().max().item()
    assert (bf16 - ref).abs().max().item() < 0.02 * scale
    assert (int8 - ref).abs().max().item() < 0.02 * scale


def test_int8_linear_is_the_dequantised_product():
    lin = torch.nn.Linear(64, 40)
    q = Int8Linear(lin)
    w = q.qweight.float() * q.scale[:, None]  # the dequantised weight
    assert (w - lin.weight).abs().max() <= q.scale.max() / 2 + 1e-7  # rounding to the nearest step
    x = torch.randn(5, 64)
    with torch.no_grad():
        y = q(x)
    assert y.dtype == torch.float32
    ref = x @ w.t() + lin.bias
    # activations go through the kernel in bf16: relative error of order 2^-8
    torch.testing.assert_close(y, ref, atol=1e-2 * ref.abs().max().item(), rtol=0)


@pytest.mark.skipif(not can_pack(torch.zeros(1, dtype=torch.bfloat16)), reason="torch built without oneDNN")
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "transposed"])
def test_bf16_layouts_match_plain_bf16(model, packed):
    idx = torch.randint(0, 97, (2, 8))
    plain = copy.deepcopy(model).to(torch.bfloat16)  # bf16 with the usual nn.Linear
    fast = prepare_for_decoding(copy.deepcopy(model), dtype=torch.bfloat16, packed=packed)
    qkv = fast.blocks[0].attn.qkv
    if packed:
        assert isinstance(qkv, PackedLinear)
    else:
        assert type(qkv) is torch.nn.Linear and qkv.weight.t().is_contiguous() and not qkv.weight.is_contiguous()
    assert fast.lm_head.weight is fast.tok_emb.weight  # still tied
    assert fast.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        a, b = plain(idx).float(), fast(idx).float()
        step = fast(idx[:1, :1]).float()  # the batch-1 one-token shape decoding uses
    # both round to bf16 at every layer; they may differ in summation order only
    scale = a.abs().max().item()
    assert (a - b).abs().max().item() < 0.01 * scale
    assert (step - a[:1, :1]).abs().max().item() < 0.01 * scale


@pytest.mark.skipif(not can_pack(torch.zeros(1, dtype=torch.bfloat16)), reason="torch built without oneDNN")
def test_bf16_layout_is_chosen_once_per_shape(model):
    fast = prepare_for_decoding(copy.deepcopy(model), dtype=torch.bfloat16)  # timed choice
    kinds: dict[tuple, set] = {}
    for name, m in fast.named_modules():
        if isinstance(m, (PackedLinear, torch.nn.Linear)):
            kinds.setdefault(tuple(m.weight.shape), set()).add(type(m))
            if type(m) is torch.nn.Linear:  # not packed: then stored (in, out)
                assert m.weight.t().is_contiguous(), name
    assert kinds and all(len(k) == 1 for k in kinds.values())  # the same layers get the same layout


def _laid_out(model) -> bool:
    w = model.blocks[0].attn.qkv.weight
    return w.t().is_contiguous() and not w.is_contiguous()


def test_load_gives_the_fast_layout_with_the_plain_results(model, tmp_path):
    from lmforge import CharTokenizer, load
    from lmforge.checkpoint import save_run

    tok = CharTokenizer.train("".join(chr(32 + i) for i in range(95)))
    save_run(tmp_path / "run", model, tok)
    fast, _ = load(tmp_path / "run")
    plain, _ = load(tmp_path / "run", inference=False)
    assert _laid_out(fast) and not _laid_out(plain)
    assert not fast.training and not plain.training
    idx = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(fast(idx), plain(idx), atol=1e-5, rtol=1e-5)
    assert torch.equal(fast.generate(idx, 20, temperature=0.0), plain.generate(idx, 20, temperature=0.0))


def test_generate_in_eval_mode_lays_out_and_the_model_still_trains(model):
    ref = copy.deepcopy(model)
    train_mode = copy.deepcopy(model).train()
    idx = torch.randint(0, 97, (1, 5))
    train_mode.generate(idx, 3, temperature=0.0)
    assert not _laid_out(train_mode) and train_mode.training  # training mode: left as it is
    model.generate(idx, 3, temperature=0.0)
    assert _laid_out(model) and model.lm_head.weight is model.tok_emb.weight
    # three AdamW steps on the laid-out model equal three on an untouched copy
    x = torch.randint(0, 97, (4, 17))
    losses = {}
    for name, m in (("laid out", model), ("plain", ref)):
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        losses[name] = []
        for _ in range(3):
            _, loss = m(x[:, :-1], targets=x[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert losses["laid out"][-1] < losses["laid out"][0]
    torch.testing.assert_close(torch.tensor(losses["laid out"]), torch.tensor(losses["plain"]), atol=1e-5, rtol=0)
    for (n, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=n)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_linear_is_the_groupwise_dequantised_product(group):
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 40)  # 40 rows: padded to 48 inside, sliced back
    q = Int4Linear(lin, group)
    # the formula, written independently: per group of `group` inputs, 16 levels from min to max
    w = lin.weight.detach().reshape(40, 256 // group, group)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    step = (hi - lo) / 15
    deq = (lo + ((w - lo) / step).round() * step).reshape(40, 256)
    assert (deq - lin.weight).abs().max() <= step.max() / 2 + 1e-6
    x = torch.randn(5, 256)
    with torch.no_grad():
        y = q(x)
    assert y.shape == (5, 40) and y.dtype == torch.float32
    ref = x @ deq.t() + lin.bias
    # activations, scales and zeros go through the kernel in bf16
    torch.testing.assert_close(y, ref, atol=2e-2 * ref.abs().max().item(), rtol=0)


def test_int4_model_stays_close_and_keeps_odd_widths_in_int8(model):
    idx = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        ref = model(idx)
        q = prepare_for_decoding(copy.deepcopy(model), int4=True, group_size=32)
        out = q(idx)
    assert isinstance(q.blocks[0].attn.qkv, Int4Linear) and isinstance(q.lm_head, Int4Linear)
    assert (out - ref).abs().max().item() < 0.1 * ref.abs().max().item()
    assert q.generate(idx, 5, temperature=0.0).shape == (1, 13)
    odd = prepare_for_decoding(torch.nn.Sequential(torch.nn.Linear(48, 16)), int4=True, group_size=32)
    assert isinstance(odd[0], Int8Linear)  # 48 inputs are not whole groups of 32


@pytest.mark.skipif(not can_pack(torch.ones(1, dtype=torch.bfloat16)), reason="oneDNN packing needs a CPU build with mkldnn")
def test_loading_a_packed_bf16_run_holds_its_weights_about_once(tmp_path):
    """A fresh process loads a ~350 MB bf16 run with every linear packed: its resident memory
    above the floor stays near the checkpoint's size S (a packed layer keeps `weight` only as an
    unread mapping of the file), where keeping both layouts would hold about 2 S."""
    import subprocess
    import sys

    from lmforge.checkpoint import save_run
    from lmforge.tokenizers import CharTokenizer

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, block_size=64, n_layer=4, n_head=16, n_embd=2048, **LLAMA)).to(torch.bfloat16)
    save_run(tmp_path, model, CharTokenizer.train("abcdefgh"))
    size = (tmp_path / "model.safetensors").stat().st_size
    code = f"""
import torch, lmforge
from lmforge.checkpoint import load_run
import lmforge.checkpoint as c
def rss(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
floor = rss("VmRSS")
orig = c.prepare_for_decoding
c.prepare_for_decoding = lambda m, **kw: orig(m, packed=True, **kw)
m, _ = load_run({str(tmp_path)!r})
assert sum(type(x).__name__ == "PackedLinear" for x in m.modules()) == 4 * 4 + 1  # and the LM head
print(rss("VmHWM") - floor)
"""
    above = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert above < 1.4 * size, f"{above / size:.2f} x S resident at the peak"


needs_onednn = pytest.mark.skipif(not can_pack(torch.zeros(1), torch.float32), reason="torch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 2, 16, 32, 33, 200])
def test_batch_packed_linear_is_the_plain_product(rows):
    """Every row count, whichever kernel it takes (packed for 2-32 rows), gives x W^T + b."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 136)
    layer = BatchPackedLinear(lin)
    x = torch.randn(rows, 3, 96)[:, 0]  # a strided input
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ lin.weight.T + lin.bias, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer(x[None]), (x @ lin.weight.T + lin.bias)[None], atol=1e-5, rtol=1e-5)


@needs_onednn
def test_batch_packed_linear_trains_as_a_plain_linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 80)
    ref = copy.deepcopy(lin)
    layer = BatchPackedLinear(lin)
    x = torch.randn(4, 48)
    layer(x).square().sum().backward()
    ref(x).square().sum().backward()
    torch.testing.assert_close(lin.weight.grad, ref.weight.grad)
    torch.testing.assert_close(lin.bias.grad, ref.bias.grad)


@needs_onednn
def test_prepare_for_batches_keeps_ties_names_and_tokens(model):
    idx = torch.randint(0, 97, (8, 6))
    batched = copy.deepcopy(model)
    assert prepare_for_batches(batched)
    assert isinstance(batched.blocks[0].mlp.fc, BatchPackedLinear)
    assert isinstance(batched.lm_head, BatchPackedLinear) and batched.lm_head.weight is batched.tok_emb.weight
    assert batched.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(batched(idx), model(idx), atol=1e-5, rtol=1e-5)
        for b in (1, 4, 8):  # the steps take the packed kernel from 2 rows on
            assert torch.equal(batched.generate(idx[:b], 20, temperature=0.0), model.generate(idx[:b], 20, temperature=0.0))


def test_prepare_for_batches_leaves_bf16_and_int8_alone(model):
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert not prepare_for_batches(bf16)
    int8 = prepare_for_decoding(copy.deepcopy(model), int8=True)
    assert not prepare_for_batches(int8)
    assert not any(isinstance(m, BatchPackedLinear) for m in (*bf16.modules(), *int8.modules()))
