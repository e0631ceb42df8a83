"""Every Hugging Face family lmforge imports and exports, checked against transformers itself
on small random models built here with each family's switches on (nothing is downloaded).

Per family: save_pretrained in several shards -> `lmforge import-hf` -> logits within 1e-4
of transformers' (float32) on a sequence longer than any sliding window, 30 greedy tokens
equal to transformers' greedy generate (lmforge with its KV cache) -> `lmforge export-hf` ->
AutoModelForCausalLM loads it with no missing or unexpected keys and gives the same logits."""

import json

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from lmforge.checkpoint import load_run, read_run_config  # noqa: E402
from lmforge.cli.main import main  # noqa: E402
from lmforge.interop import write_hf_tokenizer  # noqa: E402
from lmforge.tokenizers import BPETokenizer  # noqa: E402

TOL = 1e-4
VOCAB = 300
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
PEFT_TARGETS = {"phi3": ["qkv_proj", "down_proj"]}  # PEFT's names of the modules a test adapter sits on
FAMILIES = {  # name -> (config class, settings that switch the family's features on)
    "llama-tied": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_parameters=LLAMA3)),
    "llama-untied": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=16)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=32)),  # 2 x n_embd / n_head
    "gemma2": ("Gemma2Config", dict(num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
                                    sliding_window=16, attn_logit_softcapping=1.5, final_logit_softcapping=0.8)),
    "phi3": ("Phi3Config", dict(num_key_value_heads=2)),
}


@pytest.fixture(scope="module")
def tokenizer():
    return BPETokenizer.train("the quick brown fox jumps over the lazy dog. " * 40, 280, pattern="gpt2")


