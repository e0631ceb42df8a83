"""Chat templates rendered by lmforge and by transformers' apply_chat_template, string for string and
id for id. The templates are written here in the common styles (ChatML, header tokens, turns with
a "model" role, [INST] with a system branch), as are the tokenizers they run on (trained in tmp)."""

import json
from datetime import datetime

import pytest

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import decoders, pre_tokenizers, processors, trainers  # noqa: E402
from tokenizers.models import BPE  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

from lmforge.chat import (ChatFormat, ChatTemplate, load_chat_template, read_hf_chat_template,  # noqa: E402
                          save_chat_template, write_hf_chat_template)
from lmforge.errors import LMForgeError  # noqa: E402
from lmforge.interop.hf_tokenizer import read_hf_tokenizer  # noqa: E402

CHATML = """{%- if messages[0]['role'] != 'system' %}
    {{- '<|im_start|>system\\nYou answer briefly.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

HEADERS = """{{- bos_token }}
{%- set date_string = strftime_now("%d %B %Y") %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today: " + date_string + "\\n" }}
{%- if tools is not none %}
    {{- "Tools:\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=2) + "\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message + "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

TURNS = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- set role = "model" if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\\n' }}
{%- endif -%}
"""

INST = """{%- set ns = namespace(system="") %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {%- set ns.system = message['content'] %}
        {%- break %}
    {%- endif %}
{%- endfor %}
{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {%- continue %}
    {%- elif message['role'] == 'user' %}
        {%- if ns.system and loop.first or ns.system and loop.index0 == 1 %}
            {{- '[INST] ' + ns.system + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] | trim + eos_token }}
    {%- else %}
        {{- raise_exception('Only system, user and assistant roles are supported, not ' + message['role'] + '!') }}
    {%- endif %}
{%- endfor %}
"""

# style -> (template, special tokens, whether the tokenizer's post-processor adds BOS)
STYLES = {
    "chatml": (CHATML, {"eos_token": "<|im_end|>"}, False),
    "headers": (HEADERS, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, True),
    "turns": (TURNS, {"bos_token": "<bos>", "eos_token": "<eos>"}, True),
    "inst": (INST, {"bos_token": "<s>", "eos_token": "</s>"}, True),
}
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<s>", "</s>"]
TEXT = ("Grüße aus München! The quick brown fox answers: how are you today? 你好，世界 "
        "system user assistant model INST tools weather Berlin ") * 20

CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "Hello, how are you?"}],
    "system + multi-turn": [
        {"role": "system", "content": "  Be brief; answer in German.  "},
        {"role": "user", "content": "Wie ist das Wetter in München?"},
        {"role": "assistant", "content": " Sonnig, 25 °C. "},
        {"role": "user", "content": "Und morgen?\nBitte mit Emoji 🌦"},
    ],
    "user, assistant": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
}


def hf_tokenizer(style: str) -> PreTrainedTokenizerFast:
    source, specials, adds_bos = STYLES[style]
    tk = HFTokenizer(BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if adds_bos:
        bos = specials["bos_token"]
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                          special_tokens=[(bos, tk.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, chat_template=source, **specials)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """style -> a directory holding that style's tokenizer and template, saved by transformers."""
    out = {}
    for style in STYLES:
        d = tmp_path_factory.mktemp(style)
        hf_tokenizer(style).save_pretrained(d)
        out[style] = d
    return out


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_equals_transformers(saved, style, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    theirs = AutoTokenizer.from_pretrained(saved[style])
    chat = read_hf_chat_template(saved[style])
    expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    ours = chat.render(messages, add_generation_prompt=add_generation_prompt)
    assert ours == expected
    # token ids: special tokens single ids, BOS once
    tok = read_hf_tokenizer(saved[style])
    ids = ChatFormat(chat).encode(tok, ours)
    want = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    assert ids == list(want["input_ids"])
    bos = STYLES[style][1].get("bos_token")
    if bos is not None:
        assert ids.count(tok.token_to_id(bos)) == 1 and ids[0] == tok.token_to_id(bos)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("last", ["Sure, the answer is", " spaced out  ", "Line one\nline two\n"])
def test_continue_final_message_equals_transformers(saved, style, last):
    """An assistant answer begun by the caller, continued rather than closed (lm-eval's
    gen_prefix), including contents a template strips."""
    messages = [*CONVERSATIONS["system + multi-turn"], {"role": "assistant", "content": last}]
    theirs = AutoTokenizer.from_pretrained(saved[style])
    expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                          continue_final_message=True)
    fmt = ChatFormat(read_hf_chat_template(saved[style]))
    assert fmt.render(messages, add_generation_prompt=False, continue_final_message=True) == expected
    with pytest.raises(LMForgeError, match="cannot also"):
        fmt.render(messages, continue_final_message=True)


def test_special_tokens_and_today_are_variables(saved):
    chat = read_hf_chat_template(saved["headers"])
    assert chat.special_tokens["bos_token"] == "<|begin_of_text|>"
    text = chat.render([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|begin_of_text|><|start_header_id|>system")
    assert f"Today: {datetime.now().strftime('%d %B %Y')}\n" in text
    # a variable given at render time overrides the file's special token
    assert chat.render([{"role": "user", "content": "Hi"}], bos_token="<B>").startswith("<B><|start")


def test_tojson_keeps_non_ascii_as_transformers_does(saved):
    tools = [{"type": "function", "function": {"name": "wetter", "description": "Wetter in München, °C & <HTML>",
                                               "parameters": {"stadt": "string"}}}]
    msgs = [{"role": "user", "content": "Wie warm ist es?"}]
    theirs = AutoTokenizer.from_pretrained(saved["headers"])
    expected = theirs.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=True)
    ours = read_hf_chat_template(saved["headers"]).render(msgs, tools=tools)
    assert ours == expected
    assert "München, °C & <HTML>" in ours and json.dumps(tools[0], ensure_ascii=False, indent=2) in ours


@pytest.mark.parametrize("style, messages, message", [
    ("turns", [{"role": "assistant", "content": "first"}], "Conversation roles must alternate"),
    ("turns", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     "Conversation roles must alternate"),
    ("inst", [{"role": "tool", "content": "42"}], "Only system, user and assistant roles are supported, not tool!"),
])
def test_raise_exception_is_a_user_error_with_the_templates_message(saved, style, messages, message):
    with pytest.raises(LMForgeError, match=message):
        read_hf_chat_template(saved[style]).render(messages)
    theirs = AutoTokenizer.from_pretrained(saved[style])
    with pytest.raises(Exception, match=message):  # transformers: jinja2's TemplateError, same message
        theirs.apply_chat_template(messages, tokenize=False)


def test_sandbox_and_bad_templates_are_user_errors():
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(LMForgeError, match="does not parse"):
        ChatTemplate("{% for m in messages %}{{ m['content'] }}").render(msgs)
    with pytest.raises(LMForgeError, match="failed"):
        ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}").render(msgs)
    with pytest.raises(LMForgeError, match="failed"):
        ChatTemplate("{% set ns = namespace(_secret=1) %}{{ ns._secret }}").render(msgs)
    with pytest.raises(LMForgeError, match="failed"):  # immutable sandbox: no appending to lists
        ChatTemplate("{% set x = [] %}{{ x.append(1) }}").render(msgs)
    with pytest.raises(LMForgeError, match="at least one message"):
        ChatTemplate("x").render([])
    # loop controls, trim_blocks / lstrip_blocks, {% generation %} as transformers configures them
    src = ("{% for m in messages %}\n  {% if loop.index > 2 %}{% break %}{% endif %}\n"
           "{% generation %}[{{ m.content }}]{% endgeneration %}\n{% endfor %}")
    msgs3 = [{"role": "user", "content": c} for c in "abc"]
    theirs = PreTrainedTokenizerFast(tokenizer_object=hf_tokenizer("chatml").backend_tokenizer, chat_template=src)
    assert ChatTemplate(src).render(msgs3) == theirs.apply_chat_template(msgs3, tokenize=False) == "[a][b]"
    # messages with None values: the key is dropped, as transformers does
    src = "{% for m in messages %}{{ 'tool_calls' in m }}{% endfor %}"
    assert ChatTemplate(src).render([{"role": "assistant", "content": "x", "tool_calls": None}]) == "False"


def test_named_templates_in_tokenizer_config_and_dict_special_tokens(saved, tmp_path):
    """The older layout: tokenizer_config.json's chat_template as a list of named templates, special
    tokens as {"content": ...} objects."""
    d = tmp_path / "hf"
    hf_tokenizer("inst").save_pretrained(d)
    (d / "chat_template.jinja").unlink()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    tool_use = "{{ bos_token }}TOOLS {{ tools | tojson }}{% for m in messages %} {{ m.content }}{% endfor %}"
    cfg["chat_template"] = [{"name": "default", "template": INST}, {"name": "tool_use", "template": tool_use}]
    cfg["bos_token"] = {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "__type": "AddedToken"}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    chat = read_hf_chat_template(d)
    assert chat.source == INST and set(chat.named) == {"tool_use"} and chat.special_tokens["bos_token"] == "<s>"
    theirs = AutoTokenizer.from_pretrained(d)
    msgs = CONVERSATIONS["system + multi-turn"]
    tools = [{"name": "uhr", "description": "die Uhrzeit in Zürich"}]
    assert chat.render(msgs) == theirs.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert chat.render(msgs, tools=tools) == theirs.apply_chat_template(msgs, tools=tools, tokenize=False)
    assert chat.render(msgs, tools=tools).startswith("<s>TOOLS [{")
    assert chat.variant("tool_use").render(msgs, tools=[]) == theirs.apply_chat_template(
        msgs, chat_template="tool_use", tools=[], tokenize=False)


def test_run_directory_and_export_round_trip(saved, tmp_path):
    chat = read_hf_chat_template(saved["headers"])
    chat = ChatTemplate(chat.source, {"tool_use": CHATML}, chat.special_tokens)
    run = tmp_path / "run"
    run.mkdir()
    assert load_chat_template(run) is None
    save_chat_template(chat, run)
    assert load_chat_template(run) == chat
    assert not list(run.glob(".*.tmp"))  # atomic writes leave nothing behind
    save_chat_template(ChatTemplate(CHATML), run)  # no extras: the earlier extras file goes
    assert not (run / "chat_template.json").exists() and load_chat_template(run) == ChatTemplate(CHATML)
    # export: transformers reads chat_template.jinja and additional_chat_templates/ beside the tokenizer
    out = tmp_path / "export"
    hf_tokenizer("headers").save_pretrained(out)
    (out / "chat_template.jinja").unlink()
    write_hf_chat_template(chat, out)
    theirs = AutoTokenizer.from_pretrained(out)
    msgs = CONVERSATIONS["system + multi-turn"]
    assert chat.render(msgs) == theirs.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert chat.variant("tool_use").render(msgs) == theirs.apply_chat_template(
        msgs, chat_template="tool_use", tokenize=False, add_generation_prompt=True)
    assert read_hf_chat_template(out).named == {"tool_use": CHATML}
    with pytest.raises(LMForgeError, match="plain name"):
        write_hf_chat_template(ChatTemplate("x", {"../evil": "y"}), out)
    assert read_hf_chat_template(tmp_path) is None  # no template anywhere: None
