"""The request handler: filter headers, stream both ways, replay once when the token is refused."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from ssl import SSLContext

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .body import MemoryBudget, ReplayableBody
from .errors import SERVER, SERVER_NAME, ProxyError, describe
from .inbound import KEY_HEADER
from .observe import GONE, REPLAY, SENT, Metrics, request_target
from .quota import USED_UP, QuotaWatch, Throttled, error_code, kind_of
from .route import Hop, Route, proxy_failure
from .tokens import Token, TokenCache, read_up_to

__all__ = ["CACHE_STATUS", "HOP_BY_HOP", "NOT_FORWARDED", "Answer", "Captured", "Forwarder"]

# How a cacheable request was answered (MISS, HIT, BYPASS, STALE), as nginx's
# $upstream_cache_status.
CACHE_STATUS = "X-Cache-Status"

log = logging.getLogger("mdcloud_proxy.forward")

# RFC 9110 7.6.1 and the ones Go's httputil.ReverseProxy also drops.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Host is the upstream's, framing is aiohttp's, Expect is answered here, Authorization is ours,
# the proxy key is for the proxy. Forwarding headers would tell a third party about internal
# addresses, and a caller could spoof them.
NOT_FORWARDED = HOP_BY_HOP | {
    "host",
    "content-length",
    "expect",
    "authorization",
    KEY_HEADER.lower(),
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-real-ip",
}
_NOT_RETURNED = HOP_BY_HOP | {"content-length"}
TOKEN_REFUSED_CODES = frozenset({401009, 401010})
_PEEK_LIMIT = 64 * 1024
MAX_THROTTLE_TRIES = 20


def _filtered(headers: CIMultiDictProxy[str], drop: frozenset[str]) -> list[tuple[str, str]]:
    """The pairs of ``headers`` in order, without ``drop`` and whatever Connection names."""
    connection = headers.getall("Connection", ())
    if connection:
        drop = drop | {name.strip().lower() for value in connection for name in value.split(",")}
    return [(name, value) for name, value in headers.items() if name.lower() not in drop]


def _not_utf8(headers: list[tuple[str, str]]) -> str | None:
    """The name of the first header whose value is not valid UTF-8, or None.

    aiohttp's parsers (C and pure-Python) decode header bytes as UTF-8 with surrogateescape and
    its writers encode UTF-8: valid UTF-8 goes on byte for byte, but of other bytes (obs-text)
    the C writer drops the escaped ones and the pure-Python one raises. Such a value cannot be
    passed on unaltered. Names are tokens (both parsers refuse others).
    """
    for name, value in headers:
        if not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:
                return name
    return None


def _head_too_large(exc: aiohttp.ClientResponseError) -> str | None:
    """What was too large in an answer head aiohttp's client refused, or None for other errors.

    The ClientResponseError is raised from a copy of the parser's error, whose cause is the
    parser's error itself.
    """
    parsed = exc.__cause__.__cause__ if exc.__cause__ is not None else None
    if isinstance(parsed, LineTooLong):
        return f"a line of more than {parsed.args[1]} bytes"
    if isinstance(parsed, BadHttpMessage) and parsed.message.startswith("Too many headers"):
        return "too many header lines"
    return None


class _Relayed(web.StreamResponse):
    """A streamed answer whose headers go out with its first body bytes, in one write.

    aiohttp's StreamResponse sends its headers on their own at prepare(); one write fewer per
    answer is measurable (bench/). The attribute is aiohttp's (it is what web.Response sets);
    without it the headers would only go out separately again.
    """

    _send_headers_immediately = False


def token_refused(status: int, headers: CIMultiDictProxy[str], body: bytes) -> bool:
    """Whether an upstream answer says the bearer token expired or is invalid."""
    if status != 401:
        return False
    if any('error="invalid_token"' in v for v in headers.getall("WWW-Authenticate", ())):
        return True
    try:
        error = json.loads(body).get("error")
        return isinstance(error, dict) and error.get("code") in TOKEN_REFUSED_CODES
    except (ValueError, AttributeError):
        return False


async def _peek(resp: aiohttp.ClientResponse) -> bytes:
    """Read the start of a (small) 401 or 429 answer so it can be inspected and still passed
    on."""
    return await read_up_to(resp, _PEEK_LIMIT)


def _token_refused_by_hanging_up(exc: BaseException, body: ReplayableBody | None) -> bool:
    """Whether the upstream dropped the connection while the caller's body was still going up.

    It cannot have processed a request it did not read to the end, and the usual reason to
    hang up on an upload is a refused token, whose 401 the reset can destroy before it is
    read: such a request is treated as one whose token was refused.
    """
    dropped = isinstance(exc, aiohttp.ServerDisconnectedError) or (
        isinstance(exc, aiohttp.ClientOSError) and not isinstance(exc, aiohttp.ClientConnectorError)
    )
    return dropped and body is not None and body.error is None and not body.delivered


def _upstream_failure(
    exc: BaseException, url: URL, body: ReplayableBody | None, hop: Hop | None = None
) -> ProxyError:
    """The error to show the caller for a failed upstream exchange."""
    if body is not None and body.error is not None:
        return body.error  # the caller's side failed, not the upstream
    failure = proxy_failure(exc, hop, url)
    if failure is not None:
        message, rejected = failure
        return ProxyError(message, status=502, code=502007 if rejected else 502006)
    if isinstance(exc, TimeoutError):
        return ProxyError(
            f"upstream {url.host} did not answer in time (upstream.connect_timeout / "
            "upstream.read_timeout)",
            status=504,
            code=504001,
        )
    if isinstance(exc, aiohttp.ClientSSLError):
        return ProxyError(
            f"TLS with upstream {url.host} failed: {describe(exc)}", status=502, code=502002
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ProxyError(
            f"cannot connect to upstream {url.host}:{url.port}: {describe(exc)}",
            status=502,
            code=502001,
        )
    too_large = _head_too_large(exc) if isinstance(exc, aiohttp.ClientResponseError) else None
    if too_large is not None:
        return ProxyError(
            f"upstream answer headers too large: {url.host} sent {too_large}",
            status=502,
            code=502004,
        )
    return ProxyError(
        f"upstream {url.host} connection failed ({describe(exc)})",
        status=502,
        code=502003,
    )


def _returned(headers: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    """The answer's headers that go on to the caller; ProxyError if one cannot."""
    returned = _filtered(headers, _NOT_RETURNED)
    not_utf8 = _not_utf8(returned)
    if not_utf8 is not None:
        raise ProxyError(
            f"upstream answer header {not_utf8} is not valid UTF-8; "
            "it cannot be passed on unaltered",
            status=502,
            code=502005,
        )
    return returned


