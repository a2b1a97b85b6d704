"""The listening side: aiohttp's server with connection limits, timeouts and safe error answers.

aiohttp keeps an idle connection for about an hour, never times out a request head or body
that trickles in, accepts connections until descriptors run out, and answers a malformed
request with a text body that quotes the offending bytes. A proxy in front of an account
needs what nginx and Go's net/http do instead: each connection has a deadline for its head,
for each read of its body and for idling between requests; past ``max_connections`` a new
connection gets a quick 503; malformed requests get MetaDefender's error shape, naming the
problem without quoting it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import resource
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    PayloadEncodingError,
)
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from .errors import SERVER, SERVER_NAME, error_response
from .logs import HTTP_LOG, Throttled

__all__ = [
    "ENTRY",
    "LISTEN_LIMITS",
    "Limits",
    "Runner",
    "default_max_connections",
    "max_connections",
    "raise_descriptor_limit",
]

# Why a connection was closed by the proxy, for mdcloud_proxy_connections_closed_total.
CLOSE_REASONS = ("header_timeout", "body_timeout", "idle_timeout", "max_connections")


@dataclass(frozen=True)
class Limits:
    """What one listener allows each connection; 0 turns a timeout off.

    ``max_connections`` None means half the descriptor limit in force when it starts.
    ``closed`` is told the reason each time the listener closes a connection.
    """

    header_timeout: float = 10.0
    body_timeout: float = 60.0
    idle_timeout: float = 75.0
    max_connections: int | None = None
    closed: Callable[[str], None] = lambda _reason: None


LISTEN_LIMITS = web.AppKey("listen_limits", Limits)
# If an app sets it (at start-up), every request goes to it, with the app's own handler
# (its router) as the second argument.
Entry = Callable[
    [web.BaseRequest, Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]],
    Awaitable[web.StreamResponse],
]
ENTRY: web.AppKey[Entry] = web.AppKey("entry")

_BUSY_BODY = (
    b'{"error":{"code":503030,"messages":["mdcloud-proxy: too many connections '
    b'(listen.max_connections); try again shortly"]}}'
)
# Written before any request is read: the caller learns why, and the descriptor is freed.
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nServer: mdcloud-proxy\r\n"
    b"Content-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY
)
# A request head (up to its blank line) that asks for the connection to close and has no body.
_HEAD_END = b"\r\n\r\n"
_HEAD_LIMIT = 64 * 1024
_CLOSE = re.compile(rb"\r\nconnection:[^\r\n]*\bclose\b", re.IGNORECASE)
_FRAMED = re.compile(rb"\r\n(?:content-length|transfer-encoding)\s*:", re.IGNORECASE)

_MALFORMED: list[tuple[type[HttpProcessingError], str]] = [
    (LineTooLong, "the request line or a header is too long"),
    (InvalidHeader, "a header name or value holds characters HTTP does not allow"),
    (BadHttpMethod, "this is not an HTTP request (unknown method)"),
    (BadStatusLine, "the request line is not valid HTTP/1.1"),
    (InvalidURLError, "the request target is not a valid URL path"),
    (PayloadEncodingError, "the body's framing (Content-Length, Transfer-Encoding) is not valid"),
]

_PLAIN_REASON = re.compile(r"[A-Za-z][A-Za-z -]{2,60}")


def raise_descriptor_limit() -> None:
    """Raise the soft limit on open files to the hard limit, as Go and nginx do.

    Each request in flight holds two descriptors (the caller's and the upstream's), and the
    common default of 1024 is soon used up.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for wanted in (hard, 1 << 20, 65536):  # an unlimited hard limit is refused as a soft one
        if wanted != resource.RLIM_INFINITY and wanted > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            except (ValueError, OSError):
                continue
            return


def max_connections(runner: web.BaseRunner) -> int:
    """How many connections ``runner``'s listener takes before it answers 503."""
    server = runner.server
    return server.max_connections if isinstance(server, _Server) else 0


def under_way(runner: web.BaseRunner) -> int:
    """Connections of ``runner`` with a request under way: its head awaited or arriving,
    parsed and not yet answered (a handler aiohttp has not started yet included), or its
    body still arriving after an early answer."""
    server = runner.server
    if not isinstance(server, _Server):
        return 0
    return sum(isinstance(c, _Connection) and c.under_way for c in server.connections)


