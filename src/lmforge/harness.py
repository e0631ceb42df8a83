"""lmforge as a model of EleutherAI's evaluation harness (lm-eval): the tasks papers report,
scored by lmforge's own forward passes.

    lmforge eval --run RUN --tasks hellaswag lambada_openai
    lm_eval --model lmforge --model_args run=RUN,dtype=float32 --tasks hellaswag

lm-eval looks models up in its own table and reads no plugin entry points; lmforge's .pth
start-up hook (lm_eval_hook.py) adds "lmforge" to that table. Without it (lmforge on PYTHONPATH
rather than installed), `python -m lmforge.harness` is lm-eval's command line with this module
imported first; in Python, `from lmforge.harness import LMForgeLM`.

Requests are scored in batches, with three savings over running each request as a sequence of
its own (what lm-eval's `hf` model does):
- the choices of a multiple-choice question share its context: the context and the choices go
  into one row, each choice attending to the context and to itself only (a block mask;
  positions restart after the context), so the context runs once, not once per choice;
- only scored positions go through the vocabulary projection, a chunk at a time (on GPT-2 the
  head over every position is a quarter of a forward's time, and (B, T, 50,257) floats);
- generation decodes a batch of rows together with a KV cache, left-padded, each row at its
  own positions.
Scores equal `hf`'s to float rounding: the same tokens, truncation and rolling windows."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Sequence

import torch
from torch import nn

from .errors import LMForgeError
from .nn.softcap import softcap
from .sampling import sample_next

Pair = tuple[list[int], list[int]]  # (context ids, continuation ids)
HEAD_LOGITS = 2**26  # logits made at once by the vocabulary projection (256 MB in fp32)


# ---- scoring token ids: no lm-eval needed ---------------------------------------------------

@dataclass
class _Row:
    """One sequence of a batch: a shared prefix, then each member's continuation inputs."""
    tokens: list[int]
    positions: list[int]
    segments: list[int]  # 0: the prefix; k: member k's tokens
    members: list[tuple[int, list[int], list[int]]] = field(default_factory=list)  # (request, logit slots, targets)

    def add(self, request: int, rest: list[int], targets: list[int]) -> None:
        n, start = self.segments.count(0), len(self.tokens)
        self.tokens += rest
        self.positions += range(n, n + len(rest))
        self.segments += [len(self.members) + 1] * len(rest)
        # the prefix's last position predicts the first target; each fed token the next one
        self.members.append((request, [n - 1, *range(start, start + len(rest))], targets))


def pack_rows(pairs: Sequence[Pair], max_length: int, share: bool = True) -> list[_Row]:
    """Each request as lm-eval's `hf` model feeds it, (context + continuation) cut to its last
    max_length + 1 tokens, minus the last; requests with the same prefix (the part before the
    continuation's second token) share one row when `share`, up to max_length tokens a row."""
    groups: dict[Any, tuple[list[int], list]] = {}
    for i, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise ValueError("every request needs a context and a continuation token")
        if len(cont) > max_length:
            raise LMForgeError(f"a continuation of {len(cont)} tokens exceeds the model's context of "
                               f"{max_length}; shorten the task's targets")
        inp = (ctx + cont)[-(max_length + 1):][:-1]
        cut = len(inp) - len(cont) + 1
        groups.setdefault(tuple(inp[:cut]) if share else i, (inp[:cut], []))[1].append((i, inp[cut:], cont))
    rows = []
    for prefix, members in groups.values():
        row = None
        for i, rest, cont in members:
            if row is None or len(row.tokens) + len(rest) > max_length:
                row = _Row(list(prefix), list(range(len(prefix))), [0] * len(prefix))
                rows.append(row)
            row.add(i, rest, cont)
    return rows


class _KeepHidden(nn.Module):
    """Stands in for the vocabulary projection during a forward: keeps the final hidden states
    (B, T, C), so the caller projects only the positions it scores."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.hidden = x
        return x[..., :0]


def final_hidden(model, idx: torch.Tensor, **kwargs) -> torch.Tensor:
    """The model's own forward up to its final norm: (B, T) ids -> (B, T, C)."""
    head, keep = model.lm_head, _KeepHidden()
    model.lm_head = keep
    try:
        model(idx, **kwargs)
    finally:
        model.lm_head = head
    return keep.hidden


def project(model, hidden: torch.Tensor) -> torch.Tensor:
    """(N, C) final hidden states -> (N, V) float32 logits, as the model's forward makes them."""
    return softcap(model.lm_head(hidden), model.config.final_softcap).float()


