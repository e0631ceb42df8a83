"""A model's own chat template: a Jinja2 program that turns a list of messages into the text the
model was trained to continue. Rendered in a sandbox configured as transformers configures it
(`apply_chat_template(..., tokenize=False)` gives the same string), read from a Hugging Face
directory, and kept in a run directory beside the tokenizer.

    RUN/chat_template.jinja   the default template (what transformers reads too)
    RUN/chat_template.json    {"templates": {"tool_use": "..."}, "special_tokens": {"bos_token": "<s>"}}
                              (only when there are named extras or special-token strings)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import LMForgeError
from ..fileio import atomic_open, read_json, write_json

TEMPLATE_FILE = "chat_template.jinja"
EXTRAS_FILE = "chat_template.json"  # lmforge's own, in a run directory
HF_EXTRAS_DIR = "additional_chat_templates"  # transformers' folder for named templates
# the special-token strings transformers hands every template (its SPECIAL_TOKENS_ATTRIBUTES)
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # a template name that is safe as a file name
_REASONING = ("reasoning_content", "thinking", "reasoning")  # names transformers aliases for templates


# --- the sandbox ------------------------------------------------------------------------------

class _Refused(jinja2.TemplateError):
    """raise_exception(...) called by the template itself: the conversation is not one it accepts."""


def _raise_exception(message: str):
    raise _Refused(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; templates want plain JSON, non-ASCII kept
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _dict(*args, **kwargs) -> dict:
    return dict(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """namespace() that refuses underscore names, so a template cannot reach Python internals."""

    def __init__(*args, **kwargs):  # Jinja's own signature trick: namespace(self=...) still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's text in some templates;
    rendering keeps the body as it is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_dict,
                       namespace=_Namespace)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise LMForgeError(f"the chat template does not parse (line {e.lineno}: {e.message}); "
                           "fix chat_template.jinja") from None


def _plain(value: Any) -> Any:
    """What a template may see: plain JSON-like values only (a pydantic model becomes its dict,
    anything else a '<TypeName>' placeholder), copied, so rendering never touches the caller's data."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for kind in (str, int, float):
        if isinstance(value, kind):  # a subclass (an enum, a numpy scalar) may carry methods
            return kind(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _message(m: Any) -> dict:
    """A message as transformers hands it over: keys whose value is None dropped, reasoning
    also under `thinking` and `reasoning_content`."""
    m = _plain(m)
    if not isinstance(m, dict):
        raise LMForgeError(f"a chat message must be a dict with 'role' and 'content', not {m!r}")
    m = {k: v for k, v in m.items() if v is not None}
    reasoning = next((m[k] for k in _REASONING if m.get(k) is not None), None)
    if reasoning is not None:
        m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
    return m


# --- the template ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ChatTemplate:
    """The default template's source, other named ones (e.g. "tool_use"), and the special-token
    strings the template reads as variables (bos_token, eos_token, ...)."""

    source: str
    named: Mapping[str, str] = field(default_factory=dict)
    special_tokens: Mapping[str, str] = field(default_factory=dict)

    def variant(self, name: str) -> ChatTemplate:
        """The same tokens with the named template ("default" is the source itself)."""
        if name == "default":
            return self
        if name not in self.named:
            raise LMForgeError(f"no chat template named {name!r}; this model has {['default', *sorted(self.named)]}")
        return ChatTemplate(self.named[name], {"default": self.source, **self.named}, self.special_tokens)

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               **extra_vars: Any) -> str:
        """messages [{"role": "user", "content": "Hi"}, ...] -> the prompt text. extra_vars reach
        the template as variables and override the special tokens; `tools` picks the "tool_use"
        template when there is one, as transformers does."""
        if not messages:
            raise LMForgeError("a chat needs at least one message")
        tools, documents = extra_vars.pop("tools", None), extra_vars.pop("documents", None)
        source = self.named["tool_use"] if tools is not None and "tool_use" in self.named else self.source
        variables = _plain({**self.special_tokens, **extra_vars})
        try:
            return _compile(source).render(messages=[_message(m) for m in messages], tools=_plain(tools),
                                           documents=_plain(documents),
                                           add_generation_prompt=add_generation_prompt, **variables)
        except _Refused as e:
            raise LMForgeError(f"the chat template refused the conversation: {e.message}") from None
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:
            raise LMForgeError(f"the chat template failed on this conversation ({type(e).__name__}: {e})") from None


# --- files ------------------------------------------------------------------------------------