async def wait_answered(runner: web.BaseRunner) -> None:
    """Wait until no connection of ``runner`` has a request under way (after
    ``stop_keeping_alive``: no new ones come then)."""
    server = runner.server
    if not isinstance(server, _Server):
        return
    while under_way(runner):
        server.settled.clear()
        await server.settled.wait()


def stop_keeping_alive(runner: web.BaseRunner) -> None:
    """Before stopping: idle connections close now, the others once their answer is out."""
    server = runner.server
    if isinstance(server, _Server):
        server.draining = True
        for connection in list(server.connections):
            if not isinstance(connection, _Connection):
                continue
            if connection.lingering:
                # Still reading the body of an answered request: closing it with bytes
                # unread would send a reset, which can lose the answer. Closes after it.
                connection.close_after_body()
            elif not connection.under_way:
                connection.force_close()  # close() would leave an idle transport open


def default_max_connections(reserved: int = 0) -> int:
    """Half the open-file limit in force, after ``reserved`` descriptors are set aside."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(16, (soft - reserved) // 2)


class _Connection(RequestHandler):
    """aiohttp's protocol for one connection, with deadlines for its head, body and idling.

    One timer per connection, re-armed only when it fires (as aiohttp's own keep-alive
    timer): data arriving only moves a timestamp, so uploads pay nothing per chunk.
    """

    def __init__(self, server: _Server, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self._server = server
        self._limits = server.limits
        self._admitted = False
        self._head_since: float | None = None  # first byte of an unfinished request head
        self._last_read = 0.0
        self._idle_since: float | None = None
        self._parsed = 0  # requests parsed so far (aiohttp's own count)
        self._answered = 0
        self._body: StreamReader | None = None  # the latest request's body
        self._partial_head = b""  # the start of a request head not yet seen whole
        self._closing = False  # a request asked to close: what follows it is ignored
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when it is due

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._server
        if server.open >= server.max_connections:
            transport.write(_BUSY)  # type: ignore[attr-defined]
            transport.close()
            self._limits.closed("max_connections")
            server.warn(
                "max_connections",
                "refusing new connections: %d are open (listen.max_connections)",
                server.open,
            )
            return
        self._admitted = True
        server.open += 1
        super().connection_made(transport)
        now = self._loop.time()
        self._head_since = self._last_read = now
        self._arm(now)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        self._server.open -= 1
        if self._server.draining:
            self._server.settled.set()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    @property
    def under_way(self) -> bool:
        """Whether a request was parsed and is not answered yet, or the body of an answered
        one is still arriving, or a head is arriving, or awaited on a new connection (which
        header_timeout, if set, bounds)."""
        transport = self.transport
        if not self._admitted or transport is None or transport.is_closing():
            return False  # a closing TLS connection may take 30 s to report that it is lost
        if self._answered < self._parsed or self.lingering:
            return True
        if self._head_since is None:
            return False
        # Line breaks between requests are ignored (RFC 9112 2.2): they start no head.
        return bool(self._partial_head.strip(b"\r\n")) or self._limits.header_timeout > 0

    @property
    def lingering(self) -> bool:
        """Whether the body of a request answered already is still arriving (aiohttp reads
        it to the end before the connection is used again)."""
        body = self._body
        return self._answered == self._parsed and body is not None and not body.is_eof()

    def close_after_body(self) -> None:
        """Close once the body of the answered request has arrived (when stopping).

        Not by turning keep-alive off: aiohttp sets it from the answer a moment after the
        answer is out, which would undo that.
        """
        assert self._body is not None

        def idle() -> None:
            if not self.under_way:
                self.force_close()

        def arrived() -> None:  # called inside the parser: act once it is done
            self._loop.call_soon(idle)

        self._body.on_eof(arrived)

    def force_close(self) -> None:
        super().force_close()
        if self._server.draining:
            self._server.settled.set()

    async def start(self) -> None:
        try:
            await super().start()
        finally:
            # aiohttp closes the transport at the end; a TLS one reports its loss only once
            # the peer has answered the close, up to 30 s later.
            if self._server.draining:
                self._server.settled.set()

    def data_received(self, data: bytes) -> None:
        if self._closing and data:  # its resuming still parses what was held back
            return
        if not data:  # aiohttp resuming its parser (resume_reading): nothing arrived
            super().data_received(data)
            self._count_parsed(self._loop.time())
            return
        now = self._loop.time()
        self._last_read = now
        if self._body is None or self._body.is_eof():  # a request head, not a body
            if self._head_since is None:
                self._head_since, self._idle_since = now, None
                self._arm(now)
            data = self._cut_after_close(data)
        super().data_received(data)
        self._count_parsed(now)

    def _count_parsed(self, now: float) -> None:
        """Note the requests aiohttp parsed since the last call (in data_received, or from
        what was pipelined behind a declined upgrade, in finish_response)."""
        if self._request_count != self._parsed:
            self._parsed = self._request_count
            self._head_since, self._partial_head = None, b""
            self._body = self._messages[-1][1] if self._messages else None
            self._arm(now)

    def _cut_after_close(self, data: bytes) -> bytes:
        """``data`` up to the end of a bodiless request that asks to close the connection.

        Both of aiohttp's parsers refuse the whole chunk, the requests before included, when
        bytes follow such a request in it; those are answered and the rest ignored instead.
        Heads are followed across chunks until one announces a body, whose end only the
        parser knows.
        """
        seen = self._partial_head + data
        start = 0
        while (end := seen.find(_HEAD_END, start)) >= 0:
            head = seen[start:end]
            if _FRAMED.search(head) is not None:
                self._partial_head = b""
                return data
            if _CLOSE.search(head) is not None:
                self._closing, self._partial_head = True, b""
                return data[: end + len(_HEAD_END) - (len(seen) - len(data))]
            start = end + len(_HEAD_END)
        # The parser refuses a head longer than a few lines of 8 KiB: so much is plenty.
        self._partial_head = seen[start:][-_HEAD_LIMIT:]
        return data

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        # No upgrade is ever made (aiohttp's parsers take CONNECT for one too), and the C
        # parser drops what was pipelined behind one: answer, then close at once (not after
        # lingering to read a body that never ends), instead of leaving the caller waiting.
        upgrade = request.method == "CONNECT" or "Upgrade" in request.headers
        if not resp.prepared:  # the proxy's own answer; a forwarded one is under way already
            resp.headers.setdefault(SERVER, SERVER_NAME)
        if self._server.draining and not resp.prepared and not self._messages:
            resp.force_close()  # its head says "Connection: close"
        try:
            answered = await super().finish_response(request, resp, start_time)
            if upgrade:
                self.force_close()
            return answered
        finally:
            self._answered += 1
            now = self._loop.time()
            self._count_parsed(now)
            if self._answered == self._parsed and self._head_since is None:
                self._idle_since = now
                self._arm(now)
            if self._server.draining:
                if not self._messages:  # the last request parsed: the connection closes after it
                    resp.force_close()  # (aiohttp reads the keep-alive of the answer after this)
                self._server.settled.set()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A MetaDefender-shaped answer to a request aiohttp could not parse or handle.

        aiohttp's own answer quotes the offending line, which may hold a key; this one names
        the kind of problem only.
        """
        if not isinstance(exc, HttpProcessingError):
            return _safe(super().handle_error(request, status, exc, message), status)
        problem = _problem(exc)
        self._server.warn(
            "malformed",
            "refused a malformed request from %s: %d %s",
            request.remote,
            status,
            type(exc).__name__,
        )
        answer = error_response(status, status * 1000 + 5, f"malformed request: {problem}")
        answer.force_close()
        return answer

    def _arm(self, now: float) -> None:
        """Make sure the check of this connection's deadline, in its state as of now, runs
        in time.

        A timer due no later is kept (its check finds the next deadline): cancelling and
        scheduling one at each state change of each request cost 2-3% of the CPU of a small
        request (bench/).
        """
        deadline = self._deadline(now)
        if deadline is None:
            return  # a timer still set finds nothing due and stops
        if self._timer is not None:
            if self._timer_at <= deadline[0]:
                return
            self._timer.cancel()
        self._timer_at = deadline[0]
        self._timer = self._loop.call_at(deadline[0], self._check)

    def _deadline(self, now: float) -> tuple[float, str] | None:
        limits = self._limits
        if self._head_since is not None:
            if limits.header_timeout:
                return self._head_since + limits.header_timeout, "header_timeout"
        elif self._body is not None and not self._body.is_eof():
            if limits.body_timeout:
                # While reading is paused, the proxy, not the caller, is the slow side.
                since = now if self._reading_paused else self._last_read
                return since + limits.body_timeout, "body_timeout"
        elif self._idle_since is not None and limits.idle_timeout:
            return self._idle_since + limits.idle_timeout, "idle_timeout"
        return None

    def _check(self) -> None:
        self._timer = None
        if self.transport is None:
            return
        now = self._loop.time()
        deadline = self._deadline(now)
        if deadline is None:
            return  # a request is being answered; finish_response re-arms
        if now < deadline[0]:
            self._timer_at = deadline[0]
            self._timer = self._loop.call_at(deadline[0], self._check)
            return
        reason = deadline[1]
        self._limits.closed(reason)
        if reason != "idle_timeout":
            self._server.warn(reason, "closed a connection from %s: %s", self.peername, reason)
        self.force_close()


