"""The batching scheduler: one thread owns the model and steps every active sequence together.

Each sequence holds a row ("slot") of one preallocated KV cache, with its own length, so
requests that arrived at different times, with prompts of different lengths, decode in the
same forward pass: every row feeds its last token at its own position, and a mask hides the
cache columns a row has not filled. A new request is prefilled alone (its prompt, once per
choice), then joins the batch at the next step. A finished or abandoned sequence gives its row
back at once (the last row moves into the hole, so active rows stay 0..S-1 and every read of
the cache is a plain slice).

HTTP handlers talk to the engine through `Handle`s: `submit` queues a request and returns a
handle whose asyncio queue receives one `Event` per generated token."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import torch

from ..sampling import sample_next
from .slots import SlotKVCache
from .text import Detokenizer


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: no log-probabilities; k: also the k most likely tokens
    prompt_logprobs: bool = False  # log-probabilities of the prompt's tokens (for echo)
    stop_ids: frozenset[int] = frozenset()  # end-of-sequence ids besides the tokenizer's end-of-text


@dataclass
class Event:
    """One step of one choice: the sampled token (None on a final flush) and the text it adds."""

    choice: int
    text: str
    token: int | None = None
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" once the choice is done


class Handle:
    """A request as seen by the HTTP side. Events arrive on `queue` (from the engine thread);
    an Exception on the queue means the request failed."""

    def __init__(self, prompt_ids: list[int], n: int, params: SamplingParams, loop: asyncio.AbstractEventLoop):
        self.prompt_ids, self.n, self.params, self.loop = prompt_ids, n, params, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.abort_reason: str | None = None  # set: the engine ends every open choice with this reason
        self.prompt_logprobs: list[tuple[float | None, list[tuple[int, float]]]] | None = None

    def push(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            self.cancelled = True

    def cancel(self) -> None:
        """Stop generating for this request (its rows are freed at the next step)."""
        self.cancelled = True

    def abort(self, reason: str = "abort") -> None:
        """End this request at the next step: every open choice gets a final event with `reason`
        as its finish_reason (a deadline, a server shutting down), so streams close cleanly."""
        self.abort_reason = reason

    async def events(self):
        """Yield Events until every choice has finished."""
        done = 0
        while done < self.n:
            item = await self.queue.get()
            if isinstance(item, Exception):
                raise item
            done += item.finish_reason is not None
            yield item


@dataclass(eq=False)
class _Seq:
    handle: Handle
    choice: int
    detok: Detokenizer
    generator: torch.Generator
    generated: int = 0
    last: int = 0  # the token to feed next
    prev: int = 0  # the token before it (speculative decoding feeds it to the draft)
    done: bool = False


@dataclass
class EngineStats:
    finished: int = 0  # choices that ended by a stop or their length
    cancelled: int = 0  # choices dropped because their client went away
    dropped: int = 0  # requests whose client went away while queued, dropped before they ran
    aborted: int = 0  # choices ended early by a deadline or a shutdown (final event sent)
    tokens: int = 0  # tokens generated in all


class Engine:
    """Runs `model` on a background thread over up to `max_batch` sequences at once. With a
    `draft` model (same vocabulary), every step is a speculative round: the draft proposes
    `draft_tokens` tokens per row and the model checks them in one pass (serve/speculative.py).
    `compile`: decode with a torch.compile'd step over all max_batch rows (serve/compiled.py),
    compiled here, before the first request; `compile_seconds` says how long it took."""

    def __init__(self, model, tokenizer, max_batch: int = 16, max_context: int | None = None,
                 draft=None, draft_tokens: int = 4, compile: bool = False):
        if not hasattr(model, "make_cache"):
            from ..errors import LMForgeError

            raise LMForgeError(f"serving needs a decoder model with a KV cache (gpt); got {type(model).__name__}")
        self.model, self.tokenizer, self.max_batch = model.eval(), tokenizer, max_batch
        self.device = next(model.parameters()).device
        # the KV cache holds max_batch x block_size positions per layer, allocated up front: an
        # imported Llama 3 (131,072 positions) would need tens of GB, so a server may cap it
        self.block_size: int = min(model.config.block_size, max_context or model.config.block_size)
        dtype = next(model.parameters()).dtype
        self.speculator = None
        if draft is not None:
            from .speculative import Speculator

            if draft.config.vocab_size != model.config.vocab_size:
                from ..errors import LMForgeError

                raise LMForgeError(f"the draft's vocabulary ({draft.config.vocab_size}) differs from the model's "
                                   f"({model.config.vocab_size}); use a draft trained with the same tokenizer")
            self.speculator = Speculator(draft, draft_tokens, max_batch, self.block_size, self.device, dtype)
        spare = draft_tokens + 1 if draft is not None else 0  # columns for guesses past a row's end
        self.cache = SlotKVCache(model.config.n_layer, max_batch, *self._kv_shape(model),
                                 max_len=self.block_size + spare, device=self.device, dtype=dtype)
        self.compiled, self.compile_seconds = None, 0.0
        if compile:
            from .compiled import CompiledStep

            if draft is not None:
                from ..errors import LMForgeError

                raise LMForgeError("a compiled step and a draft model do not combine; choose one")
            self.compiled = CompiledStep(self.model, self.cache)
            self.compile_seconds = self.compiled.compile_seconds
        self.rows: list[_Seq] = []  # row i of the cache belongs to rows[i]
        self.pending: list[Handle] = []
        self.stats = EngineStats()
        self.model_lock = threading.Lock()  # held while the model runs (the attention probe shares it)
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
        self._thread.start()

    @staticmethod
    def _kv_shape(model) -> tuple[int, int]:
        probe = model.make_cache(1, 1)  # (n_layer, 1, nkv, 1, hs): the model knows its own layout
        return probe.k.shape[2], probe.k.shape[4]

    # --- the HTTP side ----------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], n: int, params: SamplingParams) -> Handle:
        handle = Handle(prompt_ids, n, params, asyncio.get_running_loop())
        with self._cv:
            self.pending.append(handle)
            self._cv.notify()
        return handle

    def load(self) -> dict[str, int | float]:
        with self._cv:
            out = {"active": len(self.rows), "queued": sum(h.n for h in self.pending),
                   "slots": self.max_batch, "finished": self.stats.finished,
                   "cancelled": self.stats.cancelled, "dropped": self.stats.dropped,
                   "aborted": self.stats.aborted, "tokens_generated": self.stats.tokens}
            if self.speculator is not None:  # the share of the draft's guesses the model kept
                spec = self.speculator.stats
                out.update(draft_rounds=spec.rounds, draft_proposed=spec.proposed,
                           draft_acceptance=round(spec.acceptance_rate, 4))
            return out

    def queued(self) -> int:
        """Requests waiting for a row."""
        with self._cv:
            return len(self.pending)

    def abort_all(self, reason: str = "abort") -> None:
        """End every queued and running request with a final event (see Handle.abort)."""
        with self._cv:
            for h in self.pending + [s.handle for s in self.rows]:
                h.abort(reason)
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=5)

    # --- the engine thread ------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self.pending and not self.rows:
                    self._cv.wait()
                if self._closed:
                    return
                admitted = self._admit()
            with self.model_lock, torch.no_grad():
                for handle in admitted:
                    self._guarded([handle], self._prefill, handle)
                if self.rows:
                    self._guarded([s.handle for s in self.rows], self._decode_step)
            with self._cv:
                self._retire()

    def _guarded(self, handles: list[Handle], step, *args) -> None:
        """Run one step; if it fails, fail the requests it was serving (the server lives on)."""
        try:
            step(*args)
        except Exception as e:  # a bug or e.g. out of memory: report it to the clients
            for h in handles:
                h.push(e)
                h.cancel()

    def _admit(self) -> list[Handle]:
        """Move queued requests into free rows, first come first served."""
        keep = []
        for h in self.pending:
            if h.cancelled:
                self.stats.dropped += 1
            elif h.abort_reason:  # never ran: every choice ends empty
                for c in range(h.n):
                    h.push(Event(c, "", finish_reason=h.abort_reason))
                self.stats.aborted += h.n
            else:
                keep.append(h)
        self.pending = keep
        admitted, free = [], self.max_batch - len(self.rows)
        while self.pending and self.pending[0].n <= free:
            handle = self.pending.pop(0)
            free -= handle.n
            admitted.append(handle)
        return admitted

    def _prefill(self, handle: Handle) -> None:
        p, n, row = handle.params, handle.n, len(self.rows)
        idx = torch.tensor([handle.prompt_ids] * n, device=self.device)  # (n, T)
        self.cache.prefill(row, n)
        logits = self.model(idx, cache=self.cache)  # (n, T, V)
        if p.prompt_logprobs:
            handle.prompt_logprobs = self._prompt_logprobs(handle.prompt_ids, logits[0], p.logprobs or 0)
        seqs = []
        for c in range(n):
            gen = torch.Generator(device=self.device)
            if p.seed is not None:
                gen.manual_seed((p.seed + c) % 2**64)  # choice c of seed s is reproducible on its own
            else:
                gen.seed()
            seqs.append(_Seq(handle, c, Detokenizer(self.tokenizer, p.stop), gen, last=handle.prompt_ids[-1]))
        self.rows.extend(seqs)
        if self.speculator is not None:
            self.speculator.prefill(row, n, handle.prompt_ids)
        if p.max_tokens == 0:
            for s in seqs:
                self._finish(s, "length")
            return
        self._sample(seqs, logits[:, -1])

    def _decode_step(self) -> None:
        self._retire()  # e.g. sequences that ended at their prefill
        S = len(self.rows)
        if S == 0:
            return
        if self.speculator is not None:
            for s, (toks, logits) in zip(list(self.rows), self.speculator.round(self.model, self.cache, self.rows)):
                self._report([s] * len(toks), torch.tensor(toks), logits)
            return
        if self.compiled is not None:
            self._sample(self.rows, self.compiled.step([s.last for s in self.rows]))
            return
        idx = torch.tensor([[s.last] for s in self.rows], device=self.device)  # (S, 1)
        positions, mask = self.cache.decode(S)
        logits = self.model(idx, cache=self.cache, positions=positions, mask=mask)  # (S, 1, V)
        self._sample(self.rows, logits[:, -1])

    def _sample(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """logits (k, V), one row per sequence in seqs: sample, then report each token."""
        toks = torch.stack([sample_next(logits[i:i + 1], s.handle.params.temperature, s.handle.params.top_k,
                                        s.handle.params.top_p, s.generator)[0]
                            for i, s in enumerate(seqs)])  # (k,)
        self._report(seqs, toks, logits)

    def _report(self, seqs: list[_Seq], toks: torch.Tensor, logits: torch.Tensor) -> None:
        """Token toks[i] of seqs[i], drawn from logits[i]; a sequence may appear several times
        in a row (speculative rounds), and tokens after it has finished are dropped."""
        want = [s.handle.params.logprobs for s in seqs]
        chosen = top_vals = top_ids = None
        if any(w is not None for w in want):
            # log-probabilities of the model's own distribution (before temperature / top-p)
            logp = torch.log_softmax(logits.float(), dim=-1)  # (k, V)
            chosen = logp.gather(1, toks[:, None])[:, 0].tolist()
            k_top = max(w or 0 for w in want)
            if k_top:
                top = logp.topk(k_top, dim=-1)
                top_vals, top_ids = top.values.tolist(), top.indices.tolist()
        eot = getattr(self.tokenizer, "eot_id", None)
        for i, (s, t) in enumerate(zip(seqs, toks.tolist())):
            if s.handle.cancelled or s.done:
                continue
            if t == eot or t in s.handle.params.stop_ids:
                self._finish(s, "stop")
                continue
            s.prev, s.last, s.generated = s.last, t, s.generated + 1
            self.stats.tokens += 1
            ev = Event(s.choice, s.detok.push(t), t)
            if want[i] is not None:
                ev.logprob = chosen[i]
                ev.top = list(zip(top_ids[i][:want[i]], top_vals[i][:want[i]])) if want[i] else []
            if s.detok.stopped:
                ev.finish_reason = "stop"
            elif s.generated >= s.handle.params.max_tokens:
                ev.finish_reason = "length"
                ev.text += s.detok.flush()
            s.handle.push(ev)
            if ev.finish_reason:
                s.done = True
                self.stats.finished += 1

    def _prompt_logprobs(self, ids: list[int], logits: torch.Tensor, k: int):
        """[(logprob of token i given tokens < i, its top k), ...]; the first token has None."""
        logp = torch.log_softmax(logits.float(), dim=-1)  # (T, V)
        ids_t = torch.tensor(ids[1:], device=logp.device)
        lp = logp[:-1].gather(1, ids_t[:, None])[:, 0].tolist() if len(ids) > 1 else []
        tops = [[] for _ in ids]
        if k:
            top = logp.topk(k, dim=-1)
            vals, idx = top.values.tolist(), top.indices.tolist()
            tops = [[]] + [list(zip(idx[i], vals[i])) for i in range(len(ids) - 1)]
        return [(None, [])] + [(lp[i], tops[i + 1]) for i in range(len(ids) - 1)]

    def _finish(self, s: _Seq, reason: str) -> None:
        s.done = True
        self.stats.finished += 1
        s.handle.push(Event(s.choice, s.detok.flush(), finish_reason=reason))

    def _retire(self) -> None:
        """Free the rows of finished and cancelled sequences; the last row fills each hole."""
        for r in range(len(self.rows) - 1, -1, -1):
            s = self.rows[r]
            if not s.done and not s.handle.cancelled and s.handle.abort_reason:
                self._finish(s, s.handle.abort_reason)
                self.stats.finished -= 1
                self.stats.aborted += 1
            if not (s.done or s.handle.cancelled):
                continue
            if not s.done:
                self.stats.cancelled += 1
            last = len(self.rows) - 1
            if r != last:
                self.cache.move(last, r)
                if self.speculator is not None:
                    self.speculator.move(last, r)
                self.rows[r] = self.rows[last]
            self.rows.pop()