def _row_hidden(model, rows: list[_Row]) -> torch.Tensor:
    device = next(model.parameters()).device
    B, T = len(rows), max(len(r.tokens) for r in rows)
    idx = torch.zeros(B, T, dtype=torch.long)
    for b, r in enumerate(rows):
        idx[b, :len(r.tokens)] = torch.tensor(r.tokens)
    if all(len(r.members) == 1 for r in rows):  # plain sequences, right-padded: causality hides the pads
        return final_hidden(model, idx.to(device))
    pos, seg = torch.zeros(B, T, dtype=torch.long), torch.full((B, T), -1)
    for b, r in enumerate(rows):
        pos[b, :len(r.tokens)], seg[b, :len(r.tokens)] = torch.tensor(r.positions), torch.tensor(r.segments)
    # a token sees the prefix and its own segment, causally; a pad sees pads (never an empty row)
    mask = ((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])) & torch.ones(T, T, dtype=torch.bool).tril()
    return final_hidden(model, idx.to(device), positions=pos.to(device), mask=mask[:, None].to(device))


@torch.no_grad()
def score_pairs(model, pairs: Sequence[Pair], max_length: int, batch_size: int = 16,
                share: bool = True, progress=None) -> list[tuple[float, bool]]:
    """(sum of the continuation's log-probabilities, whether greedy decoding gives it) per pair."""
    rows = sorted(pack_rows(pairs, max_length, share), key=lambda r: -len(r.tokens))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        hidden = _row_hidden(model, batch)  # (B, T, C)
        T = hidden.shape[1]
        slots, targets, spans = [], [], []
        for b, row in enumerate(batch):
            for i, logit_slots, cont in row.members:
                spans.append((i, len(targets), len(cont)))
                slots += [b * T + s for s in logit_slots]
                targets += cont
        picked = hidden.reshape(-1, hidden.shape[-1])[torch.tensor(slots, device=hidden.device)]  # (N, C)
        tgt = torch.tensor(targets, device=hidden.device)
        logp, greedy = [], []
        step = max(1, HEAD_LOGITS // model.config.vocab_size)
        for s in range(0, len(targets), step):
            logits = project(model, picked[s:s + step])  # (n, V)
            logp.append(torch.log_softmax(logits, dim=-1).gather(1, tgt[s:s + step, None])[:, 0])
            greedy.append(logits.argmax(dim=-1) == tgt[s:s + step])
        lp, gr = torch.cat(logp).double().cpu(), torch.cat(greedy).cpu()
        for i, s, n in spans:
            out[i] = (float(lp[s:s + n].sum()), bool(gr[s:s + n].all()))
        if progress is not None:
            progress(sum(len(r.members) for r in batch))
    return out


def window_of(model) -> int | None:
    """The smallest sliding attention window of any layer (None: full attention everywhere)."""
    windows = [b.attn.window for b in getattr(model, "blocks", []) if getattr(b.attn, "window", None)]
    return min(windows) if windows else None


@torch.no_grad()
def generate_batch(model, tokenizer, contexts: Sequence[list[int]], max_new_tokens: int, stop: Sequence[str] = (),
                   end_ids: frozenset[int] = frozenset(), temperature: float = 0.0, top_k: int | None = None,
                   top_p: float | None = None) -> list[str]:
    """Continue every context together (left-padded, KV cache); each text ends before an end id
    and is cut at its first stop string."""
    device = next(model.parameters()).device
    B, W = len(contexts), max(len(c) for c in contexts)
    pads = torch.tensor([W - len(c) for c in contexts], device=device)[:, None]  # (B, 1)
    idx = torch.zeros(B, W, dtype=torch.long)
    for b, c in enumerate(contexts):
        idx[b, W - len(c):] = torch.tensor(c)
    cache = model.make_cache(B, W + max_new_tokens)
    padded = bool(pads.any())
    if padded:  # each row at its own positions; pads are never looked at (a pad sees itself only)
        valid = torch.arange(W + max_new_tokens, device=device)[None] >= pads  # (B, S)
        positions = (torch.arange(W, device=device)[None] - pads).clamp(min=0)
        mask = valid[:, None, :W] | torch.eye(W, dtype=torch.bool, device=device)
        hidden = final_hidden(model, idx.to(device), cache=cache, positions=positions, mask=mask[:, None])
    else:
        hidden = final_hidden(model, idx.to(device), cache=cache)
    logits = project(model, hidden[:, -1])
    generated: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    tail = 4 * max((len(s) for s in stop), default=0) + 1  # tokens that hold a stop string ending now
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p)  # (B,)
        for b, t in enumerate(nxt.tolist()):
            if done[b]:
                continue
            if t in end_ids:
                done[b] = True
                continue
            generated[b].append(t)
            text = tokenizer.decode(generated[b][-tail:], skip_special_tokens=True)
            done[b] = any(s and s in text for s in stop)
        if all(done) or step == max_new_tokens - 1:
            break
        if padded:
            hidden = final_hidden(model, nxt[:, None], cache=cache, positions=W + step - pads,
                                  mask=valid[:, None, None, :W + step + 1])
        else:
            hidden = final_hidden(model, nxt[:, None], cache=cache)
        logits = project(model, hidden[:, -1])
    texts = []
    for g in generated:
        text = tokenizer.decode(g, skip_special_tokens=True)
        for s in stop:  # lm-eval's post-processing: cut at each stop string in turn
            text = text.split(s)[0] if s else text
        texts.append(text)
    return texts


