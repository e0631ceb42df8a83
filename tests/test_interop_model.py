"""GPT-2 checkpoints to and from Hugging Face, checked against transformers itself on small
random models built here (nothing is downloaded). Tolerance: max |logit difference| <= 1e-4
in float32 (observed ~3e-7: the two libraries run the same arithmetic in a different order)."""

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel  # noqa: E402

from conftest import SHARED  # noqa: E402
from lmforge.checkpoint import load_run, read_run_config, save_run  # noqa: E402
from lmforge.cli.main import main  # noqa: E402
from lmforge.errors import LMForgeError  # noqa: E402
from lmforge.interop import export_hf, import_hf  # noqa: E402
from lmforge.models.gpt import GPT, GPTConfig  # noqa: E402
from lmforge.tokenizers import BPETokenizer, CharTokenizer  # noqa: E402

GPT2_TOK = SHARED / "data" / "gpt2-tokenizer"
TOL = 1e-4
SMALL = dict(n_positions=64, n_embd=64, n_layer=2, n_head=4)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def add_gpt2_tokenizer(directory) -> None:
    if not GPT2_TOK.is_dir():
        pytest.skip("GPT-2 tokenizer files not found in shared/data")
    shutil.copy(GPT2_TOK / "encoder.json", directory / "vocab.json")
    shutil.copy(GPT2_TOK / "vocab.bpe", directory / "merges.txt")


@pytest.fixture(scope="module")
def trained_tokenizer(shakespeare_text) -> BPETokenizer:
    return BPETokenizer.train(shakespeare_text[:60_000], 600, pattern="gpt2")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shakespeare_text, trained_tokenizer):
    """A tiny lmforge GPT trained for a few dozen steps, so its next-token choices are clear."""
    torch.manual_seed(0)
    tok = trained_tokenizer
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=64))
    data = torch.tensor(tok.encode(shakespeare_text[:20_000]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        starts = torch.randint(0, len(data) - 65, (8,))
        batch = torch.stack([data[s:s + 65] for s in starts])  # (8, 65)
        _, loss = model(batch[:, :-1], targets=batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    run = tmp_path_factory.mktemp("trained") / "run"
    save_run(run, model.eval(), tok)
    return run


def test_import_random_gpt2_gives_transformers_logits(tmp_path):
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50257, **SMALL)).eval()
    hf.save_pretrained(tmp_path / "hf")
    add_gpt2_tokenizer(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    model, tok = load_run(tmp_path / "run")
    ids = torch.tensor([tok.encode("Hello world, this is a test of the imported GPT-2.")])
    with torch.no_grad():
        assert max_diff(model(ids), hf(ids).logits) <= TOL
    assert tok.encode("Hello world") == [15496, 995]
    assert model.config.tie_embeddings and model.lm_head.weight is model.tok_emb.weight


def test_import_untied_bin_with_buffers_and_options(tmp_path):
    """pytorch_model.bin as older transformers wrote it (attn.bias mask buffers inside), an
    untied head, a custom MLP width and layer_norm_epsilon."""
    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=50257, n_inner=96, layer_norm_epsilon=1e-6, tie_word_embeddings=False,
                     activation_function="gelu_pytorch_tanh", **SMALL)
    hf = GPT2LMHeadModel(cfg).eval()
    d = tmp_path / "hf"
    d.mkdir()
    state = dict(hf.state_dict())
    for i in range(cfg.n_layer):
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64, dtype=torch.bool))
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, d / "pytorch_model.bin")
    cfg.save_pretrained(d)
    add_gpt2_tokenizer(d)
    import_hf(d, tmp_path / "run")
    model, _ = load_run(tmp_path / "run")
    assert model.config.mlp_hidden == 96 and model.config.norm_eps == 1e-6
    assert model.lm_head.weight is not model.tok_emb.weight
    ids = torch.randint(0, 50257, (2, 24))
    with torch.no_grad():
        assert max_diff(model(ids), hf(ids).logits) <= TOL


