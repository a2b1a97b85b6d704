"""A local MetaDefender Cloud and OAuth tenant, for the tests, the demo and offline integration.

It answers like the real service where that matters to a client: the client-credentials token
endpoint with HTTP Basic authentication, bearer tokens that expire (401009) or are unknown
(401010), the ``apikey`` header (401006), MetaDefender's error shape, the file, apikey and
lookup calls (hash, IP, domain, URL, CVE, one at a time or in bulk), and the account's quotas:
a count per interval for each limit type, throttles and a cap on concurrent calls, with the
rate-limit headers and 429 answers (429000, 429001, 429002) they give. It keeps the newest
requests it saw in ``requests`` so tests can check what arrived, byte for byte.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import math
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["LIMIT_TYPES", "SeenRequest", "Simulator"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

LIMIT_TYPES = ("reputation_api", "prevention_api", "sandbox_api", "feed_api")
DEFAULT_LIMIT = 4000  # calls per interval of a limit type the simulator is not told about
MAX_BULK = 1000  # items in one bulk lookup
MAX_BULK_BODY = 1024 * 1024  # bytes; a larger body is refused like bad JSON
# Lookup answers are derived from the value alone, so these stay fixed too.
_REPORT_TIME = "2024-01-01T00:00:00.000Z"
_PROVIDERS = ("webroot.com", "avira.com", "isc.sans.edu", "phishtank.com")


@dataclass
class SeenRequest:
    """One request as it reached the simulator."""

    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body_sha256: str | None = None
    body_size: int = 0
    peer: Any = None  # the client's (host, port): which connection it came on

    def header(self, name: str) -> list[str]:
        """Every value of header ``name``, in order."""
        return [v for k, v in self.headers if k.lower() == name.lower()]


_SEEN = web.RequestKey("seen", SeenRequest)


def md_error(status: int, code: int, message: str) -> web.Response:
    """An error in MetaDefender Cloud's shape."""
    return web.json_response({"error": {"code": code, "messages": [message]}}, status=status)


@dataclass
class _Window:
    """Calls counted in a window of fixed length that opens at its first call."""

    start: float | None = None
    used: int = 0

    def left(self, now: float, length: float) -> float:
        """Seconds until the window closes (all of it when none is open); closes it if due."""
        if self.start is not None and now >= self.start + length:
            self.start, self.used = None, 0
        return length if self.start is None else self.start + length - now

    def count(self, now: float, calls: int) -> None:
        if self.start is None:
            self.start = now
        self.used += calls


def _interval_name(seconds: float) -> str:
    return "daily" if seconds == 86400 else f"{seconds:g}"


def _seconds(left: float) -> int:
    return max(1, math.ceil(left))


@dataclass
class _Upload:
    data_id: str
    name: str
    size: int
    sha256: str
    sha1: str
    md5: str


