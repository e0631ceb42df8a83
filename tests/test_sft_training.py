"""Instruction fine-tuning runs: packed batches equal to padded ones (loss and gradients), exact
resume, the mask's effect on training, exact-match scoring, and the result used by chat, merge
and PEFT. Tiny models built and trained here; float32 throughout."""

import io
import json
import random

import pytest
import torch

from lmforge.chat import ChatFormat, chat_format
from lmforge.checkpoint import load_run, read_run_config, save_run
from lmforge.cli.main import main
from lmforge.errors import LMForgeError
from lmforge.generation import eos_ids
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.sft import SFTBatches, answer, collate, exact_match, load_examples
from lmforge.sft.render import encode_conversation
from lmforge.train.finetune import build_finetune_trainer
from sft_common import CHATML, FAST, _convs, chat, runs, sums, tok, write_jsonl  # noqa: F401 (fixtures)


def _examples(tok, n=12, train_on_prompt=False):
    fmt = ChatFormat(None, eos_ids(tok))
    rng = random.Random(1)
    recs = [chat("Say " + " ".join(rng.choice(["yes", "no", "maybe"]) for _ in range(rng.randint(1, 12))),
                 " ".join(rng.choice(["ok", "fine", "sure"]) for _ in range(rng.randint(1, 6)))) for _ in range(n)]
    return [encode_conversation(c, tok, fmt, train_on_prompt) for c in _convs(recs)]


CONFIGS = {
    "gpt2": {},
    "llama (rope, gqa)": dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", n_head=4, n_kv_head=2, bias=False),
    "sliding window": dict(pos_encoding="rope", sliding_window=6),
    "softcap (reference attention)": dict(attn_softcap=20.0, final_softcap=30.0),
}


@pytest.mark.parametrize("config", CONFIGS)
def test_packed_equals_padded_equals_one_by_one(tok, config):
    torch.manual_seed(0)
    shape = dict(vocab_size=tok.vocab_size, block_size=512, n_layer=2, n_head=2, n_embd=32)
    model = GPT(GPTConfig(**{**shape, **CONFIGS[config]})).eval()
    with torch.no_grad():  # larger weights than GPT-2's init, so attention patterns matter
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(std=0.2)
    exs = _examples(tok, train_on_prompt=config != "llama (rope, gqa)")  # one with answers only
    idx = list(range(len(exs)))
    padded = collate(exs, [[i] for i in idx])
    packed_rows = [idx[:5], idx[5:9], idx[9:]]
    packed = collate(exs, packed_rows, packed=True)
    assert padded[0].shape[0] == len(exs) and packed[0].shape[0] == 3
    assert packed[4].dtype == torch.bool and packed[3][0, :3].tolist() == [0, 1, 2]
    with torch.no_grad():
        loss_padded = model(*padded)[1]
        loss_packed = model(*packed)[1]
        loss_packed_fast = model(*packed, return_logits=False)[1]
        # reference: each example alone, the token losses summed and divided by their count
        total, count = 0.0, 0
        for e in exs:
            x, y = (torch.from_numpy(a)[None] for a in e.inputs_and_targets())
            logits = model(x)
            total += torch.nn.functional.cross_entropy(logits[0], y[0], ignore_index=-1, reduction="sum").item()
            count += int((y != -1).sum())
    ref = total / count
    assert abs(loss_padded.item() - ref) <= 1e-5 and abs(loss_packed.item() - ref) <= 1e-5
    assert abs(loss_packed_fast.item() - ref) <= 1e-5
    with torch.no_grad():  # what the test would miss: attention across examples, positions that run on
        x, y, _, pos, mask = packed
        assert abs(model(x, y, None, pos, None)[1].item() - ref) > 1e-3
        if model.config.pos_encoding == "learned":  # RoPE sees only distances, the same either way
            assert abs(model(x, y, None, None, mask)[1].item() - ref) > 1e-3
    if config == "sliding window":  # the window does cut attention here: rows are longer than it
        assert max(len(e) for e in exs) > 6


