"""Random contiguous blocks from a memory-mapped token file: x is a block, y the same block
shifted by one, so every position learns to predict the token after it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import LMForgeError
from ..fileio import read_json

SPLITS = ("train", "val")


class TokenData:
    """A prepared data directory (see `lmforge prepare`)."""

    def __init__(self, data_dir: str | Path):
        self.dir = Path(data_dir)
        if not self.dir.is_dir():
            raise LMForgeError(f"data directory not found: {self.dir} (create it with `lmforge prepare`)")
        self.meta = read_json(self.dir / "meta.json", "data meta file")
        if not isinstance(self.meta, dict) or self.meta.get("format") != "lmforge-data":
            raise LMForgeError(f"{self.dir}/meta.json is not an lmforge data file; run `lmforge prepare` again")
        self.vocab_size = int(self.meta["vocab_size"])
        self.splits: dict[str, np.memmap] = {}
        for split in SPLITS:
            path = self.dir / f"{split}.bin"
            if not path.is_file() or path.stat().st_size == 0:
                raise LMForgeError(f"{path} is missing or empty; run `lmforge prepare` again")
            self.splits[split] = np.memmap(path, dtype=np.dtype(self.meta["dtype"]), mode="r")

    @property
    def tokenizer_path(self) -> Path:
        return self.dir / self.meta.get("tokenizer", "tokenizer.json")

    def check_tokenizer(self, tokenizer) -> None:
        """A model trained with another vocabulary would read these ids as the wrong tokens."""
        from ..tokenizers import load_tokenizer

        if tokenizer.to_dict() != load_tokenizer(self.tokenizer_path).to_dict():
            raise LMForgeError(f"the tokenizer does not match the one {self.dir} was prepared with; "
                               f"prepare the data again with this tokenizer")


class TokenBatches:
    """Draws (x, y) batches. Its random generator's state is part of a checkpoint, so a resumed
    run sees exactly the batches an uninterrupted run would have seen."""

    def __init__(self, data: TokenData, batch_size: int, block_size: int, seed: int = 0,
                 device: str | torch.device = "cpu"):
        self.data, self.batch_size, self.block_size = data, batch_size, block_size
        self.device = torch.device(device)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        for split, arr in data.splits.items():
            if len(arr) <= block_size:
                raise LMForgeError(f"the {split} split has {len(arr)} tokens, fewer than block_size+1 "
                                   f"({block_size + 1}); use more text or a smaller block_size")

    def get_batch(self, split: str, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        arr = self.data.splits[split]
        starts = torch.randint(len(arr) - self.block_size, (self.batch_size,),
                               generator=generator or self.generator).tolist()
        block = np.stack([arr[s:s + self.block_size + 1] for s in starts]).astype(np.int64)
        xy = torch.from_numpy(block)
        x, y = xy[:, :-1], xy[:, 1:]
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.contiguous(), y.contiguous()

    def for_rank(self, rank: int) -> None:
        """Data parallelism: process `rank` draws its own stream of batches (seed + rank)."""
        self.generator.manual_seed(self.seed + rank)

    def tokens_per_batch(self) -> int:
        return self.batch_size * self.block_size

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
