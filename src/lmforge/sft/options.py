"""What `lmforge finetune --data FILE` needs to turn instruction files into batches: the options,
kept in OUT/finetune.json for --resume, and the one call that reads, splits and batches."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..chat.format import ChatFormat
from ..errors import LMForgeError
from ..fileio import file_sha256
from .batches import SFTBatches, count_tokens
from .examples import OVERLONG, hold_out, load_examples


@dataclass(frozen=True)
class SFTOptions:
    """val: a validation file (default: a seeded 5% of the training file). max_length: the most
    tokens an example may have (default: the model's block_size). overlong: truncate or drop
    longer ones. train_on_prompt: every token counts in the loss, not only the answers'.
    pack: several examples a row, with a document mask, instead of one padded example a row."""

    val: str | None = None
    max_length: int | None = None
    overlong: str = "truncate"
    train_on_prompt: bool = False
    pack: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SFTOptions:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise LMForgeError(f"unknown instruction-data option {unknown[0]!r}; valid: {', '.join(sorted(names))}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self, block_size: int) -> None:
        if self.overlong not in OVERLONG:
            raise LMForgeError(f"--overlong must be one of {', '.join(OVERLONG)}, not {self.overlong!r}")
        if self.max_length is not None and not 2 <= self.max_length <= block_size:
            raise LMForgeError(f"--max-length must be between 2 and the model's block_size {block_size}, "
                               f"not {self.max_length}")


def data_fingerprint(train: str | Path, opts: SFTOptions) -> dict[str, str | None]:
    """sha256 of the training and validation files: a resumed run must read the same examples."""
    return {"data_sha256": file_sha256(train), "val_sha256": file_sha256(opts.val) if opts.val else None}


def build_sft_batches(train_path: str | Path, opts: SFTOptions, tokenizer, fmt: ChatFormat, block_size: int,
                      batch_size: int, seed: int, verbose: bool = True) -> SFTBatches:
    """Read the training (and validation) file, hold out 5% when there is no validation file,
    and batch them. Raises LMForgeError ("FILE:LINE: ...") on the first unusable record."""
    opts.validate(block_size)
    max_length = opts.max_length or block_size
    sets = [load_examples(p, tokenizer, fmt, max_length, opts.overlong, opts.train_on_prompt)
            for p in ([train_path, opts.val] if opts.val else [train_path])]
    if opts.val:
        train, val = sets[0].examples, sets[1].examples
    else:
        train, val = hold_out(sets[0].examples, seed)
    if verbose:
        for s in sets:
            print(s.summary(max_length))
        total, counted = count_tokens(train)
        where = "every token" if opts.train_on_prompt else "answer tokens"
        print(f"{len(train)} training / {len(val)} validation examples{'' if opts.val else ' (5% held out)'}; "
              f"{total:,} training tokens, {counted:,} of them in the loss ({where}); "
              f"{'packed' if opts.pack else 'padded, grouped by length'}")
    return SFTBatches(train, val, batch_size, block_size, pack=opts.pack, seed=seed)
