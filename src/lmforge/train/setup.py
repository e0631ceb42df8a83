"""From what the user typed to a ready Trainer: preset < TOML file < --set overrides, with
model and training keys in one flat namespace (as in nanoGPT)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import read_run_config
from ..config import parse_overrides
from ..data import TokenBatches, TokenData
from ..errors import LMForgeError
from ..models import build_model, model_class
from ..models.presets import get_preset
from ..tokenizers import load_tokenizer
from .config import TrainConfig
from .trainer import TRAINER_FILE, Trainer

DEFAULT_PRESET = "char-tiny"


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise LMForgeError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise LMForgeError(f"{path} is not valid TOML: {e}") from None


def resolve_settings(preset: str | None, config_file: str | None, overrides: list[str]) -> tuple[str, str, dict[str, Any], dict[str, Any]]:
    """Returns (preset name, model kind, model config dict, train config dict)."""
    file_settings = read_toml(config_file) if config_file else {}
    preset = preset or file_settings.pop("preset", None) or DEFAULT_PRESET
    file_settings.pop("preset", None)
    p = get_preset(preset)
    kind = file_settings.pop("model", p["model"])
    user = {**file_settings, **parse_overrides(overrides)}
    model_part, train_part = split_settings(user, kind)
    return preset, kind, {**p["model_config"], **model_part}, {**p["train"], **train_part}


def split_settings(settings: dict[str, Any], kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    model_keys = model_class(kind).config_class.field_types()
    train_keys = TrainConfig.field_types()
    unknown = [k for k in settings if k not in model_keys and k not in train_keys]
    if unknown:
        import difflib

        valid = sorted({*model_keys, *train_keys})
        close = difflib.get_close_matches(unknown[0], valid, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise LMForgeError(f"unknown setting {unknown[0]!r}{hint}; valid keys: {', '.join(valid)}")
    return ({k: v for k, v in settings.items() if k in model_keys},
            {k: v for k, v in settings.items() if k in train_keys})


def build_trainer(data_dir: str | Path, out_dir: str | Path, preset: str | None = None,
                  config_file: str | None = None, overrides: list[str] | None = None,
                  resume: bool = False, progress: bool = True, verbose: bool = True) -> Trainer:
    """Everything `lmforge train` does before the loop starts."""
    overrides = overrides or []
    out_dir = Path(out_dir)
    data = TokenData(data_dir)
    if resume:
        run = read_run_config(out_dir)
        kind, model_cfg = run["model"], dict(run["model_config"])
        model_part, train_part = split_settings(parse_overrides(overrides), kind)
        changed = [k for k, v in model_part.items() if k != "dropout"]
        if changed:
            raise LMForgeError(f"cannot change the model's {changed[0]} when resuming; "
                               f"start a new run instead")
        model_cfg.update(model_part)
        train_cfg = TrainConfig.from_dict({**run.get("train_config", {}), **train_part})
        tokenizer = load_tokenizer(out_dir / "tokenizer.json")
        data.check_tokenizer(tokenizer)
        run_extra = {k: v for k, v in run.items() if k in ("preset", "data")}
    else:
        if (out_dir / TRAINER_FILE).exists():
            raise LMForgeError(f"{out_dir} already holds a training run; pass --resume to continue it "
                               f"or choose another --out")
        preset, kind, model_cfg, train_dict = resolve_settings(preset, config_file, overrides)
        model_cfg["vocab_size"] = data.vocab_size
        train_cfg = TrainConfig.from_dict(train_dict)
        tokenizer = load_tokenizer(data.tokenizer_path)
        run_extra = {"preset": preset, "data": str(Path(data_dir).resolve())}
    train_cfg.validate()
    torch.manual_seed(train_cfg.seed)  # the same seed gives the same initial weights
    model = build_model(kind, model_cfg)
    if verbose:
        print(f"model: {kind}, {model.num_params() / 1e6:.2f}M parameters "
              f"({', '.join(f'{k}={model_cfg[k]}' for k in ('n_layer', 'n_head', 'n_embd', 'block_size') if k in model_cfg)})")
    batches = TokenBatches(data, train_cfg.batch_size, model.config.block_size, seed=train_cfg.seed)
    trainer = Trainer(model, batches, train_cfg, out_dir, tokenizer, run_extra=run_extra, progress=progress)
    return finish_setup(trainer, batches, resume, verbose)


def finish_setup(trainer: Trainer, batches: TokenBatches, resume: bool, verbose: bool) -> Trainer:
    """Batches go to the trainer's device; a resumed run reloads its checkpoint."""
    batches.device = trainer.device
    if resume:
        trainer.resume()
        if verbose:
            print(f"resuming {trainer.out_dir} at iter {trainer.iter} of {trainer.cfg.max_iters}")
    return trainer
