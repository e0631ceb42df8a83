"""A run's tokenizer as GGUF metadata, in the two forms llama.cpp implements.

- `gpt2` (byte-level BPE: lmforge's own BPE, GPT-2, Llama 3, Qwen files): every token spelled with
  GPT-2's byte table ("Ġworld"), the merges as "a b" strings in rank order, and the name of the
  pre-tokenizer whose split regex is the tokenizer's (`tokenizer.ggml.pre`). llama.cpp has a fixed
  list of split regexes, so a pattern outside that list is refused rather than silently replaced.
  llama.cpp applies no normalizer: Qwen's NFC is accepted (the ids agree on NFC text, as for
  llama.cpp's own conversion of Qwen), any other normalizer is refused.
- `llama` (SentencePiece-style BPE: Llama 2, Mistral, TinyLlama): the "▁" pieces with scores.
  llama.cpp merges the adjacent pair whose concatenation has the highest score, so a token made
  by merge k scores -k: the lowest merge rank wins, as in the tokenizer.json's BPE. llama.cpp puts a
  space before the text and after every special token, which is the Llama 2 (legacy) form; a
  Metaspace file with prepend_scheme "first" differs on text that starts with a space.

Token types follow llama.cpp: NORMAL, CONTROL (special tokens), USER_DEFINED (non-special
added tokens, always matched), BYTE (<0xXX> fallback pieces), UNKNOWN, UNUSED (ids the model has
but the tokenizer never produces, written as [PAD{i}])."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import LMForgeError
from ..tokenizers import BPETokenizer, HFBPETokenizer, Tokenizer
from ..tokenizers.bpe import PATTERNS
from ..tokenizers.byte_table import token_to_str

# llama.cpp's token types (llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# (split regexes in order, whether whole words in the vocabulary skip the merges) -> llama.cpp's
# pre-tokenizer name. tiktoken (lmforge's own BPE) always takes a whole word that is a token.
PRE_TOKENIZERS: dict[tuple[tuple[str, ...], bool], str] = {
    ((PATTERNS["gpt2"],), False): "gpt-2",
    ((PATTERNS["gpt4"],), True): "llama-bpe",  # cl100k's rule; llama.cpp's regex is Llama 3's equivalent
    ((PATTERNS["gpt4"],), False): "dbrx",
    ((LLAMA3_SPLIT,), True): "llama-bpe",
    ((LLAMA3_SPLIT,), False): "dbrx",
    ((QWEN2_SPLIT,), False): "qwen2",
    ((r"\p{N}", PATTERNS["gpt2"]), False): "smollm",
}


def _pre_tokenizer(splits: tuple[str, ...], ignore_merges: bool) -> str | None:
    """The exact match, else the same regexes with the other merge rule (the two differ only on
    words a vocabulary holds whole that its merges would split otherwise)."""
    return PRE_TOKENIZERS.get((splits, ignore_merges)) or PRE_TOKENIZERS.get((splits, not ignore_merges))


@dataclass
class GGUFVocab:
    """Everything `tokenizer.ggml.*` holds for one run."""

    model: str  # gpt2 | llama
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    eot_id: int | None = None  # a second end-of-generation id (chat models end turns with it)
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_space_prefix: bool | None = None


def gguf_vocab(tok: Tokenizer, n_vocab: int, generation: dict[str, Any]) -> GGUFVocab:
    """The run's tokenizer as GGUF metadata for a model with `n_vocab` embedding rows.
    `generation`: the run's generation entry (bos_token_id, eos_token_id list)."""
    if tok.vocab_size > n_vocab:
        raise LMForgeError(f"the tokenizer has {tok.vocab_size} tokens but the model only {n_vocab}")
    if isinstance(tok, BPETokenizer):
        vocab = _lmforge_bpe(tok, n_vocab)
    elif isinstance(tok, HFBPETokenizer):
        vocab = _hf_sentencepiece(tok, n_vocab) if tok.style == "sentencepiece" else _hf_byte_level(tok, n_vocab)
    else:
        raise LMForgeError(f"the run's {tok.kind!r} tokenizer has no GGUF form (llama.cpp reads byte-level BPE "
                           "and SentencePiece vocabularies); train the model with a BPE tokenizer")
    eos = list(generation.get("eos_token_id") or ([] if tok.eos_id is None else [tok.eos_id]))
    bos = generation.get("bos_token_id")
    # GPT-2's convention where a tokenizer has no BOS (lmforge's own BPE): <|endoftext|> begins a
    # text too. llama.cpp would otherwise assume its own default id.
    vocab.bos_id = next((i for i in (bos, tok.bos_id, tok.eot_id) if i is not None), None)
    vocab.eos_id = eos[0] if eos else None
    vocab.eot_id = eos[1] if len(eos) > 1 else None
    vocab.add_bos = bool(tok.add_bos) and vocab.bos_id is not None
    return vocab


