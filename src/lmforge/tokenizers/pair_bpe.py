"""BPE as the `tokenizers` library runs it: merges are pairs of token ids with a priority,
applied to one word at a time (lowest priority number first, leftmost on a tie).

This differs from tiktoken's rule (merge the adjacent pair whose concatenation has the lowest
rank) on vocabularies where a token can be spelled by two different pairs; `tiktoken_equivalent`
decides per vocabulary whether the fast tiktoken path gives the same ids. Characters missing
from the vocabulary become `<0xXX>` byte tokens (byte_fallback), else the unknown token (fused
into one when `fuse_unk`), else they are dropped, as in the `tokenizers` library.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence


class PairBPE:
    """vocab: token text -> id; merges: (left text, right text) in priority order."""

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], ignore_merges: bool = False,
                 byte_fallback: bool = False, unk_id: int | None = None, fuse_unk: bool = False):
        self.vocab = vocab
        self.ignore_merges = ignore_merges
        self.unk_id, self.fuse_unk = unk_id, fuse_unk
        # (left id, right id) -> (priority, merged id); a repeated pair keeps its last entry,
        # as the `tokenizers` library's map does
        self.pairs: dict[tuple[int, int], tuple[int, int]] = {
            (vocab[a], vocab[b]): (k, vocab[a + b]) for k, (a, b) in enumerate(merges)}
        self.byte_ids: list[int] | None = None
        if byte_fallback:
            ids = [vocab.get(f"<0x{b:02X}>") for b in range(256)]
            self.byte_ids = ids if all(i is not None for i in ids) else None
        self.cache: dict[str, list[int]] = {}

    def symbols(self, word: str) -> list[int]:
        """One id per character; byte tokens or the unknown token where there is none.

        >>> PairBPE({"a": 0, "<unk>": 1}, [], unk_id=1, fuse_unk=True).symbols("abca")
        [0, 1, 0]
        """
        vocab, out = self.vocab, []
        pending_unk = 0  # characters waiting to become one fused unknown token
        for ch in word:
            i = vocab.get(ch)
            if i is not None:
                if pending_unk:
                    out.append(self.unk_id)
                    pending_unk = 0
                out.append(i)
            elif self.byte_ids is not None:
                out.extend(self.byte_ids[b] for b in ch.encode("utf-8"))
            elif self.unk_id is not None:
                if pending_unk and not self.fuse_unk:
                    out.append(self.unk_id)
                pending_unk = 1
        if pending_unk:
            out.append(self.unk_id)
        return out

    def encode_word(self, word: str) -> list[int]:
        """Ids of one pre-tokenized word (cached: natural text repeats its words).

        >>> bpe = PairBPE({"a": 0, "b": 1, "ab": 2, "aba": 3}, [("a", "b"), ("ab", "a")])
        >>> bpe.encode_word("abab"), bpe.encode_word("aba")
        ([2, 2], [3])
        """
        ids = self.cache.get(word)
        if ids is not None:
            return ids
        whole = self.vocab.get(word) if self.ignore_merges else None
        ids = [whole] if whole is not None else self.merge(self.symbols(word))
        if len(self.cache) < 500_000:
            self.cache[word] = ids
        return ids

    def merge(self, ids: list[int]) -> list[int]:
        """Apply merges to a list of ids until none applies: lowest priority first, leftmost
        on a tie. Short words rescan their pairs (fast in Python); long ones (text without
        spaces, such as Chinese under SentencePiece) use a heap, as the `tokenizers` library does."""
        if len(ids) > 48:
            return self.merge_long(ids)
        pairs = self.pairs
        while len(ids) > 1:
            best, best_i = None, -1
            for i in range(len(ids) - 1):
                m = pairs.get((ids[i], ids[i + 1]))
                if m is not None and (best is None or m[0] < best[0]):
                    best, best_i = m, i
            if best is None:
                break
            ids[best_i:best_i + 2] = [best[1]]
        return ids


    def merge_long(self, ids: list[int]) -> list[int]:
        """`merge` in O(n log n): a heap of (priority, position) over a linked list of symbols;
        entries whose symbols have changed since they were pushed are skipped when popped.

        >>> bpe = PairBPE({"a": 0, "aa": 1}, [("a", "a")])
        >>> bpe.merge_long([0] * 5) == bpe.merge([0] * 5) == [1, 1, 0]
        True
        """
        pairs, n = self.pairs, len(ids)
        sym, nxt, prv = list(ids), list(range(1, n + 1)), list(range(-1, n - 1))
        alive = [True] * n
        heap = []
        for i in range(n - 1):
            m = pairs.get((sym[i], sym[i + 1]))
            if m is not None:
                heap.append((m[0], i, sym[i], sym[i + 1], m[1]))
        heapq.heapify(heap)
        while heap:
            _, i, a, b, new = heapq.heappop(heap)
            j = nxt[i]
            if not alive[i] or sym[i] != a or j >= n or sym[j] != b:
                continue  # stale: one of the two symbols was merged away since
            sym[i], alive[j], nxt[i] = new, False, nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            for left, right in ((prv[i], i), (i, nxt[i])):
                if left >= 0 and right < n:
                    m = pairs.get((sym[left], sym[right]))
                    if m is not None:
                        heapq.heappush(heap, (m[0], left, sym[left], sym[right], m[1]))
        return [sym[i] for i in range(n) if alive[i]]


def tiktoken_equivalent(ranks: dict[bytes, int], merges: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether tiktoken on `ranks` (bytes -> id) gives the ids the merges give.

    tiktoken merges the adjacent pair whose concatenation has the lowest id. That equals the
    merge rule when (1) merged tokens' ids grow in merge order, (2) every token of 2+ bytes is
    made by exactly one merge, and (3) that merge is the one tiktoken's own rule recovers for
    the token (the last step of encoding the token's bytes with lower ids only). Then every
    token also encodes as itself, so tiktoken's whole-piece lookup (`ignore_merges`) changes
    nothing. (Leave out of `ranks` the multi-byte tokens no merge makes: merges never reach them.)"""
    from .bpe import bpe_parts

    made: set[bytes] = set()
    last = -1
    for a, b in merges:
        token = a + b
        rank = ranks.get(token)
        if rank is None or rank <= last or token in made:
            return False
        if bpe_parts(ranks, token, max_rank=rank) != [a, b]:
            return False
        made.add(token)
        last = rank
    return all(len(t) == 1 or t in made for t in ranks)
