"""Byte-level BPE: training, tiktoken encoding vs the pure-Python reference, losslessness,
special tokens, and the JSON file format."""

import doctest
import json
import pickle
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.errors import LMForgeError
from lmforge.tokenizers import BPETokenizer, CharTokenizer, load_tokenizer, tokenizer_from_dict
from lmforge.tokenizers import base, bpe, bpe_train
from lmforge.tokenizers.bpe import merges_from_ranks

EOT = "<|endoftext|>"
MULTILINGUAL = (
    "Grüße aus München! Die Straße ist 3,5 km lang.\n"
    "我们今天去公园散步。天气很好，阳光明媚。\n"
    "Emoji: 🎉🚀👩‍👩‍👧‍👦 🇩🇪 — “quotes” and naïve café.\n"
    "   indented\t\ttabs\r\nwindows line\n\n\nnumbers 1234567 and 3.14159; don't we'll I'M\n"
)
hyp = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def text(shakespeare_text) -> str:
    return shakespeare_text[:50_000]


@pytest.fixture(scope="module", params=["gpt4", "gpt2"])
def tok(request, text) -> BPETokenizer:
    return BPETokenizer.train(text + MULTILINGUAL, vocab_size=600, pattern=request.param)


@pytest.fixture(scope="module")
def tok4(text) -> BPETokenizer:
    return BPETokenizer.train(text + MULTILINGUAL, vocab_size=600, special_tokens=[EOT, "<|pad|>"])


# Text that stresses the split patterns and UTF-8: all of Unicode but lone surrogates,
# plus runs of emoji, CJK, combining marks, control characters and whitespace.
any_char = st.characters(blacklist_categories=("Cs",))
# For parity, also no code points unassigned in this Python's Unicode (14.0): on some letters
# assigned later (e.g. U+A7CE) the regex module's tables and tiktoken's Rust ones disagree.
assigned_char = st.characters(blacklist_categories=("Cs", "Cn"))
pieces = st.sampled_from(
    ["🎉", "👩‍👩‍👧", "🇩🇪", "漢字", "日本語", "e\u0301", "\u0308", "\x00", "\x07", "\x1b[0m", "\r\n", "\n\n",
     "   ", "\t", "\u00a0", "\u2028", "'s", "'LL", " 123456", "ß", "a", " the", "!!", EOT, "<|", "|>"]
)


def texts(chars=any_char):
    return st.one_of(st.text(chars), st.lists(st.one_of(pieces, st.text(chars, max_size=3))).map("".join))


def test_doctests():
    for module in (base, bpe, bpe_train):
        assert doctest.testmod(module).failed == 0, module.__name__


# --- training -------------------------------------------------------------------------------
def test_train_sizes_and_ids(tok4):
    assert tok4.vocab_size == 600
    assert len(tok4.merges) == 600 - 256 - 2
    assert tok4.special_tokens == {EOT: 598, "<|pad|>": 599}
    assert tok4.eot_id == 598
    assert all(tok4.ranks[bytes([b])] == b for b in range(256))


def test_train_is_deterministic(text):
    a = BPETokenizer.train(text, vocab_size=400)
    b = BPETokenizer.train(text, vocab_size=400)
    assert a.merges == b.merges


def test_train_first_merge_is_the_most_frequent_pair():
    tok = BPETokenizer.train("ab ab ab cd cd", vocab_size=257, pattern=r"\S+|\s", special_tokens=())
    assert tok.merges == [(97, 98)]  # (a, b) occurs 3 times
    tie = BPETokenizer.train("cd ab", vocab_size=257, pattern=r"\S+|\s", special_tokens=())
    assert tie.merges == [(97, 98)]  # a tie: the smaller pair (a, b) beats (c, d)


def test_train_from_files_streams_like_one_text(tmp_path, text, monkeypatch):
    data = text[:20_000].replace("\n\n", f"\n{EOT}\n")
    half = len(data) // 2
    (tmp_path / "a.txt").write_text(data[:half], encoding="utf-8", newline="")
    (tmp_path / "b.txt").write_text(data[half:], encoding="utf-8", newline="")
    whole = BPETokenizer.train(data, vocab_size=400)
    monkeypatch.setattr(bpe_train, "BLOCK_CHARS", 97)  # cut words and special tokens in half
    streamed = BPETokenizer.train([tmp_path / "a.txt", str(tmp_path / "b.txt")], vocab_size=400)
    assert streamed.merges == whole.merges


