"""BPE tokenizers read from a Hugging Face tokenizer.json, keeping the file's ids.

Two styles share this class: byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2: text -> UTF-8
bytes drawn with GPT-2's byte table, split by regexes first) and SentencePiece-style BPE
(Llama 2, Mistral, TinyLlama, Gemma: spaces become "▁", characters outside the vocabulary
become <0xXX> byte tokens). The file's normalizer, pre-tokenizer, added tokens, BPE model and
decoder are kept verbatim, so saving and exporting give the same file back:

    {"format": "lmforge-tokenizer", "version": 1, "kind": "hf-bpe",
     "tokenizer_json": {...the tokenizer.json...}, "config": {"bos_token": ..., "add_bos_token": ...}}

Byte-level files encode through tiktoken when its rule gives the same ids (checked per file,
see `pair_bpe.tiktoken_equivalent`); other files use the pure-Python `PairBPE`. `encode`
never adds BOS/EOS: `add_bos` says whether the file's post-processor or config would.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import LMForgeError
from .base import AllowedSpecial, Tokenizer, as_id_list
from .byte_table import str_to_token, text_to_byte_chars, unicode_to_bytes
from .hf_pipeline import (AddedToken, AddedTokens, PreTokenizer, covering, decoder, normalizer, safe_word_split,
                          splitter)
from .pair_bpe import PairBPE, tiktoken_equivalent

CONFIG_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    """Merges stored as ["a", "b"] pairs or as "a b" strings (the older form)."""
    out = []
    for k, m in enumerate(model.get("merges", [])):
        pair = m.split(" ") if isinstance(m, str) else m
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise LMForgeError(f"merge #{k} {m!r} is not a pair of tokens")
        out.append((pair[0], pair[1]))
    return out


def template_bos(post: Any) -> str | None:
    """The special token a TemplateProcessing post-processor puts before a single sequence."""
    if isinstance(post, dict) and post.get("type") == "Sequence":
        return next((b for b in map(template_bos, post.get("processors", [])) if b), None)
    if isinstance(post, dict) and post.get("type") == "TemplateProcessing":
        single = post.get("single") or []
        if single and isinstance(single[0], dict) and "SpecialToken" in single[0]:
            return single[0]["SpecialToken"].get("id")
    return None


class HFBPETokenizer(Tokenizer):
    """A tokenizer.json BPE model (byte-level or SentencePiece-style) with the file's ids."""

    kind = "hf-bpe"

    def __init__(self, tokenizer_json: dict[str, Any], config: dict[str, Any] | None = None,
                 use_tiktoken: bool = True, tiktoken_checked: bool | None = None):
        """use_tiktoken=False forces the pure-Python path (the reference the fast one is tested
        against). tiktoken_checked: the saved verdict of the tiktoken check (about 25 us per merge,
        seconds for a 128k vocabulary), so that loading a run's own file skips it."""
        d, self.config = tokenizer_json, dict(config or {})
        model = d.get("model") if isinstance(d, dict) else None
        if not isinstance(model, dict) or model.get("type") != "BPE":
            kind = model.get("type") if isinstance(model, dict) else None
            raise LMForgeError(f"only BPE tokenizers can be imported (model type {kind!r}); "
                               "WordPiece, Unigram and WordLevel files are not supported")
        for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
            if model.get(key):
                raise LMForgeError(f"BPE option {key}={model[key]!r} is not supported")
        self.tokenizer_json = d
        vocab = model.get("vocab")
        if not isinstance(vocab, dict) or not all(type(i) is int and i >= 0 for i in vocab.values()):
            raise LMForgeError('tokenizer.json "model.vocab" must map token text to non-negative ids')
        merges = _merge_pairs(model)
        for k, (a, b) in enumerate(merges):
            if a not in vocab or b not in vocab or a + b not in vocab:
                raise LMForgeError(f"merge #{k} ({a!r} {b!r}) uses or makes a token missing from the vocabulary")
        self._normalize = normalizer(d.get("normalizer"))
        self.pre = PreTokenizer.from_json(d.get("pre_tokenizer"))
        self._decode_steps = decoder(d.get("decoder"))
        added = [AddedToken.from_json(t, self._normalize is not None) for t in d.get("added_tokens", [])]
        self.added = AddedTokens(added)
        self.special_tokens = {t.content: t.id for t in added if t.special}
        self._nonspecial = frozenset(t.content for t in added if not t.special)
        self._all_added = frozenset(t.content for t in added)

        self._id_to_str = {i: s for s, i in vocab.items()}
        self._id_to_str.update({t.id: t.content for t in added})
        ids = sorted(set(vocab.values()) | {t.id for t in added})
        if len(self._id_to_str) != len(vocab) + len({t.id for t in added} - set(vocab.values())) \
                or ids != list(range(len(ids))):
            raise LMForgeError("the vocabulary's ids have gaps or repeats; it cannot be imported")
        self._vocab_size = len(ids)
        self.vocab = vocab
        self.added_ids = {t.id for t in added}
        self._special_ids = set(self.special_tokens.values())

        unk = model.get("unk_token")
        self.bpe = PairBPE(vocab, merges, bool(model.get("ignore_merges")), bool(model.get("byte_fallback")),
                           vocab.get(unk) if unk else None, bool(model.get("fuse_unk")))
        self._split = splitter(self.pre.splits)
        self._words = None if self.pre.byte_level else safe_word_split(merges, "▁")
        self._byte_tokens = self._byte_decoder() if self.pre.byte_level and \
            (d.get("decoder") or {}).get("type") == "ByteLevel" else None
        self._encoding = None
        self.fast = use_tiktoken and self.pre.byte_level and self._tiktoken_ranks(merges, tiktoken_checked) is not None
        self._simple = self._one_call()
        self._pre_split = splitter(self.pre.splits[:-1])  # what runs before tiktoken's own split

    # --- the tiktoken path ---------------------------------------------------------------------
    def _tiktoken_ranks(self, merges: list[tuple[str, str]], checked: bool | None) -> dict[bytes, int] | None:
        """tiktoken's ranks for this vocabulary, or None where tiktoken would give other ids."""
        table = unicode_to_bytes()
        made = {a + b for a, b in merges}
        ranks = {}
        for text, i in self.vocab.items():
            if text in self.added.by_content or not all(c in table for c in text):
                continue  # matched before the model, or unreachable by byte-level BPE
            if len(text) > 1 and text not in made and not self.bpe.ignore_merges:
                continue  # no merge makes it, so BPE never produces it
            ranks[str_to_token(text)] = i
        if checked is False or sum(len(t) == 1 for t in ranks) != 256:
            return None
        if checked is None and not tiktoken_equivalent(ranks, [(str_to_token(a), str_to_token(b)) for a, b in merges]):
            return None
        self._ranks = ranks
        return ranks

    @property
    def encoding(self):
        """tiktoken Encoding: the last split regex runs inside it, added tokens as its specials."""
        if self._encoding is None:
            import tiktoken

            last = covering(self.pre.splits[-1]) if self.pre.splits else r"[\s\S]+"
            specials = {t.content: t.id for t in self.added.tokens}
            self._encoding = tiktoken.Encoding("lmforge-hf-bpe", pat_str=last, mergeable_ranks=self._ranks,
                                               special_tokens=specials)
        return self._encoding

    def _one_call(self) -> bool:
        """Whether one tiktoken call does it all: no normalizer, at most one split, and added
        tokens that tiktoken matches the same way (no strip flags, none a prefix of another)."""
        if not self.fast or self._normalize is not None or len(self.pre.splits) > 1:
            return False
        toks = [t.content for t in self.added.tokens]
        if any(t.lstrip or t.rstrip for t in self.added.tokens):
            return False
        return not any(a != b and b.startswith(a) for a in toks for b in toks)

    # --- encoding ------------------------------------------------------------------------------
    def encode(self, text: str, allowed_special: AllowedSpecial = "all") -> list[int]:
        """Text -> ids, as the `tokenizers` library's encode(text, add_special_tokens=False).
        Special added tokens are matched when allowed; non-special added tokens always."""
        if self._simple:
            allowed = self._all_added if allowed_special == "all" else self._allowed(allowed_special) | self._nonspecial
            return self.encoding.encode(text, allowed_special=allowed, disallowed_special=())
        allowed = self._allowed(allowed_special)
        out: list[int] = []
        for part in self.added.split(text, allowed):
            if isinstance(part, int):
                out.append(part)
            else:
                out.extend(self._encode_segment(*part))
        return out

    def _encode_segment(self, text: str, start: int) -> list[int]:
        if self._normalize is not None:
            text = self._normalize(text)
        text = self.pre.rewrite(text, at_start=start == 0)
        if not text:
            return []
        out: list[int] = []
        if self.fast:
            enc = self.encoding
            pieces = self._pre_split(text) if len(self.pre.splits) > 1 else [text]
            for piece in pieces:
                out.extend(enc.encode_ordinary(piece))
            return out
        word = self.bpe.encode_word
        for piece in self._split(text):
            if self.pre.byte_level:
                out.extend(word(text_to_byte_chars(piece)))
            else:
                for w in self._words(piece):
                    if w:
                        out.extend(word(w))
        return out

    def _allowed(self, allowed_special: AllowedSpecial) -> frozenset[str]:
        if allowed_special == "all":
            return frozenset(self.special_tokens)
        if allowed_special == "none":
            return frozenset()
        if isinstance(allowed_special, str):
            raise LMForgeError(f'allowed_special must be "all", "none" or a set, not {allowed_special!r}')
        unknown = set(allowed_special) - set(self.special_tokens)
        if unknown:
            raise LMForgeError(f"unknown special token {sorted(unknown)[0]!r}; this tokenizer has "
                               f"{sorted(self.special_tokens)}")
        return frozenset(allowed_special)

    # --- decoding ------------------------------------------------------------------------------
    def _byte_decoder(self) -> dict[int, bytes]:
        table = unicode_to_bytes()
        out = {}
        for i, text in self._id_to_str.items():
            if i in self.added_ids or not all(c in table for c in text):
                out[i] = text.encode("utf-8")
            else:
                out[i] = bytes(table[c] for c in text)
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids -> text through the file's decoder. Special tokens are kept by default, as
        transformers' decode does; skip_special_tokens=True drops them."""
        ids = as_id_list(ids)
        bad = next((i for i in ids if i not in self._id_to_str), None)
        if bad is not None:
            raise LMForgeError(f"token id {bad!r} is not in the tokenizer's vocabulary (0..{self.vocab_size - 1})")
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        if self._byte_tokens is not None:
            b = self._byte_tokens
            return b"".join([b[i] for i in ids]).decode("utf-8", errors="replace")
        return "".join(self._decode_steps([self._id_to_str[i] for i in ids]))

    # --- the shared interface ------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def token_to_id(self, text: str) -> int | None:
        t = self.added.by_content.get(text)
        return t.id if t is not None else self.vocab.get(text)

    def id_to_token(self, i: int) -> str | None:
        return self._id_to_str.get(i)

    def _config_token(self, name: str) -> str | None:
        value = self.config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        return value if isinstance(value, str) else None

    @property
    def bos_token(self) -> str | None:
        return self._config_token("bos_token") or template_bos(self.tokenizer_json.get("post_processor"))

    @property
    def eos_token(self) -> str | None:
        return self._config_token("eos_token")

    @property
    def unk_token(self) -> str | None:
        return self._config_token("unk_token") or self.tokenizer_json["model"].get("unk_token")

    @property
    def pad_token(self) -> str | None:
        return self._config_token("pad_token")

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else self.token_to_id(self.eos_token)

    @property
    def eot_id(self) -> int | None:
        return self.eos_id

    @property
    def add_bos(self) -> bool:
        flag = self.config.get("add_bos_token")
        if isinstance(flag, bool):
            return flag and self.bos_id is not None
        return template_bos(self.tokenizer_json.get("post_processor")) is not None

    @property
    def style(self) -> str:
        return "byte-level" if self.pre.byte_level else "sentencepiece"

    # --- saving --------------------------------------------------------------------------------
    def _fields(self) -> dict[str, Any]:
        return {"tokenizer_json": self.tokenizer_json, "config": self.config, "tiktoken": self.fast}

    @classmethod
    def _from_fields(cls, d: dict[str, Any]) -> HFBPETokenizer:
        if not isinstance(d.get("tokenizer_json"), dict):
            raise LMForgeError('hf-bpe tokenizer file has no "tokenizer_json" object; the file is corrupt')
        checked = d.get("tiktoken")
        checked = checked if isinstance(checked, bool) else None
        return cls(d["tokenizer_json"], d.get("config") or {}, tiktoken_checked=checked)

    def __getstate__(self) -> dict[str, Any]:
        # the pipeline's closures and tiktoken's Encoding do not pickle: rebuild from the file
        return {"tokenizer_json": self.tokenizer_json, "config": self.config, "tiktoken": self.fast}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["tokenizer_json"], state["config"], tiktoken_checked=state["tiktoken"])

    def __repr__(self) -> str:
        return f"HFBPETokenizer({self.style}, vocab_size={self.vocab_size}, tiktoken={self.fast})"
