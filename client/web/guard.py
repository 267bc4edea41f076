"""What the web gateway does about connections before any endpoint sees them: a per-client-address
connection cap and the HTTP request-head timeout (the body timeout is the login endpoint's own).

aiohttp has neither: a client that sends half a request head holds its file descriptor until the
keep-alive clock (75 s), and one address may open as many connections as the process has
descriptors. :class:`GuardedRunner` is an ``AppRunner`` whose connections are
:class:`GuardedHandler` s, aiohttp's own request handler plus:

- **the cap**: a connection from an address that already holds ``max_per_address`` is answered
  ``429 Too Many Requests`` (``Retry-After``) at once, whatever it sends, and closed; 0 = no cap.
  Behind a reverse proxy every connection comes from the proxy's address: cap there instead (e.g.
  nginx ``limit_conn``) and set 0 here.
- **the head timeout**: from the connection's start, and again from the end of each request
  (keep-alive idle time included), a client has ``header_timeout`` seconds to deliver a complete
  request head; then ``408 Request Timeout`` and the connection is closed; 0 = off. A WebSocket's
  upgrade request is a request like any other; once upgraded, the socket's own clocks apply.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

log = logging.getLogger(__name__)

REFUSE_LINGER = 0.25  # s a refused connection stays open so the client reads the 429 (not a reset)


def _raw(status: str, text: str, extra: str = "") -> bytes:
    body = text.encode()
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
        f"{extra}Connection: close\r\n\r\n"
    ).encode() + body


TOO_MANY = _raw("429 Too Many Requests", "too many connections from your address\n", "Retry-After: 5\r\n")
TIMED_OUT = _raw("408 Request Timeout", "the request was not sent in time\n")


@dataclass
class Guard:
    """The gateway-wide connection book: open connections per address, and what was refused."""

    max_per_address: int = 0
    header_timeout: float = 0.0
    open: Counter[str] = field(default_factory=Counter)
    counters: Counter[str] = field(default_factory=Counter)

    def admit(self, addr: str) -> bool:
        if self.max_per_address and self.open[addr] >= self.max_per_address:
            self.counters["refused_per_address"] += 1
            return False
        self.open[addr] += 1
        return True

    def release(self, addr: str) -> None:
        self.open[addr] -= 1
        if self.open[addr] <= 0:
            del self.open[addr]

    @property
    def connections(self) -> int:
        return sum(self.open.values())


class GuardedHandler(RequestHandler):
    """aiohttp's per-connection protocol, with the cap and the head timeout (see the module)."""

    __slots__ = ("_addr", "_guard", "_head_timer", "_refused")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._guard: Guard = self._manager.guard  # type: ignore[union-attr]
        self._addr: str | None = None
        self._refused = False
        self._head_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        addr = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if not self._guard.admit(addr):
            self._refused = True
            log.info("connection from %s refused: %d open", addr, self._guard.open[addr])
            transport.write(TOO_MANY)  # type: ignore[attr-defined]
            self._loop.call_later(REFUSE_LINGER, transport.close)
            return
        self._addr = addr
        self.arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # answered already: whatever it sends is dropped
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.cancel_head_timer()
        if self._addr is not None:
            self._guard.release(self._addr)
            self._addr = None
        super().connection_lost(exc)

    # -- the request-head clock --------------------------------------------------------------
    def arm_head_timer(self) -> None:
        self.cancel_head_timer()
        if self._guard.header_timeout > 0 and self.transport is not None:
            self._head_timer = self._loop.call_later(self._guard.header_timeout, self._head_timed_out)

    def cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._guard.counters["header_timeouts"] += 1
        log.info(
            "connection from %s: no complete request head in %.1f s", self._addr, self._guard.header_timeout
        )
        transport.write(TIMED_OUT)
        transport.close()


class _GuardedServer(Server):
    guard: Guard

    def __call__(self) -> RequestHandler:
        return GuardedHandler(self, loop=self._loop, **self._kwargs)


class GuardedRunner(web.AppRunner):
    """An ``AppRunner`` whose connections are :class:`GuardedHandler` s."""

    def __init__(self, app: web.Application, guard: Guard, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.guard = guard

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = _GuardedServer
        server.guard = self.guard  # type: ignore[attr-defined]
        return server


@web.middleware
async def head_clock(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The request head arrived: stop its clock; when the handler is done, the next head's runs."""
    proto = request.protocol
    guarded = isinstance(proto, GuardedHandler)
    if guarded:
        proto.cancel_head_timer()
    resp: web.StreamResponse | None = None
    try:
        resp = await handler(request)
        return resp
    finally:
        if guarded and not isinstance(resp, web.WebSocketResponse):
            proto.arm_head_timer()