def test_packed_gradients_equal_padded(tok):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32))
    exs = _examples(tok)
    grads = []
    for batch in (collate(exs, [[i] for i in range(len(exs))]), collate(exs, [list(range(6)), list(range(6, 12))],
                                                                      packed=True)):
        model.zero_grad()
        model(*batch)[1].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert (grads[0] - grads[1]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("pack", [False, True])
def test_batches_cover_an_epoch_and_resume_exactly(tok, pack):
    exs = _examples(tok, n=30)
    b = SFTBatches(exs[:25], exs[25:], batch_size=4, block_size=64, pack=pack, seed=0)
    seen = []
    for _ in range(len(b._make_plan("train", torch.Generator().manual_seed(0)))):
        x = b.get_batch("train")[0]
        seen.append(x.shape)
    assert b.tokens_per_batch() > 0
    if not pack:  # grouped by length: the batches are mostly real tokens
        assert len(seen) == 7
    state = b.state_dict()
    nxt = [b.get_batch("train") for _ in range(5)]
    b2 = SFTBatches(exs[:25], exs[25:], batch_size=4, block_size=64, pack=pack, seed=0)
    b2.load_state_dict(state)
    for want, got in zip(nxt, [b2.get_batch("train") for _ in range(5)]):
        assert all(torch.equal(w, g) for w, g in zip(want, got) if w is not None)
    # evaluation batches come from their own generator and leave the stream alone
    g = torch.Generator().manual_seed(7)
    b2.get_batch("val", generator=g)
    state = b2.state_dict()
    b2.get_batch("train", generator=torch.Generator().manual_seed(1))
    assert torch.equal(b2.state_dict()["generator"], state["generator"])


# --- the mask's effect on training ------------------------------------------------------------------

SENTENCE = "Listen carefully, for I shall say this only once and never again."


def _prompt_loss(model, tok, fmt, records):
    """Mean loss on the user sentence's tokens (the prompt), all examples."""
    exs = [encode_conversation(c, tok, fmt, train_on_prompt=True) for c in _convs(records)]
    total, count = 0.0, 0
    with torch.no_grad():
        for e in exs:
            x, y = (torch.from_numpy(a)[None] for a in e.inputs_and_targets())
            keep = ~torch.from_numpy(e.answer[1:])[None]
            y = torch.where(keep, y, -1)
            total += torch.nn.functional.cross_entropy(model(x)[0], y[0], ignore_index=-1, reduction="sum").item()
            count += int(keep.sum())
    return total / count


def test_default_mask_leaves_the_prompt_nearly_unlearned(tmp_path, tok, runs):
    rng = random.Random(0)
    records = [chat(SENTENCE, rng.choice(["yes", "no"])) for _ in range(40)]
    data = write_jsonl(tmp_path / "same.jsonl", records)
    fmt = chat_format(tok, runs["plain"])
    base, _ = load_run(runs["plain"], inference=False)
    before = _prompt_loss(base, tok, fmt, records)
    moved = {}
    for name, opts in (("answers", {}), ("everything", {"train_on_prompt": True})):
        tr = build_finetune_trainer(runs["plain"], data, tmp_path / name, "full",
                                    overrides=["max_iters=30", "eval_interval=30", "eval_iters=1", "batch_size=8",
                                               "learning_rate=3e-3", "warmup_iters=0"],
                                    progress=False, verbose=False, sft=opts)
        tr.fit()
        tr.model.eval()
        moved[name] = before - _prompt_loss(tr.model, tok, fmt, records)
    assert moved["everything"] > 1.0  # trained on it, the model learns the sentence
    assert abs(moved["answers"]) < 0.25 * moved["everything"]


# --- using the result ---------------------------------------------------------------------------------

def test_answers_scored_by_exact_match(tmp_path, runs, tok):
    rng = random.Random(0)
    records = [chat(f"Repeat the word {w}.", w) for w in (rng.choice(["apple", "river", "stone", "cloud"])
                                                          for _ in range(60))]
    data = write_jsonl(tmp_path / "copy.jsonl", records)
    fmt = chat_format(tok, runs["plain"])
    exs = load_examples(data, tok, fmt, max_length=64).examples[:8]
    base, _ = load_run(runs["plain"])
    assert exact_match(base, tok, fmt, exs, max_new_tokens=8) == 0.0
    tr = build_finetune_trainer(runs["plain"], data, tmp_path / "o", "full",
                                overrides=["max_iters=60", "eval_interval=60", "eval_iters=1", "batch_size=8",
                                           "learning_rate=1e-2", "warmup_iters=0"], progress=False, verbose=False)
    tr.fit()
    model = tr.model.eval()
    assert exact_match(model, tok, fmt, exs, max_new_tokens=8) == 1.0  # it answers, then stops at end-of-text
    msgs = exs[0].conversation.messages
    assert answer(model, tok, fmt, msgs[:-1], 8) == msgs[-1]["content"]


def test_lora_from_chat_data_chat_merge_and_resume(tmp_path, runs, tok, capsys, monkeypatch):
    base = runs["chatml"]
    data = write_jsonl(tmp_path / "sums.jsonl", sums(40))
    ft = ["--set", "max_iters=8", "eval_interval=4", "eval_iters=1", "batch_size=4", "warmup_iters=0",
          "learning_rate=1e-2", "lr_decay_iters=8", "--no-progress", "--lora-targets", "all-linear"]
    assert main(["finetune", "--base", str(base), "--data", str(data), "--out", str(tmp_path / "ad"), "--pack",
                 *ft]) == 0
    out = capsys.readouterr().out
    assert "38 training / 2 validation examples (5% held out)" in out and "packed" in out
    rec = json.loads((tmp_path / "ad" / "finetune.json").read_text())
    assert rec["sft"]["pack"] is True and rec["sft"]["data_sha256"]

    # exact resume: 4 + 4 iterations equal 8 in one go
    half = [a if a != "max_iters=8" else "max_iters=4" for a in ft]
    assert main(["finetune", "--base", str(base), "--data", str(data), "--out", str(tmp_path / "half"), "--pack",
                 *half]) == 0
    assert main(["finetune", "--data", str(data), "--out", str(tmp_path / "half"), "--resume",
                 "--set", "max_iters=8", "--no-progress"]) == 0
    from safetensors.torch import load_file
    a, b = (load_file(str(tmp_path / d / "adapter.safetensors")) for d in ("ad", "half"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main(["finetune", "--data", str(data), "--out", str(tmp_path / "half"), "--resume", "--overlong", "drop",
                 "--no-progress"]) == 2
    assert "--overlong differs from the run being resumed" in capsys.readouterr().err

    # chat with base + adapter: the run's ChatML template formats the conversation
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2 plus 3?\n"))
    assert main(["chat", "--run", str(base), "--adapter", str(tmp_path / "ad"), "--temperature", "0",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()

    # merge: a plain run that keeps the chat template and gives base + adapter's logits
    assert main(["merge", "--base", str(base), "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "chat_template.jinja").read_text() == CHATML
    merged, _ = load_run(tmp_path / "m", inference=False)
    adapted, _ = load_run(base, adapter=tmp_path / "ad", inference=False)
    plain, _ = load_run(base, inference=False)
    ids = torch.tensor([chat_format(tok, base).prompt_ids(tok, [{"role": "user", "content": "What is 2 plus 3?"}])])
    with torch.no_grad():
        assert (merged(ids) - adapted(ids)).abs().max().item() <= 1e-5
        assert (adapted(ids) - plain(ids)).abs().max().item() > 1e-3  # training changed the model


def test_peft_loads_the_adapter_with_the_same_logits(tmp_path, runs, tok):
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = runs["chatml"]
    data = write_jsonl(tmp_path / "sums.jsonl", sums(30))
    assert main(["finetune", "--base", str(base), "--data", str(data), "--out", str(tmp_path / "ad"),
                 "--lora-targets", "all-linear", "--set", "learning_rate=1e-2", *FAST]) == 0
    assert main(["export-hf", str(base), "--out", str(tmp_path / "hf"), "--adapter",
                 str(tmp_path / "ad")]) == 0
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"),
                                            tmp_path / "hf" / "adapter").eval()
    ours, _ = load_run(base, adapter=tmp_path / "ad", inference=False)
    plain, _ = load_run(base, inference=False)
    ids = torch.tensor([chat_format(tok, base).prompt_ids(tok, [{"role": "user", "content": "What is 4 plus 4?"}])])
    with torch.no_grad():
        assert (ours(ids) - plain(ids)).abs().max().item() > 1e-4
        assert (ours(ids) - theirs(input_ids=ids).logits).abs().max().item() <= 1e-4


def test_full_finetune_keeps_the_chat_template(tmp_path, runs):
    data = write_jsonl(tmp_path / "sums.jsonl", sums(20))
    val = write_jsonl(tmp_path / "val.jsonl", sums(3, seed=9))
    assert main(["finetune", "--base", str(runs["chatml"]), "--data", str(data), "--val", str(val),
                 "--method", "full", "--out", str(tmp_path / "full"), *FAST]) == 0
    assert (tmp_path / "full" / "chat_template.jinja").read_text() == CHATML
    assert read_run_config(tmp_path / "full")["model"] == "gpt"


def test_pack_needs_gpt(tmp_path, tok, capsys):
    from lmforge.models.nnlm import NNLM, NNLMConfig
    torch.manual_seed(0)
    save_run(tmp_path / "nnlm", NNLM(NNLMConfig(vocab_size=tok.vocab_size)), tok, {"train_config": {"device": "cpu"}})
    data = write_jsonl(tmp_path / "d.jsonl", sums(10))
    rc = main(["finetune", "--base", str(tmp_path / "nnlm"), "--data", str(data), "--out", str(tmp_path / "o"),
               "--pack", *FAST])
    assert rc == 2 and "--pack needs a GPT run" in capsys.readouterr().err
    with pytest.raises(LMForgeError, match="at least 2 tokens"):
        load_examples(data, tok, ChatFormat(None, eos_ids(tok)), max_length=1)
