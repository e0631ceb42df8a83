"""Training settings, named as in nanoGPT wherever it has a name for them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ConfigBase, check_choice


@dataclass
class TrainConfig(ConfigBase):
    max_iters: int = 2000
    batch_size: int = 12
    gradient_accumulation_steps: int = 1  # micro-batches summed before each optimizer step
    learning_rate: float = 1e-3
    min_lr: float = 1e-4  # where the cosine decay ends
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # None: decay over max_iters
    decay_lr: bool = True
    weight_decay: float = 0.1  # applied to matrices only
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "float32"  # float32 | bfloat16 | float16 (autocast for the forward pass)
    compile: bool = False
    # keep only each block's input through the forward pass and recompute the block in backward:
    # activation memory of one block instead of all, for about a third more compute
    activation_checkpointing: bool = False
    fsdp: bool = False  # under torchrun: shard weights, gradients and AdamW state (FSDP2) instead of DDP

    def validate(self) -> None:
        self.check_positive("max_iters", "batch_size", "gradient_accumulation_steps",
                            "eval_interval", "eval_iters", "log_interval")
        check_choice("dtype", self.dtype, ("float32", "bfloat16", "float16"))
        if self.learning_rate <= 0 or self.min_lr < 0:
            self.fail("learning_rate must be positive and min_lr non-negative")

    def lr_at(self, it: int) -> float:
        """Linear warm-up, then cosine decay from learning_rate to min_lr. Warm-up lets Adam's
        moment estimates settle before large steps; the decay anneals into a minimum."""
        if not self.decay_lr:
            return self.learning_rate
        if it < self.warmup_iters:
            return self.learning_rate * (it + 1) / (self.warmup_iters + 1)
        decay_iters = self.lr_decay_iters or self.max_iters
        if it >= decay_iters:
            return self.min_lr
        ratio = (it - self.warmup_iters) / max(1, decay_iters - self.warmup_iters)
        coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
        return self.min_lr + coeff * (self.learning_rate - self.min_lr)
