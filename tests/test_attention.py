"""The fused attention path against softmax(QK^T/sqrt(d))V written out."""

import math

import pytest
import torch

from lmforge.nn import KVCache, MultiHeadAttention, attention_reference
from lmforge.nn.attention import causal_mask


def test_reference_is_the_formula_on_a_tiny_case():
    # one head, two positions, head size 2: check against numbers worked by hand
    q = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    k = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])
    v = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    out, w = attention_reference(q, k, v, causal=True)
    # position 0 sees only key 0; position 1 sees scores [0, 1]/sqrt(2)
    a = math.exp(0.0) / (math.exp(0.0) + math.exp(1 / math.sqrt(2)))
    assert torch.allclose(w[0, 0], torch.tensor([[1.0, 0.0], [a, 1 - a]]), atol=1e-6)
    assert torch.allclose(out[0, 0, 1], a * v[0, 0, 0] + (1 - a) * v[0, 0, 1], atol=1e-6)


def test_causal_mask_with_cached_prefix():
    m = causal_mask(2, 4)
    assert m.tolist() == [[True, True, True, False], [True, True, True, True]]


@pytest.mark.parametrize("n_kv_head", [None, 2, 1])
@pytest.mark.parametrize("cross", [False, True])
def test_fused_equals_reference(n_kv_head, cross):
    torch.manual_seed(0)
    attn = MultiHeadAttention(64, 4, n_kv_head, causal=not cross, cross=cross).eval()
    x = torch.randn(3, 10, 64)
    mem = torch.randn(3, 7, 64) if cross else None
    mask = torch.ones(3, 1, 1, 7, dtype=torch.bool) if cross else None
    if cross:
        mask[0, ..., 5:] = False  # padding in the first sentence
    fused = attn(x, memory=mem, mask=mask)
    attn.record_weights = True
    ref = attn(x, memory=mem, mask=mask)
    assert (fused - ref).abs().max().item() <= 1e-5
    w = attn.last_weights
    assert torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1)), atol=1e-6)
    if cross:
        assert w[0, ..., 5:].abs().max() == 0  # padded keys get no weight
    else:
        assert torch.triu(w, diagonal=1).abs().max() == 0  # no peeking at the future


def test_kv_cache_overflow_is_an_error():
    cache = KVCache(1, 1, 2, 4, max_len=3)
    k = torch.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError):
        cache.update(0, k, k)