def _padded(names: dict[int, str], types: dict[int, int], n_vocab: int) -> tuple[list[str], list[int]]:
    tokens = [names.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    return tokens, [types.get(i, UNUSED) for i in range(n_vocab)]


def _lmforge_bpe(tok: BPETokenizer, n_vocab: int) -> GGUFVocab:
    pre = _pre_tokenizer((tok.pat_str,), True)
    if pre is None:
        raise LMForgeError(f"the tokenizer's split pattern {tok.pattern!r} has no llama.cpp pre-tokenizer; "
                           f"GGUF export needs pattern {' or '.join(PATTERNS)}")
    names = {i: token_to_str(b) for b, i in tok.ranks.items()}
    types = dict.fromkeys(names, NORMAL)
    names.update({i: s for s, i in tok.special_tokens.items()})
    types.update(dict.fromkeys(tok.special_tokens.values(), CONTROL))
    tokens, kinds = _padded(names, types, n_vocab)
    merges = [f"{names[a]} {names[b]}" for a, b in tok.merges]
    return GGUFVocab("gpt2", pre, tokens, kinds, merges)


def _added_types(tok: HFBPETokenizer) -> dict[int, int]:
    return {t.id: CONTROL if t.special else USER_DEFINED for t in tok.added.tokens}


def _hf_byte_level(tok: HFBPETokenizer, n_vocab: int) -> GGUFVocab:
    norm = tok.tokenizer_json.get("normalizer")
    if norm is not None and norm != {"type": "NFC"}:  # Qwen's NFC: the same ids on NFC text
        raise LMForgeError(f"the tokenizer.json's normalizer {norm.get('type') if isinstance(norm, dict) else norm!r} "
                           "is not applied by llama.cpp's byte-level BPE; it cannot be written to GGUF")
    ignore = bool(tok.tokenizer_json["model"].get("ignore_merges"))
    pre = _pre_tokenizer(tuple(tok.pre.splits), ignore)
    if pre is None:
        raise LMForgeError(f"the tokenizer.json's pre-tokenizer (splits {tok.pre.splits}, ignore_merges={ignore}) "
                           "matches none of llama.cpp's pre-tokenizers; it cannot be written to GGUF")
    names = {i: tok.id_to_token(i) for i in range(tok.vocab_size)}
    types = {**dict.fromkeys(names, NORMAL), **_added_types(tok)}
    tokens, kinds = _padded(names, types, n_vocab)
    merges = [f"{a} {b}" for a, b in _merge_pairs(tok)]
    return GGUFVocab("gpt2", pre, tokens, kinds, merges)


def _merge_pairs(tok: HFBPETokenizer) -> list[tuple[str, str]]:
    from ..tokenizers.hf_bpe import _merge_pairs as pairs

    return pairs(tok.tokenizer_json["model"])


def _hf_sentencepiece(tok: HFBPETokenizer, n_vocab: int) -> GGUFVocab:
    model = tok.tokenizer_json["model"]
    if not model.get("byte_fallback"):
        raise LMForgeError("a SentencePiece-style tokenizer.json without byte_fallback has no GGUF form "
                           "(llama.cpp falls back to <0xXX> byte pieces)")
    names = {i: tok.id_to_token(i) for i in range(tok.vocab_size)}
    types = {i: BYTE if _is_byte_piece(s) else NORMAL for i, s in names.items()}
    unk = model.get("unk_token")
    if unk in tok.vocab:
        types[tok.vocab[unk]] = UNKNOWN
    types.update(_added_types(tok))
    tokens, kinds = _padded(names, types, n_vocab)
    first_merge: dict[str, int] = {}
    for k, (a, b) in enumerate(_merge_pairs(tok)):
        first_merge.setdefault(a + b, k)
    scores = []
    for i, text in enumerate(tokens):
        if kinds[i] != NORMAL or len(text) == 1:
            scores.append(0.0)
        else:  # a token no merge makes is never chosen by BPE: the lowest priority
            scores.append(-float(first_merge.get(text, 1e9)))
    vocab = GGUFVocab("llama", "default", tokens, kinds, scores=scores)
    vocab.unk_id = tok.vocab.get(unk) if unk else None
    vocab.add_space_prefix = tok.pre.metaspace is None or tok.pre.metaspace[1] != "never"
    return vocab


def _is_byte_piece(s: str) -> bool:
    return len(s) == 6 and s.startswith("<0x") and s.endswith(">")


def write_vocab(writer, vocab: GGUFVocab) -> None:
    """Add the `tokenizer.ggml.*` keys to a gguf.GGUFWriter."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    for name, value in (("bos", vocab.bos_id), ("eos", vocab.eos_id), ("eot", vocab.eot_id),
                        ("unk", vocab.unk_id), ("pad", vocab.pad_id)):
        if value is not None:
            writer.add_uint32(f"tokenizer.ggml.{name}_token_id", int(value))
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)


__all__ = ["GGUFVocab", "gguf_vocab", "write_vocab", "PRE_TOKENIZERS"]
