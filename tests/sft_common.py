"""What the instruction fine-tuning tests share: a BPE tokenizer with ChatML's special tokens,
tiny runs with and without a chat template, and small chat JSONL files."""

import json
import random

import pytest
import torch

from lmforge.chat import ChatTemplate, save_chat_template
from lmforge.checkpoint import save_run
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.tokenizers import BPETokenizer

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
          "{%- endif %}")
FAST = ["--set", "max_iters=4", "eval_interval=4", "eval_iters=1", "batch_size=4", "warmup_iters=0", "--no-progress"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def chat(user, answer, system=None):
    msgs = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": msgs}


def sums(n=40, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        out.append(chat(f"What is {a} plus {b}?", str(a + b)))
    return out


@pytest.fixture(scope="module")
def tok(shakespeare_text):
    return BPETokenizer.train(shakespeare_text[:20_000] + " 0123456789+?", 400, special_tokens=CHATML_SPECIALS)


def make_run(path, tok, template=None, **cfg):
    torch.manual_seed(0)
    shape = dict(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32)
    save_run(path, GPT(GPTConfig(**{**shape, **cfg})), tok, {"train_config": {"device": "cpu"}})
    if template is not None:
        save_chat_template(ChatTemplate(template, {}, {"eos_token": "<|im_end|>"}), path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("sft")
    return {"plain": make_run(root / "plain", tok), "chatml": make_run(root / "chatml", tok, CHATML)}


# --- formats ------------------------------------------------------------------------------------

def _convs(records, name="x.jsonl"):
    from lmforge.sft.records import Conversation
    return [Conversation(tuple(r["messages"]), f"{name}:{i + 1}") for i, r in enumerate(records)]
