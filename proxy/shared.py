"""The quota guard's state shared by a fleet of proxies through Redis, as a best effort.

With ``cache.redis_url``, replicas share lookup answers, flight locks (one replica asks the
upstream, the others wait for its answer), remembered uploads, throttle windows and the latest
quota figures. Redis only saves quota, so it never becomes the outage: each call is bounded by
``cache.redis_timeout``; an error or a timeout counts as "not shared" and the request goes on;
after three failures in a row, a circuit breaker stops asking for 1 s, doubling up to 30 s,
and the fleet sync (every half second) probes on its own. One warning per outage, one line
when Redis is back.

Keys are ``cache.redis_prefix``, a format version and digests. Values are sealed with an HMAC
keyed by the client secret and bound to their key, so a value this fleet did not write, or one
moved to another key, is ignored (and overwritten by the next answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from enum import Enum
from typing import Any, TypeVar

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeout

from .config import redis_address
from .logs import Throttled
from .observe import Metrics
from .quota import KINDS, LIMIT_TYPES, MAX_NAME, QuotaWatch

__all__ = ["Claim", "SharedStore", "first_words"]

log = logging.getLogger("mdcloud_proxy.cache")

T = TypeVar("T")

VERSION = b"1"  # of keys and values: a new format gets new keys
_MAC = 32
FIRST_BACKOFF, MAX_BACKOFF = 1.0, 30.0
FAILURES_TO_OPEN = 3
SYNC_SECONDS = 0.5
FIRST_POLL, MAX_POLL = 0.002, 0.05  # a follower's pauses while another replica fetches
POOL_CONNECTIONS = 64
HEALTH_CHECK_SECONDS = 30
# Hashes of the fleet's quota view: read one bounded page, kept an hour past the last write.
_VIEW_TTL_MS = 3_600_000
_MAX_FIELD = 2048  # bytes of a window or limit value we accept

# Deletes the flight lock only if it is still ours: it may have expired and been taken since.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Claim(Enum):
    """Who asks the upstream for a key, as Redis decided."""

    LEAD = "lead"  # this replica: the lock is ours until released
    FOLLOW = "follow"  # another replica is asking: wait for its answer
    ALONE = "alone"  # Redis could not say: ask without it


class _Breaker:
    """Whether Redis is worth asking: not for a while after it failed.

    It opens after ``FAILURES_TO_OPEN`` failures in a row, each of a call begun after the one
    before was seen to fail: calls that time out together (the machine stalled, or one slow
    moment of Redis) are one failure, not an outage. A call that began before the latest
    failure neither opens the breaker again nor closes it; only a later call (a probe) does.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._backoff = FIRST_BACKOFF
        self._until = 0.0
        self._seen = float("-inf")  # when the latest failure was seen
        self._failures = 0  # in a row
        self.down_since: float | None = None  # on the clock

    def allows(self) -> bool:
        return self._clock() >= self._until

    def failed(self, reason: str, started: float) -> None:
        if started < self._seen:
            return  # the same trouble as the failure before
        now = self._seen = self._clock()
        self._failures += 1
        if self.down_since is None and self._failures < FAILURES_TO_OPEN:
            return
        if self.down_since is None:
            self.down_since = now
            self._backoff = FIRST_BACKOFF
            log.warning(
                "Redis: %s; the quota guard works in this process alone until Redis answers "
                "again (asked again in %.0f s, then up to every %.0f s)",
                reason,
                self._backoff,
                MAX_BACKOFF,
            )
        else:
            self._backoff = min(MAX_BACKOFF, self._backoff * 2)
        self._until = now + self._backoff

    def succeeded(self, started: float) -> None:
        if started < self._seen:
            return  # it says nothing of Redis since the latest failure
        self._failures = 0
        if self.down_since is not None:
            gone = self._clock() - self.down_since
            log.info("Redis answers again after %.0f s: the quota guard is shared", gone)
            self.down_since, self._until = None, 0.0


