import math

import pytest
import torch

import lmforge
from lmforge.checkpoint import load_run
from lmforge.data import prepare
from lmforge.errors import LMForgeError
from lmforge.models import build_model
from lmforge.models.nnlm import NNLM, NNLMConfig
from lmforge.models.presets import get_preset
from lmforge.train.setup import build_trainer

SMALL = dict(vocab_size=11, block_size=12, context=3, n_embd=4, n_hidden=16)


def random_model(**kw) -> NNLM:
    torch.manual_seed(0)
    model = NNLM(NNLMConfig(**{**SMALL, **kw})).eval()
    for p in model.parameters():  # the zero-initialised output layers would hide mistakes
        torch.nn.init.normal_(p, std=0.3)
    return model


@pytest.mark.parametrize("direct", [True, False])
def test_logits_are_the_papers_formula(direct):
    """y = b + W x + U tanh(d + H x), x the n-1 previous embeddings, padded at the start."""
    model = random_model(direct=direct)
    idx = torch.randint(0, 11, (2, 7))
    logits = model(idx)
    assert logits.shape == (2, 7, 11)
    C, H, d = model.tok_emb.weight, model.hidden.weight, model.hidden.bias
    U, b = model.out.weight, model.out.bias
    for row in range(2):
        for t in range(7):
            ids = [idx[row, j].item() if j >= 0 else model.pad_id for j in range(t - 2, t + 1)]
            x = torch.cat([C[i] for i in ids])  # ((n-1) * m,)
            y = b + U @ torch.tanh(d + H @ x)
            if direct:
                y = y + model.direct.weight @ x
            torch.testing.assert_close(logits[row, t], y, atol=1e-5, rtol=1e-5)


def test_prediction_ignores_tokens_beyond_the_window():
    model = random_model()
    idx = torch.randint(0, 11, (1, 10))
    changed = idx.clone()
    changed[0, :4] = (changed[0, :4] + 1) % 11
    a, b = model(idx), model(changed)
    assert not torch.allclose(a[0, 5], b[0, 5])  # position 5 sees ids 3..5
    torch.testing.assert_close(a[0, 6:], b[0, 6:], atol=0, rtol=0)  # position 6 sees 4..6


def test_loss_starts_at_uniform_and_ignores_minus_one():
    model = NNLM(NNLMConfig(**SMALL))
    idx = torch.randint(0, 11, (3, 12))
    targets = torch.randint(0, 11, (3, 12))
    targets[:, :2] = -1
    logits, loss = model(idx, targets)
    assert loss.item() == pytest.approx(math.log(11), abs=1e-5)  # zero-initialised output layers
    ref = torch.nn.functional.cross_entropy(logits[:, 2:].reshape(-1, 11), targets[:, 2:].reshape(-1))
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)


def test_greedy_generation_matches_stepwise_argmax():
    model = random_model()
    idx = torch.randint(0, 11, (2, 5))
    out = model.generate(idx, max_new_tokens=15, temperature=0.0)  # slides past block_size 12
    assert out.shape == (2, 20)
    seq = idx
    for _ in range(15):
        seq = torch.cat([seq, model(seq[:, -3:])[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_registered_kind_preset_and_bad_config():
    p = get_preset("nnlm-char")
    assert p["model"] == "nnlm"
    model = build_model("nnlm", {**p["model_config"], "vocab_size": 65})
    assert isinstance(model, NNLM) and model.num_params() < 1_000_000
    with pytest.raises(LMForgeError, match="context"):
        NNLM(NNLMConfig(**{**SMALL, "context": 0}))


def test_trains_saves_and_samples_through_the_shared_tools(tmp_path, small_corpus):
    prepare([small_corpus], "char", tmp_path / "data", progress=False)
    t = build_trainer(tmp_path / "data", tmp_path / "run", preset="nnlm-char",
                      overrides=["max_iters=150", "eval_interval=150", "eval_iters=4", "n_hidden=64"],
                      progress=False, verbose=False)
    res = t.fit()
    assert res["val_loss"] < math.log(t.model.config.vocab_size) - 1.0
    model, tok = load_run(tmp_path / "run")
    assert isinstance(model, NNLM)
    text = lmforge.generate(model, tok, "ROMEO:", max_new_tokens=30, temperature=0.8, seed=0)
    assert isinstance(text, str) and len(text) == 30