@dataclass
class Simulator:
    """MetaDefender Cloud on loopback. Build its app with ``app()``.

    ``token_lifetime`` is the ``expires_in`` it announces; ``revoke_after``, if set, is when it
    really stops accepting a token (a token revoked early, or clocks that disagree).
    ``early_reject`` makes ``POST /v4/file`` refuse a bad token at once, without reading the
    upload, and drop the connection. ``token_failure`` = (status, body[, headers]) makes the
    token endpoint answer that instead of a token. ``requests`` holds the newest
    ``max_requests`` requests, oldest first, so a simulator left running stays small.

    Quotas, per limit type (`LIMIT_TYPES`): lookups (``GET /v4/hash|ip|domain|url|cve/X`` and
    the bulk ``POST /v4/hash|ip|domain|url``) count against ``reputation_api``, a bulk one of N
    items counts N; uploads (``POST /v4/file``) against ``prevention_api``. ``limits`` is the
    count allowed per ``limit_interval`` seconds (a type it does not name: 4000); the interval
    starts at the first counted call of that type, on ``clock``. A call that would go past the
    limit gets 429 code 429000 and counts nothing. Answers that count, 404003 included, carry
    ``X-RateLimit-For``, ``-Interval`` (``daily`` for 86400, else the seconds), ``-Limit``,
    ``-Used``, ``-Remaining`` and ``-Reset-In`` (``3294s``). Polls (``GET /v4/file/ID``),
    ``GET /v4/apikey/`` and ``/v4/apikey/limits/status`` count nothing but carry the headers of
    ``prevention_api`` and ``reputation_api`` as they stand; the limits status answers what
    remains of each type, and ``GET /v4/apikey/`` the configured limits.

    ``throttles`` maps a limit type to (calls, window seconds): past that many calls in a window
    (opened by its first call; a bulk lookup is one call), 429 code 429001 with the quota's
    headers except ``X-RateLimit-Reset-In``, which with ``Retry-After`` says when the window
    closes. ``max_concurrent`` caps the calls of a limit type being answered at once: past it,
    429 code 429002. Both are off by default. While ``gate`` is an unset event, counted calls
    wait for it before answering, so a test can hold calls in flight (``in_flight`` counts them
    per limit type). Throttles and the cap are checked before the quota.

    Lookups answer the same bytes for the same value: a report derived from the value, or, for
    a value containing ``unknown`` or listed in ``unknown_values`` (and for a hash of nothing
    uploaded), 404 code 404003; in a bulk answer such an item is ``{KEY: value, "error": ...}``
    and every other item is the single lookup's report.

    For tests to assert: ``served`` counts what was counted against each limit type (a bulk
    lookup of N counts N; refusals and 429s count nothing), ``throttled`` counts the 429s by
    their code (429000, 429001, 429002), ``lookups`` counts the lookup requests that arrived,
    whatever they were answered (a bulk one counts once).
    """

    client_id: str = "demo-client"
    client_secret: str = field(default="demo-secret", repr=False)
    api_key: str | None = field(default=None, repr=False)
    token_lifetime: float = 3600.0
    revoke_after: float | None = None
    early_reject: bool = False
    token_failure: tuple[int, bytes] | tuple[int, bytes, dict[str, str]] | None = None
    clock: Callable[[], float] = time.monotonic
    token_requests: int = 0
    max_requests: int = 10_000
    limits: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(LIMIT_TYPES, DEFAULT_LIMIT)
    )
    limit_interval: float = 86400.0
    throttles: dict[str, tuple[int, float]] = field(default_factory=dict)
    max_concurrent: dict[str, int] = field(default_factory=dict)
    unknown_values: set[str] = field(default_factory=set)
    gate: asyncio.Event | None = field(default=None, repr=False)
    served: Counter[str] = field(default_factory=Counter, repr=False)
    throttled: Counter[int] = field(default_factory=Counter, repr=False)
    lookups: int = 0
    in_flight: Counter[str] = field(default_factory=Counter, repr=False)
    requests: list[SeenRequest] = field(default_factory=list, repr=False)
    seen_requests: int = 0  # all of them, kept or not
    issued_tokens: list[str] = field(default_factory=list, repr=False)
    expired_tokens: set[str] = field(default_factory=set, repr=False)  # answered with 401009
    _tokens: dict[str, float] = field(default_factory=dict, repr=False)
    _uploads: dict[str, _Upload] = field(default_factory=dict, repr=False)
    _quotas: dict[str, _Window] = field(default_factory=dict, repr=False)
    _throttle_windows: dict[str, _Window] = field(default_factory=dict, repr=False)

    def expire_tokens(self) -> None:
        """From now on, every token issued so far is answered with 401009."""
        for token in self._tokens:
            self._tokens[token] = float("-inf")

    def app(self) -> web.Application:
        """The simulator as an aiohttp application."""
        app = web.Application(middlewares=[self._record])
        app.router.add_post("/v4/oauth2/token", self._token)
        app.router.add_post("/v4/file", self._upload)
        app.router.add_get("/v4/file/{data_id}", self._file_report)
        app.router.add_get("/v4/hash/{value}", self._lookup("hash", self._hash_report))
        app.router.add_get("/v4/ip/{value}", self._lookup("address", self._reputation))
        app.router.add_get("/v4/domain/{value}", self._lookup("address", self._reputation))
        # aiohttp matches on the path with %2F still encoded, then decodes it in match_info.
        app.router.add_get(r"/v4/url/{value:[\s\S]+}", self._lookup("address", self._reputation))
        app.router.add_get("/v4/cve/{value}", self._lookup("cve", self._cve_report))
        app.router.add_post("/v4/hash", self._bulk("hash", "hash", self._hash_report))
        app.router.add_post("/v4/ip", self._bulk("address", "address", self._reputation))
        app.router.add_post("/v4/domain", self._bulk("fqdn", "address", self._reputation))
        app.router.add_post("/v4/url", self._bulk("url", "address", self._reputation))
        app.router.add_get("/v4/apikey/", self._apikey_info)
        app.router.add_get("/v4/apikey/limits/status", self._limits)
        app.router.add_route("*", r"/{tail:[\s\S]*}", self._not_found)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        seen = SeenRequest(
            request.method,
            request.raw_path,
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
            peer=request.transport.get_extra_info("peername") if request.transport else None,
        )
        # A list, not a deque: tests slice it. Dropping its head costs about 2 us at 10,000.
        self.requests.append(seen)
        if len(self.requests) > self.max_requests:
            del self.requests[: len(self.requests) - self.max_requests]
        self.seen_requests += 1
        request[_SEEN] = seen
        return await handler(request)

    # -- OAuth ----------------------------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        if self.token_failure is not None:
            status, body, *headers = self.token_failure
            return web.Response(
                status=status,
                body=body,
                content_type="application/json",
                headers=headers[0] if headers else None,
            )
        if not self._client_authenticated(request.headers.get("Authorization", "")):
            return web.json_response(
                {"error": "invalid_client", "error_description": "Client authentication failed"},
                status=401,
                headers={"WWW-Authenticate": 'Basic realm="oauth2"'},
            )
        form = await request.post()
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        token = secrets.token_urlsafe(32)
        now = self.clock()
        valid_for = self.token_lifetime if self.revoke_after is None else self.revoke_after
        self._tokens = {t: exp for t, exp in self._tokens.items() if exp > now}
        self._tokens[token] = now + valid_for
        self.issued_tokens.append(token)
        return web.json_response(
            {"access_token": token, "expires_in": int(self.token_lifetime), "token_type": "Bearer"}
        )

    def _client_authenticated(self, authorization: str) -> bool:
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            client_id, _, client_secret = (
                base64.b64decode(encoded, validate=True).decode().partition(":")
            )
        except (binascii.Error, UnicodeDecodeError):
            return False
        return hmac.compare_digest(
            client_id.encode(), self.client_id.encode()
        ) and hmac.compare_digest(client_secret.encode(), self.client_secret.encode())

    def _refusal(self, request: web.Request) -> web.Response | None:
        """The 401 a real API would give, or None when the caller is authenticated."""
        if self.api_key is not None and not hmac.compare_digest(
            request.headers.get("apikey", "").encode(), self.api_key.encode()
        ):
            return md_error(401, 401006, "Invalid apikey")
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            if self.api_key is not None:
                return None  # authenticated by apikey alone
            return md_error(401, 401010, "OAuth token is invalid")
        expires = self._tokens.get(token)
        if expires is None:
            return md_error(401, 401010, "OAuth token is invalid")
        if self.clock() >= expires:
            self.expired_tokens.add(token)
            return md_error(401, 401009, "OAuth token has expired")
        return None

    # -- quotas ---------------------------------------------------------------------------------

    def _limit(self, kind: str) -> int:
        return self.limits.get(kind, DEFAULT_LIMIT)

    def remaining(self, kind: str) -> int:
        """What is left of limit type ``kind`` in its current interval."""
        quota = self._quotas.setdefault(kind, _Window())
        quota.left(self.clock(), self.limit_interval)
        return max(0, self._limit(kind) - quota.used)

    def _rate_headers(self, kind: str) -> dict[str, str]:
        """The rate-limit headers MetaDefender puts on answers, as limit type ``kind`` stands."""
        quota = self._quotas.setdefault(kind, _Window())
        left = quota.left(self.clock(), self.limit_interval)
        return {
            "X-RateLimit-For": kind,
            "X-RateLimit-Interval": _interval_name(self.limit_interval),
            "X-RateLimit-Limit": str(self._limit(kind)),
            "X-RateLimit-Used": str(quota.used),
            "X-RateLimit-Remaining": str(max(0, self._limit(kind) - quota.used)),
            "X-RateLimit-Reset-In": f"{_seconds(left)}s",
        }

    def _with_rate_headers(self, response: web.Response, kind: str) -> web.Response:
        response.headers.update(self._rate_headers(kind))
        return response

    def _too_many(self, code: int, message: str, headers: dict[str, str]) -> web.Response:
        self.throttled[code] += 1
        response = md_error(429, code, message)
        response.headers.update(headers)
        return response

    def _admit(self, kind: str, cost: int) -> web.Response | None:
        """Count a call of ``cost`` against ``kind``, or the 429 that refuses it."""
        now = self.clock()
        headers = self._rate_headers(kind)
        cap = self.max_concurrent.get(kind)
        if cap is not None and self.in_flight[kind] >= cap:
            message = f"Too many concurrent connections, at most {cap} for {kind}"
            return self._too_many(429002, message, headers)
        window = self._throttle_windows.setdefault(kind, _Window())
        throttle = self.throttles.get(kind)
        if throttle is not None:
            calls, length = throttle
            left = window.left(now, length)
            if window.used >= calls:
                wait = str(_seconds(left))
                headers.update({"X-RateLimit-Reset-In": wait + "s", "Retry-After": wait})
                message = f"API key throttled, retry after the throttle is reset in {wait}s"
                return self._too_many(429001, message, headers)
        quota = self._quotas[kind]  # made by _rate_headers
        if quota.used + cost > self._limit(kind):
            message = (
                "API key limit exceeded, retry after the limit is reset. "
                f"The limit will be reset in {headers['X-RateLimit-Reset-In']}"
            )
            return self._too_many(429000, message, headers)
        if throttle is not None:
            window.count(now, 1)
        quota.count(now, cost)
        self.served[kind] += cost
        return None

    async def _metered(
        self, kind: str, cost: int, answer: Callable[[], Awaitable[web.Response]]
    ) -> web.Response:
        """``answer()`` counted against ``kind``, with its headers; or the 429 instead."""
        refused = self._admit(kind, cost)
        if refused is not None:
            return refused
        self.in_flight[kind] += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
            response = await answer()
        finally:
            self.in_flight[kind] -= 1
        return self._with_rate_headers(response, kind)

    # -- API ------------------------------------------------------------------------------------

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        refusal = self._refusal(request)
        if refusal is not None:
            if self.early_reject:
                # Answer before the upload is read, then hang up, as a busy gateway does.
                refusal.force_close()
                await refusal.prepare(request)
                await refusal.write_eof()
                if request.transport is not None:
                    request.transport.close()
                return refusal
            await self._consume(request)  # read it all, then refuse (keeps the connection)
            return refusal

        async def accept() -> web.Response:
            sha256, sha1, md5, size = await self._consume(request)
            name = request.headers.get("filename", "unnamed")
            upload = _Upload(uuid.uuid4().hex, name, size, sha256, sha1, md5)
            self._uploads[upload.data_id] = upload
            answer = {
                "data_id": upload.data_id,
                "status": "inqueue",
                "in_queue": 0,
                "queue_priority": "normal",
                "sha1": upload.sha1.upper(),
                "sha256": upload.sha256.upper(),
            }
            return web.json_response(answer)

        response = await self._metered("prevention_api", 1, accept)
        if response.status == 429:
            await self._consume(request)  # as with a refusal: the connection stays usable
        return response

    async def _consume(self, request: web.Request) -> tuple[str, str, str, int]:
        """Read the body as it streams in; record its size and digest on the SeenRequest."""
        sha256, sha1, md5, size = hashlib.sha256(), hashlib.sha1(), hashlib.md5(), 0  # noqa: S324
        async for chunk in request.content.iter_any():
            size += len(chunk)
            sha256.update(chunk)
            sha1.update(chunk)
            md5.update(chunk)
        seen = request[_SEEN]
        seen.body_sha256, seen.body_size = sha256.hexdigest(), size
        return sha256.hexdigest(), sha1.hexdigest(), md5.hexdigest(), size

    def _report(self, upload: _Upload) -> dict[str, Any]:
        return {
            "data_id": upload.data_id,
            "file_info": {
                "display_name": upload.name,
                "file_size": upload.size,
                "md5": upload.md5.upper(),
                "sha1": upload.sha1.upper(),
                "sha256": upload.sha256.upper(),
            },
            "scan_results": {
                "progress_percentage": 100,
                "scan_all_result_a": "No Threat Detected",
                "scan_all_result_i": 0,
                "total_avs": 0,
            },
        }

    async def _file_report(self, request: web.Request) -> web.Response:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        upload = self._uploads.get(request.match_info["data_id"])
        if upload is None:
            return md_error(404, 404008, "The data_id was not found")
        # A poll counts against no quota, as far as anyone has reported.
        return self._with_rate_headers(web.json_response(self._report(upload)), "prevention_api")

    # -- lookups --------------------------------------------------------------------------------

    def _unknown(self, value: str) -> bool:
        wanted = value.lower()
        return "unknown" in wanted or wanted in {v.lower() for v in self.unknown_values}

    def _hash_report(self, value: str) -> dict[str, Any] | None:
        wanted = value.lower()
        for upload in self._uploads.values():
            if wanted in (upload.md5, upload.sha1, upload.sha256):
                return self._report(upload)
        return None

    def _reputation(self, value: str) -> dict[str, Any] | None:
        if self._unknown(value):
            return None
        digest = hashlib.sha256(value.encode()).digest()
        detected = digest[0] % (len(_PROVIDERS) + 1)
        sources = [
            {
                "provider": provider,
                "assessment": "high risk" if i < detected else "trustworthy",
                "detect_time": _REPORT_TIME if i < detected else "",
                "update_time": _REPORT_TIME,
                "status": 1 if i < detected else 0,
            }
            for i, provider in enumerate(_PROVIDERS)
        ]
        results = {"start_time": _REPORT_TIME, "detected_by": detected, "sources": sources}
        return {"address": value, "lookup_results": results}

    def _cve_report(self, value: str) -> dict[str, Any] | None:
        if self._unknown(value):
            return None
        digest = hashlib.sha256(value.upper().encode()).digest()
        score = round(digest[0] / 255 * 10, 1)
        return {
            "cve": value.upper(),
            "cvss": {"score": score, "vector": "AV:N/AC:L/Au:N/C:P/I:P/A:P"},
            "severity": "high" if score >= 7 else "medium" if score >= 4 else "low",
            "published_date": _REPORT_TIME,
            "last_modified_date": _REPORT_TIME,
        }

    def _lookup(
        self, key: str, report: Callable[[str], dict[str, Any] | None]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        """The handler of ``GET /v4/KIND/{value}``: the report, or 404003 for an unknown value."""

        async def handle(request: web.Request) -> web.Response:
            self.lookups += 1
            refusal = self._refusal(request)
            if refusal is not None:
                return refusal
            value = request.match_info["value"]

            async def answer() -> web.Response:
                found = report(value)
                if found is None:
                    return md_error(404, 404003, f"The {key} was not found: {value}")
                return web.json_response(found)

            return await self._metered("reputation_api", 1, answer)

        return handle

    def _bulk(
        self, field_name: str, key: str, report: Callable[[str], dict[str, Any] | None]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        """The handler of ``POST /v4/KIND`` with ``{field_name: [values]}``: ``{"data": [...]}``."""

        async def handle(request: web.Request) -> web.Response:
            self.lookups += 1
            body = await self._read(request)  # read it all first, as for any refusal
            refusal = self._refusal(request)
            if refusal is not None:
                return refusal
            try:
                values = json.loads(body)[field_name]
            except (ValueError, KeyError, TypeError):
                values = None
            if (
                not isinstance(values, list)
                or not 0 < len(values) <= MAX_BULK
                or not all(isinstance(v, str) for v in values)
            ):
                message = (
                    f'The body must be JSON {{"{field_name}": [...]}} with 1 to {MAX_BULK} strings'
                )
                return md_error(400, 400000, message)

            async def answer() -> web.Response:
                data = []
                for value in values:
                    found = report(value)
                    if found is None:
                        error = {"code": 404003, "messages": [f"The {key} was not found"]}
                        found = {key: value, "error": error}
                    data.append(found)
                return web.json_response({"data": data})

            return await self._metered("reputation_api", len(values), answer)

        return handle

    async def _read(self, request: web.Request) -> bytes:
        """The body if it is small (else b""); its size and digest go on the SeenRequest."""
        body, digest, size = bytearray(), hashlib.sha256(), 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            digest.update(chunk)
            if size <= MAX_BULK_BODY:
                body += chunk
        seen = request[_SEEN]
        seen.body_sha256, seen.body_size = digest.hexdigest(), size
        return bytes(body) if size <= MAX_BULK_BODY else b""

    # -- the account ----------------------------------------------------------------------------

    async def _apikey_info(self, request: web.Request) -> web.Response:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        info = {
            "paid_user": 0,
            "limit_interval": _interval_name(self.limit_interval),
            "limit_prevention": self._limit("prevention_api"),
            "limit_reputation": self._limit("reputation_api"),
            "max_upload_file_size": 140,
            "qos_scan": "normal",
        }
        return self._with_rate_headers(web.json_response(info), "reputation_api")

    async def _limits(self, request: web.Request) -> web.Response:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        status = {
            kind: self.remaining(kind) for kind in {**dict.fromkeys(LIMIT_TYPES), **self.limits}
        }
        return self._with_rate_headers(web.json_response(status), "reputation_api")

    async def _not_found(self, request: web.Request) -> web.Response:
        await self._consume(request)
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        return md_error(404, 404000, "Endpoint not found")
