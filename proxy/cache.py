"""The quota guard: each lookup answer costs the account's quota once.

Lookups whose answer depends on nothing but the request (hash, IP, domain, URL and CVE
reputation, and their bulk forms) are kept for ``cache.ttl`` (a "not found" for
``cache.miss_ttl``); identical lookups in flight at once cause one upstream request
(coalescing, as nginx's ``proxy_cache_lock``); when the upstream cannot answer (quota used
up, 5xx, unreachable) an entry up to ``cache.stale_ttl`` past its lifetime is served instead
(as ``proxy_cache_use_stale``). With ``cache.uploads``, an upload of the same bytes with the
same scan options gets the earlier answer (its ``data_id``). Every answer on a cacheable route
says how it was served in ``X-Cache-Status``: MISS, HIT, BYPASS or STALE.

With a ``SharedStore`` (``cache.redis_url``), the answers and uploads are kept in Redis as well,
and a flight goes upstream in one replica of the fleet only: requests coalesce in process
first, then the flight asks Redis (one round trip; on a miss one more for the lock before
the upstream, and two in the background after the callers have the answer: storing it, then
giving the lock up), while other replicas wait for its answer (proxy/shared.py).

The key is written down in ``LookupCache.key``: the upstream identity (digests of the OAuth
client id and the apikey that goes upstream), method, raw path (a hash folded to lower case),
query, the body's digest, and every request header but those in ``IGNORED_HEADERS``.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from cachetools import LRUCache, TTLCache

from .body import ReplayableBody
from .errors import ProxyError
from .forward import CACHE_STATUS, NOT_FORWARDED, Answer, Captured, Forwarder
from .observe import CACHE, Metrics, request_target
from .quota import USED_UP, error_code
from .shared import Claim, SharedStore

__all__ = ["IGNORED_HEADERS", "LookupCache"]

log = logging.getLogger("mdcloud_proxy.cache")


_LOOKUP = re.compile(r"^/v4/(?:(hash|ip|domain|cve)/[^/?]+|url/[^?]+)(?:\?|$)")
_BULK = re.compile(r"^/v4/(?:hash|ip|domain|url)(?:\?|$)")
_UPLOAD = re.compile(r"^/v4/file(?:\?|$)")
# Headers that cannot change MetaDefender's answer: those never forwarded (framing,
# hop-by-hop, the caller's Authorization and proxy key), tracing, the caller's own cache
# directives. Everything else is part of the key; for an upload, every one of them is a scan
# option (filename, rule, sandbox, archivepwd, ...: README lists them).
IGNORED_HEADERS = NOT_FORWARDED | {
    "apikey",  # in the key as part of the upstream identity
    "user-agent",
    "cache-control",
    "pragma",
    "traceparent",
    "tracestate",
    "x-request-id",
    "x-correlation-id",
    "x-amzn-trace-id",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "b3",
}
UPLOADS_KEPT = 10_000  # answers of uploads remembered for dedup, newest first
_NOT_FOUND = 404003
_ENTRY_OVERHEAD = 256  # bytes an entry costs besides its body and headers
ANSWERS, UPLOADS = "answer", "upload"  # what the fleet's store keeps, apart


@dataclass(frozen=True)
class _Entry:
    """A kept answer and its times, on this process's clock."""

    answer: Answer
    stored_at: float
    fresh_until: float
    stale_until: float

    @property
    def size(self) -> int:
        headers = sum(len(k) + len(v) for k, v in self.answer.headers)
        return len(self.answer.body) + headers + _ENTRY_OVERHEAD

    def encode(self, to_wall: Callable[[float], float]) -> bytes:
        """The entry for the fleet's store (its times as every replica reads them)."""
        answer = self.answer
        head = {
            "status": answer.status,
            "reason": answer.reason,
            "headers": answer.headers,
            "stored_at": to_wall(self.stored_at),
            "fresh_until": to_wall(self.fresh_until),
            "stale_until": to_wall(self.stale_until),
        }
        return json.dumps(head, separators=(",", ":")).encode() + b"\n" + answer.body

    @classmethod
    def decode(cls, value: bytes, from_wall: Callable[[float], float]) -> _Entry | None:
        """An entry from the fleet's store, or None if it is not one."""
        line, _, body = value.partition(b"\n")
        try:
            head: Any = json.loads(line)
            status, reason, headers = head["status"], head["reason"], head["headers"]
            times = [from_wall(float(head[k])) for k in ("stored_at", "fresh_until", "stale_until")]
        except (ValueError, TypeError, KeyError):
            return None
        pairs = [tuple(pair) for pair in headers] if isinstance(headers, list) else None
        if (
            not (isinstance(status, int) and 100 <= status <= 599 and isinstance(reason, str))
            or pairs is None
            or not all(len(p) == 2 and all(_header_text(x) for x in p) for p in pairs)
        ):
            return None
        return cls(Answer(status, reason, pairs, body), *times)


