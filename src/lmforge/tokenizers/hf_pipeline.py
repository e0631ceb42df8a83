"""The text stages of a Hugging Face tokenizer.json around its BPE model, as plain functions:
normalizer, pre-tokenizer, added tokens, decoder. Each reads its JSON entry and refuses, with
one clear line, any step or option it would not reproduce exactly."""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import regex

from ..errors import LMForgeError
from .byte_table import unicode_to_bytes
from .bpe import PATTERNS

# ByteLevel(use_regex=true) splits with GPT-2's regex; ours is the same split in tiktoken's dialect.
GPT2_REGEX = PATTERNS["gpt2"]


def _unsupported(what: str, spec: Any) -> LMForgeError:
    return LMForgeError(f"unsupported {what} {json.dumps(spec, ensure_ascii=False)[:120]}; "
                        "lmforge reads byte-level and SentencePiece-style BPE files (see docs/interop.md)")


def _string_or_regex(pattern: Any, what: str) -> str:
    """A {"String": s} or {"Regex": r} pattern as a regex for the `regex` module and tiktoken."""
    if isinstance(pattern, dict) and isinstance(pattern.get("String"), str):
        return regex.escape(pattern["String"])
    if isinstance(pattern, dict) and isinstance(pattern.get("Regex"), str):
        return tiktoken_regex(pattern["Regex"])
    raise _unsupported(what, pattern)