@dataclass(frozen=True)
class Answer:
    """An upstream answer read whole: what a cache keeps and serves again."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def response(self, extra: Mapping[str, str]) -> web.Response:
        """The answer for a caller, with ``extra`` headers."""
        answer = web.Response(status=self.status, reason=self.reason, body=self.body)
        answer.headers.extend(self.headers)
        answer.headers.update(extra)
        return answer


@dataclass(frozen=True)
class Captured:
    """What ``Forwarder.capture`` got: the whole answer, or one too long, still open."""

    answer: Answer | None
    open: aiohttp.ClientResponse | None
    start: bytes


class Forwarder:
    """Forwards a request to the one upstream with a bearer token: builds the outgoing
    request, sends it, replays it once if the token was refused, relays the answer."""

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession,
        tokens: TokenCache,
        metrics: Metrics,
        upstream_url: str,
        api_key: str | None = None,
        max_body_size: int,
        replay_memory_limit: int,
        replay_memory_total: int,
        quota: QuotaWatch,
        ssl: SSLContext | bool = True,
        route: Route | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self._session = session
        self._tokens = tokens
        self._metrics = metrics
        self._base = upstream_url.rstrip("/")
        self._api_key = api_key
        self._max_body_size = max_body_size
        self._memory_limit = replay_memory_limit
        self.budget = MemoryBudget(replay_memory_total)  # shared by all requests' bodies
        self._quota = quota
        self._clock = clock
        self._sleep = sleep
        self._ssl = ssl
        # One upstream: its route is decided once.
        self._hop = (route or Route())(URL(self._base))
        self._proxy = self._hop.url if self._hop is not None else None

    def __repr__(self) -> str:
        return f"Forwarder(upstream_url={self._base!r})"

    def body_of(self, request: web.BaseRequest) -> ReplayableBody | None:
        """The caller's body, replayable (None for a request without one)."""
        if not request.body_exists:
            return None
        return ReplayableBody(
            request.content,
            memory_limit=self._memory_limit,
            max_size=self._max_body_size,
            budget=self.budget,
        )

    async def __call__(
        self,
        request: web.BaseRequest,
        *,
        body: ReplayableBody | None = None,
        cache_status: str | None = None,
    ) -> web.StreamResponse:
        """Forward one admitted request and relay its answer.

        ``body`` is the caller's body when a step before has taken it (the caller's own);
        ``cache_status`` becomes the answer's X-Cache-Status. Raises ProxyError for a failure
        before anything was sent to the caller; a failure after that aborts its connection.
        """
        own = body is None
        if own:
            body = self.body_of(request)
        try:
            url, headers = self._outgoing(request, body)
            resp, peeked = await self._through_throttles(request, url, headers, body)
            return await self.relay(request, resp, peeked, cache_status)
        finally:
            if own and body is not None:
                body.close()

    async def capture(
        self, request: web.BaseRequest, limit: int, body: ReplayableBody | None = None
    ) -> Captured:
        """Forward ``request`` and read its answer whole, if it has at most ``limit`` bytes.

        A longer answer is left open in the result, with what was read of it, for ``relay``.
        """
        url, headers = self._outgoing(request, body)
        resp, peeked = await self._through_throttles(request, url, headers, body)
        try:
            data = peeked + await read_up_to(resp, max(0, limit - len(peeked)))
            answer_headers = _returned(resp.headers)
        except (aiohttp.ClientError, TimeoutError) as exc:
            resp.close()
            raise _upstream_failure(exc, url, body, self._hop) from None
        except ProxyError:
            resp.close()
            raise
        if len(data) > limit:
            return Captured(None, resp, data)
        resp.release()
        answer = Answer(resp.status, resp.reason or "", answer_headers, data)
        return Captured(answer, None, b"")

    def _outgoing(
        self, request: web.BaseRequest, body: ReplayableBody | None
    ) -> tuple[URL, CIMultiDict[str]]:
        """The upstream URL and headers for ``request`` (the token is added per attempt)."""
        forwarded = _filtered(request.headers, NOT_FORWARDED)
        not_utf8 = _not_utf8(forwarded)
        if not_utf8 is not None:
            raise ProxyError(
                f"request header {not_utf8} is not valid UTF-8; it cannot be passed on unaltered",
                status=400,
                code=400004,
            )
        # aiohttp's ClientSession merges headers by a case-sensitive set of names into a
        # case-insensitive dict, so "X-A: 1" then "x-a: 2" would reach the upstream as "x-a: 2"
        # alone. Names are case-insensitive (RFC 9110 5.1): spell each repeat like the first.
        spelling: dict[str, str] = {}
        headers = CIMultiDict(
            [(spelling.setdefault(name.lower(), name), value) for name, value in forwarded]
        )
        if self._api_key is not None:
            headers.popall("apikey", None)
            headers["apikey"] = self._api_key
        if body is not None and request.content_length is not None:
            # Keep the caller's framing: some gateways refuse chunked uploads.
            headers["Content-Length"] = str(request.content_length)
        # Raw path and query byte for byte; joining URLs would let '//host/x' pick the host.
        return URL(self._base + request.raw_path, encoded=True), headers

    async def _through_throttles(
        self,
        request: web.BaseRequest,
        url: URL,
        headers: CIMultiDict[str],
        body: ReplayableBody | None,
    ) -> tuple[aiohttp.ClientResponse, bytes]:
        """``_exchange``, waiting out throttles within ``throttle.max_wait``: a window known
        to be closed before sending, an announced reset after a 429 (then sent again)."""
        quota = self._quota
        deadline = self._clock() + quota.max_wait
        tries, waited = 0, False
        kind = kind_of(request.method, request.raw_path)
        while True:
            name = quota.limit_of(kind)
            closed = quota.closed_for(kind)
            if closed is not None:
                if self._clock() + closed > deadline:
                    self._metrics.throttle_waits.labels(name, "gave_up").inc()
                    raise Throttled(
                        f"the {name} throttle reopens in {closed:.0f} s, past "
                        f"throttle.max_wait ({quota.max_wait:.0f} s)",
                        retry_after=closed,
                    )
                # Jitter: what waited for one window does not all arrive at its first instant.
                await self._wait(request, name, closed + random.uniform(0.05, 0.25))
                waited = True
            resp, peeked = await self._exchange(request, url, headers, body)
            if resp.status == 429 and not peeked:
                try:
                    peeked = await _peek(resp)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    resp.close()
                    raise _upstream_failure(exc, url, body, self._hop) from None
            code = error_code(peeked) if resp.status == 429 else None
            quota.seen(kind, resp.status, resp.headers, code)
            name = quota.limit_of(kind)
            tries += 1
            pause = quota.wait_for(resp.status, resp.headers, code, tries, deadline - self._clock())
            if tries >= MAX_THROTTLE_TRIES:
                pause = None  # a clock that does not move must not make this loop for ever
            if pause is None:
                throttled = resp.status == 429 and code != USED_UP
                if waited or throttled:
                    outcome = "gave_up" if throttled else "ok"
                    self._metrics.throttle_waits.labels(name, outcome).inc()
                return resp, peeked
            resp.close()
            if body is not None:
                await body.settle_copy()
                if body.not_replayable is not None:
                    raise body.not_replayable
            if waited:
                self._metrics.throttle_waits.labels(name, "again").inc()
            await self._wait(request, name, pause)
            waited = True

    async def _wait(self, request: web.BaseRequest, limit: str, seconds: float) -> None:
        log.info(
            "%s %s: the %s throttle is closed; waiting %.1f s, then sending it again",
            request.method,
            request_target(request),
            limit,
            seconds,
        )
        await self._sleep(seconds)  # a caller who hangs up meanwhile cancels it

    async def _exchange(
        self,
        request: web.BaseRequest,
        url: URL,
        headers: CIMultiDict[str],
        body: ReplayableBody | None,
    ) -> tuple[aiohttp.ClientResponse, bytes]:
        """Send the request; if the token is refused, refresh it and send it once more.

        Returns the answer to relay and the part of its body already read.
        """
        token = await self._tokens.get()
        resp = None
        try:
            resp = await self._send(request.method, url, headers, token, body)
            peeked = await _peek(resp) if resp.status == 401 else b""
        except (aiohttp.ClientError, TimeoutError) as exc:
            if resp is not None:
                resp.close()
            if not _token_refused_by_hanging_up(exc, body):
                raise _upstream_failure(exc, url, body, self._hop) from None
            log.info(
                "upstream hung up on %s %s before reading the whole body; "
                "replaying with a fresh token",
                request.method,
                request_target(request),
            )
        else:
            if not token_refused(resp.status, resp.headers, peeked):
                return resp, peeked
            resp.close()
            log.info(
                "upstream refused the access token for %s %s; refreshing it and replaying",
                request.method,
                request_target(request),
            )
        self._tokens.invalidate(token)
        outcome = "failed"
        try:
            if body is not None:
                await body.settle_copy()  # a write that failed unnoticed shows now
                if body.not_replayable is not None:
                    raise body.not_replayable  # the copy is not whole: sending it cannot help
            token = await self._tokens.get()
            resp = await self._send(request.method, url, headers, token, body)
            # A 401 to a fresh token is passed on: replaying again could not help.
            outcome = "refused" if resp.status == 401 else "ok"
            return resp, b""
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _upstream_failure(exc, url, body, self._hop) from None
        finally:
            request[REPLAY] = outcome
            self._metrics.replays.labels(outcome).inc()

    async def _send(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        token: Token,
        body: ReplayableBody | None,
    ) -> aiohttp.ClientResponse:
        # aiohttp copies the headers into its request: replacing the token for a replay is safe.
        headers["Authorization"] = "Bearer " + token.access_token
        started = time.monotonic()
        resp = await self._session.request(
            method,
            url,
            headers=headers,
            data=body.stream() if body is not None else None,
            allow_redirects=False,
            ssl=self._ssl,
            proxy=self._proxy,
        )
        self._metrics.upstream_latency.observe(time.monotonic() - started)
        return resp

    async def relay(
        self,
        request: web.BaseRequest,
        resp: aiohttp.ClientResponse,
        peeked: bytes,
        cache_status: str | None = None,
    ) -> web.StreamResponse:
        """Stream the upstream answer to the caller (``peeked``: what was read of it already),
        then release it; abort the caller's connection if it breaks off."""
        try:
            return await self._stream(request, resp, peeked, cache_status)
        finally:
            # Back to the pool when the answer was read to the end, closed otherwise.
            resp.release()

    async def _stream(
        self,
        request: web.BaseRequest,
        resp: aiohttp.ClientResponse,
        peeked: bytes,
        cache_status: str | None,
    ) -> web.StreamResponse:
        out = _Relayed(status=resp.status, reason=resp.reason)
        out.headers.extend(_returned(resp.headers))
        if SERVER not in out.headers:
            out.headers[SERVER] = SERVER_NAME  # not aiohttp's default, which names versions
        if cache_status is not None:
            out.headers[CACHE_STATUS] = cache_status
        out.content_length = resp.content_length
        await out.prepare(request)
        request[SENT] = 0
        try:
            if peeked:
                await out.write(peeked)
                request[SENT] = len(peeked)
            while True:
                try:
                    chunk = await resp.content.readany()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    log.warning(
                        "%s %s: upstream answer broke off (%s); aborting the caller's connection",
                        request.method,
                        request_target(request),
                        describe(exc),
                    )
                    # A truncated answer must not look complete: no final chunk, no keep-alive.
                    if request.transport is not None:
                        request.transport.abort()
                    return out
                if not chunk:
                    break
                await out.write(chunk)
                request[SENT] += len(chunk)
            await out.write_eof()
        except ConnectionResetError:
            # The caller hung up while its answer was being written (its connection was
            # closing before aiohttp cancelled this handler): the caller's doing, counted as
            # 499 and in its access log line, not an error of the proxy with a traceback.
            request[GONE] = True
        return out
