"""The training loop: AdamW, warm-up + cosine learning rate, gradient clipping and
accumulation, periodic evaluation, atomic checkpoints and exact resume.

It works for any model whose `forward(*batch)` returns (logits, loss) (when its forward takes
`return_logits`, the loop passes False and reads only the loss) and any data source with
`get_batch(split)`, `tokens_per_batch()` and `state_dict()`/`load_state_dict()`."""

from __future__ import annotations

import contextlib
import inspect
import json
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from ..checkpoint import load_weights, read_weights, save_run
from ..errors import LMForgeError
from ..fileio import atomic_path
from . import distributed
from .config import TrainConfig

TRAINER_FILE = "trainer.pt"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LMForgeError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LMForgeError("device cuda requested but no CUDA GPU is available; use --set device=cpu")
    return device


def emulated_bf16(device: torch.device) -> bool:
    """True on an x86 CPU without bf16 instructions (avx512_bf16 or AMX): there every bf16
    product converts to float32 and back, so bf16 math runs slower than float32 itself."""
    has_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if device.type != "cpu" or platform.machine().lower() not in ("x86_64", "amd64") or has_bf16 is None:
        return False  # a GPU, an ARM CPU, or a torch that cannot tell: no claim
    return not (has_bf16() or (has_amx is not None and has_amx()))


