"""GPT-2 / Hugging Face byte-level BPE files <-> lmforge's `BPETokenizer`.

Hugging Face stores a byte-level BPE vocabulary as text: every byte is drawn as a printable
unicode character (GPT-2's `bytes_to_unicode` table: printable Latin-1 bytes stand for
themselves, the other 68 bytes borrow the characters from U+0100 on, so a space is "Ġ").

    vocab.json     {"Hello": 15496, "Ġworld": 995, ..., "<|endoftext|>": 50256}
    merges.txt     "#version: 0.2" then one merge per line, highest priority first: "Ġ t"
    tokenizer.json the same model for the `tokenizers` library, plus the pre-tokenizer

lmforge's BPETokenizer needs id = rank: ids 0..255 are the single bytes (in any order, GPT-2's
is the table's order) and merge k makes id 256 + k. GPT-2's files satisfy this, so an imported
GPT-2 tokenizer stays a BPETokenizer with GPT-2's ids. Any other BPE tokenizer.json (Llama 3,
Qwen, SentencePiece-style Llama 2 / Mistral / Gemma, `tokenizers`-trained files) becomes an
HFBPETokenizer, which keeps the file's ids (`hf_tokenizer_files` reads and writes those).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import regex

from ..errors import LMForgeError
from ..fileio import atomic_open, read_json, write_json
from ..tokenizers import EOT, PATTERNS, BPETokenizer, HFBPETokenizer, Tokenizer
from ..tokenizers.byte_table import bytes_to_unicode, str_to_token, token_to_str, unicode_to_bytes

__all__ = ["read_hf_tokenizer", "write_hf_tokenizer", "bytes_to_unicode", "unicode_to_bytes",
           "str_to_token", "token_to_str"]

MERGES_HEADER = "#version: 0.2"


# --- split patterns ---------------------------------------------------------------------------
def hf_regex(pat_str: str) -> str:
    """tiktoken's regex in the dialect of `tokenizers` (Oniguruma). Oniguruma reads `X{1,3}+` as
    "one or more runs of 1-3 X", not as a possessive {1,3}; at the end of an alternative, as in
    GPT-4's `\\p{N}{1,3}+`, plain `{1,3}` means the same."""
    return regex.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", pat_str)


def pattern_name(pat_str: str) -> str:
    """Map a regex back to its lmforge name when it is one of ours (in either dialect)."""
    for name, pat in PATTERNS.items():
        if pat_str in (pat, hf_regex(pat)):
            return name
    return pat_str


# --- import -----------------------------------------------------------------------------------
def tokenizer_from_vocab(vocab: dict[str, int], merges: list[tuple[str, str]], pattern: str = "gpt2",
                         special_tokens: dict[str, int] | None = None) -> BPETokenizer:
    """Build a BPETokenizer that keeps the file's ids. Vocabulary entries past the merged tokens
    (such as GPT-2's "<|endoftext|>" at 50256) become special tokens."""
    special_tokens = dict(special_tokens or {})
    byte_ids = {}
    for text, i in vocab.items():
        if text not in special_tokens and len(text) == 1 and text in unicode_to_bytes():
            byte_ids[unicode_to_bytes()[text]] = i
    if sorted(byte_ids) != list(range(256)) or sorted(byte_ids.values()) != list(range(256)):
        raise LMForgeError("the vocabulary does not give the 256 single bytes the ids 0..255; "
                           "lmforge imports byte-level BPE vocabularies numbered like GPT-2's")
    byte_order = sorted(byte_ids, key=byte_ids.get)  # byte_order[id] = byte value
    pairs = []
    for k, (a, b) in enumerate(merges):
        if a not in vocab or b not in vocab or a + b not in vocab:
            raise LMForgeError(f"merge #{k} ({a!r} {b!r}) uses or makes a token missing from the vocabulary; "
                               "vocab.json and merges.txt do not belong together")
        if vocab[a + b] != 256 + k:
            raise LMForgeError(f"merge #{k} makes {a + b!r} with id {vocab[a + b]}, not {256 + k}: lmforge's BPE "
                               "numbers merged tokens in merge order, and this vocabulary does not")
        pairs.append((vocab[a], vocab[b]))
    n_ranked = 256 + len(merges)
    for text, i in vocab.items():
        if i >= n_ranked:
            special_tokens.setdefault(text, i)
    ids = sorted({**vocab, **special_tokens}.values())
    if ids != list(range(len(ids))):
        raise LMForgeError("the vocabulary's ids have gaps or repeats; it cannot be imported as byte-level BPE")
    tok = BPETokenizer.from_merges(pairs, pattern, special_tokens, byte_order)
    for text, i in vocab.items():
        if i < n_ranked and tok.decode_bytes([i]) != str_to_token(text):
            raise LMForgeError(f"vocabulary entry {text!r}: {i} is not the token its merges make; the files are inconsistent")
    return tok


