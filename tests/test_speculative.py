"""Speculative decoding changes how fast tokens come, never which tokens (greedy) or their
distribution (sampling)."""


import pytest
import torch

from lmforge import GPT, GPTConfig
from lmforge.errors import LMForgeError
from lmforge.models.speculative import SpeculativeStats, speculative_generate, speculative_steps
from lmforge.sampling import probabilities


def _model(seed: int, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=61, block_size=48, n_layer=2, n_head=2, n_embd=32)
    return GPT(GPTConfig(**{**cfg, **kw})).eval()


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_equals_the_target_alone(k):
    target, draft = _model(0), _model(1, n_layer=1, n_embd=16)
    for prompt_len, n in ((1, 20), (7, 30), (30, 40)):  # the last one slides past block_size
        idx = torch.randint(0, 61, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
        stats = SpeculativeStats()
        out = [int(t) for t in speculative_steps(target, draft, idx, n, k=k, temperature=0.0, stats=stats)]
        assert out == target.generate(idx, n, temperature=0.0)[0, prompt_len:].tolist()
        assert stats.rounds > 0 and 0 <= stats.accepted <= stats.proposed


def test_a_draft_equal_to_the_target_is_always_accepted():
    target = _model(0)
    stats = SpeculativeStats()
    out = speculative_generate(target, target, torch.tensor([[3, 4]]), 12, k=4, temperature=0.0, stats=stats)
    assert out.shape == (1, 14) and stats.acceptance_rate == 1.0


def test_sampled_tokens_follow_the_target_distribution():
    """Two sampled tokens, 36 possible pairs, against the target's exact joint distribution."""
    V = 6
    target, draft = _model(0, vocab_size=V, tie_embeddings=False), _model(5, vocab_size=V, n_layer=1)
    with torch.no_grad():  # peaked distributions unlike the draft's near-uniform ones
        target.lm_head.weight.mul_(60)
    prompt = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        p1 = probabilities(target(prompt)[:, -1], 1.0)[0]
        joint = torch.stack([p1[a] * probabilities(target(torch.cat([prompt, torch.tensor([[a]])], 1))[:, -1], 1.0)[0]
                             for a in range(V)])  # (V, V): P(t1 = a, t2 = b)
    g = torch.Generator().manual_seed(0)
    n = 3000
    counts = torch.zeros(V, V)
    stats = SpeculativeStats()
    for _ in range(n):
        a, b = (int(t) for t in speculative_steps(target, draft, prompt, 2, k=2, temperature=1.0, generator=g,
                                                  stats=stats))
        counts[a, b] += 1
    expected = joint * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 66.6  # chi-squared, 35 degrees of freedom, p = 0.001
    assert 0.05 < stats.acceptance_rate < 0.95  # the draft differs: both branches were taken


def test_bad_drafts_are_refused():
    target = _model(0)
    with pytest.raises(LMForgeError, match="vocabulary"):
        next(speculative_steps(target, _model(1, vocab_size=50), torch.tensor([[1]]), 3))
    with pytest.raises(LMForgeError, match="batch 1"):
        next(speculative_steps(target, _model(1), torch.tensor([[1], [2]]), 3))
