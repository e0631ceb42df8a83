"""Fine-tuning a trained run on new data, with the same Trainer (progress bar, metrics,
checkpoints, exact resume) as `lmforge train`.

Two methods:
- `full`: every weight trains. OUT is a plain run directory (config.json, model.safetensors,
  tokenizer.json, trainer.pt, metrics.jsonl), used like any other run.
- `lora`: the base weights stay frozen and only the adapters train. OUT is an *adapter
  directory*: adapter_config.json + adapter.safetensors (A and B only, a few hundred kB), plus
  trainer.pt (the optimizer state of the adapter alone) and metrics.jsonl. It does not copy
  the base weights; it points at them. Use it as `lmforge sample --run BASE --adapter OUT`,
  or make a plain run of it with `lmforge merge --base BASE --adapter OUT --out RUN2`.

Both write OUT/finetune.json: the method, the base run (path and the sha256 of its weights)
and the settings, which is what `--resume` reads back.

The data is a prepared directory (`lmforge prepare`: next-token batches over running text), or
an instruction file (chat, prompt/completion or Alpaca records, `lmforge.sft`): rendered with
the base run's chat format, loss on the answers only, padded or packed batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..adapters import load_adapter_weights, save_adapter
from ..chat import chat_format, load_chat_template, save_chat_template
from ..checkpoint import load_weights, read_run_config
from ..config import parse_overrides
from ..data import TokenBatches, TokenData
from ..errors import LMForgeError
from ..fileio import file_sha256, read_json, write_json
from ..models import build_model
from ..nn.lora import LoRAConfig, apply_lora, lora_report
from ..nn.quantized_base import BASE_DTYPES
from ..sft.options import SFTOptions, build_sft_batches, data_fingerprint
from ..tokenizers import load_tokenizer
from .config import TrainConfig
from .frozen_base import check_targets, load_frozen_base
from .setup import finish_setup, read_toml, split_settings
from .trainer import TRAINER_FILE, Trainer

METHODS = ("lora", "full")
FINETUNE_FILE = "finetune.json"
FINETUNE_FORMAT = "lmforge-finetune"
# model settings a fine-tuning run may change: they alter training, not the weights' shapes
CHANGEABLE_MODEL_KEYS = ("dropout",)
LM_KINDS = ("gpt", "nnlm")  # models trained on TokenData's next-token batches


class FinetuneTrainer(Trainer):
    """The Trainer, with checkpoints that also record the base run; for LoRA they hold only
    the adapter (the frozen base weights are read from the base run again on resume)."""

    def __init__(self, *args: Any, method: str, base_config: dict[str, Any], record: dict[str, Any], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.method, self.base_config, self.record = method, base_config, record

    def save_model(self, weights: dict[str, torch.Tensor] | None = None) -> None:
        if self.method == "full":
            super().save_model(weights)
            template = load_chat_template(self.record["base_run"])
            if template is not None:  # the fine-tuned run chats in its base's format
                save_chat_template(template, self.out_dir)
        else:
            save_adapter(self.model, self.out_dir, self.base_config,
                         extra={"base_run": self.record["base_run"]})
        write_json(self.out_dir / FINETUNE_FILE, {**self.record, "train_config": self.cfg.to_dict()})

    def load_model(self) -> None:
        if self.method == "full":
            super().load_model()
        else:
            load_adapter_weights(self.model, self.out_dir)


def _settings(config_file: str | None, overrides: list[str], kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model settings, training settings) from a TOML file and --set overrides."""
    user = {**(read_toml(config_file) if config_file else {}), **parse_overrides(overrides)}
    model_part, train_part = split_settings(user, kind)
    fixed = [k for k in model_part if k not in CHANGEABLE_MODEL_KEYS]
    if fixed:
        raise LMForgeError(f"cannot change the model's {fixed[0]} when fine-tuning: the shape comes from "
                           f"the base run (only {', '.join(CHANGEABLE_MODEL_KEYS)} may change)")
    return model_part, train_part


def _read_record(out_dir: Path) -> dict[str, Any]:
    if not (out_dir / FINETUNE_FILE).is_file():
        raise LMForgeError(f"cannot resume: {out_dir / FINETUNE_FILE} not found "
                           f"(was {out_dir} written by `lmforge finetune`?)")
    record = read_json(out_dir / FINETUNE_FILE, "fine-tuning record")
    if not isinstance(record, dict) or record.get("format") != FINETUNE_FORMAT:
        raise LMForgeError(f"{out_dir / FINETUNE_FILE} is not an lmforge fine-tuning record")
    return record


