import json
import math

import pytest
import torch

from lmforge.checkpoint import load_run
from lmforge.data import prepare
from lmforge.errors import LMForgeError
from lmforge.train.config import TrainConfig
from lmforge.train.setup import build_trainer

FAST = ["n_layer=2", "n_head=2", "n_embd=32", "block_size=32", "batch_size=4",
        "eval_iters=2", "log_interval=1", "warmup_iters=5"]


@pytest.fixture
def data_dir(tmp_path, small_corpus):
    prepare([small_corpus], "char", tmp_path / "data", progress=False)
    return tmp_path / "data"


def losses(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    assert cfg.lr_at(0) == pytest.approx(1 / 11)
    assert cfg.lr_at(9) == pytest.approx(10 / 11)
    assert cfg.lr_at(10) == pytest.approx(1.0)
    assert cfg.lr_at(60) == pytest.approx(0.1 + 0.5 * 0.9)  # half-way: cosine at pi/2
    assert cfg.lr_at(110) == pytest.approx(0.1)


def test_training_lowers_the_loss(tmp_path, data_dir):
    t = build_trainer(data_dir, tmp_path / "run", overrides=FAST + ["max_iters=60", "eval_interval=60"],
                      progress=False, verbose=False)
    res = t.fit()
    first = losses(tmp_path / "run")[0]["loss"]
    assert first == pytest.approx(math.log(t.model.config.vocab_size), abs=0.5)
    assert res["val_loss"] < first - 0.5
    model, tok = load_run(tmp_path / "run")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), t.model.state_dict().values()))


def test_logits_are_freed_before_backward(tmp_path, data_dir):
    """A training step keeps only the loss: the (B, T, vocab) logits must not stay alive
    through backward (for a 50k vocabulary that is the largest tensor of the step)."""
    import weakref

    t = build_trainer(data_dir, tmp_path / "run", overrides=FAST + ["max_iters=2"], progress=False, verbose=False)
    seen, alive_in_backward = [], []
    t.model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(weakref.ref(out)))
    t.model.tok_emb.weight.register_hook(lambda g: alive_in_backward.append(seen[-1]() is not None))
    t.model.train()
    t.step()
    assert alive_in_backward == [False]


def test_resume_is_exact(tmp_path, data_dir):
    common = FAST + ["eval_interval=10", "lr_decay_iters=40", "dropout=0.1"]
    straight = tmp_path / "straight"
    build_trainer(data_dir, straight, overrides=common + ["max_iters=40"], progress=False, verbose=False).fit()
    split = tmp_path / "split"
    build_trainer(data_dir, split, overrides=common + ["max_iters=20"], progress=False, verbose=False).fit()
    build_trainer(data_dir, split, overrides=["max_iters=40"], resume=True, progress=False, verbose=False).fit()
    a, b = losses(straight), losses(split)
    assert [r["iter"] for r in a] == [r["iter"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "train_loss", "val_loss"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], abs=1e-6)


def test_gradient_accumulation_matches_big_batch(tmp_path, data_dir):
    """Two micro-batches of 4 give the gradient of one batch of 8 (mean loss)."""
    t = build_trainer(data_dir, tmp_path / "r", overrides=FAST + ["gradient_accumulation_steps=2", "grad_clip=0"],
                      progress=False, verbose=False)
    state = t.data.state_dict()
    x1, y1 = t.data.get_batch("train")
    x2, y2 = t.data.get_batch("train")
    t.data.load_state_dict(state)
    model = t.model
    ref = [p.detach().clone() for p in model.parameters()]
    _, loss = model(torch.cat([x1, x2]), torch.cat([y1, y2]))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    t.optimizer.step = lambda: None  # inspect the accumulated gradients instead of applying them
    t.optimizer.zero_grad = lambda set_to_none=True: None
    t.step()
    for p, g, r in zip(model.parameters(), grads, ref):
        assert torch.equal(p, r)
        assert torch.allclose(p.grad, g, atol=1e-6)


def test_bad_settings(tmp_path, data_dir):
    with pytest.raises(LMForgeError, match="did you mean max_iters"):
        build_trainer(data_dir, tmp_path / "r", overrides=["max_iter=3"], progress=False)
    with pytest.raises(LMForgeError, match="unknown preset"):
        build_trainer(data_dir, tmp_path / "r", preset="nope", progress=False)
    with pytest.raises(LMForgeError, match="expected a value of type int"):
        build_trainer(data_dir, tmp_path / "r", overrides=["max_iters=lots"], progress=False)
    with pytest.raises(LMForgeError, match="data directory not found"):
        build_trainer(tmp_path / "nodata", tmp_path / "r", progress=False)
