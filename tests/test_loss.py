"""The chunked cross-entropy: the same loss and gradients as making the whole logits."""

import copy
import tempfile

import pytest
import torch
import torch.nn.functional as F

import lmforge.nn.loss as loss_module
from lmforge.models import build_model
from lmforge.nn.lora import apply_lora
from lmforge.nn.loss import chunked_cross_entropy
from lmforge.train import TrainConfig, Trainer


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("vocab,n,chunk,bias", [(50, 37, 200, False), (1000, 129, 5000, True),
                                                (300, 64, 10**6, False), (7, 10, 1, True)])
def test_matches_cross_entropy_of_full_logits(vocab, n, chunk, bias, smoothing):
    """float64, so the only differences are summation order: 1e-12."""
    g = torch.Generator().manual_seed(vocab)
    h = torch.randn(n, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(vocab, 16, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(vocab, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    t = torch.randint(0, vocab, (n,), generator=g)
    t[::5] = -1  # ignored positions
    inputs = [x for x in (h, w, b) if x is not None]
    ref = F.cross_entropy(F.linear(h, w, b), t, ignore_index=-1, label_smoothing=smoothing)
    ref_grads = torch.autograd.grad(ref * 3.0, inputs)
    out = chunked_cross_entropy(h, w, t, b, label_smoothing=smoothing, chunk_elements=chunk)
    grads = torch.autograd.grad(out * 3.0, inputs)
    assert out.item() == pytest.approx(ref.item(), abs=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_without_grad_gives_the_loss_only():
    h, w = torch.randn(20, 8), torch.randn(100, 8)
    t = torch.randint(0, 100, (20,))
    with torch.no_grad():
        out = chunked_cross_entropy(h, w, t, chunk_elements=300)
    assert out.item() == pytest.approx(F.cross_entropy(h @ w.T, t).item(), abs=1e-5)


def _gpt(vocab=500):
    torch.manual_seed(0)
    return build_model("gpt", dict(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0))


@pytest.mark.parametrize("adapted", [False, True])
def test_gpt_loss_without_logits(monkeypatch, adapted):
    """return_logits=False: no logits, and the loss and every gradient as with them (float32:
    1e-6), for the tied head and for a LoRA-adapted tied head (E + s B A)."""
    model = _gpt()
    if adapted:
        apply_lora(model, ["tok_emb", "mlp.proj"], r=4, alpha=8.0, dropout=0.0)
        with torch.no_grad():  # B starts at zero; make the adapter matter
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(0, 0.05)
    idx = torch.randint(0, 500, (4, 32))
    targets = torch.roll(idx, -1, dims=1)
    targets[:, -2:] = -1
    params = [p for p in model.parameters() if p.requires_grad]
    logits, ref = model(idx, targets)
    ref_grads = torch.autograd.grad(ref, params)
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 3000)  # several chunks of 6 tokens
    logits, loss = model(idx, targets, return_logits=False)
    grads = torch.autograd.grad(loss, params)
    assert logits is None
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_small_logits_are_still_returned():
    model = _gpt()
    idx = torch.randint(0, 500, (2, 8))
    logits, loss = model(idx, idx, return_logits=False)  # 16 x 500 logits: under the chunk size
    assert logits.shape == (2, 8, 500)


def test_bf16_autocast_loss_close_to_full_logits(monkeypatch):
    model = _gpt()
    idx = torch.randint(0, 500, (4, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(idx, idx)[1]
        monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 3000)
        loss = model(idx, idx, return_logits=False)[1]
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), abs=2e-2)


class _Batches:
    def __init__(self, vocab):
        self.gen, self.vocab = torch.Generator().manual_seed(0), vocab

    def get_batch(self, split, generator=None):
        x = torch.randint(0, self.vocab, (4, 33), generator=generator or self.gen)
        return x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def tokens_per_batch(self):
        return 128

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_trainer_steps_match_with_and_without_chunks(monkeypatch):
    """The trainer asks for the loss alone; three AdamW steps through the chunked loss end at
    the same losses (1e-5) and weights (1e-5) as through whole logits."""
    base = _gpt()
    results = []
    for chunk in (3000, 1 << 40):
        monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", chunk)
        cfg = TrainConfig(max_iters=3, batch_size=4, warmup_iters=1, device="cpu", eval_iters=1)
        trainer = Trainer(copy.deepcopy(base), _Batches(500), cfg, tempfile.mkdtemp(), tokenizer=None,
                          progress=False)
        assert trainer.loss_only == {"return_logits": False}
        losses = [trainer.step().item() for _ in range(3)]
        results.append((losses, trainer.model.state_dict()))
    (la, wa), (lb, wb) = results
    assert la == pytest.approx(lb, abs=1e-5)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=0)


def test_split_loss_through_chunks_equals_whole_logits(monkeypatch):
    """`lmforge eval`'s loss over a split: asked of the model without logits (chunked), it
    equals the sum of F.cross_entropy over whole logits, block by block (1e-5)."""
    import types

    import numpy as np

    from lmforge.evaluate import split_loss

    model = _gpt().eval()
    tokens = np.random.default_rng(0).integers(0, 500, size=32 * 5 + 7)  # a short last block
    data = types.SimpleNamespace(splits={"val": tokens})
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 3000)
    loss, n = split_loss(model, data, "val", batch_size=2)
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(tokens) - 1, 32):
            seq = torch.as_tensor(tokens[s:s + 33], dtype=torch.long)
            logits = model(seq[None, :-1])
            total += F.cross_entropy(logits[0], seq[1:], reduction="sum").item()
            count += len(seq) - 1
    assert n == count == len(tokens) - 1
    assert loss == pytest.approx(total / count, abs=1e-5)


