"""Instruction fine-tuning data: the three record formats, the held-out split, over-long
examples, bad input (FILE:LINE, exit 2, nothing under --out), and the answer mask for every
template style (checked against transformers' rendering). Float32 throughout."""

import json

import numpy as np
import pytest

from lmforge.chat import ChatFormat, chat_format
from lmforge.cli.main import main
from lmforge.generation import eos_ids
from lmforge.sft import hold_out, load_examples, read_conversations
from lmforge.sft.render import encode_conversation
from lmforge.tokenizers import CharTokenizer
from sft_common import FAST, _convs, chat, runs, sums, tok, write_jsonl  # noqa: F401 (fixtures)


# --- formats ------------------------------------------------------------------------------------

def test_three_formats_read_as_conversations(tmp_path):
    jsonl = write_jsonl(tmp_path / "mixed.jsonl", [
        chat("Hi", "Hello", system="Be brief."),
        {"prompt": "2+2=", "completion": "4"},
        {"instruction": "Translate", "input": "Hallo", "output": "Hello"},
        {"instruction": "Say yes", "output": "yes"},
    ])
    convs = read_conversations(jsonl)
    assert [c.where for c in convs] == [f"{jsonl}:{i}" for i in (1, 2, 3, 4)]
    assert [m["role"] for m in convs[0].messages] == ["system", "user", "assistant"]
    assert convs[1].messages == ({"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"})
    assert convs[2].messages[0]["content"] == "Translate\n\nHallo"
    assert convs[3].messages == ({"role": "user", "content": "Say yes"}, {"role": "assistant", "content": "yes"})
    # Alpaca as a JSON array: each record keeps the line it starts on
    arr = tmp_path / "alpaca.json"
    arr.write_text('[\n  {"instruction": "a", "output": "b"},\n\n  {"instruction": "c",\n   "output": "d"}\n]\n')
    assert [c.where for c in read_conversations(arr)] == [f"{arr}:2", f"{arr}:4"]



def test_hold_out_is_seeded_five_percent(tok):
    fmt = ChatFormat(None, eos_ids(tok))
    exs = [encode_conversation(c, tok, fmt) for c in _convs(sums(100))]
    train, val = hold_out(exs, seed=3)
    assert len(val) == 5 and len(train) == 95
    assert {id(e) for e in train}.isdisjoint(id(e) for e in val)
    assert [e.conversation.where for e in hold_out(exs, seed=3)[1]] == [e.conversation.where for e in val]
    assert [e.conversation.where for e in hold_out(exs, seed=4)[1]] != [e.conversation.where for e in val]


def _convs(records, name="x.jsonl"):
    from lmforge.sft.records import Conversation
    return [Conversation(tuple(r["messages"]), f"{name}:{i + 1}") for i, r in enumerate(records)]


def test_overlong_truncated_or_dropped_and_counted(tmp_path, tok, runs):
    long = chat("Tell me a story.", "Once upon a time " * 30)
    path = write_jsonl(tmp_path / "d.jsonl", sums(6) + [long])
    fmt = chat_format(tok, runs["plain"])
    cut = load_examples(path, tok, fmt, max_length=40, overlong="truncate")
    assert (cut.truncated, cut.dropped, len(cut)) == (1, 0, 7) and max(len(e) for e in cut) == 40
    dropped = load_examples(path, tok, fmt, max_length=40, overlong="drop")
    assert (dropped.truncated, dropped.dropped, len(dropped)) == (0, 1, 6)
    assert "1 dropped as longer than --max-length 40" in dropped.summary(40)


# --- bad input ----------------------------------------------------------------------------------

