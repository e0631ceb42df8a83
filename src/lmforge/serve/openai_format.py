"""Engine events -> OpenAI's JSON: whole responses, and stream chunks (one per token).

Completions and chat share the bookkeeping (text so far, log-probabilities, token counts) and
differ only in where the text goes: `text` for completions, `message` / `delta` for chat."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from .engine import Event


@dataclass
class _Choice:
    text: str = ""
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    # completions: parallel lists; chat: list of {"token", "logprob", "bytes", "top_logprobs"}
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)
    content: list[dict] = field(default_factory=list)
    started: bool = False


class Formatter:
    """One request's answer. `kind` is "completion" or "chat"; choice index = prompt * n + c."""

    def __init__(self, kind: str, tokenizer, model: str, n: int, prompt_ids: list[list[int]],
                 prompt_texts: list[str], echo: bool = False, logprobs: int | None = None,
                 return_token_ids: bool = False):
        self.kind, self.tok, self.model, self.n = kind, tokenizer, model, n
        self.prompt_ids, self.prompt_texts = prompt_ids, prompt_texts
        self.echo, self.logprobs, self.return_ids = echo, logprobs, return_token_ids
        self.id = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.choices = [_Choice() for _ in range(len(prompt_ids) * n)]
        for i, c in enumerate(self.choices):
            if echo:
                c.text = prompt_texts[i // n]

    # --- pieces -----------------------------------------------------------------------------
    def token_str(self, t: int) -> str:
        return self.tok.decode([t])

    def token_bytes(self, t: int) -> list[int]:
        raw = getattr(self.tok, "decode_bytes", None)
        return list(raw([t])) if raw else list(self.token_str(t).encode("utf-8"))

    def _chat_lp(self, t: int, lp: float, top: list[tuple[int, float]]) -> dict:
        return {"token": self.token_str(t), "logprob": lp, "bytes": self.token_bytes(t),
                "top_logprobs": [{"token": self.token_str(i), "logprob": v, "bytes": self.token_bytes(i)}
                                 for i, v in top]}

    def echo_logprobs(self, prompt: int, prompt_lp) -> None:
        """Completions with echo + logprobs: the prompt's tokens come first, the first one with None."""
        for c in self.choices[prompt * self.n:(prompt + 1) * self.n]:
            for t, (lp, top) in zip(self.prompt_ids[prompt], prompt_lp):
                self._record_lp(c, t, lp, top)

    def _record_lp(self, c: _Choice, t: int, lp: float | None, top) -> dict:
        s = self.token_str(t)
        off = c.text_offset[-1] + len(c.tokens[-1]) if c.tokens else 0
        c.tokens.append(s)
        c.token_logprobs.append(lp)
        top_d = {self.token_str(i): v for i, v in top} if self.logprobs else None
        c.top_logprobs.append(top_d)
        c.text_offset.append(off)
        return {"tokens": [s], "token_logprobs": [lp], "top_logprobs": [top_d] if self.logprobs else None,
                "text_offset": [off]}

    # --- streaming --------------------------------------------------------------------------
    def chunk(self, prompt: int, ev: Event) -> dict:
        """Record the event and return its stream chunk."""
        index = prompt * self.n + ev.choice
        c = self.choices[index]
        c.text += ev.text
        c.finish_reason = ev.finish_reason
        lp_json = None
        if ev.token is not None:
            c.token_ids.append(ev.token)
            if ev.logprob is not None:
                if self.kind == "chat":
                    entry = self._chat_lp(ev.token, ev.logprob, ev.top or [])
                    c.content.append(entry)
                    lp_json = {"content": [entry]}
                else:
                    lp_json = self._record_lp(c, ev.token, ev.logprob, ev.top or [])
        if self.kind == "chat":
            delta = {"content": ev.text} if ev.text or not ev.finish_reason else {}
            if not c.started:
                delta = {"role": "assistant", **delta}
            out = {"index": index, "delta": delta, "logprobs": lp_json, "finish_reason": ev.finish_reason}
        else:
            out = {"index": index, "text": ev.text, "logprobs": lp_json, "finish_reason": ev.finish_reason}
        if self.return_ids:
            out["token_ids"] = [] if ev.token is None else [ev.token]
            if not c.started:
                out["prompt_token_ids"] = self.prompt_ids[prompt]
        c.started = True
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [out]}

    def echo_chunks(self) -> list[dict]:
        """Completions with echo: the prompt text first, one chunk per choice."""
        out = []
        for i, c in enumerate(self.choices):
            choice = {"index": i, "text": self.prompt_texts[i // self.n], "logprobs": None, "finish_reason": None}
            out.append({"id": self.id, "object": "text_completion", "created": self.created,
                        "model": self.model, "choices": [choice]})
        return out

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompt_ids)
        completion = sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def usage_chunk(self) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [], "usage": self.usage()}

    # --- whole responses --------------------------------------------------------------------
    def response(self) -> dict:
        choices = []
        for i, c in enumerate(self.choices):
            if self.kind == "chat":
                lp = {"content": c.content} if self.logprobs is not None else None
                ch = {"index": i, "message": {"role": "assistant", "content": c.text},
                      "logprobs": lp, "finish_reason": c.finish_reason}
            else:
                lp = None
                if self.logprobs is not None:
                    lp = {"tokens": c.tokens, "token_logprobs": c.token_logprobs,
                          "top_logprobs": c.top_logprobs if self.logprobs else None,
                          "text_offset": c.text_offset}
                ch = {"index": i, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason}
            if self.return_ids:
                ch["token_ids"] = c.token_ids
                ch["prompt_token_ids"] = self.prompt_ids[i // self.n]
            choices.append(ch)
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}
