"""schemathesis (an independent fuzzer) against the server's own OpenAPI schema: generated
bodies, valid and not, for every route, with the API key set. No answer may be a 5xx, and every
4xx must carry OpenAI's error shape."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, settings

from lmforge.models.gpt import GPT, GPTConfig
from lmforge.serve import create_app
from lmforge.tokenizers import CharTokenizer
from test_serve import live_server

KEY = "sk-schema"


@pytest.fixture(scope="module")
def schema_url(shakespeare_text):
    tok = CharTokenizer.train(shakespeare_text)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32))
    # small limits keep each generated request to milliseconds
    app = create_app(model, tok, model_name="tiny", api_key=KEY, max_batch=4, max_tokens_limit=8, max_queue=64)
    with live_server(app) as base:
        yield base


@pytest.fixture(scope="module")
def api_schema(schema_url):
    return schemathesis.openapi.from_url(f"{schema_url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


def check_answer(resp) -> None:
    assert resp.status_code < 500, (resp.status_code, resp.text[:300])
    if resp.status_code >= 400:
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str), err


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_fuzzed_requests_get_no_5xx_and_documented_errors(case):
    check_answer(case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=30))


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_fuzzed_requests_many_examples(case):
    check_answer(case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=30))


def test_seed_beyond_64_bits_is_a_clear_4xx(schema_url):
    r = httpx.post(f"{schema_url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "tiny", "prompt": "a", "max_tokens": 2, "seed": 2**70})
    assert r.status_code == 422 and r.json()["error"]["param"] == "seed"
    r = httpx.post(f"{schema_url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "tiny", "prompt": "a", "max_tokens": 2, "seed": 2**63 - 1, "n": 3})
    assert r.status_code == 200 and len(r.json()["choices"]) == 3  # seed + choice wraps, no overflow
