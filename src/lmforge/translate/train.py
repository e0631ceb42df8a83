"""From parallel text files to a ready Trainer: the seq2seq counterpart of
`lmforge.train.setup.build_trainer`, with the same preset < --set resolution, the same
Trainer (progress bar, metrics.jsonl, atomic checkpoints, exact resume) and an eval hook that
adds val BLEU every few evaluations."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import read_run_config
from ..config import ConfigBase, parse_overrides
from ..errors import LMForgeError
from ..models import build_model
from ..models.presets import PRESETS, get_preset
from ..tokenizers import BPETokenizer, load_tokenizer, tokenizer_from_dict
from ..train import TrainConfig, Trainer, distributed
from ..train.setup import split_settings
from ..train.trainer import TRAINER_FILE, resolve_device
from .data import SPECIAL_TOKENS, Split, TranslationBatches, encode_sentences, read_parallel, special_ids

DEFAULT_PRESET = "transformer-multi30k"


@dataclass
class TranslateConfig(ConfigBase):
    """Settings of the data and of the BLEU check, beside the model's and the trainer's."""

    max_tokens: int = 4096  # batch budget: sentences x longest sentence (either side), in tokens
    bleu_every: int = 2  # val BLEU every this many evaluations (0: never)
    bleu_sentences: int = 200  # how many val sentences (from the top) the BLEU check translates
    bleu_beam: int = 1  # beam size for the BLEU check (1: greedy, the fastest)

    def validate(self) -> None:
        self.check_positive("max_tokens", "bleu_sentences", "bleu_beam")


def resolve(preset: str | None, overrides: list[str]) -> tuple[str, dict, dict, dict]:
    """(preset, model config, train config, translate config) dicts: preset < --set."""
    preset = preset or DEFAULT_PRESET
    p = get_preset(preset)
    if p["model"] != "seq2seq":
        raise LMForgeError(f"preset {preset!r} is a {p['model']} model; translation needs a seq2seq preset "
                           f"such as {DEFAULT_PRESET} or transformer-tiny")
    user = parse_overrides(overrides)
    t_keys = TranslateConfig.field_types()
    t_part = {k: user.pop(k) for k in list(user) if k in t_keys}
    model_part, train_part = split_settings(user, "seq2seq")
    return (preset, {**p["model_config"], **model_part}, {**p["train"], **train_part},
            {**PRESETS[preset].get("translate", {}), **t_part})


def train_tokenizer(files: list[str | Path], vocab_size: int) -> BPETokenizer:
    """One byte-level BPE vocabulary for both languages, with pad, bos and eos."""
    return BPETokenizer.train([str(f) for f in files], vocab_size, special_tokens=SPECIAL_TOKENS)


def bleu_hook(val_src: list[str], val_tgt: list[str], tcfg: TranslateConfig):
    """Eval hook: every `bleu_every` evaluations (and at the end), translate the first
    `bleu_sentences` val sentences and add their sacreBLEU as val_bleu."""
    from .bleu import sacre_bleu
    from .search import translate

    src, refs = val_src[:tcfg.bleu_sentences], val_tgt[:tcfg.bleu_sentences]

    def hook(trainer: Trainer) -> dict[str, Any]:
        n_eval = trainer.iter // trainer.cfg.eval_interval
        if not tcfg.bleu_every or (n_eval % tcfg.bleu_every and trainer.iter != trainer.cfg.max_iters):
            return {}
        hyps = translate(trainer.model, trainer.tokenizer, src, beam=tcfg.bleu_beam)
        return {"val_bleu": round(sacre_bleu(hyps, refs)[0], 2)}

    return hook


def build_translation_trainer(train_src: str | None, train_tgt: str | None, val_src: str | None,
                              val_tgt: str | None, out_dir: str | Path, preset: str | None = None,
                              overrides: list[str] | None = None, resume: bool = False,
                              tokenizer_path: str | None = None, progress: bool = True,
                              verbose: bool = True) -> Trainer:
    """Everything `lmforge translate train` does before the loop starts."""
    overrides = overrides or []
    out_dir = Path(out_dir)
    say = print if verbose else (lambda *a, **k: None)
    if resume:
        run = read_run_config(out_dir)
        user = parse_overrides(overrides)
        t_keys = TranslateConfig.field_types()
        t_part = {k: user.pop(k) for k in list(user) if k in t_keys}
        model_part, train_part = split_settings(user, "seq2seq")
        changed = [k for k in model_part if k != "dropout"]
        if changed:
            raise LMForgeError(f"cannot change the model's {changed[0]} when resuming; start a new run instead")
        model_cfg = {**run["model_config"], **model_part}
        train_dict = {**run.get("train_config", {}), **train_part}
        t_dict = {**run.get("translate", {}), **t_part}
        preset = run.get("preset")
        paths = run.get("data", {})
        train_src, train_tgt = train_src or paths.get("train_src"), train_tgt or paths.get("train_tgt")
        val_src, val_tgt = val_src or paths.get("val_src"), val_tgt or paths.get("val_tgt")
        tokenizer = load_tokenizer(out_dir / "tokenizer.json")
    else:
        if (out_dir / TRAINER_FILE).exists():
            raise LMForgeError(f"{out_dir} already holds a training run; pass --resume to continue it "
                               f"or choose another --out")
        preset, model_cfg, train_dict, t_dict = resolve(preset, overrides)
        tokenizer = None
    if not all((train_src, train_tgt, val_src, val_tgt)):
        raise LMForgeError("give --train-src, --train-tgt, --val-src and --val-tgt")
    tcfg = TranslateConfig.from_dict(t_dict, where="translate config")
    tcfg.validate()
    train_cfg = TrainConfig.from_dict(train_dict)
    train_cfg.validate()
    tr_src, tr_tgt = read_parallel(train_src, train_tgt)
    va_src, va_tgt = read_parallel(val_src, val_tgt)
    if tokenizer is None:
        if tokenizer_path:
            tokenizer = load_tokenizer(tokenizer_path)
        else:
            say(f"training a shared BPE tokenizer ({model_cfg.get('vocab_size', 8000)} tokens) "
                f"on {train_src} and {train_tgt}")
            # under torchrun rank 0 trains it and every rank gets the same one
            distributed.setup(resolve_device(train_cfg.device))
            vocab = int(model_cfg.get("vocab_size", 8000))
            tokenizer = tokenizer_from_dict(distributed.from_main(
                lambda: train_tokenizer([train_src, train_tgt], vocab).to_dict()))
        pad, bos, eos = special_ids(tokenizer)
        model_cfg.update(vocab_size=tokenizer.vocab_size, pad_id=pad, bos_id=bos, eos_id=eos)
    torch.manual_seed(train_cfg.seed)  # the same seed gives the same initial weights (on every rank)
    model = build_model("seq2seq", model_cfg)
    max_len = model.config.max_len
    splits = {"train": Split(encode_sentences(tokenizer, tr_src, max_len), encode_sentences(tokenizer, tr_tgt, max_len - 1)),
              "val": Split(encode_sentences(tokenizer, va_src, max_len), encode_sentences(tokenizer, va_tgt, max_len - 1))}
    batches = TranslationBatches(splits, tcfg.max_tokens, model.config.pad_id, model.config.bos_id, seed=train_cfg.seed)
    c = model.config
    say(f"model: seq2seq, {model.num_params() / 1e6:.2f}M parameters ({c.n_enc_layer}+{c.n_dec_layer} layers, "
        f"n_embd={c.n_embd}, n_head={c.n_head}, vocab {c.vocab_size}, {c.norm_position}-LN)")
    say(f"data: {len(tr_src):,} training pairs in {batches.batches_per_epoch()} batches per epoch "
        f"(max_tokens={tcfg.max_tokens}), padding {100 * batches.padding_fraction:.1f}% of the batch cells")
    run_extra = {"preset": preset, "translate": tcfg.to_dict(),
                 "data": {"train_src": str(Path(train_src).resolve()), "train_tgt": str(Path(train_tgt).resolve()),
                          "val_src": str(Path(val_src).resolve()), "val_tgt": str(Path(val_tgt).resolve())}}
    trainer = Trainer(model, batches, train_cfg, out_dir, tokenizer, run_extra=run_extra, progress=progress,
                      eval_hook=bleu_hook(va_src, va_tgt, tcfg))
    batches.device = trainer.device
    if resume:
        trainer.resume()
        say(f"resuming {out_dir} at iter {trainer.iter} of {train_cfg.max_iters}")
    return trainer
