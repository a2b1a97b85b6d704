"""Bearer tokens: the client-credentials fetch and the cache that refreshes ahead, single-flight."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, field
from ssl import SSLContext

import aiohttp
from yarl import URL

from .errors import TokenError, describe
from .route import Route, proxy_failure

__all__ = ["ClientCredentials", "Token", "TokenCache", "read_up_to"]

log = logging.getLogger("mdcloud_proxy.tokens")

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
DEFAULT_LIFETIME = 3600.0
# A longer claimed lifetime is cut to this; a token refused before then is replayed anyway.
MAX_LIFETIME = 86400.0
# The longest pause between fetches after failures, whatever Retry-After says.
MAX_BACKOFF = 900.0
# A token answer is a few hundred bytes; one this large is something else.
MAX_ANSWER_BYTES = 64 * 1024
# RFC 6750 2.1 b64token: all that may follow "Bearer " in an Authorization header.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


@dataclass(frozen=True)
class Token:
    """An access token; ``expires_at`` is on the cache's monotonic clock, never wall-clock."""

    access_token: str = field(repr=False)
    expires_at: float
    lifetime: float


async def read_up_to(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body of ``resp`` to its end, or its first ``limit + 1`` bytes if it is longer.

    ``resp.content.read(n)`` returns only what has arrived so far: the beginning of an answer
    sent in pieces (TLS records, chunks, a slow server). Each read waits at most the session's
    read timeout; the framing (Content-Length or chunked) says where the end is.
    """
    body = bytearray()
    while len(body) <= limit:
        piece = await resp.content.read(limit + 1 - len(body))
        if not piece:
            break
        body += piece
    return bytes(body)


def _lifetime(expires_in: object) -> float:
    """Seconds a token lasts, from an ``expires_in`` that is a positive number, capped."""
    lifetime = math.nan
    if isinstance(expires_in, int | float | str) and not isinstance(expires_in, bool):
        try:
            lifetime = float(expires_in)
        except OverflowError:  # an integer too large for a float
            lifetime = math.inf
        except ValueError:
            pass
    if not lifetime > 0:
        raise TokenError("token endpoint answer has an invalid expires_in", status=502)
    if lifetime > MAX_LIFETIME:
        log.warning(
            "token endpoint says its token is valid for %.6g s; using it for at most %.0f s",
            lifetime,
            MAX_LIFETIME,
        )
        lifetime = MAX_LIFETIME
    return lifetime


def _again(error: TokenError, *, retry_after: float) -> TokenError:
    return TokenError(
        error.message,
        status=error.status,
        permanent=error.permanent,
        retry_after=retry_after,
        error_code=error.error_code,
        error_description=error.error_description,
    )


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After")
    try:
        seconds = float(value) if value is not None else math.nan
    except ValueError:
        return None  # an HTTP-date; the backoff decides instead
    if math.isnan(seconds):
        return None
    # Capped like the longest backoff: "inf" or a year must not stop all asking for good.
    return min(max(0.0, seconds), MAX_BACKOFF)


def _refusal(body: bytes) -> tuple[str | None, str | None, str]:
    """What a token endpoint said in an error body: RFC 6749 5.2 or MetaDefender's shape.

    Returns the RFC 6749 ``error`` code and ``error_description`` (None where absent), and
    the reason to quote after the status in a message (``": ..."`` or empty).
    """
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return None, None, ""
    error, description = data.get("error"), data.get("error_description")
    parts: list[str] = []
    if isinstance(error, str):
        parts.append(error)
        if isinstance(description, str):
            parts.append(description)
    elif isinstance(error, dict) and isinstance(error.get("messages"), list):
        parts.extend(str(m) for m in error["messages"])
    reason = ": " + "; ".join(parts)[:200] if parts else ""
    if not isinstance(error, str):
        return None, None, reason
    return error, description if isinstance(description, str) else None, reason


@dataclass(frozen=True)
class ClientCredentials:
    """Fetches tokens with the OAuth 2.0 client-credentials grant, as MetaDefender documents it.

    It has its own call path (never the forwarding path), so a token request can never be
    retried by the replay logic and recurse.
    """

    session: aiohttp.ClientSession = field(repr=False)
    token_url: str
    client_id: str
    client_secret: str = field(repr=False)
    ssl: SSLContext | bool = field(default=True, repr=False)
    clock: Clock = field(default=time.monotonic, repr=False)
    route: Route = field(default_factory=Route, repr=False)

    def _basic_auth(self) -> str:
        # As MetaDefender documents it: base64(CLIENT_ID:CLIENT_SECRET), without form-encoding.
        pair = f"{self.client_id}:{self.client_secret}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")

    async def fetch(self) -> Token:
        """One token request; raises TokenError saying what went wrong."""
        url = URL(self.token_url)
        try:
            async with self.session.post(
                self.token_url,
                data=b"grant_type=client_credentials",
                headers={
                    "Authorization": self._basic_auth(),
                    "Content-Type": "application/x-www-form-urlencoded",
                    "Accept": "application/json",
                    "Accept-Encoding": "identity",
                },
                allow_redirects=False,
                ssl=self.ssl,
                proxy=self.route.proxy_for(url),
            ) as resp:
                # The lifetime counts from the answer's arrival, not from the end of a body
                # that may come slowly: a token is never thought valid longer than it is.
                received = self.clock()
                body = await read_up_to(resp, MAX_ANSWER_BYTES)
                status, headers = resp.status, resp.headers
        except TimeoutError:
            raise TokenError(f"token endpoint {self.token_url} timed out") from None
        except (aiohttp.ClientProxyConnectionError, aiohttp.ClientHttpProxyError) as exc:
            failure = proxy_failure(exc, self.route(url), url)
            if failure is None:
                raise
            message, rejected = failure
            # Rejected credentials are a configuration error: waited out like the client's.
            raise TokenError(
                f"token endpoint {self.token_url}: {message}",
                status=502 if rejected else 503,
                permanent=rejected,
            ) from None
        except aiohttp.ClientPayloadError:
            raise TokenError(f"token endpoint {self.token_url} broke off its answer") from None
        except aiohttp.ClientSSLError as exc:
            raise TokenError(
                f"TLS with token endpoint {self.token_url} failed: {describe(exc)}",
                status=502,
                permanent=True,
            ) from None
        except aiohttp.ClientError as exc:
            raise TokenError(
                f"token endpoint {self.token_url} unreachable: {describe(exc)}"
            ) from None

        if status != 200:
            error_code, description, reason = _refusal(body)
            if status == 429 or status >= 500:
                raise TokenError(
                    f"token endpoint answered HTTP {status}{reason}",
                    retry_after=_retry_after(headers),
                    error_code=error_code,
                    error_description=description,
                )
            # RFC 6749 5.2: a failed client authentication is invalid_client, or a 401.
            if status == 401 or error_code == "invalid_client":
                problem = "rejected the client credentials"
                fix = "oauth.client_id and oauth.client_secret"
            else:
                problem, fix = "refused the token request", "oauth.token_url"
            # Retrying cannot fix this, and MetaDefender blocks addresses that keep trying.
            raise TokenError(
                f"token endpoint {problem} (HTTP {status}{reason}); check {fix}",
                status=502,
                permanent=True,
                error_code=error_code,
                error_description=description,
            )
        if len(body) > MAX_ANSWER_BYTES:
            raise TokenError(
                f"token endpoint answer is larger than {MAX_ANSWER_BYTES // 1024} KiB: "
                "that is no token answer; check oauth.token_url",
                status=502,
            )
        return self._parse(body, received)

    def _parse(self, body: bytes, received: float) -> Token:
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise TokenError("token endpoint answered with something that is not JSON", status=502)
        access_token = data.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise TokenError("token endpoint answer has no access_token", status=502)
        if not _B64TOKEN.fullmatch(access_token):
            # Never quoted: it is a secret, and its line breaks could forge log lines.
            raise TokenError(
                "token endpoint answer has an access_token that cannot be sent as a bearer "
                "token: it holds characters RFC 6750 does not allow (such as CR, LF, NUL or "
                "spaces)",
                status=502,
            )
        lifetime = _lifetime(data.get("expires_in", DEFAULT_LIFETIME))
        return Token(access_token, received + lifetime, lifetime)


class TokenCache:
    """Serves a valid token to any number of concurrent callers.

    A token is fresh, stale (inside the refresh margin) or gone. Fresh: served. Stale: served,
    and one background refresh starts; its failure stays quiet until the token is gone. Gone:
    every caller awaits the same single fetch. After a failure, further fetches wait for a
    backoff (long when the credentials were rejected, since MetaDefender blocks an address
    that keeps sending bad ones); meanwhile callers get the last error at once.

    Fetches start at least ``min_fetch_interval`` seconds apart, whatever lifetime the
    endpoint announces: a token that lives less than that is used for its life, then callers
    wait for the next fetch. Only a token the API refused (``invalidate``) is replaced at
    once. ``sleep`` takes every pause (a seam for tests with a fake clock).
    """

    def __init__(
        self,
        fetch: Callable[[], Awaitable[Token]],
        *,
        identity: Hashable,
        refresh_margin: float = 60.0,
        clock: Clock = time.monotonic,
        attempts: int = 3,
        retry_delay: float = 0.5,
        max_retry_wait: float = 5.0,
        min_fetch_interval: float = 1.0,
        sleep: Sleep = asyncio.sleep,
    ):
        self._fetch = fetch
        self._identity = identity
        self._margin = refresh_margin
        self._clock = clock
        self._attempts = attempts
        self._retry_delay = retry_delay
        self._max_retry_wait = max_retry_wait
        self._min_interval = min_fetch_interval
        self._sleep = sleep
        self._asked_at = float("-inf")  # when the token endpoint was last asked
        self._waived_at = float("-inf")  # when a refused token last skipped the interval
        self._short_lived = False  # the latest token lives less than min_fetch_interval
        # One token, not a cache: plain attributes. A cachetools TLRUCache lookup made get()
        # ten times slower (about 2.4 us instead of 0.2 us for a fresh token), for nothing.
        self._token: Token | None = None
        self._stale_at = float("-inf")  # when _token enters the refresh margin
        self._inflight: asyncio.Task[Token] | None = None
        self._failures = 0
        self._error: TokenError | None = None
        self._next_attempt = float("-inf")
        self.failing_since: float | None = None  # wall-clock time of the first failure in a row
        self.refreshed_at: float | None = None  # wall-clock time of the latest token

    def __repr__(self) -> str:
        return f"TokenCache(identity={self._identity!r}, failures={self._failures})"

    @property
    def current(self) -> Token | None:
        """The token that would be served now, if any (no fetch); None once it has expired."""
        token = self._token
        return token if token is not None and self._clock() < token.expires_at else None

    @property
    def error(self) -> TokenError | None:
        """Why the latest fetch failed; None once a fetch succeeds."""
        return self._error

    def _refresh_at(self, token: Token) -> float:
        return token.expires_at - min(self._margin, token.lifetime / 2)

    async def keep_fresh(self, *, min_wait: float = 1.0) -> None:
        """Hold a valid token at all times, refreshing it ahead of expiry; runs until cancelled.

        The proxy starts listening at once and this fetches the first token in the background,
        so an idle proxy stays ready and the next request does not wait for the token endpoint.
        Failures follow the same backoff as fetches made for requests.
        """
        while True:
            if self._inflight is not None:
                await asyncio.gather(asyncio.shield(self._inflight), return_exceptions=True)
                continue
            token, now = self.current, self._clock()
            due = self._next_attempt if self._error is not None else float("-inf")
            if token is not None:
                due = max(due, self._refresh_at(token))
            if now >= due:
                self._start_fetch(background=token is not None)
                continue
            await self._sleep(max(min_wait, due - now))

    async def get(self) -> Token:
        """A token that is not known to be expired; raises TokenError if none can be had."""
        now = self._clock()
        token = self._token
        if token is not None and now < token.expires_at:
            if now >= self._stale_at and now >= self._next_attempt:
                self._start_fetch(background=True)
            return token
        task = self._inflight
        if task is None:
            if self._error is not None and now < self._next_attempt:
                # A new exception each time: raising one object again and again would grow
                # its traceback by every caller's frames.
                raise _again(self._error, retry_after=self._next_attempt - now)
            task = self._start_fetch(background=False)
        # shield: one caller giving up must not cancel the fetch everybody else awaits.
        return await asyncio.shield(task)

    def invalidate(self, token: Token) -> None:
        """Forget ``token`` after the API refused it, unless a newer one already replaced it."""
        if self.current is token:
            self._token, self._stale_at = None, float("-inf")
            # Its replacement is fetched at once, so that the replay does not wait; but that
            # skips the interval between fetches only once in ten: an API that refuses every
            # token must not make the proxy ask the token endpoint at the rate requests come.
            now = self._clock()
            if now - self._waived_at >= 10 * self._min_interval:
                self._asked_at, self._waived_at = float("-inf"), now

    async def close(self) -> None:
        """Cancel a fetch in flight."""
        if self._inflight is not None:
            self._inflight.cancel()
            await asyncio.gather(self._inflight, return_exceptions=True)

    def _start_fetch(self, *, background: bool) -> asyncio.Task[Token]:
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._refresh(background))
            # Retrieve the outcome so a failed background refresh is not reported as unhandled.
            self._inflight.add_done_callback(lambda t: t.cancelled() or t.exception())
        return self._inflight

    async def _refresh(self, background: bool) -> Token:
        try:
            token = await self._fetch_with_retries()
        except TokenError as exc:
            self._failures += 1
            self._error = exc
            if self.failing_since is None:
                self.failing_since = time.time()
            backoff = self._backoff(exc)
            self._next_attempt = self._clock() + backoff
            exc.retry_after = backoff
            current = self.current
            if background and current is not None:
                log.warning(
                    "token refresh ahead of expiry failed: %s; the current token stays in use "
                    "for %.0f s",
                    exc.message,
                    current.expires_at - self._clock(),
                )
            else:
                log.error("could not obtain an access token: %s", exc.message)
            raise
        finally:
            self._inflight = None
        self._token, self._stale_at = token, self._refresh_at(token)
        self.refreshed_at = time.time()
        self._failures, self._error, self._next_attempt = 0, None, float("-inf")
        self.failing_since = None
        short_lived, self._short_lived = self._short_lived, token.lifetime < self._min_interval
        if self._short_lived and not short_lived:
            log.warning(
                "token endpoint issues tokens valid for only %.3g s; requests wait for each "
                "new one, and it is asked at most once every %.3g s",
                token.lifetime,
                self._min_interval,
            )
        log.info(
            "access token %s, valid for %.0f s",
            "refreshed ahead of expiry" if background else "fetched",
            token.lifetime,
        )
        return token

    async def _fetch_with_retries(self) -> Token:
        # Every try waits out the interval since the endpoint was last asked.
        wait = self._asked_at + self._min_interval - self._clock()
        attempt = 1
        while True:
            if wait > 0:
                await self._sleep(wait)
            self._asked_at = self._clock()
            try:
                return await self._fetch()
            except TokenError as exc:
                if exc.retry_after is not None:
                    wait = exc.retry_after
                else:
                    wait = self._retry_delay * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)
                if exc.permanent or attempt >= self._attempts or wait > self._max_retry_wait:
                    raise
                # Retries keep the interval too, whatever Retry-After says.
                wait = max(wait, self._asked_at + self._min_interval - self._clock())
                log.info("token request failed (%s); retrying in %.1f s", exc.message, wait)
            attempt += 1

    def _backoff(self, exc: TokenError) -> float:
        base, cap = (30.0, MAX_BACKOFF) if exc.permanent else (1.0, 60.0)
        delay = min(cap, base * 2.0 ** (self._failures - 1)) * random.uniform(0.75, 1.0)
        return max(delay, exc.retry_after or 0.0)