def _problem(exc: HttpProcessingError) -> str:
    """What is wrong with a request, in words that quote none of its bytes."""
    for kind, text in _MALFORMED:
        if isinstance(exc, kind):
            return text
    # The parsers' reasons start with a fixed phrase ("Invalid header value char: ..."),
    # followed by the offending bytes; only a phrase of plain words is kept.
    reason = exc.message.partition(":")[0].strip() if isinstance(exc.message, str) else ""
    return reason.lower() if _PLAIN_REASON.fullmatch(reason) else "not valid HTTP/1.1"


def _safe(answer: web.StreamResponse, status: int) -> web.StreamResponse:
    """aiohttp's plain-text 500 or 504 as a MetaDefender-shaped error."""
    if not isinstance(answer, web.Response) or answer.content_type != "text/plain":
        return answer
    code, text = 500001, "the request failed inside the proxy; its log says why"
    if status == 504:
        code, text = 504002, "the request took too long inside the proxy"
    safe = error_response(status, code, text)
    safe.force_close()
    return safe


class _Server(web.Server):
    """aiohttp's server, making ``_Connection``s that share ``limits`` and a count."""

    def __init__(
        self,
        inner: web.Server,
        limits: Limits,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        **kwargs: Any,
    ) -> None:
        super().__init__(
            handler,
            request_factory=inner.request_factory,
            handler_cancellation=inner.handler_cancellation,
            **kwargs,
        )
        self.limits = limits
        self.max_connections = limits.max_connections or default_max_connections()
        self.open = 0
        self.draining = False
        self.settled = asyncio.Event()  # while draining: a request answered, or a connection gone
        self.warn = Throttled(HTTP_LOG, logging.WARNING)  # one line per condition and 5 s

    def __call__(self) -> _Connection:
        return _Connection(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """``web.AppRunner`` whose connections keep the app's ``LISTEN_LIMITS``."""

    async def _make_server(self) -> web.Server:
        inner = await super()._make_server()
        limits = self.app.get(LISTEN_LIMITS) or Limits()
        # What aiohttp's own server would pass to each connection (the app's handler_args
        # included); it keeps them in a private attribute: without them, the test of opaque
        # bodies in tests/test_forward.py fails (auto_decompress=False is one of them).
        kwargs = dict(inner._kwargs)
        # The connection's own idle deadline decides; aiohttp's is only a backstop.
        idle = limits.idle_timeout or 3600.0
        kwargs["keepalive_timeout"] = idle + max(limits.header_timeout, 1.0)
        entry = self.app.get(ENTRY)
        handler = inner.request_handler
        if entry is not None:
            routed = handler

            async def handler(request: web.BaseRequest) -> web.StreamResponse:
                answer: web.StreamResponse = await entry(request, routed)
                return answer

        return _Server(inner, limits, handler, **kwargs)