def test_special_token_text_is_not_learned(text):
    tok = BPETokenizer.train(f"{EOT}".join([text[:5000]] * 4), vocab_size=500)
    assert not any(b"<|" in token or b"endoftext" in token for token in tok.ranks)


def test_train_stops_when_no_pairs_are_left():
    tok = BPETokenizer.train("aaaa", vocab_size=1000)
    assert tok.merges == [(97, 97), (256, 256)]
    assert tok.vocab_size == 259 and tok.eot_id == 258


@pytest.mark.parametrize("size", [0, 256, 255])
def test_vocab_size_too_small(size):
    with pytest.raises(LMForgeError, match=r"too small.*256 \(bytes\) \+ 1 \(special tokens\) = 257"):
        BPETokenizer.train("hello", vocab_size=size)


def test_train_input_errors(tmp_path):
    with pytest.raises(LMForgeError, match="not found"):
        BPETokenizer.train([tmp_path / "missing.txt"], vocab_size=300)
    with pytest.raises(LMForgeError, match="empty"):
        BPETokenizer.train("", vocab_size=300)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(LMForgeError, match="not UTF-8"):
        BPETokenizer.train([tmp_path / "latin1.txt"], vocab_size=300)
    with pytest.raises(LMForgeError, match="unknown split pattern 'gpt3'"):
        BPETokenizer.train("hello", vocab_size=300, pattern="gpt3")
    with pytest.raises(LMForgeError, match="distinct"):
        BPETokenizer.train("hello", vocab_size=300, special_tokens=[EOT, EOT])


# --- encoding: tiktoken == reference ---------------------------------------------------------
def test_tiktoken_matches_reference_on_real_text(tok, shakespeare_text):
    sample = shakespeare_text[200_000:220_000] + MULTILINGUAL
    assert tok.encode(sample) == tok.encode_reference(sample)


@hyp
@given(texts(assigned_char))
def test_tiktoken_matches_reference(tok, s):
    assert tok.encode(s) == tok.encode_reference(s)
    assert tok.encode(s, allowed_special="none") == tok.encode_reference(s, allowed_special="none")


@hyp
@given(texts())
def test_roundtrip_is_lossless(tok, s):
    assert tok.decode(tok.encode(s)) == s
    assert tok.decode(tok.encode(s, allowed_special="none")) == s


def test_encode_batch(tok4):
    batch = ["hello", "", f"a{EOT}b", MULTILINGUAL]
    assert tok4.encode_batch(batch) == [tok4.encode(s) for s in batch]


@pytest.mark.parametrize("allowed", ["all", "none"])
def test_encode_batch_with_and_without_specials(tok4, allowed):
    batch = [f"{i} {MULTILINGUAL[i % 50:]}{EOT if i % 7 == 0 else ''} line" for i in range(200)]
    assert tok4.encode_batch(batch, allowed_special=allowed) == [tok4.encode(s, allowed_special=allowed) for s in batch]


def test_encode_batch_leaves_the_garbage_collector_as_it_found_it(tok4):
    import gc

    assert gc.isenabled()
    tok4.encode_batch(["a b", "c"])
    assert gc.isenabled()
    with pytest.raises(TypeError):
        tok4.encode_batch(["a", 3])  # an error inside the paused section
    assert gc.isenabled()
    gc.disable()
    try:
        tok4.encode_batch(["a"])
        assert not gc.isenabled()  # a caller's choice is kept
    finally:
        gc.enable()


@pytest.mark.parametrize("allowed", ["all", "none"])
def test_encode_batch_in_two_processes_equals_one(tok4, allowed):
    batch = [f"{i} {MULTILINGUAL[i % 50:(i % 50) + i % 17]}{EOT if i % 7 == 0 else ''}\n" for i in range(3000)]
    one = tok4.encode_batch(batch, allowed_special=allowed)
    assert tok4.encode_batch(batch, allowed_special=allowed, num_workers=2) == one
    assert tok4.encode_batch(batch, allowed_special=allowed, num_workers=3) == one


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200), allowed=st.sampled_from(["all", "none"]))
def test_encode_to_array_equals_encode(tok4, text, allowed):
    arr = tok4.encode_to_array(text + EOT, allowed_special=allowed)
    assert arr.dtype.name == "uint32" and arr.tolist() == tok4.encode(text + EOT, allowed_special=allowed)


