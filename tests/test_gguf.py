"""`lmforge export-gguf` checked by llama.cpp itself (through llama-cpp-python) on models made here.

Per architecture (gpt2, llama with Llama 3.1 RoPE scaling, qwen2, qwen3, gemma2 with its window and
soft-caps; random weights large enough that every tensor matters) and for GPT-2- and Llama-shaped
models trained here: the f32 file's logits within 1e-3 of lmforge's and the same 30 greedy tokens.
For the trained models f16, bf16 and q8_0 files pick lmforge's greedy token on >= 90% of 30
positions (random weights, whose near-ties int8 rounding flips, >= 80%). llama.cpp's own
tokenization equals lmforge's on multilingual text for lmforge's BPE (both split patterns) and
tokenizer.json files (Llama 3-style byte-level, Qwen2-style, Llama 2-style SentencePiece). And the
import path against transformers itself: random Llama / Mistral / Qwen3 / Gemma 2 checkpoints ->
`import-hf` -> `export-gguf` give transformers' logits in llama.cpp.

llama.cpp's CPU GELU reads a table indexed by the input rounded to f16 (ggml's GGML_GELU_FP16), so
for the GELU architectures (gpt2, gemma2) the 1e-3 bound is checked against lmforge with that same
rounding, and plain lmforge within 5e-3."""

import json
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

from lmforge.chat.template import ChatTemplate, save_chat_template  # noqa: E402
from lmforge.checkpoint import load_run, save_run  # noqa: E402
from lmforge.cli.main import main  # noqa: E402
from lmforge.interop.gguf_export import export_gguf, gguf_arch  # noqa: E402
from lmforge.interop.hf_tokenizer import read_hf_tokenizer  # noqa: E402
from lmforge.models.gpt import GPT, GPTConfig  # noqa: E402
from lmforge.tokenizers import BPETokenizer, CharTokenizer  # noqa: E402

TOL, GELU_TOL = 1e-3, 5e-3
MULTILINGUAL = [  # NFC text (llama.cpp applies no normalizer; Qwen's files NFC-normalize)
    "Grüße aus München! Straße, naïve café", "你好，世界！我们今天训练一个分词器。日本語のテキスト",
    "مرحبا بالعالم، كيف حالك؟", "नमस्ते दुनिया, यह एक परीक्षण है।", "Emoji: 👩‍👩‍👧 🇩🇪 👍🏽 🙂🚀✨",
    "x" * 50 + "   \n\n\n\t\t  " + "1234567890" * 3 + " 3.14159, 1,000,000",
    "    indented\r\nwindows\n\n\n   trailing   ", " leading space", " ", "\n", "don't WE'LL they've I'M",
]
ROPE = dict(bias=False, pos_encoding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, mlp_hidden_size=96,
            norm_eps=1e-6)
FAMILIES = {  # name -> GPTConfig switches (vocab, context, depth and width are BASE's)
    "gpt2": dict(),
    "gpt2-nobias-sinusoidal": dict(bias=False, pos_encoding="sinusoidal", tie_embeddings=False),
    "llama3": dict(ROPE, rope_scaling="llama3", rope_theta=500000.0, rope_original_max_position=32),
    "llama-untied": dict(ROPE, tie_embeddings=False, n_kv_head=4),
    "qwen2": dict(ROPE, qkv_bias=True, rope_theta=1e6),
    "qwen3": dict(ROPE, qk_norm=True, qk_norm_eps=1e-6, head_dim=32),
    "gemma2": dict(ROPE, mlp="geglu", head_dim=32, norm_unit_offset=True, embed_scale=True, post_norms=True,
                   sliding_window=16, sliding_window_layers="even", attn_softcap=1.5, final_softcap=0.8),
}
ARCH = {"gpt2": "gpt2", "gpt2-nobias-sinusoidal": "gpt2", "llama3": "llama", "llama-untied": "llama",
        "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2"}


@pytest.fixture(scope="module")
def text(shakespeare_text) -> str:
    return shakespeare_text[:40_000] + " ".join(MULTILINGUAL)


@pytest.fixture(scope="module")
def tokenizer(text):
    return BPETokenizer.train(text, 400, pattern="gpt2")


def ggml_gelu(orig):
    """GELU as ggml's CPU kernel computes it: the tanh form at the input rounded to f16, the
    result rounded to f16; 0 below -10 and x above 10."""
    def gelu(x, approximate="none"):
        y = orig(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))
    return gelu