def tiktoken_regex(hf: str) -> str:
    """An Oniguruma regex from tokenizer.json -> the same split for tiktoken and `regex`.
    Oniguruma reads `X{1,3}+` as "one or more runs of 1-3 X" (the others: possessive), so
    such a regex is accepted only where it is one of lmforge's named patterns."""
    for pat in PATTERNS.values():
        if hf in (pat, regex.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", pat)):
            return pat
    if regex.search(r"\{\d+(?:,\d*)?\}\+", hf):
        raise LMForgeError(f"split regex {hf[:80]!r} uses X{{n,m}}+, which Oniguruma and tiktoken read "
                           "differently; write it as (?:X{n,m})+")
    try:
        regex.compile(hf)
    except regex.error as e:
        raise LMForgeError(f"split regex {hf[:80]!r} does not compile ({e})") from None
    return hf


def covering(pat: str) -> str:
    """`pat` plus the text between its matches, as `findall` pieces: the `tokenizers` library's
    Split(behavior=Isolated) keeps that text as pieces too, tiktoken and `findall` would drop it."""
    return f"(?:{pat})|(?:(?!(?:{pat}))[\\s\\S])+"


# --- normalizer --------------------------------------------------------------------------------
def normalizer(spec: Any) -> Callable[[str], str] | None:
    """tokenizer.json "normalizer" -> str -> str (None: leave text unchanged)."""
    if spec is None:
        return None
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "Sequence":
        steps = [f for f in map(normalizer, spec.get("normalizers", [])) if f is not None]
        if not steps:
            return None

        def run(text: str) -> str:
            for step in steps:
                text = step(text)
            return text
        return run
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return lambda text: unicodedata.normalize(kind, text)
    if kind == "Prepend" and isinstance(spec.get("prepend"), str):
        prefix = spec["prepend"]
        return lambda text: prefix + text if text else text
    if kind == "Replace" and isinstance(spec.get("content"), str):
        content, pattern = spec["content"], spec.get("pattern")
        if isinstance(pattern, dict) and isinstance(pattern.get("String"), str):
            old = pattern["String"]
            return lambda text: text.replace(old, content)
        compiled = regex.compile(_string_or_regex(pattern, "Replace pattern"))
        return lambda text: compiled.sub(lambda m: content, text)
    raise _unsupported("normalizer", spec)


# --- pre-tokenizer -----------------------------------------------------------------------------
@dataclass
class PreTokenizer:
    """What the pre-tokenizer does: Metaspace's rewrite (first), Isolated splits in order, and
    whether pieces are then drawn as bytes (ByteLevel)."""

    splits: list[str] = field(default_factory=list)   # regexes in tiktoken's dialect
    byte_level: bool = False
    metaspace: tuple[str, str] | None = None          # (replacement, prepend_scheme)

    @classmethod
    def from_json(cls, spec: Any) -> PreTokenizer:
        pre = cls()
        steps = spec.get("pretokenizers", []) if isinstance(spec, dict) and spec.get("type") == "Sequence" else \
            ([] if spec is None else [spec])
        for k, step in enumerate(steps):
            kind = step.get("type") if isinstance(step, dict) else None
            if pre.byte_level:
                raise _unsupported("pre-tokenizer step after ByteLevel", step)
            if kind == "ByteLevel":
                if step.get("add_prefix_space"):
                    raise LMForgeError("ByteLevel add_prefix_space=true is not supported "
                                       "(lmforge encodes text as given)")
                if step.get("use_regex", True):
                    pre.splits.append(GPT2_REGEX)
                pre.byte_level = True
            elif kind == "Split":
                if step.get("behavior") != "Isolated" or step.get("invert"):
                    raise _unsupported("Split (only behavior Isolated, invert false)", step)
                pre.splits.append(_string_or_regex(step.get("pattern"), "Split pattern"))
            elif kind == "Digits":
                pre.splits.append(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
            elif kind == "Metaspace" and k == 0:
                scheme = step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else "never")
                if scheme not in ("always", "first", "never"):
                    raise _unsupported("Metaspace prepend_scheme", step)
                pre.metaspace = (step.get("replacement", "▁"), scheme)
                if step.get("split", True):
                    r = regex.escape(pre.metaspace[0])
                    pre.splits.append(f"{r}(?:(?!{r})[\\s\\S])*|(?:(?!{r})[\\s\\S])+")
            else:
                raise _unsupported("pre-tokenizer step", step)
        return pre

    def rewrite(self, text: str, at_start: bool) -> str:
        """Metaspace: spaces become the replacement, which is prepended to a piece that starts
        the text ("first") or to every piece between added tokens ("always")."""
        if self.metaspace is None:
            return text
        rep, scheme = self.metaspace
        text = text.replace(" ", rep)
        if (scheme == "always" or (scheme == "first" and at_start)) and not text.startswith(rep):
            text = rep + text
        return text


def splitter(pats: list[str]) -> Callable[[str], list[str]]:
    """Apply Isolated splits one after another: text -> pieces."""
    compiled = [regex.compile(covering(p)) for p in pats]

    def split(text: str) -> list[str]:
        pieces = [text]
        for pat in compiled:
            pieces = [q for p in pieces for q in pat.findall(p)]
        return pieces
    return split


def safe_word_split(merges: list[tuple[str, str]], mark: str) -> Callable[[str], list[str]]:
    """Cut text before `mark` (SentencePiece's "▁") wherever no merge can join across the cut:
    a merge (a, b) joins at x|mark only when a ends with x and b starts with mark. BPE on the
    words then equals BPE on the whole text, which the `tokenizers` library runs as one word."""
    joins = sorted({a[-1] for a, b in merges if b.startswith(mark)})
    before = f"[^{''.join(map(re.escape, joins))}]" if joins else "."
    cut = re.compile(f"(?<={before})(?={re.escape(mark)})", re.DOTALL)
    return cut.split


# --- added tokens ------------------------------------------------------------------------------
@dataclass
class AddedToken:
    id: int
    content: str
    special: bool
    lstrip: bool = False
    rstrip: bool = False

    @classmethod
    def from_json(cls, d: Any, has_normalizer: bool) -> AddedToken:
        if not isinstance(d, dict) or type(d.get("id")) is not int or not isinstance(d.get("content"), str) \
                or not d["content"]:
            raise LMForgeError(f"added token {d!r} needs an integer id and non-empty content")
        if d.get("single_word"):
            raise LMForgeError(f"added token {d['content']!r}: single_word=true is not supported")
        if d.get("normalized") and has_normalizer and not d.get("special"):
            raise LMForgeError(f"added token {d['content']!r}: normalized=true with a normalizer is not supported")
        return cls(d["id"], d["content"], bool(d.get("special")), bool(d.get("lstrip")), bool(d.get("rstrip")))


class AddedTokens:
    """Finds added tokens in text before anything else runs (longest first at a position)."""

    def __init__(self, tokens: list[AddedToken]):
        self.tokens = sorted(tokens, key=lambda t: -len(t.content))
        self.by_content = {t.content: t for t in tokens}
        self._patterns: dict[frozenset[str], regex.Pattern | None] = {}

    def pattern(self, allowed: frozenset[str]) -> regex.Pattern | None:
        """Regex of the tokens matched: non-special ones always, special ones when allowed."""
        pat = self._patterns.get(allowed, False)
        if pat is False:
            alts = [(r"\s*" if t.lstrip else "") + f"({regex.escape(t.content)})" + (r"\s*" if t.rstrip else "")
                    for t in self.tokens if not t.special or t.content in allowed]
            # one group per token, so the match says which token it was
            pat = regex.compile("|".join(alts)) if alts else None
            self._patterns[allowed] = pat
        return pat

    def split(self, text: str, allowed: frozenset[str]) -> list[tuple[str, int] | int]:
        """text -> [(segment, start offset) or token id, ...] in order; empty segments dropped."""
        pat = self.pattern(allowed)
        if pat is None:
            return [(text, 0)] if text else []
        out: list[tuple[str, int] | int] = []
        pos = 0
        for m in pat.finditer(text):
            if m.start() > pos:
                out.append((text[pos:m.start()], pos))
            out.append(self.by_content[next(g for g in m.groups() if g is not None)].id)
            pos = m.end()
        if pos < len(text):
            out.append((text[pos:], pos))
        return out


# --- decoder -----------------------------------------------------------------------------------
def _byte_fallback(tokens: list[str]) -> list[str]:
    """Runs of <0xXX> tokens -> their text, or one U+FFFD per byte if not valid UTF-8."""
    out, run = [], bytearray()
    for t in tokens + [""]:
        if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            try:
                run.append(int(t[3:5], 16))
                continue
            except ValueError:
                pass
        if run:
            try:
                out.append(run.decode("utf-8"))
            except UnicodeDecodeError:
                out.append("\ufffd" * len(run))
            run = bytearray()
        if t:
            out.append(t)
    return out


def _byte_level(tokens: list[str]) -> list[str]:
    table = unicode_to_bytes()
    data = b"".join(bytes([table[c]]) if c in table else c.encode("utf-8") for t in tokens for c in t)
    return [data.decode("utf-8", errors="replace")]


def decoder(spec: Any) -> Callable[[list[str]], list[str]]:
    """tokenizer.json "decoder" -> list of token strings -> list of strings (joined by the caller)."""
    if spec is None:
        return lambda tokens: tokens
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "Sequence":
        steps = [decoder(s) for s in spec.get("decoders", [])]

        def run(tokens: list[str]) -> list[str]:
            for step in steps:
                tokens = step(tokens)
            return tokens
        return run
    if kind == "ByteLevel":
        return _byte_level
    if kind == "ByteFallback":
        return _byte_fallback
    if kind == "Fuse":
        return lambda tokens: ["".join(tokens)]
    if kind == "Replace" and isinstance(spec.get("pattern"), dict) and "String" in spec["pattern"]:
        old, new = spec["pattern"]["String"], spec.get("content", "")
        return lambda tokens: [t.replace(old, new) for t in tokens]
    if kind == "Strip" and isinstance(spec.get("content"), str) and len(spec["content"]) == 1:
        ch, start, stop = spec["content"], int(spec.get("start", 0)), int(spec.get("stop", 0))

        def strip(t: str) -> str:
            a = 0
            while a < min(start, len(t)) and t[a] == ch:
                a += 1
            b = len(t)
            while len(t) - b < stop and b > a and t[b - 1] == ch:
                b -= 1
            return t[a:b]
        return lambda tokens: [strip(t) for t in tokens]
    raise _unsupported("decoder", spec)