# ---- the lm-eval model class --------------------------------------------------------------

def _parse_batch_size(value) -> int:
    if isinstance(value, str) and value.startswith("auto"):
        return 16  # lm-eval's "auto" probes GPU memory; a CPU has no such limit to find
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise LMForgeError(f"batch_size must be a positive integer or auto, not {value!r}") from None
    if size < 1:
        raise LMForgeError(f"batch_size must be >= 1, not {size}")
    return size


@cache
def model_class() -> type:
    """lm-eval's TemplateLM subclass for lmforge runs, registered as "lmforge". Defined on first
    use, so lmforge itself imports without lm-eval."""
    try:
        import lm_eval.models  # noqa: F401  (lm-eval fills its registry only while it is empty)
        from lm_eval.api.model import TemplateLM
        from lm_eval.api.registry import register_model
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    except ImportError as e:
        raise LMForgeError(f"the evaluation harness needs lm-eval ({e}); install it: pip install 'lm-eval>=0.4.5'")
    from tqdm import tqdm

    from .checkpoint import load_run, read_run_config
    from .generation import eos_ids
    from .train.trainer import resolve_device

    @register_model("lmforge")
    class LMForgeLM(TemplateLM):
        """An lmforge run as an lm-eval model. model_args: run=RUN, adapter=DIR, dtype=float32 |
        bfloat16 | float16 | auto (as stored), max_length (default block_size), max_gen_toks
        (default 256). In Python, model= and tokenizer= take a loaded model instead of run=."""

        def __init__(self, run: str | None = None, adapter: str | None = None, dtype: str = "float32",
                     device: str | None = None, batch_size: int | str = 16, max_batch_size: int | None = None,
                     max_length: int | None = None, max_gen_toks: int = 256, model=None, tokenizer=None,
                     generation: dict | None = None, **unknown):
            super().__init__()
            if unknown:
                raise LMForgeError(f"unknown lmforge model_args {sorted(unknown)}; valid: run, adapter, dtype, "
                                   "device, batch_size, max_length, max_gen_toks")
            if device and device.startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's command line asks for cuda:0 unless told otherwise; `hf` falls back too
                print(f"note: {device} requested but no CUDA GPU is available; running on the CPU", file=sys.stderr)
                device = "cpu"
            if model is None:
                if run is None:
                    raise LMForgeError("the lmforge model needs run=RUN (a run directory) in --model_args")
                if dtype not in ("float32", "bfloat16", "float16", "auto"):
                    raise LMForgeError(f"dtype must be float32, bfloat16, float16 or auto, not {dtype!r}")
                model, tokenizer = load_run(run, adapter=adapter, device=resolve_device(device or "auto"),
                                            dtype=None if dtype == "auto" else getattr(torch, dtype))
                generation = read_run_config(run).get("generation")
            if not hasattr(model, "make_cache"):
                raise LMForgeError(f"the harness scores decoder-only GPT runs; this run holds a {model.kind!r} model")
            self.model, self.tokenizer, self.run = model.eval(), tokenizer, run
            self._device = next(model.parameters()).device
            self.batch_size = _parse_batch_size(batch_size)
            block = model.config.block_size
            self._max_length = min(int(max_length or block), block)
            self._max_gen_toks = int(max_gen_toks)
            self.end_ids = eos_ids(tokenizer, generation)
            # packed rows put keys out of position order, which a sliding window cannot read
            window = window_of(model)
            self.share = window is None or window >= self._max_length

        @property
        def eot_token_id(self) -> int:
            eot = self.tokenizer.eot_id
            return eot if eot is not None else self.tokenizer.encode("\n")[0]

        @property
        def prefix_token_id(self) -> int:
            bos = self.tokenizer.bos_id
            return bos if bos is not None else self.eot_token_id

        @property
        def max_length(self) -> int:
            return self._max_length

        @property
        def max_gen_toks(self) -> int:
            return self._max_gen_toks

        @property
        def tokenizer_name(self) -> str:
            return f"lmforge-{self.tokenizer.kind}"

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None,
                       **kwargs) -> list[int]:
            """As `hf` encodes: the tokenizer's BOS where its pipeline adds one (unless the text
            already starts with it or add_special_tokens=False)."""
            tok = self.tokenizer
            ids = tok.encode(string)
            bos = tok.bos_id
            if add_special_tokens is None:
                add_special_tokens = bos is None or not string.startswith(tok.decode([bos]))
            if add_special_tokens and tok.add_bos and bos is not None:
                ids = [bos, *ids]
            return ids[-left_truncate_len:] if left_truncate_len else ids

        def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
            return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            bar = tqdm(total=len(requests), disable=disable_tqdm, desc="lmforge loglikelihood")
            out = score_pairs(self.model, [(c, t) for _, c, t in requests], self.max_length, self.batch_size,
                              self.share, bar.update)
            bar.close()
            for (key, _, _), answer in zip(requests, out):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            """lm-eval's rolling windows of max_length tokens, each token predicted once."""
            pairs, owner = [], []
            for n, (text,) in enumerate(req.args for req in requests):
                windows = get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                    max_seq_len=self.max_length, context_len=1)
                for ctx, cont in map(make_disjoint_window, windows):
                    pairs.append((ctx, cont))
                    owner.append(n)
            bar = tqdm(total=len(pairs), disable=disable_tqdm, desc="lmforge loglikelihood_rolling")
            scores = score_pairs(self.model, pairs, self.max_length, self.batch_size, self.share, bar.update)
            bar.close()
            totals = [0.0] * len(requests)
            for n, (logp, _) in zip(owner, scores):
                totals[n] += logp
            for req, total in zip(requests, totals):
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out: list[str | None] = [None] * len(requests)
            groups: list[tuple[dict, list[int]]] = []  # requests with equal generation kwargs
            for i, req in enumerate(requests):
                for kw, members in groups:
                    if kw == req.args[1]:
                        members.append(i)
                        break
                else:
                    groups.append((req.args[1], [i]))
            bar = tqdm(total=len(requests), disable=disable_tqdm, desc="lmforge generate_until")
            eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
            for gen_kwargs, members in groups:
                kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
                until = handle_stop_sequences(kw.pop("until", None), eos=eos)
                max_new = kw.pop("max_gen_toks")
                if max_new >= self.max_length:
                    raise LMForgeError(f"max_gen_toks {max_new} leaves no room for a prompt in the model's "
                                       f"{self.max_length} positions")
                sampling = dict(temperature=float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0,
                                top_k=kw.get("top_k"), top_p=kw.get("top_p"))
                ctx = {i: self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_new)
                       for i in members}
                order = sorted(members, key=lambda i: -len(ctx[i]))
                window = window_of(self.model)
                size = 1 if window is not None and window < self.max_length else self.batch_size
                for start in range(0, len(order), size):
                    batch = order[start:start + size]
                    texts = generate_batch(self.model, self.tokenizer, [ctx[i] for i in batch], max_new, until,
                                           self.end_ids, **sampling)
                    for i, text in zip(batch, texts):
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(batch))
            bar.close()
            return out

    LMForgeLM.__module__, LMForgeLM.__qualname__ = __name__, "LMForgeLM"
    return LMForgeLM


def __getattr__(name: str):
    if name == "LMForgeLM":  # `from lmforge.harness import LMForgeLM` defines it on demand
        return model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> int:
    """`python -m lmforge.harness ARGS`: lm-eval's command line, with `--model lmforge` registered."""
    try:
        model_class()
    except LMForgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except LMForgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # run as lmforge.harness, not __main__: one module, one registered class
    from lmforge.harness import main as _main

    sys.exit(_main())
