"""The OpenAI-compatible server, driven by the official `openai` client against a live uvicorn
server on a free port (a tiny random-init GPT with a character tokenizer, saved to tmp)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch
import uvicorn

import lmforge
from lmforge.checkpoint import save_run
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.serve import create_app
from lmforge.serve.text import Detokenizer, render_chat, stop_hold
from lmforge.tokenizers import CharTokenizer

KEY = "sk-test-123"
NAME = "tiny"
BLOCK = 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(app):
    """uvicorn in a thread on a free port; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, shakespeare_text):
    d = tmp_path_factory.mktemp("run")
    tok = CharTokenizer.train(shakespeare_text)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=BLOCK, n_layer=2, n_head=2, n_embd=64))
    save_run(d, model, tok)
    return d


@pytest.fixture(scope="module")
def loaded(run_dir):
    return lmforge.load(run_dir)


@pytest.fixture(scope="module")
def url(loaded):
    model, tok = loaded
    app = create_app(model, tok, model_name=NAME, api_key=KEY, max_batch=16, max_tokens_limit=1000)
    with live_server(app) as base:
        yield base


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


def health(url) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()


# --- the text helpers ---------------------------------------------------------------------------

def test_stop_hold_and_detokenizer():
    assert stop_hold("Hello\nUs", ["\nUser:"]) == 3
    assert stop_hold("Hello", ["\nUser:"]) == 0
    tok = CharTokenizer("abc\nUser: ")
    d = Detokenizer(tok, ["\nUser:"])
    shown = "".join(d.push(t) for t in tok.encode("ab\nUsc"))
    assert shown == "ab\nUsc"  # "\nUs" was held back until "c" ruled the stop out
    d = Detokenizer(tok, ["\nUser:"])
    shown = "".join(d.push(t) for t in tok.encode("ab\nUser: c"))
    assert d.stopped and shown == "ab"
    assert render_chat([("system", "Be brief."), ("user", "Hi")]) == "System: Be brief.\nUser: Hi\nAssistant:"


# --- the API through the official client ----------------------------------------------------------

def test_models_and_health(client, url):
    assert [m.id for m in client.models.list().data] == [NAME]
    h = health(url)
    assert h["status"] == "ok" and h["slots"] == 16


def test_completion_matches_library_generate(client, loaded):
    model, tok = loaded
    r = client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=20, temperature=0)
    expected = lmforge.generate(model, tok, "ROMEO:", max_new_tokens=20, temperature=0)
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 6 and r.usage.completion_tokens == 20


def test_chat_completion(client, loaded):
    model, tok = loaded
    msgs = [{"role": "system", "content": "Speak."}, {"role": "user", "content": "Who art thou?"}]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=15, temperature=0)
    prompt = render_chat([(m["role"], m["content"]) for m in msgs])
    expected = lmforge.generate(model, tok, prompt, max_new_tokens=15, temperature=0, stop=["\nUser:", "\nSystem:"])
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    assert r.usage.prompt_tokens == len(tok.encode(prompt))


