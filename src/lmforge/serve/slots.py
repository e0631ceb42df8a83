"""The engine's KV cache: one preallocated cache whose rows ("slots") belong to different
sequences, each with its own length, so sequences that started at different times decode in
one forward pass."""

from __future__ import annotations

import torch

from ..nn.attention import KVCache


class SlotKVCache(KVCache):
    """A KVCache whose rows have their own lengths (`lens`). Set the mode before each forward:
    `prefill(row, n)` writes a prompt into rows [row, row + n) from column 0; `decode(S, T)`
    makes rows [0, S) each append T tokens after their own last column. One tensor per layer
    (`split_by_layer`; k[layer]: (max_batch, nkv, max_len, hs)), so the compiled step
    (`serve.compiled`) writes it in place."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.split_by_layer()
        batch = self.k[0].shape[0]
        self.lens = [0] * batch  # filled columns of each row
        self._rows = slice(0, 0)
        self._cols: torch.Tensor | None = None  # decode: the columns each row writes, (S, T)
        self._end = 0

    def prefill(self, row: int, n: int) -> None:
        self._rows, self._cols, self.pos = slice(row, row + n), None, 0
        for i in range(row, row + n):  # the rows may have served an earlier sequence
            self.lens[i] = 0

    def decode(self, S: int, T: int = 1, max_position: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [0, S) each append T tokens after their own last column. Returns the positions
        (S, T) of the new tokens (at most `max_position`) and the attention mask (S, 1, T, end):
        token t of row i sees the row's filled columns and the new ones up to its own."""
        device = self.k[0].device
        self._rows = slice(0, S)
        self._cols = torch.tensor(self.lens[:S], device=device)[:, None] + torch.arange(T, device=device)  # (S, T)
        self._end = max(self.lens[:S]) + T
        cols = torch.arange(self._end, device=device)  # (end,)
        mask = cols[None, None, :] <= self._cols[:, :, None]  # (S, T, end)
        positions = self._cols if max_position is None else self._cols.clamp(max=max_position)
        return positions, mask[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._rows
        if self._cols is None:  # prefill: k, v (n, nkv, T, hs) from column 0
            T = k.shape[2]
            self.k[layer][rows, :, :T] = k
            self.v[layer][rows, :, :T] = v
            return self.k[layer][rows, :, :T], self.v[layer][rows, :, :T]
        r = torch.arange(k.shape[0], device=k.device)[:, None]  # decode: k, v (S, nkv, T, hs)
        self.k[layer][r, :, self._cols] = k.transpose(1, 2)  # row i writes columns cols[i]: (S, T, nkv, hs)
        self.v[layer][r, :, self._cols] = v.transpose(1, 2)
        return self.k[layer][rows, :, :self._end], self.v[layer][rows, :, :self._end]

    def advance(self, n: int) -> None:
        for i in range(self._rows.start, self._rows.stop):
            self.lens[i] += n

    def move(self, src: int, dst: int) -> None:
        """Row src's cache becomes row dst's (every layer)."""
        for t in (*self.k, *self.v):
            t[dst] = t[src]
        self.lens[dst] = self.lens[src]
