"""The serving engine with a draft model: speculative rounds over every active row change how
fast tokens come, never which tokens (greedy) or their distribution (sampling)."""

from __future__ import annotations

import asyncio
import copy
import subprocess
import sys

import pytest
import torch
from scipy.stats import chi2

from lmforge.checkpoint import save_run
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.sampling import probabilities
from lmforge.serve.engine import Engine, SamplingParams
from lmforge.tokenizers import CharTokenizer


def _model(seed: int, vocab: int, block: int = 64, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_embd=32)
    return GPT(GPTConfig(**{**cfg, **kw})).eval()


async def _run(engine: Engine, requests: list[tuple[list[int], int, SamplingParams]]):
    """Submit every request at once; per request, per choice: (tokens, logprobs, finish_reason)."""
    async def one(ids, n, params):
        out = [[[], [], None] for _ in range(n)]
        async for ev in engine.submit(ids, n, params).events():
            if ev.token is not None:
                out[ev.choice][0].append(ev.token)
                out[ev.choice][1].append(ev.logprob)
            out[ev.choice][2] = ev.finish_reason or out[ev.choice][2]
        return out
    return await asyncio.gather(*(one(*r) for r in requests))


def _serve(model, tok, requests, **kw):
    engine = Engine(model, tok, max_batch=8, **kw)
    try:
        return asyncio.run(_run(engine, requests)), engine.load()
    finally:
        engine.close()


@pytest.mark.parametrize("k", [1, 4])
def test_greedy_answers_equal_the_model_alone(k):
    tok = CharTokenizer("abcdefghijklmnop")
    target = _model(0, tok.vocab_size)
    with torch.no_grad():  # positions matter, so a draft cache off by one shows in the acceptance
        target.pos_emb.weight.mul_(50)
    rng = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, tok.vocab_size, (n,), generator=rng).tolist() for n in (1, 5, 17, 40)]
    requests = [(ids, 1, SamplingParams(max_tokens=64 - len(ids) if i == 3 else 12 + 5 * i, temperature=0.0,
                                        logprobs=0, stop_ids=frozenset({3} if i == 1 else ())))
                for i, ids in enumerate(prompts)]  # the last one fills the whole context
    requests.append((prompts[2], 3, SamplingParams(max_tokens=9, temperature=0.0)))  # n choices share a prefill
    alone, _ = _serve(target, tok, requests)
    for draft in (_model(7, tok.vocab_size, n_layer=1, n_embd=16, block=32), copy.deepcopy(target)):
        spec, load = _serve(target, tok, requests, draft=draft, draft_tokens=k)
        for a, b in zip(alone, spec):
            for (ta, la, fa), (tb, lb, fb) in zip(a, b):
                assert tb == ta and fb == fa
                if la and la[0] is not None:
                    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), atol=1e-4, rtol=0)
        assert load["draft_rounds"] > 0 and 0 <= load["draft_acceptance"] <= 1
        if draft.config.n_layer == target.config.n_layer:  # the model's own copy: every guess kept
            assert load["draft_acceptance"] == 1.0


def test_sampled_tokens_follow_the_model_distribution():
    """Three sampled tokens (the first from the prefill, the next two from a speculative round
    with k = 2) against the model's exact joint distribution over the 4**3 outcomes."""
    tok = CharTokenizer("abcd")
    V = tok.vocab_size
    target, draft = _model(0, V, tie_embeddings=False), _model(5, V, n_layer=1)
    with torch.no_grad():  # distributions of their own, unlike the draft's near-uniform ones
        target.lm_head.weight.mul_(15)
    prompt = [1, 2, 3]

    def p_next(ids):
        with torch.no_grad():
            return probabilities(target(torch.tensor([ids]))[:, -1], 1.0)[0]

    joint = torch.zeros(V, V, V)
    p1 = p_next(prompt)
    for a in range(V):
        p2 = p_next(prompt + [a])
        for b in range(V):
            joint[a, b] = p1[a] * p2[b] * p_next(prompt + [a, b])
    n_req, n = 200, 8
    requests = [(prompt, n, SamplingParams(max_tokens=3, temperature=1.0, seed=n * i)) for i in range(n_req)]
    out, load = _serve(target, tok, requests, draft=draft, draft_tokens=2)
    counts = torch.zeros(V, V, V)
    for req in out:
        for toks, _, _ in req:
            counts[tuple(toks)] += 1
    expected = (joint * n_req * n).flatten()
    counts = counts.flatten()
    small = expected < 5  # pooled into one cell, as the chi-squared approximation needs
    e = torch.cat([expected[~small], expected[small].sum()[None]])
    c = torch.cat([counts[~small], counts[small].sum()[None]])
    stat = float(((c - e) ** 2 / e).sum())
    assert stat < chi2.ppf(0.999, len(e) - 1)
    assert 0.05 < load["draft_acceptance"] < 0.95  # the draft differs: both branches were taken


def test_serve_refuses_a_draft_with_another_tokenizer(tmp_path):
    a, b = CharTokenizer("abcdef"), CharTokenizer("uvwxyz")
    save_run(tmp_path / "model", _model(0, a.vocab_size), a)
    save_run(tmp_path / "draft", _model(1, b.vocab_size), b)
    proc = subprocess.run([sys.executable, "-m", "lmforge", "serve", "--run", str(tmp_path / "model"),
                           "--draft", str(tmp_path / "draft")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "another tokenizer" in proc.stderr and "Traceback" not in proc.stderr
