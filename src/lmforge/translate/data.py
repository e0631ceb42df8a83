"""Parallel text -> padded batches of similar length under a token budget.

Sentences of very different lengths in one batch waste compute on padding, so batches are
built by length: shuffle the corpus, cut it into large buckets, sort each bucket by length,
fill batches up to `max_tokens` (longest sentence x sentences), then shuffle the batches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LMForgeError

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|endoftext|>"
SPECIAL_TOKENS = (PAD, BOS, EOS)


def read_lines(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise LMForgeError(f"text file not found: {path}")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise LMForgeError(f"{path} is not UTF-8 text ({e})") from None


def read_parallel(src_path: str | Path, tgt_path: str | Path) -> tuple[list[str], list[str]]:
    """Two aligned files, one sentence a line: line i of one translates line i of the other."""
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        longer, shorter = (src_path, tgt_path) if len(src) > len(tgt) else (tgt_path, src_path)
        n = min(len(src), len(tgt))
        raise LMForgeError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}: line {n + 1} of "
                           f"{longer} has no partner in {shorter}; the files must be aligned line by line")
    for i, (s, t) in enumerate(zip(src, tgt), 1):
        if bool(s.strip()) != bool(t.strip()):
            empty = src_path if not s.strip() else tgt_path
            raise LMForgeError(f"line {i} of {empty} is empty but its partner is not; "
                               f"the files are probably misaligned from there on")
    return src, tgt


def special_ids(tokenizer) -> tuple[int, int, int]:
    """(pad, bos, eos) ids of a tokenizer trained with SPECIAL_TOKENS."""
    specials = getattr(tokenizer, "special_tokens", {})
    missing = [s for s in SPECIAL_TOKENS if s not in specials]
    if missing:
        raise LMForgeError(f"the tokenizer lacks the special token {missing[0]}; a translation tokenizer "
                           f"needs {', '.join(SPECIAL_TOKENS)}")
    return specials[PAD], specials[BOS], specials[EOS]


def encode_sentences(tokenizer, lines: list[str], max_len: int) -> list[list[int]]:
    """Each line -> ids + [eos], cut to max_len tokens (eos kept last)."""
    _, _, eos = special_ids(tokenizer)
    out = []
    for ids in tokenizer.encode_batch(lines, allowed_special="none"):
        out.append(ids[: max_len - 1] + [eos])
    return out


def pad_batch(seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """List of id lists -> (B, T) long tensor, right-padded."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out


@dataclass
class Split:
    src: list[list[int]]  # ids, each ending with eos
    tgt: list[list[int]]


def make_batches(split: Split, max_tokens: int, generator: torch.Generator | None = None,
                 bucket_size: int = 32768) -> list[list[int]]:
    """Sentence indices grouped into batches whose padded size (sentences x longest side)
    stays within max_tokens. With a generator: random buckets, sorted inside, batches shuffled;
    without: one sorted pass (deterministic, for evaluation)."""
    n = len(split.src)
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
    length = [max(len(split.src[i]), len(split.tgt[i]) + 1) for i in range(n)]  # +1: bos
    batches: list[list[int]] = []
    for b0 in range(0, n, bucket_size if generator is not None else max(n, 1)):
        bucket = sorted(order[b0:b0 + bucket_size] if generator is not None else order,
                        key=lambda i: (len(split.src[i]), len(split.tgt[i])))
        batch: list[int] = []
        longest = 0
        for i in bucket:
            if batch and max(longest, length[i]) * (len(batch) + 1) > max_tokens:
                batches.append(batch)
                batch, longest = [], 0
            batch.append(i)
            longest = max(longest, length[i])
        if batch:
            batches.append(batch)
    if generator is not None:
        batches = [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def padding_fraction(split: Split, batches: list[list[int]]) -> float:
    """Share of the source and target tensor cells that are padding."""
    pad = total = 0
    for batch in batches:
        for side in (split.src, [[0] + t for t in split.tgt]):  # target side includes bos
            lens = [len(side[i]) for i in batch]
            total += max(lens) * len(lens)
            pad += max(lens) * len(lens) - sum(lens)
    return pad / max(total, 1)


class TranslationBatches:
    """The data source the Trainer draws from: `get_batch(split)` -> (src, tgt_in, tgt_out).

    Training walks through an epoch's shuffled batches in order and reshuffles at the end; the
    generator state, epoch order and position are in `state_dict()`, so a resumed run sees
    exactly the batches an uninterrupted one would. Evaluation (`generator=` given) draws
    batches at random from a fixed, sorted batching of the split."""

    def __init__(self, splits: dict[str, Split], max_tokens: int, pad_id: int, bos_id: int,
                 seed: int = 0, device: str | torch.device = "cpu"):
        for name, split in splits.items():
            if not split.src:
                raise LMForgeError(f"the {name} split is empty; give it at least one sentence pair")
        longest = max(max(len(s), len(t) + 1) for split in splits.values() for s, t in zip(split.src, split.tgt))
        if max_tokens < longest:
            raise LMForgeError(f"max_tokens={max_tokens} is smaller than the longest sentence ({longest} tokens); "
                               f"raise max_tokens or lower max_len")
        self.splits, self.max_tokens = splits, max_tokens
        self.pad_id, self.bos_id = pad_id, bos_id
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.pos = 0, 0
        self.order = make_batches(splits["train"], max_tokens, self.generator)
        self.eval_batches = {name: make_batches(split, max_tokens) for name, split in splits.items()}
        self.padding_fraction = padding_fraction(splits["train"], self.order)
        self._last_tokens = 0

    def _tensors(self, split: Split, batch: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = pad_batch([split.src[i] for i in batch], self.pad_id)  # (B, S)
        tgt = pad_batch([[self.bos_id] + split.tgt[i] for i in batch], self.pad_id)  # (B, T+1)
        tensors = (src, tgt[:, :-1].contiguous(), tgt[:, 1:].contiguous())  # src, bos+y, y+eos
        return tuple(t.to(self.device) for t in tensors)  # type: ignore[return-value]

    def get_batch(self, split: str, generator: torch.Generator | None = None):
        if generator is not None:
            batches = self.eval_batches[split]
            j = int(torch.randint(len(batches), (1,), generator=generator))
            return self._tensors(self.splits[split], batches[j])
        if self.pos >= len(self.order):  # epoch done: a new shuffle
            self.epoch, self.pos = self.epoch + 1, 0
            self.order = make_batches(self.splits["train"], self.max_tokens, self.generator)
        batch = self.order[self.pos]
        self.pos += 1
        out = self._tensors(self.splits[split], batch)
        self._last_tokens = int((out[2] != self.pad_id).sum())
        return out

    def tokens_per_batch(self) -> int:
        """Target tokens (padding excluded) in the last training batch."""
        return self._last_tokens

    def batches_per_epoch(self) -> int:
        return len(self.order)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "epoch": self.epoch, "pos": self.pos,
                "order": self.order}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.epoch, self.pos, self.order = state["epoch"], state["pos"], state["order"]
