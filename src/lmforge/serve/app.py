"""The HTTP server: OpenAI's completions and chat endpoints over the batching engine, plus the
playground page and the attention probe it draws from.

    app = create_app(model, tokenizer, model_name="shakespeare", api_key="secret")
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..generation import _prompt_ids
from .admission import AdmissionMiddleware
from .api_errors import APIError, APIKeyMiddleware, install_error_handlers
from .attention import attention_map
from .engine import Engine, Handle, SamplingParams
from .metrics import CONTENT_TYPE, Metrics, TokenClock
from .openai_format import Formatter
from .schemas import AttentionRequest, ChatCompletionRequest, CompletionRequest
from ..chat import ChatFormat, chat_format

MAX_PROMPTS = 64  # prompts in one completions request
MAX_STOPS = 16


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _EventStream(StreamingResponse):
    """Server-sent events that cancel their requests when the stream ends for any reason,
    including the client hanging up, so the engine frees their rows."""

    def __init__(self, content, handles: list[Handle]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.handles = handles

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            for h in self.handles:
                h.cancel()


async def _merge(handles: list[Handle]):
    """Yield (prompt index, event) from several requests as the events arrive."""
    if len(handles) == 1:
        async for ev in handles[0].events():
            yield 0, ev
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, h: Handle) -> None:
        try:
            async for ev in h.events():
                await queue.put((i, ev))
        except Exception as e:
            await queue.put((i, e))
        await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        left = len(handles)
        while left:
            i, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def create_app(model, tokenizer, model_name: str = "lmforge", api_key: str | None = None,
               max_batch: int = 16, max_tokens_limit: int | None = None, max_queue: int = 256,
               request_timeout: float | None = 600.0, max_body_bytes: int = 1 << 20,
               log_prompts: bool = False, max_context: int | None = None,
               chat: ChatFormat | None = None, draft=None, draft_tokens: int = 4,
               compile: bool = False) -> FastAPI:
    """An OpenAI-compatible app serving `model`. With `api_key`, every /v1 path needs
    `Authorization: Bearer <api_key>`. At most `max_batch` sequences decode together (a
    request's n choices count separately); n may not exceed it. Past `max_queue` waiting
    requests a new one gets 429 with Retry-After; a request still generating after
    `request_timeout` seconds ends with finish_reason "abort"; bodies over `max_body_bytes` get 413.
    `max_context` caps the positions a request may use (prompt + max_tokens) below the model's
    block_size, and with them the KV cache allocated for max_batch rows. `chat`: how the chat route
    renders messages and where every route stops (`lmforge.chat.chat_format(tokenizer, run_dir)`:
    the run's own template and EOS ids); default: the plain "User:/Assistant:" format. `draft`: a
    smaller model with the same tokenizer for speculative decoding (`draft_tokens` a round).
    `compile`: decode with a torch.compile'd step, compiled before the app is returned."""
    fmt_chat = chat or chat_format(tokenizer)
    engine = Engine(model, tokenizer, max_batch=max_batch, max_context=max_context, draft=draft,
                    draft_tokens=draft_tokens, compile=compile)
    block = engine.block_size
    limit = min(max_tokens_limit or block, block)
    page = resources.files("lmforge.serve").joinpath("static/playground.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.close()

    app = FastAPI(title="lmforge", version="1", lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics = Metrics(engine)
    app.state.draining, app.state.inflight = False, 0
    install_error_handlers(app)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    # outermost: counts and logs every request, the 401s included
    app.add_middleware(AdmissionMiddleware, state=app.state, max_body_bytes=max_body_bytes,
                       log_prompts=log_prompts)

    # --- checking a request -----------------------------------------------------------------
    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"model {name!r} is not served here; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def encode(prompt) -> list[int]:
        if isinstance(prompt, str):
            return _prompt_ids(model, tokenizer, prompt)
        bad = [t for t in prompt if not 0 <= t < tokenizer.vocab_size]
        if bad or not prompt:
            raise APIError(400, f"token ids must be in [0, {tokenizer.vocab_size}) and not empty; got {bad[:3]}",
                           param="prompt")
        return list(prompt)

    def params(req, prompts: list[list[int]], default_max: int | None, stops: list[str],
               logprobs: int | None, echo: bool = False) -> SamplingParams:
        longest = max(len(p) for p in prompts)
        if longest > block:
            raise APIError(400, f"the prompt has {longest} tokens but the model's context is {block} tokens; "
                                "shorten the prompt", param="prompt", code="context_length_exceeded")
        if req.n > max_batch:
            raise APIError(400, f"n={req.n} is more than this server's limit of {max_batch} choices",
                           param="n", code="invalid_value")
        if len(stops) > MAX_STOPS:
            raise APIError(400, f"at most {MAX_STOPS} stop strings", param="stop")
        room = min(block - longest, limit)
        max_tokens = req.max_tokens if req.max_tokens is not None else getattr(req, "max_completion_tokens", None)
        if max_tokens is None:
            max_tokens = room if default_max is None else min(default_max, room)
        if max_tokens > limit:
            raise APIError(400, f"max_tokens={max_tokens} is above this server's limit of {limit}",
                           param="max_tokens", code="invalid_value")
        if longest + max_tokens > block:
            raise APIError(400, f"the model's context is {block} tokens, but {longest} in the prompt + "
                                f"{max_tokens} to generate is more; lower max_tokens or shorten the prompt",
                           param="max_tokens", code="context_length_exceeded")
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature,
                              top_p=req.top_p if req.top_p < 1.0 else None, top_k=req.top_k,
                              stop=tuple(stops), seed=req.seed, logprobs=logprobs,
                              prompt_logprobs=echo and logprobs is not None, stop_ids=fmt_chat.eos_ids)

    # --- running it -------------------------------------------------------------------------
    async def respond(request: Request, fmt: Formatter, prompts: list[list[int]], n: int,
                      p: SamplingParams, stream: bool, include_usage: bool, echo: bool):
        waiting = engine.queued()
        if waiting + len(prompts) > max_queue:
            raise APIError(429, f"{waiting} requests are waiting, this server's limit is {max_queue}; "
                                "retry shortly", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"})
        notes = request.scope.setdefault("state", {})
        notes["prompt_tokens"] = sum(len(x) for x in prompts) * n
        notes["completion_tokens"] = 0
        if log_prompts:
            notes["prompt"] = fmt.prompt_texts
        clock = TokenClock(time.perf_counter)
        handles = [engine.submit(ids, n, p) for ids in prompts]
        loop = asyncio.get_running_loop()
        timers = [loop.call_later(request_timeout, h.abort, "abort") for h in handles] if request_timeout else []

        def seen(ev) -> None:
            clock.tick(ev)
            notes["completion_tokens"] = clock.tokens

        def done() -> None:
            for t in timers:
                t.cancel()
            clock.observe(metrics, n * len(prompts))

        if stream:
            async def events():
                try:
                    if echo:
                        for chunk in fmt.echo_chunks():
                            yield _sse(chunk)
                    async for i, ev in _merge(handles):
                        seen(ev)
                        yield _sse(fmt.chunk(i, ev))
                    if include_usage:
                        yield _sse(fmt.usage_chunk())
                except Exception as e:  # the model failed mid-stream: say so in the stream
                    yield _sse(APIError(500, f"generation failed: {e}", type="server_error").body())
                finally:
                    done()
                yield "data: [DONE]\n\n"
            return _EventStream(events(), handles)

        async def gather(h: Handle):
            out = []
            async for ev in h.events():
                seen(ev)
                out.append(ev)
            return out

        work = asyncio.ensure_future(asyncio.gather(*(gather(h) for h in handles)))
        watch = asyncio.ensure_future(_until_disconnected(request))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            done()
            for h in handles:
                h.cancel()
        if not work.done():  # the client went away; nobody will read an answer
            work.cancel()
            return Response(status_code=499)
        for i, (h, evs) in enumerate(zip(handles, work.result())):
            if p.prompt_logprobs and h.prompt_logprobs is not None:
                fmt.echo_logprobs(i, h.prompt_logprobs)
            for ev in evs:
                fmt.chunk(i, ev)
        return fmt.response()

    # --- routes -----------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **engine.load()}

    @app.get("/metrics", include_in_schema=False)
    async def metrics_page():
        """Prometheus text format: requests by route and status, queue, running sequences,
        tokens, time-to-first-token and time-per-output-token histograms, cancellations."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(model_name)]}

    @app.get("/v1/models/{name}")
    async def model_info(name: str):
        check_model(name)
        return _model_card(model_name)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        raw = req.prompt
        batch = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
        if len(batch) > MAX_PROMPTS:
            raise APIError(400, f"at most {MAX_PROMPTS} prompts per request", param="prompt")
        prompts = [encode(x) for x in batch]
        texts = [x if isinstance(x, str) else tokenizer.decode(ids) for x, ids in zip(batch, prompts)]
        default = None if "max_tokens" in req.model_fields_set else 16
        p = params(req, prompts, default, req.stop_list(), req.logprobs, req.echo)
        fmt = Formatter("completion", tokenizer, model_name, req.n, prompts, texts, echo=req.echo,
                        logprobs=req.logprobs, return_token_ids=req.return_token_ids)
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return await respond(request, fmt, prompts, req.n, p, req.stream, usage, req.echo)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        text = fmt_chat.render([{"role": m.role, "content": m.text()} for m in req.messages], tokenizer)
        prompts = [fmt_chat.encode(tokenizer, text)]
        k = (req.top_logprobs or 0) if req.logprobs else None
        p = params(req, prompts, None, req.stop_list() + list(fmt_chat.stop_strings), k)
        fmt = Formatter("chat", tokenizer, model_name, req.n, prompts, [text], logprobs=k,
                        return_token_ids=req.return_token_ids)
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return await respond(request, fmt, prompts, req.n, p, req.stream, usage, False)

    @app.post("/v1/internal/attention")
    async def attention(req: AttentionRequest):
        """Attention weights of one layer (one head, or their mean) over a token sequence."""
        check_model(req.model)
        if (req.prompt is None) == (req.token_ids is None):
            raise APIError(400, "give exactly one of 'prompt' and 'token_ids'", param="prompt")
        ids = encode(req.prompt if req.prompt is not None else req.token_ids)
        if len(ids) > block:
            raise APIError(400, f"{len(ids)} tokens is longer than the model's context of {block}",
                           param="token_ids", code="context_length_exceeded")
        try:
            out = await run_in_threadpool(attention_map, model, ids, req.layer, req.head, engine.model_lock)
        except IndexError as e:
            raise APIError(400, str(e), param="layer") from None
        return {"object": "attention", "model": model_name, "token_ids": ids,
                "tokens": [tokenizer.decode([t]) for t in ids], **out}

    return app


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "lmforge"}


async def _until_disconnected(request: Request, every: float = 0.25) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(every)