def test_float16_gradients_do_not_underflow():
    """Under float16 autocast the 1/N of the mean must not be applied in float16: with 262,144
    tokens, softmax/N is ~6e-8, far below float16's smallest normal number (6e-5). With a
    GradScaler's factor (2^16 here) the gradients must match float32's to 1%."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1 << 18, 16, generator=g, requires_grad=True)
    w = (torch.randn(64, 16, generator=g) * 0.3).requires_grad_()
    t = torch.randint(0, 64, (1 << 18,), generator=g)
    ref = torch.autograd.grad(F.cross_entropy(h @ w.T, t), (h, w))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = chunked_cross_entropy(h, w, t, chunk_elements=64 * 1024)
    got = torch.autograd.grad(loss * 2.0**16, (h, w))
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32
        assert ((a / 2.0**16 - b).abs().max() / b.abs().max()).item() < 1e-2


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_a_head_without_one_weight_is_recomputed_a_chunk_at_a_time(monkeypatch, smoothing):
    """A head module that is not h @ W.T + b for one W (here a Linear behind a scale, as a
    quantized frozen head is): head_loss takes chunks of tokens and recomputes their logits in
    backward; loss and gradients equal the whole logits' (float64: 1e-12)."""
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 1200)  # 1200 // 4 // 40 = 7 tokens a chunk
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(16, 40).double()
    head = torch.nn.Sequential(lin, torch.nn.Hardtanh(-3, 3))
    head.out_features = 40
    h = torch.randn(5, 9, 16, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 40, (5, 9), generator=g)
    t[0, :4] = -1  # ignored positions
    ours = loss_module.head_loss(h, head, t, label_smoothing=smoothing)
    ours.backward()
    got = (h.grad.clone(), lin.weight.grad.clone())
    h.grad, lin.weight.grad = None, None
    ref = F.cross_entropy(head(h).reshape(-1, 40), t.reshape(-1), ignore_index=-1, label_smoothing=smoothing)
    ref.backward()
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got[0], h.grad, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got[1], lin.weight.grad, atol=1e-12, rtol=1e-12)
    with torch.no_grad():  # evaluation: the same chunks, without the recomputation
        torch.testing.assert_close(loss_module.head_loss(h, head, t, label_smoothing=smoothing), ref.detach(),
                                   atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("extra", [{}, {"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 2}])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(extra):
    cfg = dict(vocab_size=50, block_size=16, n_layer=3, n_head=4, n_embd=32, dropout=0.0, **extra)
    torch.manual_seed(0)
    plain = build_model("gpt", cfg).double().train()
    recomputed = copy.deepcopy(plain)
    recomputed.activation_checkpointing = True
    x, y = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    grads = []
    for m in (plain, recomputed):
        _, loss = m(x, y)
        loss.backward()
        grads.append((loss.detach(), [p.grad for p in m.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-12, rtol=1e-12)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