@contextmanager
def no_weight_repacking():
    """llama.cpp's CPU backend repacks q8_0 weights for its AMX / int8 kernels ("extra buffer
    types"); on the AMX Xeon these tests were written on that path crashes (a segfault in decode,
    also for files made by llama.cpp's own quantizer), so the files are loaded without it."""
    from llama_cpp import llama_cpp as lib

    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = default


def open_gguf(path, n_ctx=128):
    # f32 KV cache: llama.cpp's default f16 cache would round every key and value
    with no_weight_repacking():
        return llama_cpp.Llama(str(path), logits_all=True, n_ctx=n_ctx, n_threads=2, verbose=False,
                               type_k=0, type_v=0)


def their_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


def their_greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


def random_run(tmp_path, name, tokenizer):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=416, block_size=128, n_layer=2, n_head=4, n_embd=64, **FAMILIES[name])
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norms start at 1 (Gemma: 0) and biases at 0: make them matter
                p.add_(torch.randn_like(p) * 0.3)
            else:
                p.normal_(std=0.15)
    run = tmp_path / name
    save_run(run, model, tokenizer)
    return run


def check_against_llama_cpp(run, path, gelu: bool, monkeypatch, n_greedy=30):
    """f32 logits and greedy tokens of the file vs the run's; returns (model, lmforge's greedy ids)."""
    model, _ = load_run(run, inference=False)
    torch.manual_seed(1)
    ids = torch.randint(3, 400, (1, 40))  # longer than gemma2's window (16)
    llm = open_gguf(path)
    try:
        theirs = their_logits(llm, ids[0].tolist())
        with torch.no_grad():
            plain = model(ids)[0].numpy()
            if gelu:
                monkeypatch.setattr(F, "gelu", ggml_gelu(F.gelu))
                same_gelu = model(ids)[0].numpy()
                monkeypatch.undo()
                assert np.abs(plain - theirs).max() <= GELU_TOL
            else:
                same_gelu = plain
        assert np.abs(same_gelu - theirs).max() <= TOL
        prompt = ids[:, :10]
        ours = model.generate(prompt, max_new_tokens=n_greedy, temperature=0.0)[0, 10:].tolist()
        assert their_greedy(llm, prompt[0].tolist(), n_greedy) == ours
    finally:
        llm.close()
    return model, prompt, ours


def q8_agreement(path, model, prompt, ours) -> float:
    """Share of the positions of lmforge's greedy continuation where the q8_0 file's argmax is
    lmforge's token (teacher-forced, so one early difference does not decide the rest)."""
    seq = prompt[0].tolist() + ours
    llm = open_gguf(path)
    try:
        scores = their_logits(llm, seq)
    finally:
        llm.close()
    picks = scores[len(prompt[0]) - 1:-1].argmax(-1)
    return float(np.mean(picks == np.array(ours)))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_f32_and_q8_0_in_llama_cpp(tmp_path, tokenizer, name, monkeypatch):
    run = random_run(tmp_path, name, tokenizer)
    model, _ = load_run(run, inference=False)
    assert gguf_arch(model.config) == ARCH[name]
    assert main(["export-gguf", str(run), "--out", str(tmp_path / "f32.gguf"), "--type", "f32"]) == 0
    assert gguf.GGUFReader(str(tmp_path / "f32.gguf")).fields["general.architecture"].contents() == ARCH[name]
    model, prompt, ours = check_against_llama_cpp(run, tmp_path / "f32.gguf", ARCH[name] in ("gpt2", "gemma2"),
                                                  monkeypatch)
    assert main(["export-gguf", str(run), "--out", str(tmp_path / "q8.gguf"), "--type", "q8_0"]) == 0
    assert (tmp_path / "q8.gguf").stat().st_size < 0.45 * (tmp_path / "f32.gguf").stat().st_size
    # random weights leave near-ties that int8 rounding flips (0.83-1.0 over five prompts here);
    # the >= 90% bound is the trained models' (test_trained_model_...)
    assert q8_agreement(tmp_path / "q8.gguf", model, prompt, ours) >= 0.8


def train(tokenizer, text, name, steps=150):
    torch.manual_seed(0)
    data = torch.tensor(tokenizer.encode(text[:40_000]))
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=64,
                          **FAMILIES[name]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 65, (16,))
        batch = torch.stack([data[s:s + 65] for s in starts])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), loss.item()