def hf_model(name: str):
    cls, settings = FAMILIES[name]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(getattr(transformers, cls)(**BASE, **settings)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:  # norms start at 1 (Gemma: 0) and biases at 0: make them matter
                p.add_(torch.randn_like(p) * 0.3)
            else:
                p.normal_(std=0.15)
    return model


def hf_dir(tmp_path, name, tokenizer):
    model = hf_model(name)
    d = tmp_path / "hf"
    model.save_pretrained(d, max_shard_size="60KB")
    write_hf_tokenizer(tokenizer, d)
    return model, d


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_import_generate_export(tmp_path, tokenizer, name):
    hf, d = hf_dir(tmp_path, name, tokenizer)
    assert (d / "model.safetensors.index.json").is_file()  # sharded
    assert main(["import-hf", str(d), "--out", str(tmp_path / "run")]) == 0
    model, _ = load_run(tmp_path / "run")
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 40))  # longer than the sliding windows (16)
    with torch.no_grad():
        assert max_diff(model(ids), hf(ids).logits) <= TOL

    prompt = ids[:1, :10]
    ours = model.generate(prompt, max_new_tokens=30, temperature=0.0)  # 40 tokens: past the window
    hf.generation_config.eos_token_id = None  # all 30 tokens, as lmforge generates
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False,
                         pad_token_id=0)
    assert ours.tolist() == theirs.tolist()

    assert main(["export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "back"),
                 "--max-shard-size", "60000"]) == 0
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file()
    back, info = AutoModelForCausalLM.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        assert max_diff(back.eval()(ids).logits, hf(ids).logits) <= TOL
    gen = json.loads((tmp_path / "back" / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)


def test_switches_are_on_and_generation_is_kept(tmp_path, tokenizer):
    _, d = hf_dir(tmp_path, "gemma2", tokenizer)
    assert main(["import-hf", str(d), "--out", str(tmp_path / "run")]) == 0
    rc = read_run_config(tmp_path / "run")
    mc = rc["model_config"]
    assert (mc["head_dim"], mc["sliding_window"], mc["sliding_window_layers"]) == (32, 16, "even")
    assert (mc["attn_softcap"], mc["final_softcap"], mc["norm_unit_offset"], mc["post_norms"]) == (1.5, 0.8, True, True)
    assert mc["attn_scale"] == pytest.approx(24 ** -0.5) and mc["mlp"] == "geglu" and mc["embed_scale"]
    assert rc["generation"]["bos_token_id"] == 1 and rc["generation"]["eos_token_id"] == [2]


def test_dtype_is_kept_unless_asked(tmp_path, tokenizer):
    hf, d = hf_dir(tmp_path, "llama-untied", tokenizer)
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", max_shard_size="60KB")
    write_hf_tokenizer(tokenizer, tmp_path / "bf16")
    assert main(["import-hf", str(tmp_path / "bf16"), "--out", str(tmp_path / "a")]) == 0
    assert main(["import-hf", str(d), "--out", str(tmp_path / "b"), "--dtype", "bfloat16"]) == 0
    for run in ("a", "b"):
        with safe_open(str(tmp_path / run / "model.safetensors"), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    model, _ = load_run(tmp_path / "a", inference=False)
    assert model.tok_emb.weight.dtype == torch.bfloat16


def _break(d, how):
    if how == "no config":
        (d / "config.json").unlink()
    elif how == "missing shard":
        index = json.loads((d / "model.safetensors.index.json").read_text())
        (d / sorted(set(index["weight_map"].values()))[-1]).unlink()
    elif how == "wrong shapes":
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    elif how == "unsupported type":
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "model_type": "mixtral"}))
    elif how == "yarn":
        cfg = json.loads((d / "config.json").read_text())
        cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
        (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("how, message", [
    ("no config", "config not found"), ("missing shard", "weights shard not found"),
    ("wrong shapes", "has shape"), ("unsupported type", "model_type 'mixtral' is not supported"),
    ("yarn", "RoPE scaling 'yarn' is not supported"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, tokenizer, capsys, how, message):
    _, d = hf_dir(tmp_path, "mistral", tokenizer)
    _break(d, how)
    capsys.readouterr()
    assert main(["import-hf", str(d), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "run").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no staging directory left either


@pytest.mark.parametrize("name", list(FAMILIES))
def test_peft_adapters_both_ways(tmp_path, tokenizer, name):
    """lmforge's fused qkv / gate-up LoRA -> PEFT's q_proj, k_proj, ... (one A, B split by rows),
    and a PEFT adapter on q_proj + v_proj + down_proj -> lmforge (block-diagonal B at rank 2r)."""
    peft = pytest.importorskip("peft")
    from lmforge.adapters import save_adapter
    from lmforge.nn.lora import apply_lora

    hf, d = hf_dir(tmp_path, name, tokenizer)
    assert main(["import-hf", str(d), "--out", str(tmp_path / "run")]) == 0
    model, _ = load_run(tmp_path / "run", inference=False)
    apply_lora(model, ["attn.qkv", "mlp.fc", "mlp.proj"], r=4, alpha=8, dropout=0.0)
    torch.manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2)
    save_adapter(model, tmp_path / "ad", base_config=read_run_config(tmp_path / "run"))
    assert main(["export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "back"),
                 "--adapter", str(tmp_path / "ad")]) == 0
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "back"),
                                            tmp_path / "back" / "adapter").eval()
    ids = torch.randint(3, VOCAB, (2, 24))
    with torch.no_grad():
        assert max_diff(model.eval()(ids), theirs(input_ids=ids).logits) <= TOL

    made = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0,
                                                   target_modules=PEFT_TARGETS.get(name, ["q_proj", "v_proj",
                                                                                          "down_proj"])))
    with torch.no_grad():
        for n, p in made.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2)
    made.save_pretrained(tmp_path / "peft")
    assert main(["import-hf", str(d), "--out", str(tmp_path / "run2"), "--adapter", str(tmp_path / "peft")]) == 0
    ours, _ = load_run(tmp_path / "run2", adapter=tmp_path / "run2" / "adapter")
    with torch.no_grad():
        assert max_diff(ours(ids), made.eval()(input_ids=ids).logits) <= TOL


