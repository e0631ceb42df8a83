"""Chatting with a run: `lmforge chat` driven through stdin, `lmforge sample --chat`, the server's
chat route with the run's own template, and stopping at the first of several EOS ids. Each
answer is checked against the library's greedy generation on the same rendered prompt."""

import io
import json
import shutil
import sys

import pytest
import torch

tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("transformers")
from fastapi.testclient import TestClient  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import decoders, pre_tokenizers, trainers  # noqa: E402
from tokenizers.models import BPE  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

import lmforge  # noqa: E402
from lmforge.chat import (ChatTemplate, chat_format, read_hf_chat_template, render_plain,  # noqa: E402
                          save_chat_template)
from lmforge.checkpoint import save_run  # noqa: E402
from lmforge.cli.main import main  # noqa: E402
from lmforge.interop.hf_tokenizer import read_hf_tokenizer  # noqa: E402
from lmforge.models.decoding import generate_ids  # noqa: E402
from lmforge.models.gpt import GPT, GPTConfig  # noqa: E402
from lmforge.serve import create_app  # noqa: E402
from lmforge.tokenizers import CharTokenizer  # noqa: E402

CHATML = """{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
N = 12  # tokens per answer


def write_run(d, tok, chat: ChatTemplate | None = None, eos=None):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():  # weights large enough that the answer depends on the whole context
        for w in model.parameters():
            if w.dim() == 2:
                w.normal_(0, 0.3)
    extra = {} if eos is None else {"generation": {"bos_token_id": None, "eos_token_id": eos}}
    save_run(d, model, tok, extra)
    if chat is not None:
        save_chat_template(chat, d)
    return d


@pytest.fixture(scope="module")
def template_run(tmp_path_factory):
    """A run as import-hf leaves one: a tokenizer.json BPE with ChatML's special tokens, the template
    read from the Hugging Face directory, and two EOS ids in the generation config."""
    hf = tmp_path_factory.mktemp("hf")
    tk = HFTokenizer(BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    text = "Hello there, how are you? I am well, thank you. What is the weather like today? " * 30
    tk.train_from_iterator([text], trainers.BpeTrainer(vocab_size=320, special_tokens=["<|im_start|>", "<|im_end|>",
                                                                                        "<|endoftext|>"],
                                                       show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tk, chat_template=CHATML).save_pretrained(hf)
    tok = read_hf_tokenizer(hf)
    eos = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    return write_run(tmp_path_factory.mktemp("run"), tok, read_hf_chat_template(hf), eos)


def reference(run, messages, **kw) -> str:
    """The greedy answer the library gives for this conversation."""
    model, tok = lmforge.load(run)
    fmt = chat_format(tok, run)
    return lmforge.generate(model, tok, fmt.prompt_ids(tok, messages), max_new_tokens=N, temperature=0,
                            stop=fmt.stop_strings, stop_ids=fmt.eos_ids, **kw)


def chat_cli(monkeypatch, capsys, run, lines: str, *extra) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    code = main(["chat", "--run", str(run), "--temperature", "0", "--max-new-tokens", str(N), *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def user(text):
    return {"role": "user", "content": text}


def test_chat_keeps_history_resets_and_ends_at_eof(template_run, monkeypatch, capsys):
    u1, u2 = "Hello there", "What is the weather like today?"
    a1 = reference(template_run, [user(u1)])
    a2 = reference(template_run, [user(u1), {"role": "assistant", "content": a1.strip()}, user(u2)])
    fresh = reference(template_run, [user(u2)])
    assert a2 != fresh  # the history changes the answer, so the test can tell whether it was kept
    code, out, err = chat_cli(monkeypatch, capsys, template_run, f"{u1}\n\n{u2}\n/reset\n{u2}\n")
    assert code == 0 and err == ""
    assert out == f"{a1.lstrip()}\n{a2.lstrip()}\n(conversation cleared)\n{fresh.lstrip()}\n"


def test_chat_with_a_draft_answers_as_the_model_alone(template_run, tmp_path, monkeypatch, capsys):
    """Greedy speculative decoding changes the speed, never the answer."""
    model, tok = lmforge.load(template_run)
    torch.manual_seed(3)  # a smaller random model with the same tokenizer: it proposes other tokens
    save_run(tmp_path / "draft", GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=1, n_head=2,
                                               n_embd=16)), tok)
    draft = tmp_path / "draft"
    u1, u2 = "Hello there", "What is the weather like today?"
    lines = f"{u1}\n{u2}\n"
    plain = chat_cli(monkeypatch, capsys, template_run, lines)
    code, out, err = chat_cli(monkeypatch, capsys, template_run, lines, "--draft", str(draft), "--draft-tokens", "3")
    assert code == 0 and err == "" and out == plain[1] and out.count("\n") == 2


def test_chat_plain_format_with_a_system_message(tmp_path, shakespeare_text, monkeypatch, capsys):
    """A run without a template: the plain User:/Assistant: format, the same as the server's."""
    run = write_run(tmp_path / "run", CharTokenizer.train(shakespeare_text))
    model, tok = lmforge.load(run)
    fmt = chat_format(tok, run)
    assert fmt.template is None and fmt.stop_strings == ("\nUser:", "\nSystem:")
    msgs = [{"role": "system", "content": "Speak in verse."}, user("Who art thou?")]
    assert fmt.render(msgs) == "System: Speak in verse.\nUser: Who art thou?\nAssistant:" == render_plain(msgs)
    answer = reference(run, msgs)
    code, out, _ = chat_cli(monkeypatch, capsys, run, "Who art thou?\n", "--system", "Speak in verse.")
    assert code == 0 and out == answer.lstrip() + "\n"


