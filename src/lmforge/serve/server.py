"""Running the app under uvicorn with a graceful shutdown.

On the first SIGTERM or SIGINT the server stops admitting work (503 on /v1), lets running
requests finish for up to `shutdown_timeout` seconds, then ends the rest with a final event
whose finish_reason is "abort", and exits normally (status 0). A second SIGINT exits at once."""

from __future__ import annotations

import asyncio
import signal
import time

import uvicorn

DRAIN_POLL_S = 0.05
FLUSH_S = 5.0  # after aborting, how long streams get to send their final events


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app, shutdown_timeout: float):
        super().__init__(config)
        self.lm_app, self.shutdown_timeout = app, shutdown_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame) -> None:
        # not uvicorn's handler: that one re-raises the signal after shutdown (exit status != 0)
        if self._draining:
            if sig == signal.SIGINT:
                self.force_exit = self.should_exit = True
            return
        self._draining = True
        self.lm_app.state.draining = True
        if self._loop is None:  # not started yet: nothing to drain
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

    async def _drain(self) -> None:
        state = self.lm_app.state
        deadline = time.monotonic() + self.shutdown_timeout
        while state.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        if state.inflight > 0:
            state.engine.abort_all("abort")
            flush = time.monotonic() + FLUSH_S
            while state.inflight > 0 and time.monotonic() < flush:
                await asyncio.sleep(DRAIN_POLL_S)
        self.should_exit = True


def serve(app, host: str, port: int, shutdown_timeout: float = 30.0, log_level: str = "warning") -> None:
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=FLUSH_S)
    GracefulServer(config, app, shutdown_timeout).run()