def test_import_sharded_safetensors(tmp_path):
    torch.manual_seed(2)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50257, **SMALL)).eval()
    hf.save_pretrained(tmp_path / "hf", max_shard_size="1MB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    if GPT2_TOK.is_dir():
        import_hf(tmp_path / "hf", tmp_path / "run", tokenizer_dir=GPT2_TOK)
    else:  # a clone without shared/data: a small BPE stands in for GPT-2's
        from lmforge.interop import write_hf_tokenizer

        write_hf_tokenizer(BPETokenizer.train("a small text for a stand-in tokenizer. " * 50, 300), tmp_path / "hf")
        import_hf(tmp_path / "hf", tmp_path / "run")
    model, _ = load_run(tmp_path / "run")
    ids = torch.randint(0, 50257, (1, 16))
    with torch.no_grad():
        assert max_diff(model(ids), hf(ids).logits) <= TOL


def test_export_trained_run_matches_transformers_and_greedy_generation(tmp_path, trained_run):
    export_hf(trained_run, tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model, tok = load_run(trained_run)
    prompt = "ROMEO:\nWhat light through yonder"
    ids = tok.encode(prompt)
    assert hf_tok(prompt)["input_ids"] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        assert max_diff(model(x), hf(x).logits) <= TOL
    ours = model.generate(x, max_new_tokens=30, temperature=0.0)
    hf.generation_config.eos_token_id = None  # generate all 30 tokens, as lmforge does
    theirs = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=30, do_sample=False,
                         pad_token_id=0)
    assert ours.shape == (1, len(ids) + 30)
    assert ours.tolist() == theirs.tolist()


def test_export_then_import_gives_the_same_weights(tmp_path, trained_run):
    export_hf(trained_run, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "back")
    a, tok_a = load_run(trained_run)
    b, tok_b = load_run(tmp_path / "back")
    assert a.config == b.config.replace(dropout=a.config.dropout)
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), name
    assert tok_a.ranks == tok_b.ranks and tok_a.special_tokens == tok_b.special_tokens


def test_export_untied_model(tmp_path, trained_tokenizer):
    torch.manual_seed(3)
    model = GPT(GPTConfig(vocab_size=1000, block_size=32, n_layer=2, n_head=4, n_embd=64,
                          tie_embeddings=False, norm_eps=1e-6, mlp_ratio=3.0)).eval()
    save_run(tmp_path / "run", model, trained_tokenizer)
    export_hf(tmp_path / "run", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["n_inner"] == 192
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 1000, (2, 20))
    with torch.no_grad():
        assert max_diff(model(ids), hf(ids).logits) <= TOL


@pytest.mark.parametrize("option, value", [
    ("pos_encoding", "rope"), ("pos_encoding", "sinusoidal"), ("norm", "rmsnorm"), ("mlp", "swiglu"),
    ("n_kv_head", 2), ("bias", False), ("qk_norm", True),
])
def test_export_refuses_what_gpt2_cannot_express(tmp_path, trained_tokenizer, option, value):
    model = GPT(GPTConfig(vocab_size=600, block_size=32, n_layer=1, n_head=4, n_embd=32, **{option: value}))
    save_run(tmp_path / "run", model, trained_tokenizer)
    with pytest.raises(LMForgeError, match=f"GPT-2 cannot express {option}="):
        export_hf(tmp_path / "run", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_char_tokenizer_needs_no_tokenizer_flag(tmp_path):
    tok = CharTokenizer("abcdefgh ")
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    save_run(tmp_path / "run", model, tok)
    with pytest.raises(LMForgeError, match="no-tokenizer"):
        export_hf(tmp_path / "run", tmp_path / "hf")
    export_hf(tmp_path / "run", tmp_path / "hf", tokenizer=False)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([tok.encode("bad cafe")])
    with torch.no_grad():
        assert max_diff(model.eval()(ids), hf(ids).logits) <= TOL


def _hf_dir(tmp_path, **overrides):
    d = tmp_path / "hf"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, **SMALL)).save_pretrained(d)
    add_gpt2_tokenizer(d)
    if overrides:
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, **overrides}))
    return d


@pytest.mark.parametrize("overrides, message", [
    ({"model_type": "mixtral"}, "model_type 'mixtral' is not supported; import-hf reads gpt2, llama"),
    ({"activation_function": "relu"}, "activation_function 'relu'"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"n_layer": 3}, "lacks"),
])
def test_import_rejects_configs_lmforge_cannot_run(tmp_path, overrides, message):
    d = _hf_dir(tmp_path, **overrides)
    with pytest.raises(LMForgeError, match=message):
        import_hf(d, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("missing, message", [
    ("config.json", "config not found"), ("model.safetensors", "no weights"), ("merges.txt", "no tokenizer"),
])
def test_import_missing_files(tmp_path, missing, message):
    d = _hf_dir(tmp_path)
    (d / missing).unlink()
    with pytest.raises(LMForgeError, match=message):
        import_hf(d, tmp_path / "run")


def test_cli_round_trip_and_errors(tmp_path, trained_run, capsys):
    assert main(["export-hf", str(trained_run), "--out", str(tmp_path / "hf")]) == 0
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    assert read_run_config(tmp_path / "run")["source"]["format"] == "huggingface-gpt2"
    assert main(["import-hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "directory not found" in capsys.readouterr().err