class SharedStore:
    """The fleet's store in Redis; every method degrades to "nothing shared" on trouble."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        account: str,
        seal_key: bytes,
        timeout: float,
        lock_timeout: float,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        pool = ConnectionPool.from_url(
            url,
            max_connections=POOL_CONNECTIONS,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # One immediate retry on a fresh connection (Redis restarted), never a backoff:
            # redis-py's default would retry for seconds.
            retry=Retry(NoBackoff(), 1),
            health_check_interval=HEALTH_CHECK_SECONDS,
            # A new connection is a TCP connect (and AUTH, SELECT if the URL asks): no
            # CLIENT SETINFO round trips, so that opening one in a burst stays quick.
            driver_info=None,
        )
        self._redis = Redis(connection_pool=pool)
        # Calls waiting for a connection wait here, not in the pool: a burst that waits out
        # cache.redis_timeout here skips Redis without calling it an outage.
        self._free = asyncio.Semaphore(POOL_CONNECTIONS)
        self._release = self._redis.register_script(_RELEASE)
        self.address = redis_address(url)
        self._base = f"{prefix}v{VERSION.decode()}:"
        self._account = account
        self._seal_key = seal_key
        self._timeout = timeout
        self.lock_timeout = lock_timeout
        self._metrics = metrics
        self._clock, self._wall = clock, wall
        self._breaker = _Breaker(clock)
        self._refused = Throttled(log, logging.WARNING)
        self._surprise = Throttled(log, logging.ERROR)
        self._tasks: set[asyncio.Task[None]] = set()
        metrics.redis_degraded.set_function(lambda: float(self.degraded))

    def __repr__(self) -> str:
        return f"SharedStore({self.address!r}, degraded={self.degraded})"

    @property
    def degraded(self) -> bool:
        """Whether Redis failed and has not answered since."""
        return self._breaker.down_since is not None

    @property
    def degraded_for(self) -> float | None:
        """Seconds since Redis last failed, while it has not answered since."""
        since = self._breaker.down_since
        return None if since is None else self._clock() - since

    def to_wall(self, monotonic: float) -> float:
        """A time on this process's clock as a time every replica reads alike."""
        return monotonic + (self._wall() - self._clock())

    def from_wall(self, wall: float) -> float:
        """The other way round."""
        return wall - (self._wall() - self._clock())

    async def warm_up(self) -> None:
        """Open the first connection before the proxy serves, for a second at most: a new
        process's first connect is slower than any call after it. A failure here is only
        logged by the first real call."""
        with contextlib.suppress(Exception):  # the first real call says what is wrong, once
            async with asyncio.timeout(max(1.0, self._timeout)):
                await self._redis.ping()

    async def close(self) -> None:
        """Close the connections (at shutdown), after the answers being stored and the locks
        being given up (other replicas wait for them), for a moment at most."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=max(1.0, 4 * self._timeout))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._redis.aclose(close_connection_pool=True)

    # -- answers, locks ----------------------------------------------------------------

    def _key(self, space: str, digest: bytes) -> str:
        return f"{self._base}{space}:{digest.hex()}"

    def deadline(self) -> float:
        """When calls begun now must have answered (``cache.redis_timeout``; loop time): what
        a request's calls share, so that all of them add no more than one of it."""
        return asyncio.get_running_loop().time() + self._timeout

    async def load(
        self, space: str, digest: bytes, limit: int, until: float | None = None
    ) -> tuple[bool, bytes | None]:
        """Whether Redis answered before ``until``, and the value this fleet stored under
        ``digest``, if any (at most ``limit`` bytes)."""
        key = self._key(space, digest)
        value = await self._ask(lambda r: r.getrange(key, 0, limit + _MAC), until=until)
        return value is not None, self._open(key, value)

    async def store(
        self, space: str, digest: bytes, value: bytes, ttl: float, *, probe: bool = False
    ) -> None:
        """Keep ``value`` for ``ttl`` seconds; ``probe``: even while the breaker is open."""
        key = self._key(space, digest)
        sealed = self._seal(key, value)
        await self._ask(lambda r: r.set(key, sealed, px=max(1, int(ttl * 1000))), probe=probe)

    async def claim(
        self, space: str, digest: bytes, limit: int, until: float | None = None
    ) -> tuple[Claim, str, bytes | None]:
        """Take the flight lock of ``digest`` (an answer before ``until``): who asks the
        upstream, a token to release it with, and the value stored meanwhile. Set before
        reading: a leader stores before it releases, so whoever gets the lock sees what the
        one before stored."""
        lock, key = self._key("lock", digest), self._key(space, digest)
        token = secrets.token_hex(16)
        ms = max(1, int(self.lock_timeout * 1000))

        async def ask(r: Redis) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            pipe.set(lock, token, nx=True, px=ms)
            pipe.getrange(key, 0, limit + _MAC)
            result: list[Any] = await pipe.execute()
            return result

        result = await self._ask(ask, until=until)
        if result is None:
            return Claim.ALONE, token, None
        taken, value = result
        return (Claim.LEAD if taken else Claim.FOLLOW), token, self._open(key, value)

    def publish(
        self, space: str, digest: bytes, value: bytes | None, ttl: float, lead: str | None
    ) -> None:
        """In the background: keep ``value`` (if any), then give up the lock ``lead`` (if
        ours), in that order, so that a replica that sees the lock gone finds the answer."""
        if value is None and lead is None:
            return  # a fleet's answer, or one not to keep, with no lock: nothing to do

        async def publish() -> None:
            if value is not None:  # other replicas wait for it, if the lock is ours
                await self.store(space, digest, value, ttl, probe=lead is not None)
            if lead is not None:
                await self.release(digest, lead)

        self._spawn(publish())

    async def release(self, digest: bytes, token: str) -> None:
        """Give up the flight lock, if it is still ours: asked even while the breaker is
        open (for a while after a failed store), since others wait for it."""
        lock = self._key("lock", digest)
        await self._ask(lambda r: self._release(keys=[lock], args=[token], client=r), probe=True)

    async def follow(self, space: str, digest: bytes, limit: int) -> bytes | None:
        """Wait up to ``lock_timeout`` for the replica that holds the lock to give it up;
        what is stored then (its answer, an older one, or None), or None if Redis failed."""
        lock, key = self._key("lock", digest), self._key(space, digest)
        deadline = self._clock() + self.lock_timeout
        pause = FIRST_POLL

        async def ask(r: Redis) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            pipe.exists(lock)  # first: once the lock is gone, the answer is there or never
            pipe.getrange(key, 0, limit + _MAC)
            result: list[Any] = await pipe.execute()
            return result

        while (left := deadline - self._clock()) > 0:
            await asyncio.sleep(min(pause, left))
            pause = min(MAX_POLL, pause * 2)
            result = await self._ask(ask)
            if result is None:
                return None
            locked, value = result
            if not locked:  # the lock is given up after the answer is stored
                return self._open(key, value)
        return None

    # -- the fleet's quota view ----------------------------------------------------------

    def _view(self, name: str) -> str:
        return f"{self._base}{name}:{self._account}"

    def tell_window(self, kind: str, limit: str | None, until: float) -> None:
        """``QuotaWatch.on_window``: tell the fleet, without holding up the request."""
        self._spawn(self.note_window(kind, limit, until))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def note_window(self, kind: str, limit: str | None, until: float) -> None:
        """Tell the fleet a throttle closed ``kind`` of call until ``until`` (this clock)."""
        key = self._view("windows")
        field = hashlib.sha256(kind.encode()).hexdigest()[:32]
        value = json.dumps({"kind": kind, "limit": limit, "until": self.to_wall(until)})
        sealed = self._seal(f"{key}\0{field}", value.encode())

        async def ask(r: Redis) -> None:
            pipe = r.pipeline(transaction=False)
            pipe.hset(key, field, sealed)
            pipe.pexpire(key, _VIEW_TTL_MS)
            await pipe.execute()

        await self._ask(ask)

    async def keep_in_step(self, quota: QuotaWatch) -> None:
        """Every half second: publish the quota figures this replica saw, read the fleet's
        figures and throttle windows. Runs until cancelled; it is also the breaker's probe."""
        while True:
            await self.sync(quota)
            await asyncio.sleep(SYNC_SECONDS)

    async def sync(self, quota: QuotaWatch) -> None:
        """One exchange of the quota view with the fleet."""
        limits, windows = self._view("limits"), self._view("windows")
        mine = {
            name: self._seal(f"{limits}\0{name}", json.dumps(figures).encode())
            for name, figures in quota.changed(self.to_wall).items()
        }

        async def ask(r: Redis) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            if mine:
                pipe.hset(limits, mapping=mine)  # type: ignore[arg-type]
                pipe.pexpire(limits, _VIEW_TTL_MS)
            pipe.hscan(limits, 0, count=LIMIT_TYPES)
            pipe.hscan(windows, 0, count=KINDS)
            result: list[Any] = await pipe.execute()
            return result[-2:]

        result = await self._ask(ask)
        if result is None:
            quota.unsent(mine)  # told of at the next sync that gets through
            return
        (_, seen_limits), (_, seen_windows) = result
        for name, value in _fields(seen_limits)[:LIMIT_TYPES]:
            figures = self._decoded(f"{limits}\0{name}", value)
            if figures is not None:
                quota.merge_limit(name, figures, self.from_wall)
        for field, value in _fields(seen_windows)[:KINDS]:
            window = self._decoded(f"{windows}\0{field}", value)
            if window is not None:
                quota.merge_window(window, self.from_wall)

    def _decoded(self, key: str, value: bytes) -> dict[str, Any] | None:
        payload = self._open(key, value[: _MAX_FIELD + _MAC + 1])
        if payload is None:
            return None
        try:
            decoded = json.loads(payload)
        except ValueError:
            decoded = None
        if not isinstance(decoded, dict):
            self._invalid()
            return None
        return decoded

    # -- every call ------------------------------------------------------------------

    async def _ask(
        self,
        call: Callable[[Redis], Awaitable[T]],
        *,
        probe: bool = False,
        until: float | None = None,
    ) -> T | None:
        """``call``'s result, or None when Redis did not answer in time or failed; ``probe``:
        asked even while the breaker is open. Waiting for one of the pool's connections and
        the call share ``cache.redis_timeout`` (or what is left of it ``until``, a request's
        ``deadline()``); a call left less than half of it that times out says nothing of
        Redis (``busy``)."""
        if not (probe or self._breaker.allows()):
            return None
        loop = asyncio.get_running_loop()
        deadline = self.deadline() if until is None else min(until, self.deadline())
        started, left = None, 0.0
        try:
            async with asyncio.timeout_at(deadline), self._free:
                started, left = self._clock(), deadline - loop.time()
                result = await call(self._redis)
        except ResponseError as exc:
            # Redis answered, but no: full (maxmemory), a key of another type, no permission.
            self._metrics.redis_errors.labels("refused").inc()
            self._refused("refused", "Redis refused a command: %s", first_words(exc))
            return None
        except (RedisError, OSError, TimeoutError) as exc:
            timed_out = isinstance(exc, TimeoutError | RedisTimeout)
            if started is None or (timed_out and left < self._timeout / 2):
                self._metrics.redis_errors.labels("busy").inc()
                return None  # the pool's connections were busy: this call skips Redis
            reason = "timeout" if timed_out else "unreachable"
            self._metrics.redis_errors.labels(reason).inc()
            why = f"no answer within {self._timeout * 1000:.0f} ms" if timed_out else ""
            self._breaker.failed(why or f"{self.address}: {first_words(exc)}", started)
            return None
        except Exception as exc:  # a redis-py surprise, or ours: it costs sharing, not the request
            self._metrics.redis_errors.labels("unreachable").inc()
            self._surprise("surprise", "a Redis call failed unexpectedly", exc_info=exc)
            self._breaker.failed(f"{self.address}: {type(exc).__name__}", started or 0.0)
            return None
        self._breaker.succeeded(started)
        return result

    def _mac(self, key: str, value: bytes) -> bytes:
        return hmac.digest(self._seal_key, VERSION + key.encode() + b"\0" + value, "sha256")

    def _seal(self, key: str, value: bytes) -> bytes:
        return VERSION + self._mac(key, value) + value

    def _open(self, key: str, sealed: object) -> bytes | None:
        """The value inside ``sealed`` if this fleet sealed it for ``key``; else None."""
        if not sealed:
            return None
        if isinstance(sealed, bytes) and sealed[:1] == VERSION and len(sealed) > _MAC:
            value = sealed[1 + _MAC :]
            if hmac.compare_digest(self._mac(key, value), sealed[1 : 1 + _MAC]):
                return value
        self._invalid()
        return None

    def _invalid(self) -> None:
        self._metrics.redis_errors.labels("invalid").inc()


def _fields(page: object) -> list[tuple[str, bytes]]:
    """The fields of one HSCAN page that look like ours."""
    if not isinstance(page, dict):
        return []
    found = []
    for name, value in page.items():
        if isinstance(name, bytes) and isinstance(value, bytes) and len(name) <= MAX_NAME:
            found.append((name.decode("ascii", "replace"), value))
    return found


def first_words(exc: BaseException) -> str:
    """What went wrong, short; redis-py's messages name the address, never the password."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:160]