def _token_string(value: Any) -> str | None:
    """tokenizer_config.json writes a special token as "<s>" or {"content": "<s>", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _check_names(named: Mapping[str, str], where: str) -> None:
    for name, source in named.items():
        if not isinstance(name, str) or not _NAME.match(name) or not isinstance(source, str):
            raise LMForgeError(f"{where}: chat template {name!r} needs a plain name (letters, digits, _ . -) "
                               "and a template string")


def read_hf_chat_template(hf_dir: str | Path) -> ChatTemplate | None:
    """A Hugging Face model directory's chat template, or None when it has none: chat_template.jinja
    first, else tokenizer_config.json's "chat_template" (a string, or a list of {"name", "template"}
    whose "default" is used), plus additional_chat_templates/NAME.jinja; the special-token strings
    come from tokenizer_config.json (or special_tokens_map.json)."""
    d = Path(hf_dir)
    cfg_path = d / "tokenizer_config.json"
    cfg = read_json(cfg_path, "tokenizer config") if cfg_path.is_file() else {}
    if not isinstance(cfg, dict):
        raise LMForgeError(f"{cfg_path} must hold a JSON object")
    named: dict[str, str] = {}
    entry = cfg.get("chat_template")
    if isinstance(entry, str):
        named["default"] = entry
    elif isinstance(entry, list):
        for item in entry:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise LMForgeError(f"{cfg_path}: chat_template lists {item!r}; each entry needs 'name' and 'template'")
            named[item["name"]] = item.get("template")
    elif entry is not None:
        raise LMForgeError(f"{cfg_path}: chat_template must be a string or a list of named templates")
    extras = d / HF_EXTRAS_DIR
    if extras.is_dir():
        named.update({p.stem: p.read_text(encoding="utf-8") for p in sorted(extras.glob("*.jinja"))})
    if (d / TEMPLATE_FILE).is_file():
        named["default"] = (d / TEMPLATE_FILE).read_text(encoding="utf-8")
    if not named:
        return None
    _check_names(named, str(d))
    if "default" not in named:
        raise LMForgeError(f"{d} has chat templates {sorted(named)} but none named 'default'; "
                           f"add {TEMPLATE_FILE} or name one of them 'default'")
    specials: dict[str, str] = {}
    map_path = d / "special_tokens_map.json"
    for source in (read_json(map_path, "special tokens map") if map_path.is_file() else {}, cfg):
        if isinstance(source, dict):
            specials.update({n: s for n in SPECIAL_NAMES if (s := _token_string(source.get(n))) is not None})
    default = named.pop("default")
    return ChatTemplate(default, named, specials)


def save_chat_template(chat: ChatTemplate, run_dir: str | Path) -> None:
    """Keep a chat template in a run directory (each file written atomically)."""
    run_dir = Path(run_dir)
    _check_names(chat.named, str(run_dir))
    with atomic_open(run_dir / TEMPLATE_FILE) as f:
        f.write(chat.source)
    extras = run_dir / EXTRAS_FILE
    if chat.named or chat.special_tokens:
        write_json(extras, {"templates": dict(chat.named), "special_tokens": dict(chat.special_tokens)})
    elif extras.exists():  # left by an earlier template: it would add stale names
        extras.unlink()


def load_chat_template(run_dir: str | Path) -> ChatTemplate | None:
    """The run's chat template, or None for a model without one."""
    run_dir = Path(run_dir)
    if not (run_dir / TEMPLATE_FILE).is_file():
        return None
    source = (run_dir / TEMPLATE_FILE).read_text(encoding="utf-8")
    extras = read_json(run_dir / EXTRAS_FILE, "chat template extras") if (run_dir / EXTRAS_FILE).is_file() else {}
    named, specials = extras.get("templates", {}), extras.get("special_tokens", {})
    if not isinstance(named, dict) or not isinstance(specials, dict) or \
            not all(isinstance(v, str) for v in specials.values()):
        raise LMForgeError(f"{run_dir / EXTRAS_FILE} is not a chat template extras file; "
                           "delete it or re-import the model")
    _check_names(named, str(run_dir / EXTRAS_FILE))
    return ChatTemplate(source, named, specials)


def write_hf_chat_template(chat: ChatTemplate, hf_dir: str | Path) -> None:
    """Write the template where transformers reads it: chat_template.jinja, and each named extra
    as additional_chat_templates/NAME.jinja. (The special-token strings live in the exported
    tokenizer_config.json.)"""
    hf_dir = Path(hf_dir)
    _check_names(chat.named, str(hf_dir))
    with atomic_open(hf_dir / TEMPLATE_FILE) as f:
        f.write(chat.source)
    for name, source in chat.named.items():
        with atomic_open(hf_dir / HF_EXTRAS_DIR / f"{name}.jinja") as f:
            f.write(source)