@given(st.lists(st.text(max_size=30), max_size=60), st.integers(1, 5))
def test_balanced_slices_cover_the_batch_in_order(texts, parts):
    from lmforge.tokenizers.batching import balanced_slices

    bounds = balanced_slices(texts, parts)
    assert len(bounds) == parts and bounds[0][0] == 0 and bounds[-1][1] == len(texts)
    assert all(a <= b for a, b in bounds) and all(b == c for (_, b), (c, _) in zip(bounds, bounds[1:]))
    total = sum(map(len, texts))
    longest = max(map(len, texts), default=0)
    for a, b in bounds[:-1]:  # each share but the last overshoots its quota by one text at most
        assert sum(map(len, texts[a:b])) <= total / parts + longest


# --- special tokens --------------------------------------------------------------------------
def test_special_tokens_are_never_split(tok4):
    ids = tok4.encode(f"x{EOT}{EOT}<|pad|>y{EOT}")
    assert ids.count(598) == 3 and ids.count(599) == 1
    assert tok4.decode(ids) == f"x{EOT}{EOT}<|pad|>y{EOT}"


def test_allowed_special(tok4):
    s = f"one{EOT}two<|pad|>"
    assert 598 not in tok4.encode(s, allowed_special="none")
    assert tok4.decode(tok4.encode(s, allowed_special="none")) == s
    only_eot = tok4.encode(s, allowed_special={EOT})
    assert 598 in only_eot and 599 not in only_eot
    assert only_eot == tok4.encode_reference(s, allowed_special={EOT})
    with pytest.raises(LMForgeError, match="unknown special token '<|nope|>'"):
        tok4.encode(s, allowed_special={"<|nope|>"})


@hyp
@given(st.lists(st.one_of(st.just(EOT), st.text(any_char, max_size=8))))
def test_every_special_occurrence_becomes_its_id(tok4, parts):
    s = "".join(parts)
    assert tok4.encode(s).count(tok4.eot_id) == s.count(EOT)


# --- decoding ---------------------------------------------------------------------------------
@hyp
@given(st.lists(st.integers(0, 599), max_size=50))
def test_decode_never_raises(tok4, ids):
    assert isinstance(tok4.decode(ids), str)


def test_decode_partial_utf8_gives_replacement_char(tok4):
    ids = tok4.encode("é🎉")  # é = C3 A9; bytes map to ids 0..255 unless merged
    assert tok4.decode([0xC3]) == "\ufffd"
    assert tok4.decode([0xF0, 0x9F]) == "\ufffd"
    assert tok4.decode(tok4.encode("é")[:1] + [ord("a")]).endswith("a")
    assert tok4.decode_bytes(ids) == "é🎉".encode("utf-8")


@pytest.mark.parametrize("bad", [600, -1, 10**9, "7"])
def test_decode_unknown_id(tok4, bad):
    with pytest.raises(LMForgeError, match=f"token id {bad!r} is not in"):
        tok4.decode([1, bad])


# --- other byte orders (e.g. GPT-2's) and the ranks <-> merges mapping -------------------------
def test_permuted_byte_order(text):
    trained = BPETokenizer.train(text[:10_000], vocab_size=300, special_tokens=())
    order = list(reversed(range(256)))  # id i is byte 255 - i
    merges = [tuple(255 - i if i < 256 else i for i in pair) for pair in trained.merges]
    tok = BPETokenizer.from_merges(merges, "gpt4", {EOT: 300}, byte_order=order)
    assert tok.ranks[b"\x00"] == 255 and tok.byte_order == order
    assert merges_from_ranks(tok.ranks) == merges
    s = text[:2000] + MULTILINGUAL
    assert tok.encode(s) == tok.encode_reference(s) and tok.decode(tok.encode(s)) == s
    assert tokenizer_from_dict(json.loads(json.dumps(tok.to_dict()))).ranks == tok.ranks


def test_merges_from_ranks_recovers_training_merges(tok):
    assert merges_from_ranks(tok.ranks) == tok.merges