@pytest.mark.parametrize("name", ["gpt2", "llama3"])
def test_trained_model_f32_f16_bf16_q8_0(tmp_path, tokenizer, text, monkeypatch, name):
    model, loss = train(tokenizer, text, name)
    assert loss < 5.0  # it learned something (uniform over 400 tokens: 6.0)
    save_run(tmp_path / "run", model, tokenizer)
    for qtype in ("f32", "f16", "bf16", "q8_0"):
        export_gguf(tmp_path / "run", tmp_path / f"{qtype}.gguf", qtype)
    model, _ = load_run(tmp_path / "run", inference=False)
    prompt = torch.tensor([tokenizer.encode("ROMEO:\nWhat say")])
    llm = open_gguf(tmp_path / "f32.gguf", n_ctx=64)
    try:
        seq = model.generate(prompt, max_new_tokens=30, temperature=0.0)
        with torch.no_grad():
            monkeypatch.setattr(F, "gelu", ggml_gelu(F.gelu))
            same_gelu = model(seq)[0].numpy()
            monkeypatch.undo()
            plain = model(seq)[0].numpy()
        theirs = their_logits(llm, seq[0].tolist())
        assert np.abs(same_gelu - theirs).max() <= TOL and np.abs(plain - theirs).max() <= GELU_TOL
        assert their_greedy(llm, prompt[0].tolist(), 30) == seq[0, prompt.shape[1]:].tolist()
    finally:
        llm.close()
    ours = seq[0, prompt.shape[1]:].tolist()
    for qtype in ("f16", "bf16", "q8_0"):
        assert q8_agreement(tmp_path / f"{qtype}.gguf", model, prompt, ours) >= 0.9, qtype


# --- tokenizers ------------------------------------------------------------------------------------
def hf_byte_level(text, tmp_path, style):
    """A tokenizer.json made by the tokenizers library: Llama 3's (Split regex + ByteLevel,
    ignore_merges, BOS template) or Qwen2's (one-digit regex, NFC normalizer, merges always)."""
    tk = pytest.importorskip("tokenizers")
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE

    from lmforge.interop.gguf_tokenizer import LLAMA3_SPLIT, QWEN2_SPLIT
    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    t = tk.Tokenizer(BPE(ignore_merges=style == "hf-llama3"))
    if style == "hf-qwen2":
        t.normalizer = normalizers.NFC()
    split = LLAMA3_SPLIT if style == "hf-llama3" else QWEN2_SPLIT
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), "isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator([text], trainers.BpeTrainer(vocab_size=600, special_tokens=[bos, eos], show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, t.token_to_id(bos))])
    t.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos, "eos_token": eos}))
    return read_hf_tokenizer(tmp_path)


def hf_sentencepiece(text, tmp_path):
    """A Llama 2-style tokenizer.json: sentencepiece BPE with byte fallback, converted by
    transformers' LlamaConverter (legacy normalizer form)."""
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("transformers")
    from transformers.convert_slow_tokenizer import LlamaConverter, SentencePieceExtractor

    class Extractor(SentencePieceExtractor):  # transformers 5.x passes scores where extract wants a model type
        def extract(self, vocab_scores=None):
            kw = super().extract(None)
            return kw["vocab"], kw["merges"]

    class Converter(LlamaConverter):
        SpmExtractor = Extractor

    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=700, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   minloglevel=2)
    proc = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))

    class Slow:
        vocab_file, add_prefix_space, legacy = str(tmp_path / "sp.model"), True, True

        def convert_ids_to_tokens(self, i):
            return proc.id_to_piece(i)

    Converter(Slow()).converted().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}))
    return read_hf_tokenizer(tmp_path)


PRE = {"bpe-gpt2": "gpt-2", "bpe-gpt4": "llama-bpe", "hf-llama3": "llama-bpe", "hf-qwen2": "qwen2",
       "hf-sentencepiece": "default"}


@pytest.mark.parametrize("style", ["bpe-gpt2", "bpe-gpt4", "hf-llama3", "hf-qwen2", "hf-sentencepiece"])
def test_llama_cpp_tokenizes_as_lmforge(tmp_path, text, style):
    if style.startswith("bpe"):
        tok = BPETokenizer.train(text, 500, pattern=style.removeprefix("bpe-"))
    else:
        tok = hf_sentencepiece(text, tmp_path) if style == "hf-sentencepiece" else hf_byte_level(text, tmp_path, style)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32))
    save_run(tmp_path / "run", model, tok)
    export_gguf(tmp_path / "run", tmp_path / "t.gguf", "f32")
    llm = llama_cpp.Llama(str(tmp_path / "t.gguf"), vocab_only=True, verbose=False)
    try:
        specials = "".join(list(tok.special_tokens)[:2])
        for t in MULTILINGUAL + [text[:3000], f"{specials}Hello{specials} there"]:
            assert llm.tokenize(t.encode(), add_bos=False, special=True) == tok.encode(t), t
        assert (llm.token_bos() if tok.bos_id is not None else None) == tok.bos_id
        assert llm.metadata["tokenizer.ggml.add_bos_token"] == str(tok.add_bos).lower()
        assert llm.metadata["tokenizer.ggml.pre"] == PRE[style]
    finally:
        llm.close()


