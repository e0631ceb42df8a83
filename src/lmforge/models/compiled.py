"""A compiled decode step. Eager decoding runs a few hundred small ops per token, each with
Python and dispatch overhead that batch-1 decoding cannot hide behind arithmetic. Compiling
the one-token step with inductor turns it into one fused graph; that needs fixed shapes, so
the KV cache is static (every step attends over all `max_len` slots, the unfilled ones masked
out) and the position is a tensor, not a Python int. Prefill runs eager into the same cache."""

from __future__ import annotations

import time
from typing import Iterator

import torch

from ..nn.attention import KVCache
from ..sampling import sample_next

RECOMPILE_LIMIT = 256  # graphs per step function in one process (dynamo's default is 8)


class StaticKVCache(KVCache):
    """A KVCache whose update writes at the positions in `index` (a tensor) and returns all
    max_len slots, so a step's shapes never change; the caller masks the unfilled slots and
    keeps the positions (advance does nothing). One tensor per layer (`split_by_layer`), so
    the compiled step writes it in place."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.split_by_layer()
        self.index = torch.zeros(1, dtype=torch.long, device=self.k[0].device)

    def zero_(self) -> None:
        for t in (*self.k, *self.v):
            t.zero_()

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[layer].index_copy_(2, self.index, k)  # (B, nkv, max_len, hs) <- (B, nkv, T, hs)
        self.v[layer].index_copy_(2, self.index, v)
        return self.k[layer], self.v[layer]

    def advance(self, n: int) -> None:
        pass


def compile_step(fn, device: torch.device | str, mode: str | None = None):
    """torch.compile for a fixed-shape inference step. On a CPU, unless a mode is given, the
    weights are frozen into the graph (inductor then lays them out for its own GEMM kernels
    once) and GEMMs use inductor's autotuned CPU templates: in bf16 and int8 that is what makes
    the compiled step faster than eager (docs/benchmarks.md, "The compiled decode step"), at the
    cost of a longer compile and a second copy of the weights. Frozen means later changes to
    the model's weights do not reach the graph: compile once the weights are final."""
    frozen = mode is None and torch.device(device).type == "cpu"
    compiled = torch.compile(fn, fullgraph=True, dynamic=False, mode="max-autotune" if frozen else mode)

    def step(*args):
        # Read while inductor compiles, which happens inside a call (the first, or one with new
        # shapes); passed in torch.compile's options they do not take effect. Every decoder's
        # step is the same code object to dynamo, so the per-code graph limit (8) would stop a
        # process after a few models or batch sizes; each graph is still kept apart by its guards.
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT), \
                torch._inductor.config.patch(freezing=frozen):
            return compiled(*args)
    return step


class CompiledDecoder:
    """Greedy or sampled decoding of `model` (a GPT) with a `torch.compile`d one-token step.
    The first call compiles (seconds to minutes; `compile_seconds` says how long) and later
    calls reuse the graph as long as batch size and `max_len` stay the same."""

    def __init__(self, model, max_len: int | None = None, mode: str | None = None):
        self.model = model.eval()
        self.max_len = min(max_len or model.config.block_size, model.config.block_size)
        self.mode = mode
        self.cache: StaticKVCache | None = None
        self._step = compile_step(self._one_token, model.tok_emb.weight.device, mode)
        self.compile_seconds = 0.0
        self._compiled_for: tuple[int, ...] | None = None

    def _one_token(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """token (B, 1), pos (1,) -> logits (B, V)."""
        mask = (self.key_pos <= pos)[None, None, None, :]  # (1, 1, 1, max_len): the filled slots
        return self.model(token, cache=self.cache, positions=pos, mask=mask)[:, -1]

    def _setup(self, batch: int) -> None:
        ref = self.model.tok_emb.weight
        if self.cache is None or self.cache.k[0].shape[0] != batch:
            cfg = self.model.config
            self.cache = StaticKVCache(cfg.n_layer, batch, cfg.n_kv_head or cfg.n_head, cfg.head_size,
                                       self.max_len, ref.device, ref.dtype)
            self.key_pos = torch.arange(self.max_len, device=ref.device)
            self.step_pos = torch.zeros(1, dtype=torch.long, device=ref.device)  # one tensor, updated in place
        self.cache.zero_()

    def _prefill(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        self.cache.index = pos
        mask = (self.key_pos[None, :] <= pos[:, None])[None, None]  # (1, 1, T, max_len)
        return self.model(idx, cache=self.cache, positions=pos, mask=mask)[:, -1]

    @torch.no_grad()
    def steps(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
              top_k: int | None = None, top_p: float | None = None,
              generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Yield each step's new token ids (B,), as `decode_steps` does; the prompt and the new
        tokens must fit in max_len (no sliding window here)."""
        B, T = idx.shape
        if T + max_new_tokens > self.max_len:
            raise ValueError(f"{T} prompt + {max_new_tokens} new tokens exceed the compiled cache's "
                             f"{self.max_len} positions")
        self._setup(B)
        logits = self._prefill(idx)
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            yield nxt
            if step == max_new_tokens - 1:
                break
            self.step_pos.fill_(T + step)
            self.cache.index = self.step_pos
            if self._compiled_for != (B, self.max_len):  # the first step compiles
                t0 = time.perf_counter()
                logits = self._step(nxt[:, None], self.step_pos)
                self.compile_seconds += time.perf_counter() - t0
                self._compiled_for = (B, self.max_len)
            else:
                logits = self._step(nxt[:, None], self.step_pos)

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """idx (B, T) -> (B, T + max_new_tokens)."""
        new = list(self.steps(idx, max_new_tokens, **kwargs))
        return torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx
