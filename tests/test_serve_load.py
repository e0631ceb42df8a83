"""The server under load and faults: the wait-queue limit (429), the body limit (413), requests
dropped while queued, the per-request deadline, Prometheus metrics, the access log, and a
graceful shutdown of `lmforge serve` on SIGTERM."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmforge.serve import create_app
from test_serve import free_port, live_server, loaded, run_dir  # noqa: F401 (fixtures)

KEY = "sk-load"
AUTH = {"Authorization": f"Bearer {KEY}"}


def wait_for(pred, what: str, limit: float = 20.0):
    deadline = time.time() + limit
    while not (v := pred()):
        assert time.time() < deadline, what
        time.sleep(0.02)
    return v


def health(url) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()


def long_stream(url, **extra):
    body = {"model": "tiny", "prompt": "A", "max_tokens": 1000, "stream": True, **extra}
    return httpx.stream("POST", f"{url}/v1/completions", headers=AUTH, json=body, timeout=60)


@pytest.fixture(scope="module")
def one_slot(loaded):
    """One batch row and room for one waiting request: easy to fill."""
    model, tok = loaded
    app = create_app(model, tok, model_name="tiny", api_key=KEY, max_batch=1, max_queue=1,
                     max_body_bytes=4096)
    with live_server(app) as base:
        yield base


def test_queue_full_is_429_with_retry_after_and_queued_client_gone_is_dropped(one_slot):
    url = one_slot
    before = health(url)
    with long_stream(url) as running:  # holds the only row
        lines = running.iter_lines()  # kept: a dropped iterator closes the stream
        next(lines)
        with long_stream(url) as waiting:  # the queue's one place; its client leaves before it runs
            wait_for(lambda: health(url)["queued"] == 1, "second request never queued")
            r = httpx.post(f"{url}/v1/completions", headers=AUTH, json={"model": "tiny", "prompt": "x"})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "rate_limit_error"
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
            with pytest.raises(openai.RateLimitError):
                client.completions.create(model="tiny", prompt="x", max_tokens=1)
            assert waiting.status_code == 200
    h = wait_for(lambda: (h := health(url))["active"] == 0 and h["queued"] == 0 and h, "rows not freed")
    assert h["dropped"] == before["dropped"] + 1  # the waiting request never reached the model
    assert h["cancelled"] == before["cancelled"] + 1  # the running one was cut short
    assert h["tokens_generated"] - before["tokens_generated"] < 1000


def test_oversized_body_is_413(one_slot):
    r = httpx.post(f"{one_slot}/v1/completions", headers=AUTH, json={"model": "tiny", "prompt": "x" * 5000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no content-length: counted while read
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'
    r = httpx.post(f"{one_slot}/v1/completions", headers={**AUTH, "Content-Type": "application/json"},
                   content=chunks())
    assert r.status_code == 413 and "4096" in r.json()["error"]["message"]
    r = httpx.post(f"{one_slot}/v1/completions", headers=AUTH, json={"model": "tiny", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 200


def test_request_timeout_ends_a_stream_with_abort(loaded):
    model, tok = loaded
    app = create_app(model, tok, model_name="tiny", api_key=KEY, request_timeout=0.3)
    with live_server(app) as url, long_stream(url) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
        assert events[-1]["choices"][0]["finish_reason"] == "abort"
        assert len(events) < 1000  # cut short by the deadline, not by max_tokens
        assert health(url)["aborted"] == 1


def test_metrics_and_access_log(loaded, caplog):
    model, tok = loaded
    app = create_app(model, tok, model_name="tiny", api_key=KEY)
    with caplog.at_level(logging.INFO, logger="lmforge.serve.access"), live_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        for i in range(3):
            client.completions.create(model="tiny", prompt="secret words", max_tokens=5, seed=i)
        for _ in client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=4, stream=True):
            pass
        httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x"})  # no key: 401
        text = httpx.get(f"{url}/metrics").text
        tokens_now = health(url)["tokens_generated"]
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    reqs = {(s.labels["route"], s.labels["status"]): s.value
            for s in fams["lmforge_requests"].samples if s.name == "lmforge_requests_total"}
    assert reqs[("/v1/completions", "200")] == 3 and reqs[("/v1/chat/completions", "200")] == 1
    assert reqs[("/v1/completions", "401")] == 1
    ttft = {s.name: s.value for s in fams["lmforge_time_to_first_token_seconds"].samples}
    assert ttft["lmforge_time_to_first_token_seconds_count"] == 4
    tpot = {s.name: s.value for s in fams["lmforge_time_per_output_token_seconds"].samples}
    assert tpot["lmforge_time_per_output_token_seconds_count"] == 4 and tpot["lmforge_time_per_output_token_seconds_sum"] > 0
    assert fams["lmforge_generated_tokens"].samples[0].value == tokens_now == 3 * 5 + 4
    assert fams["lmforge_queue_requests"].samples[0].value == 0
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "lmforge.serve.access"]
    done = [x for x in lines if x["path"] == "/v1/completions" and x["status"] == 200]
    assert len(done) == 3 and all(x["completion_tokens"] == 5 and x["prompt_tokens"] == 12 for x in done)
    assert all(x["method"] == "POST" and x["duration_ms"] > 0 for x in done)
    assert "secret" not in caplog.text  # no prompt text without --log-prompts


def test_sigterm_drains_then_ends_streams_and_exits_0(run_dir):
    port = free_port()
    env = {**os.environ, "LMFORGE_API_KEY": ""}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--run", str(run_dir), "--port", str(port),
                             "--device", "cpu", "--api-key", KEY, "--model-name", "tiny",
                             "--shutdown-timeout", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        proc.stdout.readline()

        def up():
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                return False
        wait_for(up, "server did not start", 30)
        with long_stream(url, max_tokens=1000) as resp:
            lines = resp.iter_lines()
            first = next(lines)
            assert first.startswith("data: {")
            proc.send_signal(signal.SIGTERM)
            r = wait_for(lambda: (r := httpx.post(f"{url}/v1/completions", headers=AUTH,
                                                  json={"model": "tiny", "prompt": "x"})).status_code == 503 and r,
                         "no 503 while draining", 5)
            assert r.json()["error"]["code"] == "shutting_down" and "retry-after" in r.headers
            rest = list(lines)  # the stream goes on, then is ended after --shutdown-timeout
        events = [json.loads(x[6:]) for x in [first, *rest] if x.startswith("data: {")]
        assert rest[-1] == "data: [DONE]" or [x for x in rest if x][-1] == "data: [DONE]"
        assert events[-1]["choices"][0]["finish_reason"] == "abort" and len(events) < 1000
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