def test_special_ids_and_chat_template_are_kept(tmp_path, tokenizer):
    run = random_run(tmp_path, "llama3", tokenizer)
    source = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    save_chat_template(ChatTemplate(source), run)
    rc = json.loads((run / "config.json").read_text())
    eot = tokenizer.eot_id
    (run / "config.json").write_text(json.dumps({**rc, "generation": {"bos_token_id": eot, "eos_token_id": [eot]}}))
    export_gguf(run, tmp_path / "m.gguf", "f16")
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    try:
        assert llm.metadata["tokenizer.chat_template"] == source
        assert (llm.token_bos(), llm.token_eos()) == (eot, eot)
        assert llm.metadata["tokenizer.ggml.pre"] == "gpt-2" and llm.metadata["tokenizer.ggml.model"] == "gpt2"
    finally:
        llm.close()


# --- refusals --------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings, message", [
    (dict(ROPE, sliding_window=16), "has no sliding-window attention"),
    (dict(ROPE, mlp="geglu", norm_unit_offset=True, embed_scale=True, post_norms=True, attn_scale=0.3),
     "fixes the attention scale"),
    (dict(pos_encoding="rope"), "needs norm='rmsnorm'"),
    (dict(ROPE, qk_norm=True), "qk_norm_eps=None"),
])
def test_inexpressible_settings_are_refused(tmp_path, tokenizer, capsys, settings, message):
    model = GPT(GPTConfig(vocab_size=416, block_size=64, n_layer=1, n_head=4, n_embd=64, **settings))
    save_run(tmp_path / "run", model, tokenizer)
    capsys.readouterr()
    assert main(["export-gguf", str(tmp_path / "run"), "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not list(tmp_path.glob("*.gguf*"))


def test_char_tokenizer_is_refused(tmp_path, capsys):
    tok = CharTokenizer.train("hello world")
    save_run(tmp_path / "run", GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2,
                                             n_embd=16)), tok)
    capsys.readouterr()
    assert main(["export-gguf", str(tmp_path / "run"), "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert "'char' tokenizer has no GGUF form" in err and err.count("\n") == 1
    assert not list(tmp_path.glob("*.gguf*"))


# --- the import path: a transformers model -> import-hf -> export-gguf -> llama.cpp -------------------
HF = {  # family -> (transformers config class, settings)
    "llama": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=None)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=32)),
    "gemma2": ("Gemma2Config", dict(num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
                                    attn_logit_softcapping=1.5, final_logit_softcapping=0.8)),
}


@pytest.mark.parametrize("family", list(HF))
def test_imported_checkpoint_matches_transformers_in_llama_cpp(tmp_path, tokenizer, family):
    """transformers' own logits (an independent implementation) against the GGUF file of its
    `import-hf` run: the whole chain, including generation_config's BOS/EOS ids."""
    transformers = pytest.importorskip("transformers")
    cls, settings = HF[family]
    torch.manual_seed(0)
    cfg = getattr(transformers, cls)(vocab_size=416, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=128, bos_token_id=1,
                                     eos_token_id=2, **settings)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3) if p.dim() == 1 else p.normal_(std=0.15)
    hf.save_pretrained(tmp_path / "hf")
    from lmforge.interop import write_hf_tokenizer
    write_hf_tokenizer(tokenizer, tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    assert main(["export-gguf", str(tmp_path / "run"), "--out", str(tmp_path / "m.gguf"), "--type", "f32"]) == 0
    torch.manual_seed(1)
    ids = torch.randint(3, 400, (1, 40))
    llm = open_gguf(tmp_path / "m.gguf")
    try:
        theirs = their_logits(llm, ids[0].tolist())
        assert (llm.token_bos(), llm.token_eos()) == (1, 2)
    finally:
        llm.close()
    with torch.no_grad():
        ref = hf(ids).logits[0].numpy()
    assert np.abs(ref - theirs).max() <= (GELU_TOL if family == "gemma2" else TOL)