def test_pickle(tok4):
    tok4.encode("warm the tiktoken cache")
    clone = pickle.loads(pickle.dumps(tok4))
    assert clone.encode(MULTILINGUAL) == tok4.encode(MULTILINGUAL)


# --- files -------------------------------------------------------------------------------------
def test_save_load_roundtrip(tmp_path, tok4):
    path = tmp_path / "tok.json"
    tok4.save(path)
    d = json.loads(path.read_text(encoding="utf-8"))
    assert d["format"] == "lmforge-tokenizer" and d["kind"] == "bpe" and d["pattern"] == "gpt4"
    assert d["special_tokens"] == {EOT: 598, "<|pad|>": 599} and "byte_order" not in d
    for loaded in (BPETokenizer.load(path), load_tokenizer(path), tokenizer_from_dict(d)):
        assert isinstance(loaded, BPETokenizer) and loaded.to_dict() == tok4.to_dict()
        assert loaded.encode(MULTILINGUAL) == tok4.encode(MULTILINGUAL)


def _write(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"format": "lmforge-tokenizer", "version": 1, "kind": "bpe", "merg', "not valid JSON"),
        ("\x00\x01 binary junk", "not valid JSON"),
        ({"model": {"type": "BPE"}, "added_tokens": [], "version": "1.0"}, "Hugging Face tokenizer.json"),
        ({"vocab": {"a": 0}}, "not an lmforge tokenizer file"),
        ([1, 2, 3], "not an lmforge tokenizer file"),
        ({"format": "lmforge-tokenizer", "version": 2, "kind": "bpe"}, "unsupported tokenizer file version 2"),
        ({"format": "lmforge-tokenizer", "version": 1, "kind": "wordpiece"}, "unknown tokenizer kind 'wordpiece'"),
        ({"format": "lmforge-tokenizer", "version": 1, "kind": "bpe", "pattern": "gpt4"}, 'no "merges" list'),
        ({"format": "lmforge-tokenizer", "version": 1, "kind": "bpe", "pattern": "gpt4", "merges": [[97, 300]]},
         r"merge #0 \[97, 300\] is not a pair of earlier ids"),
        ({"format": "lmforge-tokenizer", "version": 1, "kind": "bpe", "pattern": "gpt4", "merges": [[97, 98], [97, 98]]},
         r"merge #1 \[97, 98\] makes b'ab', already token 256"),
        ({"format": "lmforge-tokenizer", "version": 1, "kind": "bpe", "pattern": "gpt4", "merges": [[97]]},
         "not a pair"),
        ({"format": "lmforge-tokenizer", "version": 1, "kind": "bpe", "pattern": "gpt4", "merges": [],
          "special_tokens": {EOT: 97}}, "needs a non-empty name and an id >= 256"),
        ({"format": "lmforge-tokenizer", "version": 1, "kind": "bpe", "pattern": "[", "merges": []},
         "not a valid regex"),
    ],
)
def test_load_rejects_bad_files(tmp_path, content, message):
    path = _write(tmp_path / "tok.json", content)
    with pytest.raises(LMForgeError, match=message):
        load_tokenizer(path)


def test_load_rejects_missing_file_and_wrong_kind(tmp_path):
    with pytest.raises(LMForgeError, match="tokenizer file not found"):
        load_tokenizer(tmp_path / "nope.json")
    CharTokenizer.train("abc").save(tmp_path / "char.json")
    with pytest.raises(LMForgeError, match="'char' tokenizer, not 'bpe'"):
        BPETokenizer.load(tmp_path / "char.json")


def test_truncated_file_is_rejected(tmp_path, tok4):
    tok4.save(tmp_path / "tok.json")
    full = (tmp_path / "tok.json").read_text(encoding="utf-8")
    _write(tmp_path / "cut.json", full[: len(full) // 2])
    with pytest.raises(LMForgeError, match="truncated"):
        load_tokenizer(tmp_path / "cut.json")


# --- speed ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_speed_tinyshakespeare(tmp_path, shakespeare_text):
    start = time.perf_counter()
    tok = BPETokenizer.train(shakespeare_text, vocab_size=4096)
    seconds = time.perf_counter() - start
    print(f"BPE vocab 4096 on tinyshakespeare: {seconds:.2f} s")
    assert tok.vocab_size == 4096
    assert seconds < 15
