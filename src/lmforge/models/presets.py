"""Named starting points: a model shape plus the training settings that suit it.

`char-tiny` and `shakespeare-small` follow nanoGPT's Shakespeare-character recipes (CPU and
GPU sized); `gpt2` and `gpt2-medium` are GPT-2's shapes."""

from __future__ import annotations

from typing import Any

from ..errors import LMForgeError

PRESETS: dict[str, dict[str, Any]] = {
    "char-tiny": {
        "model": "gpt",
        "model_config": dict(block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0),
        "train": dict(batch_size=12, max_iters=2000, learning_rate=1e-3, min_lr=1e-4,
                      warmup_iters=100, beta2=0.99, eval_interval=250, eval_iters=20,
                      log_interval=10),
    },
    "shakespeare-small": {
        "model": "gpt",
        "model_config": dict(block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2),
        "train": dict(batch_size=64, max_iters=5000, learning_rate=1e-3, min_lr=1e-4,
                      warmup_iters=100, beta2=0.99, eval_interval=250, eval_iters=200,
                      log_interval=10),
    },
    "gpt2": {
        "model": "gpt",
        "model_config": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
        "train": dict(batch_size=12, learning_rate=6e-4, min_lr=6e-5, warmup_iters=2000,
                      weight_decay=0.1, beta2=0.95, gradient_accumulation_steps=40),
    },
    "gpt2-medium": {
        "model": "gpt",
        "model_config": dict(vocab_size=50257, block_size=1024, n_layer=24, n_head=16, n_embd=1024),
        "train": dict(batch_size=12, learning_rate=3e-4, min_lr=3e-5, warmup_iters=2000,
                      weight_decay=0.1, beta2=0.95, gradient_accumulation_steps=40),
    },
    # Llama-style: RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases. `llama-tiny` has
    # about char-tiny's parameter count (0.92M vs 0.81M) and the same 12 x 64 batches; its
    # learning rate, warm-up and shape were tuned for the 2,000-iteration char budget
    # (docs/benchmarks.md, part d).
    "llama-tiny": {
        "model": "gpt",
        "model_config": dict(block_size=64, n_layer=5, n_head=4, n_kv_head=2, n_embd=128, dropout=0.0,
                             bias=False, pos_encoding="rope", norm="rmsnorm", mlp="swiglu",
                             mlp_ratio=8 / 3),
        "train": dict(batch_size=12, max_iters=2000, learning_rate=3e-3, min_lr=3e-4,
                      warmup_iters=100, beta2=0.99, eval_interval=250, eval_iters=20,
                      log_interval=10),
    },
    # About shakespeare-small's size (10.6M vs 10.8M parameters).
    "llama-small": {
        "model": "gpt",
        "model_config": dict(block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2,
                             bias=False, pos_encoding="rope", norm="rmsnorm", mlp="swiglu",
                             mlp_ratio=8 / 3),
        "train": dict(batch_size=64, max_iters=5000, learning_rate=1e-3, min_lr=1e-4,
                      warmup_iters=100, beta2=0.99, eval_interval=250, eval_iters=200,
                      log_interval=10),
    },
    "nnlm-char": {
        "model": "nnlm",
        "model_config": dict(block_size=64, context=8, n_embd=32, n_hidden=512, direct=True, dropout=0.0),
        "train": dict(batch_size=12, max_iters=2000, learning_rate=3e-3, min_lr=3e-4,
                      warmup_iters=100, beta2=0.99, eval_interval=250, eval_iters=20,
                      log_interval=10),
    },
    # The encoder-decoder Transformer ("Attention Is All You Need", post-LN, ReLU, sinusoids,
    # tied shared-vocabulary embeddings, label smoothing 0.1, Adam beta2 0.98). The "translate"
    # part holds the batching and val-BLEU settings that `lmforge translate train` reads.
    "transformer-tiny": {
        "model": "seq2seq",
        "model_config": dict(vocab_size=2000, max_len=128, n_enc_layer=2, n_dec_layer=2, n_head=4,
                             n_embd=128, ffn_hidden=512, dropout=0.1, label_smoothing=0.1),
        # 600 steps: with ~1,000 training pairs, longer training memorises them (docs/translation.md)
        "train": dict(max_iters=600, learning_rate=2e-3, min_lr=1e-4, warmup_iters=60,
                      weight_decay=0.0, beta2=0.98, eval_interval=200, eval_iters=5, log_interval=10),
        "translate": dict(max_tokens=1024, bleu_every=1, bleu_sentences=50),
    },
    "transformer-multi30k": {
        "model": "seq2seq",
        "model_config": dict(vocab_size=8000, max_len=128, n_enc_layer=3, n_dec_layer=3, n_head=4,
                             n_embd=256, ffn_hidden=1024, dropout=0.2, label_smoothing=0.1),
        # the recipe of docs/translation.md: 5,000 steps (~23 epochs) reach 40 BLEU on test2016
        "train": dict(max_iters=5000, learning_rate=1e-3, min_lr=5e-5, warmup_iters=300,
                      weight_decay=0.0001, beta2=0.98, eval_interval=100, eval_iters=5, log_interval=10),
        "translate": dict(max_tokens=2048, bleu_every=2, bleu_sentences=100),
    },
}


def get_preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise LMForgeError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    p = PRESETS[name]
    return {"model": p["model"], "model_config": dict(p["model_config"]), "train": dict(p.get("train", {}))}


def preset_for_model(kind: str, preset: str | None = None) -> str:
    """`--model KIND`: the first preset of that kind, or check that `preset` is one."""
    kinds = {p["model"] for p in PRESETS.values()}
    if kind not in kinds:
        raise LMForgeError(f"no preset trains a {kind!r} model; --model takes one of {', '.join(sorted(kinds))}")
    if preset is None:
        return next(name for name, p in PRESETS.items() if p["model"] == kind)
    if get_preset(preset)["model"] != kind:
        raise LMForgeError(f"preset {preset!r} is a {get_preset(preset)['model']} model, not {kind}; "
                           f"drop --model or choose a {kind} preset")
    return preset
