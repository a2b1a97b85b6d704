"""The order of steps every request to the main listener goes through, read top to bottom.

The proxy's own ``/-/`` endpoints go to the application's router. Any other request is
accounted for (in flight, metrics, one log line), admitted (who asks, then what is asked),
asked for its body (100 Continue), answered by the quota guard if it is a lookup it keeps,
else forwarded; any failure on the way is turned into an answer by ``failure``. A new step
(a throttle wait, say) is one more line here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from .cache import LookupCache
from .errors import ProxyError, error_response
from .forward import Forwarder
from .inbound import InboundGuard
from .observe import CALLER_GONE, GONE, Metrics, Traffic, request_target

__all__ = ["OPS_PREFIX", "Pipeline", "failure", "refusal"]

log = logging.getLogger("mdcloud_proxy.forward")

# Paths of the proxy's own endpoints; no MetaDefender path starts with it.
OPS_PREFIX = "/-/"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

Routed = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class Pipeline:
    """Every request the main listener reads (see ``listener.ENTRY``)."""

    def __init__(
        self,
        *,
        inbound: InboundGuard,
        forwarder: Forwarder,
        cache: LookupCache | None,
        metrics: Metrics,
        traffic: Traffic,
        max_body_size: int,
    ) -> None:
        self._inbound = inbound
        self._forwarder = forwarder
        self._cache = cache
        self._metrics = metrics
        self._traffic = traffic
        self._max_body_size = max_body_size

    def __repr__(self) -> str:
        return f"Pipeline(forwarder={self._forwarder!r})"

    async def __call__(self, request: web.BaseRequest, routed: Routed) -> web.StreamResponse:
        """Answer one request; ``routed`` is the application's router, for ``/-/``."""
        if request.path.startswith(OPS_PREFIX):
            own = await routed(request)
            log.debug("%s %s -> %d", request.method, request_target(request), own.status)
            return own
        started = time.monotonic()
        self._traffic.started()
        status = 500  # an exception escaped
        answer: web.StreamResponse | None = None
        try:
            answer = await self._handle(request)
            status = CALLER_GONE if GONE in request else answer.status
            return answer
        except asyncio.CancelledError:
            status = CALLER_GONE
            raise
        finally:
            self._traffic.finished()
            self._metrics.record(request, status, answer, time.monotonic() - started)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        # Who asks, then what is asked; only then is the body asked for.
        refused = self._inbound.refusal(request) or refusal(request, self._max_body_size)
        if refused is not None:
            return refused
        if "Expect" in request.headers:
            if request.headers["Expect"].lower() != "100-continue":
                return error_response(417, 417001, "only 'Expect: 100-continue' is supported")
            if request.version >= aiohttp.HttpVersion11:
                await request.writer.write(_CONTINUE)
        try:
            if self._cache is not None and self._cache.wants(request):
                return await self._cache(request)  # the quota guard: lookups cost quota once
            return await self._forwarder(request)
        except ProxyError as exc:
            return failure(request, exc)


def refusal(request: web.BaseRequest, max_body_size: int) -> web.Response | None:
    """The answer to a request that must not be forwarded as it is, or None."""
    # Absolute-form, authority-form and '*' targets could name another host: only paths pass.
    if request.method == "CONNECT":
        return error_response(405, 405001, "CONNECT is not supported: this is no forward proxy")
    if not request.raw_path.startswith("/"):
        return error_response(400, 400002, "the request target must be a path such as /v4/apikey/")
    codings = request.headers.getall("Transfer-Encoding", ())
    if codings:
        problem = None
        if request.version < aiohttp.HttpVersion11:
            problem = "Transfer-Encoding is not allowed in an HTTP/1.0 request"  # RFC 9112 6.1
        elif _not_chunked_once(codings):
            problem = "Transfer-Encoding must end in a single chunked (RFC 9112 6.3)"
        if problem is not None:
            # Its framing is faulty: answer, then close the connection (what follows is
            # not known to be a request).
            refused = error_response(400, 400003, problem)
            refused.force_close()
            return refused
    length = request.content_length
    if length is not None and length > max_body_size:
        return error_response(
            413,
            413001,
            f"request body of {length} bytes is larger than limits.max_body_size "
            f"({max_body_size} bytes)",
        )
    return None


def _not_chunked_once(values: list[str]) -> bool:
    codings = [c.strip().lower() for value in values for c in value.split(",") if c.strip()]
    return not codings or codings[-1] != "chunked" or codings.count("chunked") != 1


def failure(request: web.BaseRequest, exc: ProxyError) -> web.Response:
    """The log line and the answer for a request that failed before anything was sent."""
    log.warning("%s %s failed: %s", request.method, request_target(request), exc.message)
    headers = None
    if exc.retry_after:
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))}
    return exc.response(headers)
