"""Byte-level BPE training, incremental: count once, then update only what a merge touches.

minbpe recounts every pair of the whole text after each merge, which is quadratic. Here:

1. Pre-tokenize the text with the split pattern and count each distinct chunk once
   (`count_chunks`). Shakespeare's 1.1 MB is 263k chunks but only 15k distinct ones.
2. Count adjacent pairs over the distinct chunks, weighted by chunk count, and index which
   chunks contain each pair (`pair -> set of chunk ids`).
3. Repeatedly take the most frequent pair from a heap, merge it only in the chunks that
   contain it, and adjust the pair counts of those chunks by their change.

Tie-break: among pairs with the same count the smallest pair `(a, b)` wins (compared as
tuples), so training is deterministic and independent of dict order.
"""

from __future__ import annotations

import heapq
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import LMForgeError

BLOCK_CHARS = 1 << 20  # read files 1M characters at a time


def merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of `pair`, left to right, with `new_id`.

    >>> merge([1, 2, 3, 1, 2], (1, 2), 4)
    [4, 3, 4]
    >>> merge([5, 5, 5], (5, 5), 6)
    [6, 5]
    """
    a, b = pair
    out: list[int] = []
    i, last = 0, len(ids) - 1
    while i < last:
        if ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    if i == last:
        out.append(ids[i])
    return out


def read_blocks(paths: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Yield the text of `paths` in blocks, so a file larger than memory can be counted.

    Files are read as UTF-8 with newlines kept as they are (`\\r\\n` stays `\\r\\n`).
    """
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise LMForgeError(f"training file not found: {path}")
        try:
            with open(path, encoding="utf-8", newline="") as f:
                while block := f.read(BLOCK_CHARS):
                    yield block
        except UnicodeDecodeError as e:
            raise LMForgeError(f"training file {path} is not UTF-8 text ({e.reason} at byte {e.start})")


def count_chunks(blocks: Iterable[str], pattern: str, specials: Iterable[str] = ()) -> Counter[str]:
    """Count the pre-tokenized chunks of a text given as consecutive blocks.

    Special-token text (e.g. `<|endoftext|>` between documents) is cut out, so no merges are
    spent on it. The last chunk of a block may continue in the next block (a word cut in
    half), so it is carried over, together with any tail that could start a special token.

    >>> sorted(count_chunks(["the cat and the h", "at"], r" ?\\w+|\\s").items())
    [(' and', 1), (' cat', 1), (' hat', 1), (' the', 1), ('the', 1)]
    >>> count_chunks(["a<|e", "ot|>a"], r"\\S+", specials=["<|eot|>"])
    Counter({'a': 2})
    """
    import regex

    split = regex.compile(pattern).findall
    specials = sorted(set(specials), key=len, reverse=True)  # longest first: never split one
    cut = regex.compile("|".join(map(regex.escape, specials))).split if specials else None
    counts: Counter[str] = Counter()
    carry = ""
    for block in blocks:
        text = carry + block
        hold = _partial_special_len(text, specials)
        text, tail = text[: len(text) - hold], text[len(text) - hold :]
        *segments, last_segment = cut(text) if cut else [text]
        for segment in segments:
            counts.update(split(segment))
        chunks = split(last_segment)
        carry = tail
        if chunks:
            last = chunks.pop()
            carry = last_segment[last_segment.rfind(last) :] + tail
        counts.update(chunks)
    for segment in cut(carry) if cut else [carry]:
        counts.update(split(segment))
    return counts


def _partial_special_len(text: str, specials: list[str]) -> int:
    """Length of the longest end of `text` that is the start (not all) of a special token.

    >>> _partial_special_len("hello <|end", ["<|endoftext|>"])
    5
    """
    longest = max(map(len, specials), default=1)
    for k in range(min(len(text), longest - 1), 0, -1):
        end = text[-k:]
        if any(s.startswith(end) for s in specials):
            return k
    return 0


def train_merges(
    chunk_counts: dict[str, int], num_merges: int, progress: bool = False
) -> list[tuple[int, int]]:
    """Learn up to `num_merges` merges from chunk counts; merge i creates token id 256 + i.

    Stops early when no pair is left (every chunk is a single token).

    >>> train_merges({"aaab": 2, "ab": 1}, 2)  # (a, a): 2 * 2 = 4, then (a, b): 2 + 1 = 3
    [(97, 97), (97, 98)]
    >>> train_merges({"ba": 1, "ab": 1}, 1)  # a tie: the smaller pair wins
    [(97, 98)]
    """
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    counts = list(chunk_counts.values())

    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # may hold stale chunk ids
    for i, (word, count) in enumerate(zip(words, counts)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += count
            where[pair].add(i)
    # Heap of (-count, pair). Entries go stale when a count drops; they are fixed when popped.
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    vocab = [bytes([b]) for b in range(256)]
    id_of = {token: i for i, token in enumerate(vocab)}
    merges: list[tuple[int, int]] = []
    bar = _progress_bar(num_merges, progress)
    while len(merges) < num_merges and heap:
        neg_count, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count != -neg_count:  # stale: re-queue with the current count
            if count > 0:
                heapq.heappush(heap, (-count, pair))
            continue
        token = vocab[pair[0]] + vocab[pair[1]]
        new_id = id_of.get(token)
        if new_id is None:
            new_id = len(vocab)
            vocab.append(token)
            id_of[token] = new_id
            merges.append(pair)
            bar.update(1)
        # else: these bytes are already a token (made from a different pair); reuse its id so
        # the vocabulary never holds the same bytes twice. Never seen on real text, but possible.

        touched = set()
        for i in where.pop(pair):
            word = words[i]
            new_word = merge(word, pair, new_id)
            if len(new_word) == len(word):
                continue  # stale index entry: an earlier merge already consumed the pair here
            count = counts[i]
            for p in zip(word, word[1:]):
                pair_counts[p] -= count
            for p in zip(new_word, new_word[1:]):
                pair_counts[p] += count
                if new_id in p:  # only pairs with the new token are new to this chunk
                    where[p].add(i)
                    touched.add(p)
            words[i] = new_word
        del pair_counts[pair]
        for p in touched:
            heapq.heappush(heap, (-pair_counts[p], p))
    bar.close()
    return merges


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, file=sys.stderr, unit="merge", desc="bpe")