# What a flight ends with: the upstream's answer, the fleet's, or why there is none.
_Flown = Captured | _Entry | ProxyError


def _directives(value: str) -> set[str]:
    return {part.strip().split("=", 1)[0].lower() for part in value.split(",") if part.strip()}


def _asked(request: web.BaseRequest) -> set[str]:
    """The caller's Cache-Control directives."""
    return _directives(",".join(request.headers.getall("Cache-Control", ())))


class LookupCache:
    """The lookup cache, coalescing and upload dedup of one proxy (in process)."""

    def __init__(
        self,
        *,
        forwarder: Forwarder,
        metrics: Metrics,
        identity: str,
        api_key: str | None,
        ttl: float,
        miss_ttl: float,
        stale_ttl: float,
        max_size: int,
        max_entry_size: int,
        uploads: bool,
        upload_ttl: float,
        shared: SharedStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._forwarder = forwarder
        self._metrics = metrics
        self._identity = identity
        self._api_key_digest = None if api_key is None else _digest(api_key)
        self._counted = {  # prometheus-client's labels() takes a lock: once, not per request
            status: metrics.cache_requests.labels(status.lower())
            for status in ("HIT", "MISS", "BYPASS", "STALE")
        }
        self._ttl, self._miss_ttl, self._stale_ttl = ttl, miss_ttl, stale_ttl
        self._max_entry_size = max_entry_size
        self._uploads = uploads
        self._upload_ttl = upload_ttl
        self._shared = shared
        # What may come back from the fleet's store: an entry's body and headers, escaped.
        self._fleet_limit = 2 * max_entry_size + 65536
        self._clock = clock
        self._entries: LRUCache[bytes, _Entry] = LRUCache(
            maxsize=max_size, getsizeof=lambda entry: entry.size
        )
        self._inflight: dict[bytes, asyncio.Task[_Flown]] = {}
        self._flights: set[asyncio.Task[_Flown]] = set()
        self._uploaded: TTLCache[bytes, _Entry] = TTLCache(
            maxsize=UPLOADS_KEPT, ttl=upload_ttl, timer=clock
        )
        metrics.cache_entries.set_function(lambda: self.entries)
        metrics.cache_bytes.set_function(lambda: self.size)

    def __repr__(self) -> str:
        return f"LookupCache(entries={len(self._entries)}, bytes={self._entries.currsize})"

    @property
    def entries(self) -> int:
        """How many answers are kept."""
        return len(self._entries)

    @property
    def size(self) -> int:
        """The bytes the kept answers take."""
        return int(self._entries.currsize)

    def wants(self, request: web.BaseRequest) -> bool:
        """Whether ``request`` is one the guard answers (a lookup, or an upload to dedup)."""
        path = request.raw_path
        if request.method == "GET":
            return _LOOKUP.match(path) is not None
        if request.method == "POST":
            if _BULK.match(path) is not None:
                return True
            return self._uploads and _UPLOAD.match(path) is not None
        return False

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        """Answer a request ``wants`` took, from the cache or upstream."""
        if request.method == "POST" and _UPLOAD.match(request.raw_path):
            return await self._upload(request)
        directives = _asked(request)
        refresh = "no-cache" in directives
        if "no-store" in directives:
            return await self._bypass(request)
        body, digest = None, ""
        if request.method == "POST":
            length = request.content_length
            if length is None or length > self._max_entry_size:
                return await self._bypass(request)  # the body is the key: too large to keep
            body = self._forwarder.body_of(request)
        handed = False  # a request that leads a flight hands it its body
        try:
            if body is not None:
                digest = await body.read_all()
            key = self.key(request, digest)
            now = self._clock()
            entry = self._entries.get(key)
            if entry is not None and now >= entry.stale_until:
                del self._entries[key]
                entry = None
            if entry is not None and now < entry.fresh_until and not refresh:
                return self._serve(request, entry.answer, "HIT", now - entry.stored_at)
            flight = self._inflight.get(key)
            leader = flight is None
            if flight is None:
                flight = self._fly(request, key, body, ANSWERS, refresh=refresh)
                handed = True
            else:
                self._metrics.cache_coalesced.inc()
            return await self._answer(request, key, flight, leader, entry, None if handed else body)
        finally:
            if body is not None and not handed:
                body.close()

    def _fly(
        self,
        request: web.BaseRequest,
        key: bytes,
        body: ReplayableBody | None,
        space: str,
        *,
        refresh: bool = False,
    ) -> asyncio.Task[_Flown]:
        """Send ``request`` upstream for everybody who asks for ``key`` meanwhile."""
        flight = asyncio.create_task(self._fetch(request, key, body, space, refresh))
        self._inflight[key] = flight
        self._flights.add(flight)
        flight.add_done_callback(lambda _: self._inflight.pop(key, None))
        flight.add_done_callback(self._flights.discard)
        return flight

    async def close(self) -> None:
        """Cancel the requests in flight (at shutdown, after the callers have gone)."""
        for flight in list(self._flights):
            flight.cancel()
        await asyncio.gather(*self._flights, return_exceptions=True)

    def key(self, request: web.BaseRequest, body_digest: str) -> bytes:
        """The digest two requests share exactly when MetaDefender gives them one answer."""
        upstream_key = self._api_key_digest or _digest(request.headers.get("apikey", ""))
        path, _, query = request.raw_path.partition("?")
        if path.startswith("/v4/hash/"):
            path = path.lower()  # hex digests, in any case
        headers = sorted(
            (name.lower(), value)
            for name, value in request.headers.items()
            if name.lower() not in IGNORED_HEADERS
        )
        # Each part and each header ends in a NUL: no two lists of them read alike.
        text = "\0".join((self._identity, upstream_key, request.method, path, query, body_digest))
        text += "\0" + "".join(f"{name}:{value}\0" for name, value in headers)
        return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()

    async def _answer(
        self,
        request: web.BaseRequest,
        key: bytes,
        flight: asyncio.Task[_Flown],
        leader: bool,
        stale: _Entry | None,
        body: ReplayableBody | None,
    ) -> web.StreamResponse:
        """The answer of the request in flight for ``key``, or a stale entry instead;
        ``body`` is a waiter's own, for when it must go upstream itself."""
        try:
            # shield: a caller who hangs up, the first included, cancels nobody's answer.
            result = await asyncio.shield(flight)
        except asyncio.CancelledError:
            if leader:
                flight.add_done_callback(_close_unread)
            raise
        now = self._clock()
        if isinstance(result, _Entry):  # another replica's answer, from the fleet's store
            return self._serve(request, result.answer, "HIT", now - result.stored_at)
        stale = stale or self._stale(key, now)  # perhaps one the fleet's store had
        if isinstance(result, ProxyError):
            if stale is not None:
                return self._serve(request, stale.answer, "STALE", now - stale.stored_at)
            # A copy for each waiter: one exception raised again and again would grow its
            # traceback by every waiter's frames.
            raise copy.copy(result) from None
        answer = result.answer
        if answer is None:  # too large to keep: its first caller streams it, others ask again
            if leader and result.open is not None:
                self._count(request, "BYPASS")
                return await self._forwarder.relay(request, result.open, result.start, "BYPASS")
            return await self._bypass(request, body)
        if stale is not None and self._failed(answer):
            return self._serve(request, stale.answer, "STALE", now - stale.stored_at)
        if not leader:
            if _private(answer):  # another caller's cookie is not to be shared
                return await self._bypass(request, body)
            return self._serve(request, answer, "HIT", 0.0)
        kept = self._entries.get(key) or self._uploaded.get(key)
        stored = kept is not None and kept.answer is answer
        return self._serve(request, answer, "MISS" if stored else "BYPASS", None)

    async def _fetch(
        self,
        request: web.BaseRequest,
        key: bytes,
        body: ReplayableBody | None,
        space: str,
        refresh: bool,
    ) -> _Flown:
        """A flight: the fleet's answer if it has one, else the upstream's (kept)."""
        lead = None  # the fleet's lock on ``key``, ours until released
        shared: bytes | None = None  # what the fleet's store is to keep, and how long
        ttl = 0.0
        try:
            if self._shared is not None:
                found, lead = await self._ask_fleet(space, key, refresh)
                if found is not None:
                    return found
            try:
                captured = await self._forwarder.capture(request, self._max_entry_size, body)
            except ProxyError as exc:
                return exc
            except Exception as exc:  # nobody may be waiting: no exception must be left unread
                log.error("a cached lookup's upstream request failed: %s", type(exc).__name__)
                return ProxyError("the upstream request failed inside the proxy", code=500001)
            if captured.answer is not None:
                keep = self._remember_upload if space == UPLOADS else self._store
                kept = keep(key, captured.answer)
                if kept is not None and self._shared is not None:
                    shared = kept.encode(self._shared.to_wall)
                    shared = shared if len(shared) <= self._fleet_limit else None
                    ttl = kept.stale_until - self._clock()
            return captured
        finally:
            if body is not None:
                body.close()
            if self._shared is not None:
                # After the callers have their answer: store it, then give up the lock.
                self._shared.publish(space, key, shared, ttl, lead)

    async def _ask_fleet(
        self, space: str, key: bytes, refresh: bool
    ) -> tuple[_Entry | None, str | None]:
        """A fresh answer the fleet's store has for ``key``, or the lock to ask the upstream
        for it (None: another replica asked and stored nothing, or Redis could not say)."""
        assert self._shared is not None
        shared, limit = self._shared, self._fleet_limit
        until = shared.deadline()  # both calls together add at most cache.redis_timeout
        answered, value = await shared.load(space, key, limit, until)
        if not answered:
            return None, None  # one call that failed is all a request pays for Redis
        found = self._adopt(space, key, value)
        if not refresh and self._fresh(found):
            return self._found(space, found), None
        claim, token, value = await shared.claim(space, key, limit, until)
        found = self._adopt(space, key, value)
        if claim is Claim.LEAD:  # perhaps stored between the two calls
            return (None if refresh or not self._fresh(found) else self._found(space, found)), token
        if claim is Claim.FOLLOW and (refresh or not self._fresh(found)):
            # Another replica asks the upstream; its answer is newer than this request.
            followed = await shared.follow(space, key, limit)
            if refresh and followed == value:
                return None, None  # it kept no new answer: this one asks the upstream itself
            found = self._adopt(space, key, followed)
        return (self._found(space, found) if self._fresh(found) else None), None

    def _adopt(self, space: str, key: bytes, value: bytes | None) -> _Entry | None:
        """An entry from the fleet's store, kept here too (fresh or, for STALE, not)."""
        if value is None or self._shared is None:
            return None
        entry = _Entry.decode(value, self._shared.from_wall)
        now = self._clock()
        if entry is None or now >= entry.stale_until:
            return None
        # Another replica's clock may run ahead: no entry lives longer here than it could have.
        longest = self._upload_ttl if space == UPLOADS else self._ttl + self._stale_ttl
        entry = _Entry(
            entry.answer,
            min(entry.stored_at, now),
            min(entry.fresh_until, now + longest),
            min(entry.stale_until, now + longest),
        )
        if space == UPLOADS:
            self._uploaded[key] = entry
        elif entry.size <= min(self._max_entry_size, self._entries.maxsize):
            self._entries[key] = entry
        return entry

    def _fresh(self, entry: _Entry | None) -> bool:
        return entry is not None and self._clock() < entry.fresh_until

    def _found(self, space: str, entry: _Entry | None) -> _Entry | None:
        """``entry``, from the fleet's store; an upload's counted as one."""
        if space == UPLOADS and entry is not None:
            self._metrics.upload_dedup.inc()
            log.info("an upload the fleet has answered before: its answer")
        return entry

    def _stale(self, key: bytes, now: float) -> _Entry | None:
        entry = self._entries.get(key)
        return entry if entry is not None and now < entry.stale_until else None

    def _failed(self, answer: Answer) -> bool:
        """Whether an answer is one a stale entry is served instead of."""
        if answer.status >= 500:
            return True
        return answer.status == 429 and error_code(answer.body) == USED_UP

    def _store(self, key: bytes, answer: Answer) -> _Entry | None:
        """Keep a lookup's answer if it is one to keep; the entry kept."""
        if answer.status == 200:
            ttl = self._ttl
        elif answer.status == 404 and error_code(answer.body) == _NOT_FOUND:
            ttl = self._miss_ttl
        else:
            return None
        if _private(answer):
            return None
        now = self._clock()
        entry = _Entry(answer, now, now + ttl, now + ttl + self._stale_ttl)
        if entry.size > min(self._max_entry_size, self._entries.maxsize):
            return None
        self._entries[key] = entry
        return entry

    def _count(self, request: web.BaseRequest, status: str) -> None:
        request[CACHE] = status
        self._counted[status].inc()

    def _serve(
        self, request: web.BaseRequest, answer: Answer, status: str, age: float | None
    ) -> web.Response:
        self._count(request, status)
        extra = {CACHE_STATUS: status}
        if age is not None and status != "MISS":
            extra["Age"] = str(max(0, int(age)))
        return answer.response(extra)

    async def _bypass(
        self, request: web.BaseRequest, body: ReplayableBody | None = None
    ) -> web.StreamResponse:
        """Forward without the cache; ``body``: the caller's, when it was read already."""
        self._count(request, "BYPASS")
        return await self._forwarder(request, body=body, cache_status="BYPASS")

    async def _upload(self, request: web.BaseRequest) -> web.StreamResponse:
        directives = _asked(request)
        body = self._forwarder.body_of(request) if "no-store" not in directives else None
        if body is None:
            return await self._bypass(request)
        handed = False  # the upload that goes upstream hands its flight its body
        try:
            key = self.key(request, await body.read_all())
            earlier = self._uploaded.get(key)
            flight = self._inflight.get(key)
            if earlier is not None or flight is not None:
                # The same bytes and scan options, uploaded before or right now.
                self._metrics.upload_dedup.inc()
                log.info("%s: the same upload as another: its answer", request_target(request))
            if earlier is not None:
                return self._serve(request, earlier.answer, "HIT", None)
            leader = flight is None
            if flight is None:
                flight = self._fly(request, key, body, UPLOADS)
                handed = True
            return await self._answer(request, key, flight, leader, None, None if handed else body)
        finally:
            if not handed:
                body.close()

    def _remember_upload(self, key: bytes, answer: Answer) -> _Entry | None:
        if answer.status != 200 or b'"data_id"' not in answer.body or _private(answer):
            return None
        now = self._clock()
        until = now + self._upload_ttl
        entry = self._uploaded[key] = _Entry(answer, now, until, until)
        return entry


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def _private(answer: Answer) -> bool:
    """Whether an answer is the one caller's alone: it sets a cookie or says so."""
    for name, value in answer.headers:
        lowered = name.lower()
        if lowered == "set-cookie":
            return True
        if lowered == "cache-control" and _directives(value) & {"no-store", "private"}:
            return True
    return False


def _header_text(value: object) -> bool:
    return isinstance(value, str) and "\r" not in value and "\n" not in value


def _close_unread(flight: asyncio.Task[_Flown]) -> None:
    """A too-long answer whose first caller left: nobody will read the rest of it."""
    if not flight.cancelled() and flight.exception() is None:
        result = flight.result()
        if isinstance(result, Captured) and result.open is not None:
            result.open.close()