def _read_merges_txt(path: Path) -> list[tuple[str, str]]:
    merges = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise LMForgeError(f"{path}:{n}: expected two tokens separated by one space, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _find(directory: Path, *names: str) -> Path | None:
    return next((directory / n for n in names if (directory / n).is_file()), None)


def read_config(directory: Path) -> dict[str, Any]:
    """tokenizer_config.json over special_tokens_map.json: the special token strings and the
    add_bos_token / add_eos_token flags (the rest, such as a chat template, is not read here)."""
    config: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = directory / name
        if path.is_file():
            d = read_json(path, name)
            if isinstance(d, dict):
                config.update({k: d[k] for k in (*HF_TOKEN_KEYS, "add_bos_token", "add_eos_token") if k in d})
    return config


HF_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_name(value: Any) -> str | None:
    """A config's special token: a string or an AddedToken object {"content": ...}."""
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) else None


def gpt2_numbered(vocab: dict[str, int], merges: list[tuple[str, str]]) -> bool:
    """Whether the vocabulary is numbered as lmforge's BPETokenizer numbers it (bytes 0..255,
    merge k -> id 256 + k), as GPT-2's files are."""
    table = unicode_to_bytes()
    if sorted(i for t, i in vocab.items() if len(t) == 1 and t in table) != list(range(256)):
        return False
    return all(vocab.get(a + b) == 256 + k for k, (a, b) in enumerate(merges))


def _plain_gpt2_file(d: dict[str, Any], config: dict[str, Any]) -> bool:
    """A tokenizer.json that BPETokenizer runs exactly: GPT-2 numbering, no normalizer, plain
    special tokens, no BOS added, <|endoftext|> (or nothing) as the config's tokens."""
    model = d.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or d.get("normalizer") is not None:
        return False
    if not isinstance(model.get("vocab"), dict):
        return False
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    added = [t for t in d.get("added_tokens", []) if isinstance(t, dict)]
    plain = all(t.get("special") and not (t.get("lstrip") or t.get("rstrip") or t.get("single_word")) for t in added)
    names = {_token_name(config.get(k)) for k in HF_TOKEN_KEYS} - {None}
    no_bos = not config.get("add_bos_token") and not config.get("add_eos_token") and \
        (d.get("post_processor") or {}).get("type") in (None, "ByteLevel")
    return plain and no_bos and names <= {EOT} and (d.get("decoder") or {}).get("type") == "ByteLevel" \
        and not model.get("ignore_merges") and gpt2_numbered(model["vocab"], merges)


def _tiktoken_rule_holds(tok: BPETokenizer) -> bool:
    """BPETokenizer encodes by tiktoken's rule; it equals the file's merges when the merges
    recovered from the ranks are the file's own (see pair_bpe.tiktoken_equivalent)."""
    given = tok.merges  # as read from the file
    tok._merges = None
    try:
        return tok.merges == given
    except LMForgeError:
        return False
    finally:
        tok._merges = given