GOOD = json.dumps(chat("What is 1 plus 1?", "2"))
BAD = {
    "not JSON": (GOOD + "\n{not json\n", 2, "not valid JSON"),
    "unknown role": (GOOD + "\n" + GOOD + "\n" + json.dumps({"messages": [
        {"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}) + "\n", 3, "unknown role 'robot'"),
    "empty answer": (json.dumps(chat("hi", "  ")) + "\n", 1, "empty assistant turn"),
    "missing answer": (GOOD + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n", 2,
                       "no assistant turn"),
    "missing completion": (json.dumps({"prompt": "hi"}) + "\n", 1, "'completion' is missing"),
    "prompt too long": (GOOD + "\n" + json.dumps(chat("word " * 80, "ok")) + "\n", 2, "the prompt alone is"),
    "no usable example": ("\n\n", None, "no usable example"),
    "all dropped": (json.dumps(chat("Hi", "answer " * 80)) + "\n", None, "no usable example (1 longer than"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, runs, capsys, case):
    text, line, message = BAD[case]
    data = tmp_path / "bad.jsonl"
    data.write_text(text, encoding="utf-8")
    extra = ["--overlong", "drop"] if case == "all dropped" else []
    out = tmp_path / "out"
    rc = main(["finetune", "--base", str(runs["plain"]), "--data", str(data), "--out", str(out),
               "--max-length", "48", *extra, *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert err.count("\n") == 1 and message in err
    assert (f"{data}:{line}:" if line else f"{data}:") in err


def test_missing_file_and_byte_order_mark(tmp_path, runs, tok, capsys):
    rc = main(["finetune", "--base", str(runs["plain"]), "--data", str(tmp_path / "nope.jsonl"), "--out",
               str(tmp_path / "out"), *FAST])
    assert rc == 2 and "data file not found" in capsys.readouterr().err and not (tmp_path / "out").exists()
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + (GOOD + "\n").encode())
    assert len(read_conversations(bom)) == 1


def test_sft_options_need_a_file(tmp_path, runs, capsys):
    (tmp_path / "dir").mkdir()
    rc = main(["finetune", "--base", str(runs["plain"]), "--data", str(tmp_path / "dir"), "--out",
               str(tmp_path / "out"), "--pack", *FAST])
    assert rc == 2 and "--pack applies to an instruction data file" in capsys.readouterr().err
    data = write_jsonl(tmp_path / "d.jsonl", sums(4))
    rc = main(["finetune", "--base", str(runs["plain"]), "--data", str(data), "--out", str(tmp_path / "out"),
               "--max-length", "65", *FAST])
    assert rc == 2 and "--max-length must be between 2 and the model's block_size 64" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- the answer mask, per template style ----------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "Be brief; answer in German."},
    {"role": "user", "content": "Wie ist das Wetter in München?"},
    {"role": "assistant", "content": "Sonnig, 25 °C."},
    {"role": "user", "content": "Und morgen?"},
    {"role": "assistant", "content": "Regen 🌦"},
]
ANSWERS = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]


def runs_of(ids, flags):
    """Maximal runs of consecutive ids whose flag is True."""
    out, cur = [], []
    for i, f in zip(ids, flags):
        if f:
            cur.append(i)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def check_mask(ex, tok, expected_answers, prompts_text):
    """Each answer decodes to its expected text, and the tokens before answer k decode to the
    rendering of the conversation up to it with the generation prompt."""
    ids, answer = ex.ids.tolist(), ex.answer.tolist()
    assert [tok.decode(r) for r in runs_of(ids, answer)] == expected_answers
    starts = [k for k in range(len(ids)) if answer[k] and (k == 0 or not answer[k - 1])]
    assert [tok.decode(ids[:s]) for s in starts] == prompts_text
    # the loss counts the answers and nothing else; --train-on-prompt counts every token
    x, y = ex.inputs_and_targets()
    assert (y != -1).tolist() == answer[1:]
    assert (y[y != -1] == np.array(ids[1:])[np.array(answer[1:])]).all()


def test_mask_plain_default_with_and_without_eos(tok, shakespeare_text):
    conv = _convs([{"messages": CONVERSATION}])[0]
    ex = encode_conversation(conv, tok, ChatFormat(None, eos_ids(tok)), check_edges=True)
    head = "System: Be brief; answer in German.\nUser: Wie ist das Wetter in München?\nAssistant:"
    check_mask(ex, tok, [" Sonnig, 25 °C.<|endoftext|>", " Regen 🌦<|endoftext|>"],
               [head, head + " Sonnig, 25 °C.<|endoftext|>\nUser: Und morgen?\nAssistant:"])
    assert ex.edges_match
    # a character tokenizer has no end-of-text token: the answer's line ends at its newline
    chars = CharTokenizer.train(shakespeare_text[:5000] + "".join(m["content"] for m in CONVERSATION))
    ex = encode_conversation(conv, chars, ChatFormat(None, eos_ids(chars)))
    check_mask(ex, chars, [" Sonnig, 25 °C.\n", " Regen 🌦\n"],
               [head, head + " Sonnig, 25 °C.\nUser: Und morgen?\nAssistant:"])
    assert chars.decode(ex.ids.tolist()).endswith("Assistant: Regen 🌦\n")


def test_mask_every_template_style(tmp_path):
    """The four styles of tests/test_chat_template.py, rendered by transformers as the reference."""
    pytest.importorskip("transformers")
    from test_chat_template import STYLES, hf_tokenizer
    from transformers import AutoTokenizer

    from lmforge.chat import read_hf_chat_template
    from lmforge.interop.hf_tokenizer import read_hf_tokenizer

    # the answer as each template writes it, through its end-of-turn token (what follows it, such
    # as ChatML's newline, belongs to the next turn's prompt)
    ends = {"chatml": ("", "<|im_end|>"), "headers": ("", "<|eot_id|>"), "turns": ("", "<end_of_turn>"),
            "inst": (" ", "</s>")}
    for style in STYLES:
        d = tmp_path / style
        hf_tokenizer(style).save_pretrained(d)
        theirs = AutoTokenizer.from_pretrained(d)
        tk, fmt = read_hf_tokenizer(d), ChatFormat(read_hf_chat_template(d))
        conv = _convs([{"messages": CONVERSATION}])[0]
        ex = encode_conversation(conv, tk, fmt, check_edges=True)
        whole = theirs.apply_chat_template(CONVERSATION, tokenize=True)
        whole = list(whole["input_ids"]) if isinstance(whole, dict) or hasattr(whole, "keys") else list(whole)
        assert ex.ids.tolist() == whole, style  # segment by segment = the whole text, id for id
        before, after = ends[style]
        prompts = [theirs.apply_chat_template(CONVERSATION[:i], tokenize=False, add_generation_prompt=True)
                   for i in (2, 4)]
        check_mask(ex, tk, [before + a + after for a in ANSWERS], prompts)


GENERATION_CHATML = (
    "{%- for message in messages %}{%- if message['role'] == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def test_mask_equals_transformers_assistant_mask(tmp_path):
    """A template that marks its answers with {% generation %} lets transformers compute the
    assistant mask itself (return_assistant_tokens_mask): ours, found from the rendering alone,
    must be the same token for token."""
    pytest.importorskip("transformers")
    from test_chat_template import hf_tokenizer

    from lmforge.chat import read_hf_chat_template
    from lmforge.interop.hf_tokenizer import read_hf_tokenizer

    hf = hf_tokenizer("chatml")
    hf.chat_template = GENERATION_CHATML
    hf.save_pretrained(tmp_path)
    theirs = hf.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    tk, fmt = read_hf_tokenizer(tmp_path), ChatFormat(read_hf_chat_template(tmp_path))
    ex = encode_conversation(_convs([{"messages": CONVERSATION}])[0], tk, fmt)
    assert ex.ids.tolist() == list(theirs["input_ids"])
    assert ex.answer.astype(int).tolist() == list(theirs["assistant_masks"])
    assert sum(theirs["assistant_masks"]) > 10


# --- batches ------------------------------------------------------------------------------------
