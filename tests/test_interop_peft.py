"""LoRA adapters to and from PEFT's format, checked against peft itself on a small GPT-2
built here. Tolerance: max |logit difference| <= 1e-4 in float32."""

import json

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, GPT2LMHeadModel  # noqa: E402

from lmforge.adapters import save_adapter  # noqa: E402
from lmforge.checkpoint import load_run, read_run_config, save_run  # noqa: E402
from lmforge.cli.main import main  # noqa: E402
from lmforge.errors import LMForgeError  # noqa: E402
from lmforge.interop import export_hf, import_hf  # noqa: E402
from lmforge.interop.peft import hf_module, lmforge_module  # noqa: E402
from lmforge.models.gpt import GPT, GPTConfig  # noqa: E402
from lmforge.nn.lora import apply_lora  # noqa: E402
from lmforge.tokenizers import BPETokenizer  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, shakespeare_text):
    torch.manual_seed(0)
    tok = BPETokenizer.train(shakespeare_text[:30_000], 500, pattern="gpt2")
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=64))
    run = tmp_path_factory.mktemp("peft") / "run"
    save_run(run, model, tok)
    return run


def make_adapter(run, path, targets, rslora=False):
    """An lmforge adapter with random B (a freshly initialised one has B = 0, which would make
    every comparison trivially equal)."""
    torch.manual_seed(1)
    model, _ = load_run(run)
    apply_lora(model, targets, r=4, alpha=8, dropout=0.1, rslora=rslora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    save_adapter(model, path, base_config=read_run_config(run))
    return path


def test_module_names_map_both_ways():
    assert hf_module("blocks.3.attn.qkv") == "transformer.h.3.attn.c_attn"
    assert hf_module("blocks.0.mlp.proj") == "transformer.h.0.mlp.c_proj"
    for name in ("blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.0.mlp.fc", "blocks.0.mlp.proj", "lm_head"):
        assert lmforge_module(hf_module(name)) == name
    with pytest.raises(LMForgeError, match="no GPT-2 counterpart"):
        hf_module("tok_emb")


@pytest.mark.parametrize("targets, rslora", [
    (["all-linear"], False),
    (["attn.qkv", "blocks.1.mlp.proj"], True),  # one layer only: PEFT gets full module names
])
def test_exported_adapter_gives_peft_the_same_logits(tmp_path, base_run, targets, rslora):
    adapter = make_adapter(base_run, tmp_path / "adapter", targets, rslora)
    export_hf(base_run, tmp_path / "hf", adapter=adapter)
    peft_cfg = json.loads((tmp_path / "hf" / "adapter" / "adapter_config.json").read_text())
    assert peft_cfg["peft_type"] == "LORA" and peft_cfg["use_rslora"] is rslora
    base = GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    peft_model = PeftModel.from_pretrained(base, tmp_path / "hf" / "adapter").eval()
    ours, _ = load_run(base_run, adapter=adapter)
    plain, _ = load_run(base_run)
    ids = torch.randint(0, 500, (2, 24))
    with torch.no_grad():
        adapted = ours(ids)
        assert (adapted - plain(ids)).abs().max().item() > 1e-2  # the adapter does change the model
        assert (adapted - peft_model(input_ids=ids).logits).abs().max().item() <= TOL


def test_untied_head_adapter_round_trips_through_peft(tmp_path, base_run):
    """lm_head is an nn.Linear in transformers, not a Conv1D: PEFT must not transpose it."""
    torch.manual_seed(3)
    tok = load_run(base_run)[1]
    run = tmp_path / "untied"
    save_run(run, GPT(GPTConfig(vocab_size=500, block_size=32, n_layer=1, n_head=4, n_embd=32,
                                tie_embeddings=False)), tok)
    adapter = make_adapter(run, tmp_path / "adapter", ["attn.proj", "lm_head"])
    export_hf(run, tmp_path / "hf", adapter=adapter)
    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "hf"),
                                           tmp_path / "hf" / "adapter").eval()
    ours, _ = load_run(run, adapter=adapter)
    ids = torch.randint(0, 500, (2, 16))
    # transformers' own PEFT integration loads base + adapter from the adapter folder alone
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / "adapter").eval()
    with torch.no_grad():
        assert (ours(ids) - peft_model(input_ids=ids).logits).abs().max().item() <= TOL
        assert (ours(ids) - auto(input_ids=ids).logits).abs().max().item() <= TOL