def _sft_options(data: Path, given: dict[str, Any] | None, record: dict[str, Any] | None) -> SFTOptions | None:
    """The instruction-data options for a data file (None for a prepared directory): those given,
    on resume on top of those recorded, which they may not change."""
    given = {k: v for k, v in (given or {}).items() if v is not None and v is not False}
    if "val" in given:
        given["val"] = str(Path(given["val"]).resolve())
    if not data.exists() and data.suffix.lower() in (".json", ".jsonl"):
        raise LMForgeError(f"data file not found: {data}")
    if not data.is_file():
        if given:
            raise LMForgeError(f"--{next(iter(given)).replace('_', '-')} applies to an instruction data file "
                               f"(chat, prompt/completion or Alpaca JSON/JSONL), and {data} is a directory")
        return None
    if record is None:
        return SFTOptions.from_dict(given)
    recorded = SFTOptions.from_dict({k: v for k, v in (record.get("sft") or {}).items()
                                     if k not in ("data_sha256", "val_sha256")})
    changed = [k for k, v in given.items() if getattr(recorded, k) != v]
    if changed:
        raise LMForgeError(f"--{changed[0].replace('_', '-')} differs from the run being resumed; drop it")
    return recorded


def build_finetune_trainer(base_run: str | Path | None, data_dir: str | Path, out_dir: str | Path,
                           method: str | None = None, lora: LoRAConfig | None = None,
                           config_file: str | None = None, overrides: list[str] | None = None,
                           resume: bool = False, progress: bool = True, verbose: bool = True,
                           base_dtype: str | None = None, sft: dict[str, Any] | None = None) -> FinetuneTrainer:
    """Everything `lmforge finetune` does before the loop starts. On resume, the method, base
    run and LoRA settings come from OUT/finetune.json; --set may change training settings.
    `method` is lora (the default for a new run) or full. `base_dtype` (LoRA only) stores the
    frozen base as float32 (the default), bfloat16, int8 or nf4 (nn/quantized_base.py).
    data_dir: a prepared directory, or an instruction file; `sft` then holds SFTOptions' fields
    (val, max_length, overlong, train_on_prompt, pack)."""
    out_dir = Path(out_dir)
    overrides = list(overrides or [])
    if resume:
        record = _read_record(out_dir)
        if base_run is not None and Path(base_run).resolve() != Path(record["base_run"]):
            raise LMForgeError(f"{out_dir} was fine-tuned from {record['base_run']}, not {base_run}; "
                               f"drop --base or pass that run")
        if method not in (None, record["method"]):
            raise LMForgeError(f"{out_dir} is a {record['method']} fine-tuning run, not {method}; "
                               f"drop --method to resume it")
        method = record["method"]
        if base_dtype not in (None, record.get("base_dtype", "float32")):
            raise LMForgeError(f"{out_dir} was trained on a {record.get('base_dtype', 'float32')} base, "
                               f"not {base_dtype}; drop --base-dtype to resume it")
        base_dtype = record.get("base_dtype", "float32")
        base_run = Path(record["base_run"])
        lora = LoRAConfig.from_dict(record["lora"]) if record.get("lora") else None
    else:
        if base_run is None:
            raise LMForgeError("--base RUN is required: the run to fine-tune")
        method = method or "lora"
        if method not in METHODS:
            raise LMForgeError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
        base_run = Path(base_run).resolve()
        if out_dir.resolve() == base_run:
            raise LMForgeError("--out must differ from --base: fine-tuning must not overwrite the base run")
        if (out_dir / TRAINER_FILE).exists():
            raise LMForgeError(f"{out_dir} already holds a training run; pass --resume to continue it "
                               f"or choose another --out")
        lora = (lora or LoRAConfig()) if method == "lora" else None
        if lora is not None:
            lora.validate()
        base_dtype = base_dtype or "float32"
        if base_dtype not in BASE_DTYPES:
            raise LMForgeError(f"--base-dtype must be one of {', '.join(BASE_DTYPES)}, not {base_dtype!r}")
        if base_dtype != "float32" and method != "lora":
            raise LMForgeError(f"--base-dtype {base_dtype} needs --method lora: a full fine-tune trains "
                               f"the base weights themselves")
    base_cfg = read_run_config(base_run)
    kind = base_cfg["model"]
    if kind not in LM_KINDS:
        raise LMForgeError(f"finetune trains language models ({', '.join(LM_KINDS)}) on prepared text; "
                           f"{base_run} is a {kind} run: adapt it in Python with lmforge.nn.lora.apply_lora")
    weights = base_run / "model.safetensors"
    base_sha = file_sha256(weights) if weights.is_file() else None
    if resume and method == "lora" and base_sha != record.get("base_weights_sha256"):
        raise LMForgeError(f"the base run {base_run} changed since this adapter was trained (its weights' "
                           f"sha256 differs); resuming would mix two bases")

    model_part, train_part = _settings(config_file, overrides, kind)
    if resume:
        model_part = {**record.get("model_overrides", {}), **model_part}
        train_cfg = TrainConfig.from_dict({**record["train_config"], **train_part})
    else:
        train_cfg = TrainConfig.from_dict({**base_cfg.get("train_config", {}), **train_part})
    train_cfg.validate()
    if train_cfg.fsdp and method == "lora":
        raise LMForgeError("fsdp=true works with --method full only; LoRA's trainable state is already "
                           "tiny, so run LoRA data-parallel (drop --set fsdp=true)")

    tokenizer = load_tokenizer(base_run / "tokenizer.json")
    sft_opts = _sft_options(Path(data_dir), sft, record if resume else None)
    sft_record = None
    if sft_opts is None:
        data = TokenData(data_dir)
        data.check_tokenizer(tokenizer)
    else:  # read and check every record before anything is built or written
        if sft_opts.pack and kind != "gpt":
            raise LMForgeError(f"--pack needs a GPT run (it masks attention between examples); {base_run} is {kind}")
        sft_record = {**sft_opts.to_dict(), **data_fingerprint(data_dir, sft_opts)}
        hashes = ("data_sha256", "val_sha256")
        if resume and [sft_record[k] for k in hashes] != [(record.get("sft") or {}).get(k) for k in hashes]:
            raise LMForgeError(f"the data file {data_dir} (or --val) changed since {out_dir} was trained; "
                               f"resuming needs the same examples")
        batches = build_sft_batches(data_dir, sft_opts, tokenizer, chat_format(tokenizer, base_run),
                                    base_cfg["model_config"]["block_size"], train_cfg.batch_size,
                                    train_cfg.seed, verbose)

    if base_dtype == "float32":
        model = build_model(kind, {**base_cfg["model_config"], **model_part})
        if not (resume and method == "full"):  # a resumed full run reads its own weights instead
            load_weights(weights, model)
    else:  # read tensor by tensor into the compact format: the full-precision base never exists whole
        model = load_frozen_base(weights, kind, {**base_cfg["model_config"], **model_part}, base_dtype)
        check_targets(model, lora.targets, base_dtype)
    torch.manual_seed(train_cfg.seed)  # the same seed gives the same adapters, whatever the base's dtype
    if lora is not None:
        report = apply_lora(model, lora.targets, lora.r, lora.alpha, lora.dropout, lora.rslora)
    else:
        report = lora_report(model)  # nothing adapted: every parameter trains
    if verbose:
        on = f", {base_dtype} base" if base_dtype != "float32" else ""
        print(f"fine-tuning {base_run} ({method}{on}): {report.trainable:,} of {report.total:,} parameters "
              f"trainable ({100 * report.trainable_fraction:.3f}%)")

    record = {"format": FINETUNE_FORMAT, "version": 1, "method": method, "base_run": str(base_run),
              "base_weights_sha256": base_sha, "data": str(Path(data_dir).resolve()),
              "model_overrides": model_part, "lora": lora.to_dict() if lora else None, "base_dtype": base_dtype,
              "sft": sft_record}
    run_extra = {"preset": base_cfg.get("preset"), "data": record["data"],
                 "finetune": {"method": method, "base_run": str(base_run)},
                 **({"generation": base_cfg["generation"]} if "generation" in base_cfg else {})}
    if sft_opts is None:
        batches = TokenBatches(data, train_cfg.batch_size, model.config.block_size, seed=train_cfg.seed)
    trainer = FinetuneTrainer(model, batches, train_cfg, out_dir, tokenizer, run_extra=run_extra,
                              progress=progress, method=method, base_config=base_cfg, record=record)
    return finish_setup(trainer, batches, resume, verbose)