def test_streaming_equals_whole_answer(client, url):
    whole = client.completions.create(model=NAME, prompt="To be", max_tokens=25, temperature=0).choices[0].text
    chunks = list(client.completions.create(model=NAME, prompt="To be", max_tokens=25, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"
    chat = list(client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=10, stream=True, seed=1,
                                               stream_options={"include_usage": True}))
    assert chat[0].choices[0].delta.role == "assistant"
    assert chat[-1].usage.completion_tokens >= 1 and chat[-1].choices == []
    # the raw stream is server-sent events ending with [DONE]
    with httpx.stream("POST", f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": NAME, "prompt": "A", "max_tokens": 3, "stream": True}) as resp:
        lines = [ln for ln in resp.iter_lines() if ln]
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and json.loads(lines[0][6:])["object"] == "text_completion"


def test_n_choices_and_prompt_list(client):
    r = client.completions.create(model=NAME, prompt="KING", max_tokens=12, n=3, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.text for c in r.choices}) > 1  # independent samples
    r = client.completions.create(model=NAME, prompt=["A", "B"], max_tokens=4, n=2, temperature=0)
    assert len(r.choices) == 4 and r.choices[0].text == r.choices[1].text
    s = list(client.completions.create(model=NAME, prompt="KING", max_tokens=12, n=3, seed=5, stream=True))
    streamed = {i: "".join(c.choices[0].text for c in s if c.choices[0].index == i) for i in range(3)}
    assert [streamed[i] for i in range(3)] == [c.text for c in
                                              client.completions.create(model=NAME, prompt="KING", max_tokens=12,
                                                                        n=3, seed=5).choices]


def test_stop_strings(client):
    full = client.completions.create(model=NAME, prompt="Good", max_tokens=40, temperature=0).choices[0].text
    stop = full[12:14]
    cut = full[:full.find(stop)]
    r = client.completions.create(model=NAME, prompt="Good", max_tokens=40, temperature=0, stop=[stop, "\x00"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=NAME, prompt="Good", max_tokens=40, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut


def test_seed_reproducibility(client):
    def sample(seed):
        return client.completions.create(model=NAME, prompt="O", max_tokens=30, temperature=1.0,
                                         top_p=0.95, seed=seed).choices[0].text
    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_logprobs_and_echo(client, loaded):
    r = client.completions.create(model=NAME, prompt="Hark", max_tokens=8, temperature=0, logprobs=3, echo=True)
    c = r.choices[0]
    assert c.text.startswith("Hark")
    lp = c.logprobs
    assert len(lp.tokens) == 4 + 8 and lp.token_logprobs[0] is None
    assert "".join(lp.tokens) == c.text
    for chosen, top in zip(lp.token_logprobs[4:], lp.top_logprobs[4:]):
        assert len(top) == 3 and chosen == pytest.approx(max(top.values()), abs=1e-6)  # greedy = most likely
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       logprobs=True, top_logprobs=2, temperature=0)
    content = r.choices[0].logprobs.content
    assert content and all(x.logprob <= 0 and len(x.top_logprobs) == 2 for x in content)


def test_auth(url, client):
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=NAME, prompt="x", max_tokens=1)
    r = httpx.post(f"{url}/v1/completions", content=b"{not json")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/health").status_code == 200  # health needs no key


def test_bad_requests_get_json_errors_and_server_keeps_serving(client, url):
    with pytest.raises(openai.BadRequestError, match="limit"):
        client.completions.create(model=NAME, prompt="x", max_tokens=1001)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="x" * (BLOCK + 1), max_tokens=1)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="x" * 1000, max_tokens=100)  # prompt + max_tokens > context
    with pytest.raises(openai.BadRequestError, match="n=17"):
        client.completions.create(model=NAME, prompt="x", max_tokens=1, n=17)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model=NAME, prompt="x", max_tokens=1, temperature="hot")
    with pytest.raises(openai.BadRequestError, match="not in the vocabulary"):
        client.completions.create(model=NAME, prompt="\u2603", max_tokens=1)
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{url}/v1/completions", content=b'{"model": "tiny", "prompt": ', headers=auth)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": NAME, "messages": []}, headers=auth)
    assert r.status_code == 422 and r.json()["error"]["param"] == "messages"
    assert client.completions.create(model=NAME, prompt="x", max_tokens=2).choices[0].text is not None


def test_attention_endpoint(url, loaded):
    model, tok = loaded
    r = httpx.post(f"{url}/v1/internal/attention", headers={"Authorization": f"Bearer {KEY}"},
                   json={"prompt": "To be or not", "layer": 1, "head": 0})
    assert r.status_code == 200
    out = r.json()
    w = torch.tensor(out["weights"])  # (T, T)
    assert out["tokens"] == list("To be or not") and w.shape == (12, 12)
    assert out["n_layer"] == 2 and out["n_head"] == 2
    torch.testing.assert_close(w.sum(-1), torch.ones(12), atol=1e-4, rtol=0)  # each row is a distribution
    assert torch.all(w.triu(1) == 0)  # causal: nobody looks ahead
    r = httpx.post(f"{url}/v1/internal/attention", headers={"Authorization": f"Bearer {KEY}"},
                   json={"token_ids": [1, 2], "layer": 5})
    assert r.status_code == 400 and "layer" in r.json()["error"]["message"]


