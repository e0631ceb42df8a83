"""Batches of examples for the Trainer: padded and grouped by length, or packed.

Padded: each row is one example, padded on the right; the batches of an epoch are made from
examples of similar length (shuffled, sorted within groups of 64 batches, the batches
shuffled again), so little of each batch is padding. Padding needs no attention mask: causal
attention never lets a real token see a later position, and padded targets are -1 (ignored).
A batch is (x, y).

Packed: each row holds several examples back to back. A token attends only to earlier tokens
of its own example (a block-diagonal "document" mask, which the model combines with the causal
one) and positions restart at 0 for each example, so each example is computed as if alone.
A batch is (x, y, None, positions, mask): GPT.forward's (idx, targets, cache, positions, mask).

Both implement the Trainer's data protocol (`get_batch`, `tokens_per_batch`, `state_dict`,
`load_state_dict`, `for_rank`); a checkpoint holds the epoch's seed state and position, so a
resumed run sees the same batches.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import LMForgeError
from .render import Example

GROUP_BATCHES = 64  # batches of examples sorted by length together (padded mode)
PACK_WINDOW = 512  # examples placed first-fit-decreasing together (packed mode)
Plan = list[list[list[int]]]  # batches -> rows -> example indices


def padded_plan(lengths: list[int], batch_size: int, generator: torch.Generator) -> Plan:
    """One epoch of length-grouped batches, one example a row."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    group = batch_size * GROUP_BATCHES
    batches = []
    for g in range(0, len(order), group):
        chunk = sorted(order[g:g + group], key=lambda i: lengths[i])
        batches += [[[i] for i in chunk[b:b + batch_size]] for b in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def packed_plan(lengths: list[int], batch_size: int, row_len: int, generator: torch.Generator) -> Plan:
    """One epoch of packed batches: examples (lengths in positions) placed into rows of row_len
    first-fit-decreasing within windows of the shuffled order; rows shuffled, batch_size a batch."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    rows: list[list[int]] = []
    for w in range(0, len(order), PACK_WINDOW):
        room: list[int] = []
        window_rows: list[list[int]] = []
        for i in sorted(order[w:w + PACK_WINDOW], key=lambda i: -lengths[i]):
            r = next((k for k, free in enumerate(room) if free >= lengths[i]), None)
            if r is None:
                window_rows.append([])
                room.append(row_len)
                r = len(room) - 1
            window_rows[r].append(i)
            room[r] -= lengths[i]
        rows += window_rows
    rows = [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]
    return [rows[b:b + batch_size] for b in range(0, len(rows), batch_size)]


def collate(examples: list[Example], rows: list[list[int]], pad_id: int = 0, packed: bool = False,
            device: torch.device | None = None) -> tuple:
    """Rows of example indices -> the batch tensors (see the module docstring)."""
    parts = [[examples[i].inputs_and_targets() for i in row] for row in rows]
    T = max(sum(len(x) for x, _ in row) for row in parts)
    B = len(rows)
    x = torch.full((B, T), pad_id, dtype=torch.long)
    y = torch.full((B, T), -1, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    doc = torch.full((B, T), -1, dtype=torch.long)  # which example each position belongs to; -1: padding
    for b, row in enumerate(parts):
        t = 0
        for d, (xi, yi) in enumerate(row):
            n = len(xi)
            x[b, t:t + n], y[b, t:t + n] = torch.from_numpy(xi), torch.from_numpy(yi)
            pos[b, t:t + n] = torch.arange(n)
            doc[b, t:t + n] = d
            t += n
    if not packed:
        batch: tuple = (x, y)
    else:
        mask = (doc[:, :, None] == doc[:, None, :])[:, None]  # (B, 1, T, T): same example (padding: itself)
        batch = (x, y, None, pos, mask)
    if device is not None and device.type != "cpu":
        batch = tuple(t if t is None else t.to(device, non_blocking=True) for t in batch)
    return batch


class SFTBatches:
    """Training and validation batches of Examples. block_size: the model's context, the most
    positions in a row; every example must fit it (cut them with `load_examples`' max_length)."""

    def __init__(self, train: list[Example], val: list[Example], batch_size: int, block_size: int,
                 pack: bool = False, pad_id: int = 0, seed: int = 0, device: str | torch.device = "cpu"):
        self.splits = {"train": train, "val": val}
        for split, exs in self.splits.items():
            if not exs:
                raise LMForgeError(f"the {split} split has no examples")
            longest = max(len(e) - 1 for e in exs)
            if longest > block_size:
                raise LMForgeError(f"an example of the {split} split needs {longest} positions, more than the "
                                   f"model's block_size {block_size}; cut them with --max-length")
        self.batch_size, self.block_size, self.pack, self.pad_id = batch_size, block_size, pack, pad_id
        self.seed = seed
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self._epoch_start: torch.Tensor | None = None  # generator state the current epoch was planned from
        self._plan: Plan | None = None
        self._pos = 0
        self._fixed: dict[str, Plan] = {}  # evaluation: one fixed plan per split
        self._drawn: list[int] = []  # real tokens of the training batches since tokens_per_batch()

    def _make_plan(self, split: str, generator: torch.Generator) -> Plan:
        lengths = [len(e) - 1 for e in self.splits[split]]
        if self.pack:
            return packed_plan(lengths, self.batch_size, self.block_size, generator)
        return padded_plan(lengths, self.batch_size, generator)

    def _next_rows(self) -> list[list[int]]:
        if self._plan is None or self._pos >= len(self._plan):
            self._epoch_start = self.generator.get_state()
            self._plan, self._pos = self._make_plan("train", self.generator), 0
        rows = self._plan[self._pos]
        self._pos += 1
        return rows

    def get_batch(self, split: str, generator: torch.Generator | None = None) -> tuple:
        """The next training batch, or (with a generator, or for "val") a batch drawn at random
        from a fixed plan of the split, which leaves the training stream untouched."""
        if split == "train" and generator is None:
            rows = self._next_rows()
            self._drawn.append(sum(len(self.splits["train"][i]) - 1 for row in rows for i in row))
        else:
            if split not in self._fixed:
                self._fixed[split] = self._make_plan(split, torch.Generator().manual_seed(self.seed + 1))
            plan = self._fixed[split]
            rows = plan[int(torch.randint(len(plan), (1,), generator=generator))]
        return collate(self.splits[split], rows, self.pad_id, self.pack, self.device)

    def tokens_per_batch(self) -> int:
        """Real (not padding) input tokens per training batch, averaged over those drawn since
        the last call."""
        if not self._drawn:
            exs = self.splits["train"]
            return round(self.batch_size * sum(len(e) - 1 for e in exs) / len(exs))
        n = round(sum(self._drawn) / len(self._drawn))
        self._drawn.clear()
        return n

    def for_rank(self, rank: int) -> None:
        """Data parallelism: process `rank` shuffles with seed + rank."""
        self.generator.manual_seed(self.seed + rank)
        self._plan, self._epoch_start, self._pos = None, None, 0

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "epoch_start": self._epoch_start, "pos": self._pos}

    def load_state_dict(self, state: dict) -> None:
        if state.get("epoch_start") is None:
            self.generator.set_state(state["generator"])
            self._plan, self._epoch_start, self._pos = None, None, 0
            return
        self.generator.set_state(state["epoch_start"])
        self._epoch_start = state["epoch_start"]
        self._plan = self._make_plan("train", self.generator)  # replanned: the same epoch, the same order
        self._pos = state["pos"]


def count_tokens(examples: list[Example]) -> tuple[int, int]:
    """(tokens, tokens that count in the loss) over the examples' targets."""
    total = sum(len(e) - 1 for e in examples)
    counted = int(sum(np.count_nonzero(e.loss[1:]) for e in examples))
    return total, counted