BF16_NOTE = ("note: this CPU has no bf16 instructions (avx512_bf16 or AMX), so bfloat16 is emulated; "
             "{what} ran at a third to half of float32's speed on such CPUs (docs/benchmarks.md)")


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """Decay only matrices (linear weights, embeddings); norms and biases are scales and
    offsets whose size carries meaning, so shrinking them toward 0 only hurts."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates every tensor in one pass (no per-parameter Python loop); it exists
    # for float parameters on CPU and CUDA and gives the same numbers as the loop.
    fused = device.type in ("cpu", "cuda") and all(p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=fused or None, foreach=None if fused else device.type != "cpu" or None)


class Trainer:
    def __init__(self, model: torch.nn.Module, data, cfg: TrainConfig, out_dir: str | Path,
                 tokenizer, run_extra: dict[str, Any] | None = None, progress: bool = True,
                 eval_hook: Callable[["Trainer"], dict[str, Any]] | None = None):
        cfg.validate()
        self.cfg, self.data, self.tokenizer = cfg, data, tokenizer
        self.out_dir = Path(out_dir)
        self.run_extra = run_extra or {}
        self.device = distributed.setup(resolve_device(cfg.device))  # joins torchrun's group, if any
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.progress, self.eval_hook = progress and self.rank == 0, eval_hook
        self.model = model.to(self.device)
        if cfg.activation_checkpointing:
            if not hasattr(model, "activation_checkpointing"):
                raise LMForgeError(f"activation_checkpointing: the {type(model).__name__} model has no blocks "
                                   "to recompute; it applies to GPT runs")
            model.activation_checkpointing = True
        if self.world_size > 1 and hasattr(data, "for_rank"):
            data.for_rank(self.rank)  # each process draws its own batches
        if cfg.fsdp and self.world_size == 1:
            print("note: fsdp=true shards over torchrun's processes; in one process it changes nothing",
                  file=sys.stderr)
        if cfg.dtype == "bfloat16" and self.rank == 0 and emulated_bf16(self.device):
            print(BF16_NOTE.format(what="training with bf16 autocast"), file=sys.stderr)
        train_module = distributed.wrap(model, self.device, cfg.fsdp)  # DDP (or FSDP) when distributed
        self.sharded = distributed.is_sharded(model)  # FSDP shards `model` in place
        self.forward = torch.compile(train_module) if cfg.compile else train_module
        # DDP's wrapper syncs on every call, so evaluation uses the bare model; a sharded model
        # gathers its weights in every call, which is why every rank evaluates, in step.
        self.eval_forward = self.forward if self.world_size == 1 else self.model
        # the loop reads only the loss: a model that can skip making whole logits is told so
        self.loss_only = ({"return_logits": False}
                          if "return_logits" in inspect.signature(model.forward).parameters else {})
        self.optimizer = make_optimizer(model, cfg, self.device)
        self.iter = 0  # optimizer steps completed
        self.tokens = 0  # training tokens seen
        self.last_eval: dict[str, float] = {}
        self._stop = False  # set by Ctrl-C
        amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.dtype)
        self.autocast = (torch.autocast(self.device.type, dtype=amp_dtype) if amp_dtype
                         else contextlib.nullcontext())
        self.scaler = torch.amp.GradScaler(enabled=cfg.dtype == "float16" and self.device.type == "cuda")
        torch.manual_seed(cfg.seed + self.rank)  # different dropout masks on each process

    # ---- checkpoints -------------------------------------------------------------------
    def save(self) -> None:
        """Every process calls this; rank 0 writes, with each rank's data position and random
        state (the model and optimizer are the same on every rank)."""
        ranks = distributed.gather({"data": self.data.state_dict(), "rng": torch.get_rng_state()})
        weights = distributed.full_model_state(self.model)  # None unless sharded (then every rank helps)
        optimizer = distributed.full_optimizer_state(self.model, self.optimizer)
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.save_model(weights)
            state = {"iter": self.iter, "tokens": self.tokens, "fsdp": self.sharded,
                     "optimizer": self.optimizer.state_dict() if optimizer is None else optimizer,
                     "scaler": self.scaler.state_dict(), "data": ranks[0]["data"],
                     "rng": ranks[0]["rng"], "train_config": self.cfg.to_dict(),
                     "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                     "ranks": ranks if self.world_size > 1 else None}
            with atomic_path(self.out_dir / TRAINER_FILE) as tmp:
                torch.save(state, tmp)
        distributed.barrier()

    def save_model(self, weights: dict[str, torch.Tensor] | None = None) -> None:
        """The model part of a checkpoint: a run directory. Subclasses change what it holds
        (the LoRA fine-tuner writes only the adapter); `load_model` must read it back.
        `weights`: the full weights of a sharded model, gathered by `save`."""
        save_run(self.out_dir, self.model, self.tokenizer,
                 {**self.run_extra, "train_config": self.cfg.to_dict()}, state=weights)

    def load_model(self) -> None:
        path = self.out_dir / "model.safetensors"
        if self.sharded:
            distributed.load_full_model_state(self.model, read_weights(path))
        else:
            load_weights(path, self.model)

    def resume(self) -> None:
        path = self.out_dir / TRAINER_FILE
        if not path.is_file():
            raise LMForgeError(f"cannot resume: {path} not found (was the run started with `lmforge train`?)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # a truncated or foreign file
            raise LMForgeError(f"cannot resume: {path} is corrupt ({type(e).__name__})") from None
        ranks = state.get("ranks") or [state]
        if len(ranks) != self.world_size:
            raise LMForgeError(f"cannot resume: {self.out_dir} was trained by {len(ranks)} processes and "
                               f"this is {self.world_size}; resume with torchrun --nproc-per-node {len(ranks)}")
        if bool(state.get("fsdp")) != self.sharded:
            was = "true" if state.get("fsdp") else "false"
            raise LMForgeError(f"cannot resume: {self.out_dir} was trained with fsdp={was}; "
                               f"resume with --set fsdp={was}")
        self.load_model()
        if self.sharded:
            distributed.load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.data.load_state_dict(ranks[self.rank]["data"])
        torch.set_rng_state(ranks[self.rank]["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available() and self.world_size == 1:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.iter, self.tokens = state["iter"], state["tokens"]
        if self.rank == 0:
            self._truncate_metrics()
        distributed.barrier()

    def _truncate_metrics(self) -> None:
        """Drop log lines written after the checkpoint, so the resumed run continues the file."""
        path = self.out_dir / "metrics.jsonl"
        if not path.is_file():
            return
        keep = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("iter", 0) <= self.iter]
        path.write_text("".join(line + "\n" for line in keep))

    def log(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # ---- evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over eval_iters batches of each split. The eval batches come from their
        own fixed-seed generator: the same batches every time, and the training stream is
        left untouched (so evaluating does not change what a resumed run sees)."""
        self.model.eval()
        out = {}
        for split in ("train", "val"):
            gen = torch.Generator().manual_seed(self.cfg.seed + 1)
            losses = torch.zeros(self.cfg.eval_iters)
            for i in range(self.cfg.eval_iters):
                with self.autocast:
                    _, loss = self.eval_forward(*self.data.get_batch(split, generator=gen), **self.loss_only)
                losses[i] = loss.float()
            out[f"{split}_loss"] = losses.mean().item()
        self.model.train()
        return out

    # ---- the loop ----------------------------------------------------------------------
    def step(self) -> torch.Tensor:
        """One optimizer step over gradient_accumulation_steps micro-batches; returns the mean
        loss as a tensor (reading it would force a device sync, so the caller decides when)."""
        cfg = self.cfg
        lr = cfg.lr_at(self.iter)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.gradient_accumulation_steps):
            batch = self.data.get_batch("train")
            # DDP averages gradients over processes only on the last micro-batch's backward
            with distributed.no_sync(self.forward, micro < cfg.gradient_accumulation_steps - 1):
                with self.autocast:
                    # keep only the loss: holding the (B, T, vocab) logits through backward
                    # would keep a second logits-sized tensor alive for no use
                    loss = self.forward(*batch, **self.loss_only)[1] / cfg.gradient_accumulation_steps
                self.scaler.scale(loss).backward()
            total += loss.detach()
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.iter += 1
        self.tokens += self.data.tokens_per_batch() * cfg.gradient_accumulation_steps * self.world_size
        return total

    def _on_sigint(self, *_: Any) -> None:
        self._stop = True  # finish the current step, then save and stop

    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.model.train()
        old_handler = signal.signal(signal.SIGINT, self._on_sigint)
        bar = tqdm(total=cfg.max_iters, initial=self.iter, desc="train", unit="it",
                   disable=not self.progress, dynamic_ncols=True)
        loss_sum, n_logged = torch.zeros((), device=self.device), 0
        t0, tokens0 = time.perf_counter(), self.tokens
        stop = False  # with several processes, they agree on stopping at a log step
        try:
            while self.iter < cfg.max_iters and not stop:
                loss_sum += self.step()
                n_logged += 1
                bar.update(1)
                stop = self._stop if self.world_size == 1 else stop
                if self.iter % cfg.log_interval == 0 or self.iter == cfg.max_iters:
                    dt = time.perf_counter() - t0
                    loss = distributed.mean_over_ranks(loss_sum).item() / n_logged  # the one host sync
                    stop = distributed.any_rank(self._stop, self.device)
                    rec = {"iter": self.iter, "tokens": self.tokens, "loss": loss,
                           "lr": cfg.lr_at(self.iter - 1), "tok_per_s": (self.tokens - tokens0) / max(dt, 1e-9)}
                    self.log(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tok_per_s']:,.0f}")
                    loss_sum.zero_(); n_logged = 0
                    t0, tokens0 = time.perf_counter(), self.tokens
                if self.iter % cfg.eval_interval == 0 or self.iter == cfg.max_iters:
                    self._eval_and_save(bar)
                    t0, tokens0 = time.perf_counter(), self.tokens
        finally:
            signal.signal(signal.SIGINT, old_handler)
            bar.close()
        if stop:
            self.save()
            if self.rank == 0:
                print(f"interrupted: checkpoint saved at iter {self.iter} in {self.out_dir} "
                      f"(continue with --resume)")
        elif not self.last_eval:  # resumed at max_iters: nothing to train, still report
            self.last_eval = self.evaluate()
        return self.last_eval

    def _eval_and_save(self, bar: tqdm) -> None:
        res = self.evaluate()
        if self.eval_hook is not None:
            with distributed.gathered(self.model):  # hooks may call submodules directly
                res.update(self.eval_hook(self))
        self.last_eval = res
        self.log({"iter": self.iter, "tokens": self.tokens, **res})
        msg = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items())
        if self.progress:
            bar.write(f"iter {self.iter}: {msg}")
        self.save()
