"""What the server lets in: a body-size limit (413), a closed door while shutting down (503),
and, for every request, a status counted in the metrics and one access-log line.

The wait-queue limit (429) lives with the routes, where the number of queued requests is
known; this ASGI layer runs before any body is parsed, so an oversized body is refused without
being held in memory, and a draining server refuses new work before it costs anything."""

from __future__ import annotations

import json
import logging
import time

from .api_errors import APIError

access_log = logging.getLogger("lmforge.serve.access")
DISCARD_FACTOR = 16  # a refused body up to 16x the limit is read and dropped before the 413
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/internal/attention",
          "/health", "/metrics", "/")


def _route(path: str) -> str:
    if path.startswith("/v1/models/"):
        return "/v1/models/{name}"
    return path if path in ROUTES else "other"  # unknown paths share one label (bounded cardinality)


class _BodyTooLarge(Exception):
    def __init__(self, more: bool):
        super().__init__()
        self.more = more  # whether the client still has body to send


class AdmissionMiddleware:
    """`state` is the app's state: `draining` (bool), `inflight` (int), `metrics`, and per-request
    `tokens`/`prompt` notes written by the routes into scope["state"]."""

    def __init__(self, app, state, max_body_bytes: int, log_prompts: bool = False):
        self.app, self.state, self.max_body, self.log_prompts = app, state, max_body_bytes, log_prompts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]

        async def send_(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        self.state.inflight += 1
        try:
            err, unread = self._refuse(scope), True
            if err is None and scope["method"] in ("POST", "PUT", "PATCH"):
                try:
                    receive = await self._buffer(receive)
                except _BodyTooLarge as e:
                    unread = e.more
                    err = APIError(413, f"the request body is over this server's limit of {self.max_body} "
                                        "bytes; send a shorter prompt", code="request_too_large")
            if err is not None:
                if err.status == 413 and unread:  # read (and drop) what was sent, so the client gets the answer
                    await _discard(receive, DISCARD_FACTOR * self.max_body)
                await err.send(send_)
            else:
                await self.app(scope, receive, send_)
        finally:
            self.state.inflight -= 1
            self._record(scope, status[0] or 499, time.perf_counter() - t0)

    def _refuse(self, scope) -> APIError | None:
        if self.state.draining and scope["path"].startswith("/v1"):
            return APIError(503, "the server is shutting down; retry on another replica",
                            type="server_error", code="shutting_down", headers={"Retry-After": "5"})
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return APIError(413, f"the request body ({int(length)} bytes) is over this server's limit of "
                                 f"{self.max_body} bytes", code="request_too_large")
        return None

    async def _buffer(self, receive):
        """Read the whole body (at most max_body bytes), then replay it to the app."""
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away
                return _replay([msg], receive)
            size += len(msg.get("body", b""))
            if size > self.max_body:
                raise _BodyTooLarge(msg.get("more_body", False))
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        return _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}], receive)

    def _record(self, scope, status: int, seconds: float) -> None:
        route = _route(scope["path"])
        self.state.metrics.requests.labels(route, str(status)).inc()
        notes = scope.get("state") or {}
        line = {"method": scope["method"], "path": scope["path"], "status": status,
                "prompt_tokens": notes.get("prompt_tokens"), "completion_tokens": notes.get("completion_tokens"),
                "duration_ms": round(seconds * 1000, 1)}
        if self.log_prompts and "prompt" in notes:
            line["prompt"] = notes["prompt"]
        access_log.info(json.dumps(line, ensure_ascii=False))


async def _discard(receive, budget: int) -> None:
    """Drain a refused body up to `budget` bytes; past it the connection just closes."""
    while budget > 0:
        msg = await receive()
        if msg["type"] != "http.request" or not msg.get("more_body", False):
            return
        budget -= len(msg.get("body", b""))


def _replay(messages: list[dict], receive):
    async def receive_():
        if messages:
            return messages.pop(0)
        return await receive()  # later calls wait for the disconnect, as the app expects
    return receive_