@pytest.mark.parametrize("name", list(FAMILIES))
def test_lora_finetune_and_merge_on_every_family(tmp_path, tokenizer, name):
    """`lmforge finetune` (LoRA on every linear) trains on each family, and `lmforge merge` folds
    the adapter in: the merged run's export gives transformers the adapted model's logits."""
    hf, d = hf_dir(tmp_path, name, tokenizer)
    assert main(["import-hf", str(d), "--out", str(tmp_path / "run"), "--dtype", "float32"]) == 0
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog.\n" * 400)
    assert main(["prepare", "--input", str(tmp_path / "a.txt"), "--tokenizer", str(tmp_path / "run" / "tokenizer.json"),
                 "--out", str(tmp_path / "data"), "--no-progress"]) == 0
    assert main(["finetune", "--base", str(tmp_path / "run"), "--data", str(tmp_path / "data"),
                 "--out", str(tmp_path / "ad"), "--lora-targets", "all-linear", "--no-progress",
                 "--set", "max_iters=8", "eval_interval=4", "eval_iters=1", "batch_size=2",
                 "learning_rate=3e-2", "warmup_iters=0"]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "ad" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert losses[-1] < losses[0]  # it learned something of the new text
    assert main(["merge", "--base", str(tmp_path / "run"), "--adapter", str(tmp_path / "ad"),
                 "--out", str(tmp_path / "merged")]) == 0
    adapted, _ = load_run(tmp_path / "run", adapter=tmp_path / "ad", inference=False)
    assert main(["export-hf", str(tmp_path / "merged"), "--out", str(tmp_path / "out")]) == 0
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(3, VOCAB, (2, 24))
    with torch.no_grad():
        assert max_diff(adapted.eval()(ids), theirs(input_ids=ids).logits) <= TOL


def test_sliding_window_mask_is_the_band_p_minus_w_to_p():
    from lmforge.nn.attention import sliding_window_mask

    m = sliding_window_mask(torch.arange(6), 6, 3)
    want = torch.tensor([[j <= p and j > p - 3 for j in range(6)] for p in range(6)])
    assert torch.equal(m, want)
    assert sliding_window_mask(torch.tensor([[5], [2]]), 6, 3).shape == (2, 1, 1, 6)


def test_softcap_and_llama3_frequencies_follow_their_formulas():
    import math

    from lmforge.nn.rope_scaling import llama3_frequencies
    from lmforge.nn.softcap import softcap

    x = torch.linspace(-100, 100, 11)
    assert torch.allclose(softcap(x, 30.0), 30.0 * torch.tanh(x / 30.0)) and softcap(x, None) is x
    inv = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    got = llama3_frequencies(inv, 8.0, 1.0, 4.0, 8192)
    for f, g in zip(inv.tolist(), got.tolist()):
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4:
            want = f
        elif wavelen > 8192 / 1:
            want = f / 8
        else:
            s = (8192 / wavelen - 1) / (4 - 1)
            want = (1 - s) * f / 8 + s * f
        assert g == pytest.approx(want, rel=1e-12)


def test_sliding_window_holds_in_the_batched_serving_cache():
    """Rows at different offsets (the server's SlotKVCache, explicit positions and masks),
    decoding past the window: each row's logits equal a full forward of its own sequence."""
    from lmforge.models.gpt import GPT, GPTConfig
    from lmforge.serve.slots import SlotKVCache

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                          head_dim=16, pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                          sliding_window=5, sliding_window_layers="even")).eval()
    seqs = [torch.randint(0, 50, (1, 3)), torch.randint(0, 50, (1, 8))]
    cache = SlotKVCache(2, 2, 2, 16, max_len=64)
    with torch.no_grad():
        for row, s in enumerate(seqs):
            cache.prefill(row, 1)
            model(s, cache=cache)
        for _ in range(6):  # both rows pass the window of 5
            nxt = torch.randint(0, 50, (2, 1))
            positions, mask = cache.decode(2)
            logits = model(nxt, cache=cache, positions=positions, mask=mask)  # (2, 1, V)
            for row in range(2):
                seqs[row] = torch.cat([seqs[row], nxt[row:row + 1]], dim=1)
                assert max_diff(logits[row, -1], model(seqs[row])[0, -1]) <= 1e-5


def test_a_tokenizer_json_of_the_llama3_style_comes_back_out(tmp_path):
    """A byte-level BPE trained with the `tokenizers` library (its own ids, a BOS added by the
    post-processor) goes in with import-hf and out with export-hf; AutoTokenizer then encodes
    as the original file does."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE
    from transformers import AutoTokenizer

    tk = Tokenizer(BPE())
    split = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), "isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["the quick brown fox jumps over the lazy dog 123 4567. " * 30],
                           trainers.BpeTrainer(vocab_size=290, special_tokens=["<s>", "</s>"], show_progress=False,
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    model = hf_model("llama-tied")
    d = tmp_path / "hf"
    model.save_pretrained(d)
    tk.save(str(d / "tokenizer.json"))
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] | trim }}</s>\n"
                "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                         "chat_template": template}))
    assert main(["import-hf", str(d), "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "chat_template.jinja").read_text() == template  # kept in the run
    assert main(["export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    text = "the lazy fox, 2024 jumps! über 東京"
    back = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert back(text)["input_ids"] == tk.encode(text).ids  # BOS included, as the original adds it
    chat = [{"role": "system", "content": "be brief "}, {"role": "user", "content": "the fox?"}]
    original = AutoTokenizer.from_pretrained(d)
    assert back.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        original.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)  # the template went out
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["bos_token_id"] == model.config.bos_token_id  # what the checkpoint said, kept