def test_health_answers_during_long_generation_and_disconnect_frees_slot(client, url):
    before = health(url)
    long = threading.Thread(target=lambda: client.completions.create(model=NAME, prompt="A", max_tokens=1000))
    long.start()
    deadline = time.time() + 20
    while health(url)["active"] == 0:
        assert time.time() < deadline
    t0 = time.perf_counter()
    h = health(url)
    assert h["active"] >= 1 and time.perf_counter() - t0 < 1.0  # answered while the model runs
    long.join()

    # a streaming client that hangs up mid-answer gives its slot back
    with httpx.stream("POST", f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": NAME, "prompt": "B", "max_tokens": 1000, "stream": True}) as resp:
        for i, _ in enumerate(resp.iter_lines()):
            if i >= 3:
                break
    deadline = time.time() + 20
    while (h := health(url))["active"] != 0:
        assert time.time() < deadline, h
        time.sleep(0.02)
    assert h["cancelled"] == before["cancelled"] + 1
    assert h["tokens_generated"] - before["tokens_generated"] < 2000  # the second answer was cut short

    # so does a non-streaming client that gives up waiting (8 choices x 1000 tokens: seconds of work)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": NAME, "prompt": "C", "max_tokens": 1000, "n": 8},
                   timeout=httpx.Timeout(30, read=0.5))
    deadline = time.time() + 20
    while (h2 := health(url))["active"] != 0:
        assert time.time() < deadline, h2
        time.sleep(0.02)
    assert h2["cancelled"] == h["cancelled"] + 8


PROMPTS = ["Line " + chr(65 + i % 26) * (1 + i % 7) for i in range(50)]  # prompts of different lengths


def test_50_concurrent_streams_complete_without_errors(url):
    async def main():
        aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)

        async def one(i: int) -> tuple[str, str]:
            stream = await aclient.completions.create(model=NAME, prompt=PROMPTS[i], max_tokens=16,
                                                      temperature=0.8, seed=i, stream=True)
            text, reason = "", None
            async for chunk in stream:
                text += chunk.choices[0].text
                reason = chunk.choices[0].finish_reason or reason
            return text, reason

        try:
            return await asyncio.gather(*(one(i) for i in range(50)), return_exceptions=True)
        finally:
            await aclient.close()

    results = asyncio.run(main())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    assert all(reason == "length" and len(text) > 0 for text, reason in results)
    assert health(url)["active"] == 0


def test_cli_serve_binds_loopback_and_prints_url(run_dir):
    port = free_port()
    env = {**os.environ, "LMFORGE_API_KEY": ""}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--run", str(run_dir), "--port", str(port),
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in line
        deadline = time.time() + 30
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.time() < deadline and proc.poll() is None
                time.sleep(0.1)
        assert r.json()["model"] == run_dir.name
        page = httpx.get(f"http://127.0.0.1:{port}/")
        assert page.status_code == 200 and "<canvas" in page.text
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_max_context_caps_the_kv_cache_and_requests(loaded):
    model, tok = loaded
    app = create_app(model, tok, model_name=NAME, max_batch=2, max_context=32)
    with live_server(app) as base:
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=NAME, prompt="x" * 30, max_tokens=5)  # 35 > 32 < BLOCK
        assert e.value.code == "context_length_exceeded" and "32" in str(e.value)
        assert len(c.completions.create(model=NAME, prompt="x" * 20, max_tokens=5).choices[0].text) <= 5


def test_serve_adapter_answers_as_the_adapted_model(run_dir, tmp_path):
    """`lmforge serve --adapter DIR` loads the adapter onto the run: the chat route's greedy answer
    is the adapted model's, and differs from the base's."""
    import argparse

    from lmforge.adapters import save_adapter
    from lmforge.checkpoint import load_run, read_run_config
    from lmforge.cli.serve import register
    from lmforge.cli.sample import load_for_inference
    from lmforge.nn.lora import apply_lora

    model, _ = load_run(run_dir, inference=False)
    apply_lora(model, ["attn.qkv", "attn.proj"], r=4, alpha=8, dropout=0.0)
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    save_adapter(model, tmp_path / "ad", base_config=read_run_config(run_dir))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--run", str(run_dir), "--adapter", str(tmp_path / "ad")])
    adapted, tok = load_for_inference(args)
    msgs = [{"role": "user", "content": "Who art thou?"}]
    prompt = render_chat([(m["role"], m["content"]) for m in msgs])
    ref_model, _ = lmforge.load(run_dir, adapter=tmp_path / "ad")
    expected = lmforge.generate(ref_model, tok, prompt, max_new_tokens=15, temperature=0, stop=["\nUser:", "\nSystem:"])
    base_model, _ = lmforge.load(run_dir)
    assert expected != lmforge.generate(base_model, tok, prompt, max_new_tokens=15, temperature=0,
                                        stop=["\nUser:", "\nSystem:"])  # the adapter matters
    with live_server(create_app(adapted, tok, model_name=NAME)) as base:
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)
        r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=15, temperature=0)
    assert r.choices[0].message.content == expected