@pytest.mark.parametrize("targets, rslora", [(["c_attn", "c_proj"], False), (["c_fc"], True)])
def test_adapter_made_by_peft_imports(tmp_path, targets, rslora):
    torch.manual_seed(2)
    run_dir = tmp_path / "run"
    # a base exported by lmforge, then an adapter trained (here: randomised) by peft on it
    tok = BPETokenizer.train("the quick brown fox jumps over the lazy dog " * 30, 300, pattern="gpt2")
    save_run(run_dir, GPT(GPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=4, n_embd=32)), tok)
    export_hf(run_dir, tmp_path / "hf")
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "hf"), LoraConfig(
        r=4, lora_alpha=16, lora_dropout=0.0, target_modules=targets, fan_in_fan_out=True, use_rslora=rslora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    model.save_pretrained(tmp_path / "peft")
    import_hf(tmp_path / "hf", tmp_path / "imported", adapter=tmp_path / "peft")
    ours, _ = load_run(tmp_path / "imported", adapter=tmp_path / "imported" / "adapter")
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert (ours(ids) - model.eval()(input_ids=ids).logits).abs().max().item() <= TOL


def test_cli_export_and_import_with_adapters(tmp_path, base_run):
    adapter = make_adapter(base_run, tmp_path / "adapter", ["attn.qkv"])
    assert main(["export-hf", str(base_run), "--out", str(tmp_path / "hf"), "--adapter", str(adapter),
                 "--adapter-out", str(tmp_path / "peft")]) == 0
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run"),
                 "--adapter", str(tmp_path / "peft"), "--adapter-out", str(tmp_path / "back")]) == 0
    a, _ = load_run(base_run, adapter=adapter)
    b, _ = load_run(tmp_path / "run", adapter=tmp_path / "back")
    ids = torch.randint(0, 500, (1, 16))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


def _peft_dir(tmp_path, base_run):
    adapter = make_adapter(base_run, tmp_path / "adapter", ["attn.qkv"])
    export_hf(base_run, tmp_path / "hf", adapter=adapter)
    return tmp_path / "hf", tmp_path / "hf" / "adapter"


@pytest.mark.parametrize("change, message", [
    ({"peft_type": "PREFIX_TUNING"}, "only LORA"),
    ({"use_dora": True}, "use_dora"),
    ({"rank_pattern": {"c_attn": 8}}, "rank_pattern"),
    ({"r": 8}, "expected"),  # the tensors say r = 4
])
def test_import_refuses_adapters_lmforge_cannot_represent(tmp_path, base_run, change, message):
    hf_dir, peft_dir = _peft_dir(tmp_path, base_run)
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    (peft_dir / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(LMForgeError, match=message):
        import_hf(hf_dir, tmp_path / "run", adapter=peft_dir)
    assert not (tmp_path / "run").exists()  # checked before anything is written


def test_import_errors_for_wrong_adapter_files(tmp_path, base_run):
    hf_dir, peft_dir = _peft_dir(tmp_path, base_run)
    with pytest.raises(LMForgeError, match="lmforge adapter, not a PEFT one"):
        import_hf(hf_dir, tmp_path / "run", adapter=tmp_path / "adapter")
    (peft_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(LMForgeError, match="no adapter weights"):
        import_hf(hf_dir, tmp_path / "run", adapter=peft_dir)
    with pytest.raises(LMForgeError, match="not found"):
        import_hf(hf_dir, tmp_path / "run", adapter=tmp_path / "nowhere")