def test_chat_reports_a_refusing_template_and_goes_on(template_run, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(template_run, run)
    refusing = "{% for m in messages %}{% if 'secret' in m.content %}{{ raise_exception('no secrets here') }}" \
               "{% endif %}{% endfor %}" + CHATML
    save_chat_template(ChatTemplate(refusing), run)
    answer = reference(run, [user("Hello there")])
    code, out, err = chat_cli(monkeypatch, capsys, run, "tell me a secret\nHello there\n/nope\n")
    assert code == 0
    assert "the chat template refused the conversation: no secrets here" in err and "unknown command /nope" in err
    assert out == answer.lstrip() + "\n"  # the refused message did not stay in the history


def test_sample_chat(template_run, capsys):
    msgs = [{"role": "system", "content": "Be kind."}, user("How are you?")]
    answer = reference(template_run, msgs)
    assert main(["sample", "--run", str(template_run), "--chat", "--system", "Be kind.", "--prompt", "How are you?",
                 "--temperature", "0", "--max-new-tokens", str(N)]) == 0
    assert capsys.readouterr().out == answer.strip() + "\n"
    assert main(["sample", "--run", str(template_run), "--chat", "--system", "Be kind.", "--prompt", "How are you?",
                 "--temperature", "0", "--max-new-tokens", str(N), "--stream"]) == 0
    assert capsys.readouterr().out == answer.lstrip() + "\n"
    assert main(["sample", "--run", str(template_run), "--system", "x"]) == 2
    assert "--system needs --chat" in capsys.readouterr().err


def first_positions(ids: list[int]) -> dict[int, int]:
    pos: dict[int, int] = {}
    for i, t in enumerate(ids):
        pos.setdefault(t, i)
    return pos


def test_generation_stops_at_whichever_eos_id_comes_first(template_run, tmp_path, capsys):
    model, tok = lmforge.load(template_run)
    msgs = [user("Hello there")]
    prompt = chat_format(tok, template_run).prompt_ids(tok, msgs)
    # what the model says with nothing to stop it
    free = generate_ids(model, torch.tensor([prompt]), 40, temperature=0.0)[0, len(prompt):].tolist()
    firsts = sorted((p, t) for t, p in first_positions(free).items() if p >= 2)
    (p1, early), (p2, late) = firsts[0], firsts[-1]
    assert p1 < p2
    run = tmp_path / "run"
    shutil.copytree(template_run, run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["generation"]["eos_token_id"] = [late, early]  # the list's order does not matter: the first seen stops
    (run / "config.json").write_text(json.dumps(cfg))
    fmt = chat_format(tok, run)
    assert {early, late} <= fmt.eos_ids
    expected = tok.decode(free[:p1])
    assert lmforge.generate(model, tok, prompt, max_new_tokens=40, temperature=0, stop_ids=fmt.eos_ids) == expected
    assert main(["sample", "--run", str(run), "--chat", "--prompt", "Hello there", "--temperature", "0",
                 "--max-new-tokens", "40"]) == 0
    assert capsys.readouterr().out == expected.strip() + "\n"
    # the server stops there too, on the chat route and on plain completions
    app = create_app(model, tok, model_name="m", chat=fmt)
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={"model": "m", "messages": msgs, "max_tokens": 40,
                                                      "temperature": 0}).json()
        assert r["choices"][0]["message"]["content"] == expected and r["choices"][0]["finish_reason"] == "stop"
        r = client.post("/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 40,
                                                 "temperature": 0}).json()
        assert r["choices"][0]["text"] == expected and r["choices"][0]["finish_reason"] == "stop"


def test_serve_chat_route_renders_the_runs_template(template_run):
    model, tok = lmforge.load(template_run)
    fmt = chat_format(tok, template_run)
    msgs = [{"role": "developer", "content": "Be brief."}, user("Hello there"),
            {"role": "assistant", "content": "Hi."}, user("How are you?")]
    as_system = [{"role": "system", "content": "Be brief."}] + msgs[1:]  # developer counts as system
    ids = fmt.prompt_ids(tok, as_system)
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert ids.count(start) == 5 and ids.count(end) == 4  # special tokens as single ids
    expected = reference(template_run, as_system)
    with TestClient(create_app(model, tok, model_name="m", chat=fmt)) as client:
        r = client.post("/v1/chat/completions", json={"model": "m", "messages": msgs, "max_tokens": N,
                                                      "temperature": 0, "return_token_ids": True}).json()
        assert r["choices"][0]["message"]["content"] == expected
        assert r["choices"][0]["prompt_token_ids"] == ids and r["usage"]["prompt_tokens"] == len(ids)
        # the template refusing a conversation is a 400 with its message
        refusing = ChatTemplate("{{ raise_exception('only one user turn, please') }}")
        with TestClient(create_app(model, tok, model_name="m", chat=type(fmt)(refusing, fmt.eos_ids))) as c2:
            r = c2.post("/v1/chat/completions", json={"model": "m", "messages": msgs})
            assert r.status_code == 400 and "only one user turn, please" in r.json()["error"]["message"]
