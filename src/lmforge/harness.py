"""lmforge as a model of EleutherAI's evaluation harness (lm-eval): the tasks papers report,
scored by lmforge's own forward passes.

    lmforge eval --run RUN --tasks hellaswag lambada_openai
    lm_eval --model lmforge --model_args run=RUN,dtype=float32 --tasks hellaswag

lm-eval looks models up in its own table and reads no plugin entry points; lmforge's .pth
start-up hook (lm_eval_hook.py) adds "lmforge" to that table. Without it (lmforge on PYTHONPATH
rather than installed), `python -m lmforge.harness` is lm-eval's command line with this module
imported first; in Python, `from lmforge.harness import LMForgeLM`.

Requests are batched by `lmforge.scoring` (shared multiple-choice contexts, projection of the
scored positions only, KV-cached batched generation). Scores equal `hf`'s to float rounding: the
same tokens, truncation and rolling windows, and with `--apply_chat_template` the same prompts
(the run's own chat template)."""

from __future__ import annotations

import sys
from dataclasses import replace
from functools import cache

import torch

from .errors import LMForgeError
from .scoring import generate_batch, score_pairs, window_of

# ---- the lm-eval model class --------------------------------------------------------------

PLAIN_FORMAT = "lmforge plain chat format: 'System: ...\\nUser: ...\\nAssistant:'"  # runs without a template

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

    from .chat import chat_format
    from .checkpoint import load_run, read_run_config
    from .generation import eos_ids
    from .models.decoding import prepare_for_batches
    from .train.trainer import resolve_device

    @register_model("lmforge")
    class LMForgeLM(TemplateLM):
        """An lmforge run as an lm-eval model. model_args: run=RUN, adapter=DIR, dtype=float32 |
        bfloat16 | float16 | auto (as stored), max_length (default block_size), max_gen_toks
        (default 256). In Python, model= and tokenizer= take a loaded model instead of run=, and
        chat= its `lmforge.chat.ChatFormat` (default: the plain format)."""

        def __init__(self, run: str | None = None, adapter: str | None = None, dtype: str = "float32",
                     device: str | None = None, batch_size: int | str = 16, max_batch_size: int | None = None,
                     max_length: int | None = None, max_gen_toks: int = 256, model=None, tokenizer=None,
                     generation: dict | None = None, chat=None, **unknown):
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
                if _parse_batch_size(batch_size) > 1:  # its batched steps: a packed copy of fp32 weights
                    prepare_for_batches(model)
                generation = read_run_config(run).get("generation")
                chat = chat_format(tokenizer, run)
            if not hasattr(model, "make_cache"):
                raise LMForgeError(f"the harness scores decoder-only GPT runs; this run holds a {model.kind!r} model")
            self.model, self.tokenizer, self.run = model.eval(), tokenizer, run
            self._device = next(model.parameters()).device
            self.batch_size = _parse_batch_size(batch_size)
            block = model.config.block_size
            self._max_length = min(int(max_length or block), block)
            self._max_gen_toks = int(max_gen_toks)
            self.end_ids = eos_ids(tokenizer, generation)
            self.chat = chat if chat is not None else chat_format(tokenizer)
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

        def chat_template(self, chat_template: bool | str = False) -> str | None:
            """The template lm-eval records with the results (`--apply_chat_template [NAME]`): the
            run's Jinja source, or a named variant of it, which is then also the one applied."""
            if chat_template is False or chat_template is None:
                return None
            if self.chat.template is None:
                return PLAIN_FORMAT
            if isinstance(chat_template, str):
                self.chat = replace(self.chat, template=self.chat.template.variant(chat_template))
            return self.chat.template.source

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            """The prompt for a conversation, as `hf` renders it: a new assistant turn, or with
            add_generation_prompt=False the last (assistant) message continued; a template that
            refuses a system message is tried again without it."""
            render = lambda msgs: self.chat.render(msgs, self.tokenizer, add_generation_prompt,  # noqa: E731
                                                   continue_final_message=not add_generation_prompt)
            try:
                return render(chat_history)
            except LMForgeError as e:
                if not any(m.get("role") == "system" for m in chat_history):
                    raise
                print(f"note: {e}; trying again without the system message", file=sys.stderr)
                return render([m for m in chat_history if m.get("role") != "system"])

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
