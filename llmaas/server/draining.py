"""Graceful shutdown that a load balancer can see.

On the first SIGTERM (or Ctrl-C) the server starts draining while it still listens: /health answers
503 {"status": "draining"}, new API requests get 503 + Retry-After (code `server_shutting_down`, so
clients retry on another replica), and requests in flight run to their end. Once none is left, or
the grace period is over, uvicorn's own shutdown follows: it stops accepting, cancels what is still
running (the engine aborts those requests, their usage is still reported) and the process exits 0.
A second signal skips the rest of the drain.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import uvicorn

from llmaas.server.errors import RETRY_AFTER_SECONDS, error_body
from llmaas.server.responses import dumps

log = logging.getLogger("llmaas.server")

UNGATED = ("/health", "/metrics")  # answered while draining: they report it


@dataclass
class Drain:
    draining: bool = False
    in_flight: int = 0  # API requests whose response has not ended yet


class DrainMiddleware:
    """Counts API requests in flight and refuses new ones while draining (pure ASGI)."""

    def __init__(self, app, drain: Drain):
        self.app, self.drain = app, drain

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in UNGATED:
            return await self.app(scope, receive, send)
        if self.drain.draining:
            body = error_body(
                "The server is shutting down; retry the request (on another replica).",
                "server_error",
                None,
                "server_shutting_down",
            )
            headers = [
                (b"content-type", b"application/json"),
                (b"retry-after", str(RETRY_AFTER_SECONDS).encode()),
                (b"connection", b"close"),
            ]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": dumps(body).encode()})
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal drains (see the module docstring) before shutting down."""

    def __init__(self, config: uvicorn.Config, drain: Drain, grace_s: float):
        super().__init__(config)
        self.drain, self.grace_s = drain, grace_s
        self._deadline = 0.0

    def handle_exit(self, sig, frame) -> None:
        if self.drain.draining or self.should_exit:
            return super().handle_exit(sig, frame)  # a second signal: stop now
        self.drain.draining = True
        self._deadline = time.monotonic() + self.grace_s
        log.info("draining: %d request(s) in flight, up to %.0fs", self.drain.in_flight, self.grace_s)

    async def on_tick(self, counter: int) -> bool:
        if self.drain.draining and not self.should_exit:
            left = self._deadline - time.monotonic()
            if self.drain.in_flight == 0 or left <= 0:
                # What is still running when the grace period is over gets a second to end, then is cancelled.
                self.config.timeout_graceful_shutdown = max(1.0, left)
                self.should_exit = True
        return await super().on_tick(counter)
