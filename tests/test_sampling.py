import torch

from lmforge.sampling import filter_logits, sample_next


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 1.0], [5.0, 0.0, -1.0]])
    assert sample_next(logits, temperature=0.0).tolist() == [1, 0]


def test_greedy_takes_the_first_of_tied_maxima():
    # bf16 logits tie often; greedy must pick what argmax picks (the first maximum)
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randint(-2, 3, (64, 5000), generator=torch.Generator().manual_seed(0)).to(dtype)
        assert torch.equal(sample_next(logits, temperature=0.0), logits.argmax(dim=-1))
        assert sample_next(torch.tensor([[1.0, 7.0, 7.0]], dtype=dtype), temperature=0.0).tolist() == [1]


def test_top_k_keeps_k_best():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    out = filter_logits(logits, top_k=2)
    assert torch.isinf(out[0, [0, 3]]).all() and torch.isfinite(out[0, [1, 2]]).all()


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = filter_logits(probs.log(), top_p=0.75)  # 0.5 < 0.75, 0.5 + 0.3 >= 0.75: keep two
    assert torch.isfinite(out[0, :2]).all() and torch.isinf(out[0, 2:]).all()


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.7, 0.2, 0.1])
    g = torch.Generator().manual_seed(0)
    draws = sample_next(probs.log().expand(20000, 3), temperature=1.0, generator=g)
    freq = torch.bincount(draws, minlength=3).float() / 20000
    assert torch.allclose(freq, probs, atol=0.015)
