"""How the proxy reports on itself: Prometheus metrics, one log line per request, readiness."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from .errors import TokenError, error_response
from .listener import CLOSE_REASONS
from .tokens import Token, TokenCache

__all__ = [
    "CACHE",
    "CALLER_GONE",
    "GONE",
    "REPLAY",
    "SENT",
    "Metrics",
    "Traffic",
    "readiness",
    "request_target",
    "utc_time",
]

log = logging.getLogger("mdcloud_proxy.access")
Clock = Callable[[], float]

# Set by the forwarder: how a replay ended ("ok", "refused", "failed"), and the body bytes it
# relayed (a streamed answer's own counters include headers and chunk framing).
REPLAY = web.RequestKey("replay", str)
SENT = web.RequestKey("sent", int)
# Set by the forwarder when the caller hung up while its answer was being written.
GONE = web.RequestKey("gone", bool)
# Set by the quota guard: how a cacheable request was answered (X-Cache-Status).
CACHE = web.RequestKey("cache", str)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# nginx's code for "the caller closed the connection before the answer was sent".
CALLER_GONE = 499


def request_target(request: web.BaseRequest) -> str:
    """The raw path, with query values masked: a tool may put a key in the query string.

    The raw target cannot hold CR, LF or spaces, so it is safe to put into a log line.
    """
    path, _, query = request.raw_path.partition("?")
    if not query:
        return path
    names = (part.partition("=")[0] for part in query.split("&"))
    return path + "?" + "&".join(f"{name}=***" for name in names)


@dataclass
class Traffic:
    """Requests in flight (the gauge), and whether the proxy is draining before it stops."""

    in_flight: int = 0
    draining: bool = False

    def started(self) -> None:
        self.in_flight += 1

    def finished(self) -> None:
        self.in_flight -= 1


class Metrics:
    """The proxy's Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self) -> None:
        # A *_created series per counter is noise for a proxy.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)  # memory, CPU and open file descriptors
        prefix = "mdcloud_proxy_"
        self.requests = Counter(
            prefix + "requests",
            "Requests answered, by method and status class (499: the caller hung up).",
            ["method", "status_class"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            prefix + "requests_in_flight", "Requests being handled.", registry=self.registry
        )
        self.upstream_latency = Histogram(
            prefix + "upstream_latency_seconds",
            "Time from sending a request upstream to its answer's headers, per attempt.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.replays = Counter(
            prefix + "replays",
            "Requests sent again after the upstream refused the token, by outcome "
            "(ok, refused: refused again, failed: no answer).",
            ["outcome"],
            registry=self.registry,
        )
        self.token_fetches = Counter(
            prefix + "token_fetches",
            "Requests to the token endpoint, by outcome (ok, error: may pass, "
            "rejected: needs a configuration change).",
            ["outcome"],
            registry=self.registry,
        )
        self.token_expiry = Gauge(
            prefix + "token_expiry_seconds",
            "Seconds until the current access token expires; 0 when none is held.",
            registry=self.registry,
        )
        self.inbound_refusals = Counter(
            prefix + "inbound_refusals",
            "Callers refused by the inbound checks, by reason (network, missing_key, wrong_key).",
            ["reason"],
            registry=self.registry,
        )
        self.bytes_in = Counter(
            prefix + "request_bytes",
            "Request body bytes received from callers.",
            registry=self.registry,
        )
        self.bytes_out = Counter(
            prefix + "response_bytes",
            "Response body bytes sent to callers.",
            registry=self.registry,
        )
        self.cache_requests = Counter(
            prefix + "cache_requests",
            "Requests on cacheable routes, by how they were answered (hit, miss, bypass, stale).",
            ["status"],
            registry=self.registry,
        )
        self.cache_entries = Gauge(
            prefix + "cache_entries", "Lookup answers in the cache.", registry=self.registry
        )
        self.cache_bytes = Gauge(
            prefix + "cache_bytes",
            "Bytes the cached answers take (bodies and headers; at most cache.max_size).",
            registry=self.registry,
        )
        self.cache_coalesced = Counter(
            prefix + "cache_coalesced",
            "Requests that waited for an identical request's answer instead of going upstream.",
            registry=self.registry,
        )
        self.upload_dedup = Counter(
            prefix + "upload_dedup",
            "Uploads answered with the answer of the same upload earlier (cache.uploads).",
            registry=self.registry,
        )
        for status in ("hit", "miss", "bypass", "stale"):
            self.cache_requests.labels(status)
        self.throttle_waits = Counter(
            prefix + "throttle_waits",
            "Waits for a throttle's window, by limit type and outcome (ok: answered after it; "
            "again: throttled again, waited again; gave_up: passed on, the window too far).",
            ["limit", "outcome"],
            registry=self.registry,
        )
        self.quota_limit = Gauge(
            prefix + "quota_limit",
            "The account's limit per interval, by limit type, as the latest answer said.",
            ["limit"],
            registry=self.registry,
        )
        self.quota_remaining = Gauge(
            prefix + "quota_remaining",
            "Calls left in the interval, by limit type, as the latest answer said.",
            ["limit"],
            registry=self.registry,
        )
        self.quota_reset = Gauge(
            prefix + "quota_reset_seconds",
            "Seconds until the quota's interval resets, by limit type.",
            ["limit"],
            registry=self.registry,
        )
        self.redis_errors = Counter(
            prefix + "redis_errors",
            "Redis calls of the shared quota guard that failed, by reason (timeout, "
            "unreachable, refused, invalid: a value this fleet did not write, busy: every "
            "connection in use for cache.redis_timeout); each one only cost the request its "
            "sharing.",
            ["reason"],
            registry=self.registry,
        )
        for reason in ("timeout", "unreachable", "refused", "invalid", "busy"):
            self.redis_errors.labels(reason)
        self.redis_degraded = Gauge(
            prefix + "redis_degraded",
            "1 while Redis does not answer and the quota guard works in this process alone.",
            registry=self.registry,
        )
        self.body_memory = Gauge(
            prefix + "body_memory_bytes",
            "Request body bytes held in memory for replays or waiting for the spill file "
            "(at most replay.memory_total, plus one read per upload).",
            registry=self.registry,
        )
        self.connections_closed = Counter(
            prefix + "connections_closed",
            "Connections the proxy closed or refused, by reason (header_timeout, body_timeout, "
            "idle_timeout, max_connections).",
            ["reason"],
            registry=self.registry,
        )
        for reason in CLOSE_REASONS:
            self.connections_closed.labels(reason)
        for outcome in ("ok", "refused", "failed"):
            self.replays.labels(outcome)
        for outcome in ("ok", "error", "rejected"):
            self.token_fetches.labels(outcome)
        for reason in ("network", "missing_key", "wrong_key"):
            self.inbound_refusals.labels(reason)
        self._request_counters: dict[tuple[str, int], Counter] = {}

    def watch(self, traffic: Traffic, current: Callable[[], Token | None], clock: Clock) -> None:
        """Read the in-flight count and the token's remaining life when scraped."""
        self.in_flight.set_function(lambda: traffic.in_flight)

        def remaining() -> float:
            token = current()
            return max(0.0, token.expires_at - clock()) if token is not None else 0.0

        self.token_expiry.set_function(remaining)

    def watch_limit(self, name: str, limit: Callable[[], Any], clock: Clock) -> None:
        """Read one limit type's figures (a ``quota.Limit``) when scraped."""

        def figure(attribute: str) -> Callable[[], float]:
            def read() -> float:
                value = getattr(limit(), attribute)
                return float("nan") if value is None else float(value)

            return read

        def reset() -> float:
            resets_at = limit().resets_at
            return float("nan") if resets_at is None else max(0.0, resets_at - clock())

        self.quota_limit.labels(name).set_function(figure("limit"))
        self.quota_remaining.labels(name).set_function(figure("remaining"))
        self.quota_reset.labels(name).set_function(reset)

    def counting(self, fetch: Callable[[], Awaitable[Token]]) -> Callable[[], Awaitable[Token]]:
        """``fetch`` with each call counted by outcome."""

        async def counted() -> Token:
            try:
                token = await fetch()
            except TokenError as exc:
                self.token_fetches.labels("rejected" if exc.permanent else "error").inc()
                raise
            self.token_fetches.labels("ok").inc()
            return token

        return counted

    def render(self) -> web.Response:
        """The metrics in Prometheus' text format."""
        response = web.Response(body=generate_latest(self.registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    def record(
        self,
        request: web.BaseRequest,
        status: int,
        response: web.StreamResponse | None,
        duration: float,
    ) -> None:
        """Count a forwarded request and write its log line."""
        method = request.method if request.method in _METHODS else "other"
        key = (method, status // 100)
        counter = self._request_counters.get(key)
        if counter is None:  # labels() costs more than the increment: keep the children
            counter = self._request_counters[key] = self.requests.labels(method, f"{key[1]}xx")
        counter.inc()
        received = request.content.total_bytes
        sent = request.get(SENT)
        if sent is None:
            sent = (response.content_length or 0) if response is not None else 0
        if received:
            self.bytes_in.inc(received)
        self.bytes_out.inc(sent)
        if not log.isEnabledFor(logging.INFO):
            return
        path, replayed, cache = request_target(request), request.get(REPLAY), request.get(CACHE)
        # One f-string, no arguments: logging's %-formatting of a dict costs more (bench/).
        message = (
            f"{request.method} {path} -> {status}, {received} bytes in, {sent} bytes out, "
            f"{duration:.3f} s"
        )
        if cache:
            message += f", cache: {cache}"
        if replayed:
            message += f", replayed: {replayed}"
        fields = {
            "method": request.method,
            "path": path,
            "status": status,
            "bytes_in": received,
            "bytes_out": sent,
            "duration_s": round(duration, 6),
            "replayed": replayed,
            "cache": cache,
        }
        log.info(message, extra={"fields": fields})


def utc_time(wall: float) -> str:
    """A wall-clock time as people and logs read it: 2026-11-27T09:14:02Z."""
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def readiness(tokens: TokenCache, traffic: Traffic, clock: Clock) -> web.Response:
    """200 while a valid token is held and the proxy is not stopping; 503 saying why not."""
    if traffic.draining:
        return error_response(503, 503020, "not ready: shutting down")
    token = tokens.current
    if token is not None:
        return web.json_response(
            {"status": "ready", "token_expires_in_s": round(token.expires_at - clock())}
        )
    error = tokens.error
    if error is None:
        return error_response(503, 503020, "not ready: fetching the first access token")
    since = ""
    if tokens.failing_since is not None:
        since = f" (failing since {utc_time(tokens.failing_since)})"
    return error_response(503, 503020, f"not ready: no access token: {error.message}{since}")