def read_hf_tokenizer(directory: str | Path) -> Tokenizer:
    """Read tokenizer.json (+ tokenizer_config.json / special_tokens_map.json) if there is one,
    else vocab.json + merges.txt (also under OpenAI's names encoder.json + vocab.bpe), which
    imply GPT-2's split pattern. GPT-2-numbered plain files give a BPETokenizer, any other BPE
    file an HFBPETokenizer with the file's ids."""
    directory = Path(directory)
    config = read_config(directory)
    tokenizer_json = _find(directory, "tokenizer.json")
    if tokenizer_json is not None:
        d = read_json(tokenizer_json, "tokenizer.json")
        if isinstance(d, dict) and _plain_gpt2_file(d, config):
            tok = tokenizer_from_tokenizer_json(d, tokenizer_json)
            if _tiktoken_rule_holds(tok):
                return tok
        return _hf_bpe(d, config, tokenizer_json)
    vocab_path = _find(directory, "vocab.json", "encoder.json")
    merges_path = _find(directory, "merges.txt", "vocab.bpe")
    if vocab_path is None or merges_path is None:
        raise LMForgeError(f"no tokenizer in {directory}: expected tokenizer.json, or vocab.json and merges.txt")
    vocab = read_json(vocab_path, "vocab.json")
    if not isinstance(vocab, dict):
        raise LMForgeError(f"{vocab_path} must map token text to id")
    specials = {}
    added = _find(directory, "added_tokens.json")
    if added is not None:
        specials = read_json(added, "added_tokens.json")
    merges = _read_merges_txt(merges_path)
    if gpt2_numbered(vocab, merges):
        return tokenizer_from_vocab(vocab, merges, "gpt2", specials)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    # entries no merge makes (GPT-2's <|endoftext|>) are special tokens, as in the GPT-2 case
    made = {a + b for a, b in merges}
    specials.update({t: i for t, i in vocab.items() if len(t) > 1 and t not in made})
    added_tokens = [{"id": i, "content": t, "special": True} for t, i in specials.items()]
    d = {"added_tokens": added_tokens, "normalizer": None, "pre_tokenizer": byte_level, "decoder": byte_level,
         "post_processor": None, "model": {"type": "BPE", "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]}}
    return _hf_bpe(d, config, vocab_path)


def _hf_bpe(d: Any, config: dict[str, Any], where: Path) -> HFBPETokenizer:
    if not isinstance(d, dict):
        raise LMForgeError(f"{where}: not a tokenizer.json object")
    try:
        return HFBPETokenizer(d, config)
    except LMForgeError as e:
        raise LMForgeError(f"{where}: {e}") from None


def _pattern_from_pre_tokenizer(pre: Any, where: Path) -> str:
    """ByteLevel with its own regex -> "gpt2"; Split(regex) then ByteLevel(use_regex=False) ->
    that regex. Anything else is not a tiktoken-style byte-level BPE."""
    if isinstance(pre, dict) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        if pre.get("add_prefix_space"):
            raise LMForgeError(f"{where}: add_prefix_space=true is not supported (lmforge encodes text as given)")
        return "gpt2"
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"
            and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space")
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
            and "Regex" in steps[0].get("pattern", {})):
        return pattern_name(steps[0]["pattern"]["Regex"])
    raise LMForgeError(f"{where}: unsupported pre_tokenizer {json.dumps(pre)[:120]}; lmforge imports "
                       "ByteLevel, or Split(regex) followed by ByteLevel(use_regex=false)")


def tokenizer_from_tokenizer_json(d: Any, where: Path) -> BPETokenizer:
    """A `tokenizers` library file whose model is byte-level BPE."""
    model = d.get("model") if isinstance(d, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise LMForgeError(f"{where}: only BPE tokenizers can be imported (model type "
                           f"{model.get('type') if isinstance(model, dict) else None!r})")
    if d.get("normalizer") is not None:
        raise LMForgeError(f"{where}: a normalizer ({d['normalizer'].get('type')}) is not supported; "
                           "byte-level BPE encodes the text unchanged")
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            raise LMForgeError(f"{where}: BPE option {key}={model[key]!r} is not supported")
    pattern = _pattern_from_pre_tokenizer(d.get("pre_tokenizer"), where)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    specials = {t["content"]: t["id"] for t in d.get("added_tokens", []) if isinstance(t, dict)}
    return tokenizer_from_vocab(model.get("vocab", {}), merges, pattern, specials)


# --- export -----------------------------------------------------------------------------------
def hf_vocab(tok: BPETokenizer) -> dict[str, int]:
    vocab = {token_to_str(token): i for token, i in tok.ranks.items()}
    vocab.update(tok.special_tokens)
    return dict(sorted(vocab.items(), key=lambda item: item[1]))


def hf_merges(tok: BPETokenizer) -> list[str]:
    decoder = {i: token for token, i in tok.ranks.items()}
    return [f"{token_to_str(decoder[a])} {token_to_str(decoder[b])}" for a, b in tok.merges]


def tokenizer_json(tok: BPETokenizer) -> dict[str, Any]:
    """The `tokenizers` library's file for this tokenizer, written directly (no dependency).
    GPT-2's split pattern is ByteLevel's built-in regex; any other goes in a Split step."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if tok.pattern == "gpt2":
        pre = byte_level
    else:
        pre = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": hf_regex(tok.pat_str)}, "behavior": "Isolated", "invert": False},
            {**byte_level, "use_regex": False}]}
    added = [{"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for text, i in sorted(tok.special_tokens.items(), key=lambda x: x[1])]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": pre,
        "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": hf_vocab(tok), "merges": hf_merges(tok)},
    }


def write_hf_tokenizer(tok: Tokenizer, directory: str | Path, model_max_length: int | None = None) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (plus vocab.json
    and merges.txt for a BPETokenizer), which `AutoTokenizer.from_pretrained(directory)` loads.

    transformers' GPT2Tokenizer always splits with GPT-2's regex, so tokenizer_config.json
    names it only for a "gpt2"-pattern tokenizer; any other pattern is declared as the generic
    PreTrainedTokenizerFast, which runs tokenizer.json as written."""
    if isinstance(tok, HFBPETokenizer):
        return _write_hf_bpe(tok, Path(directory), model_max_length)
    if not isinstance(tok, BPETokenizer):
        raise LMForgeError(f"a {tok.kind!r} tokenizer has no Hugging Face form; only byte-level BPE and SentencePiece-style BPE export")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "vocab.json", hf_vocab(tok))
    with atomic_open(directory / "merges.txt") as f:
        f.write("\n".join([MERGES_HEADER, *hf_merges(tok)]) + "\n")
    with atomic_open(directory / "tokenizer.json") as f:
        json.dump(tokenizer_json(tok), f, ensure_ascii=False)
    # GPT2Tokenizer defaults all three to <|endoftext|> and would add it if missing: say None then.
    eot = EOT if tok.eot_id is not None else None
    specials: dict[str, Any] = {"bos_token": eot, "eos_token": eot, "unk_token": eot}
    config: dict[str, Any] = {
        "tokenizer_class": "GPT2Tokenizer" if tok.pattern == "gpt2" else "PreTrainedTokenizerFast",
        "add_prefix_space": False, "add_bos_token": False, "clean_up_tokenization_spaces": False,
        "errors": "replace", **specials,
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    write_json(directory / "tokenizer_config.json", config)
    write_json(directory / "special_tokens_map.json", {k: v for k, v in specials.items() if v})


def _write_hf_bpe(tok: HFBPETokenizer, directory: Path, model_max_length: int | None) -> None:
    """The file's own tokenizer.json back, and a config naming its special tokens. Where the
    config asked for BOS and the file has no post-processor, a TemplateProcessing one is added
    so that every loader prepends it."""
    d = dict(tok.tokenizer_json)
    if tok.add_bos and d.get("post_processor") is None:
        bos = {"SpecialToken": {"id": tok.bos_token, "type_id": 0}}
        d["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {tok.bos_token: {"id": tok.bos_token, "ids": [tok.bos_id], "tokens": [tok.bos_token]}}}
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_open(directory / "tokenizer.json") as f:
        json.dump(d, f, ensure_ascii=False)
    specials = {k: getattr(tok, k) for k in HF_TOKEN_KEYS if getattr(tok, k) is not None}
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                              "add_bos_token": tok.add_bos, "add_eos_token": False, **specials}
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    write_json(directory / "tokenizer_config.json", config)
    write_json(directory / "special_tokens_map.json", specials)
