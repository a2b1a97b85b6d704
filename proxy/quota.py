"""What the upstream says of the account's quotas and throttles, and how long to wait for them.

MetaDefender answers ``429`` with code 429001 when a throttle is hit, 429002 for too many
connections, and 429000 when a daily quota is used up. Tools behind the proxy turn any of them
into an empty "successful" report; a throttle passes, so the proxy waits it out and replays
(``throttle.max_wait``), and while a limit type's window is known to be closed, requests of that
type wait instead of walking into certain 429s. A used-up quota is passed on at once: waiting
could not help. Every answer's ``X-RateLimit-*`` headers feed the quota gauges and ``/-/status``.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ProxyError
from .observe import Metrics

__all__ = ["QuotaWatch", "Throttled", "kind_of"]

THROTTLED = frozenset({429001, 429002})
# Bounds on what callers and the upstream can make the proxy remember.
KINDS = 256
LIMIT_TYPES = 16
MAX_WINDOW = 3600.0
MAX_NAME = 64  # characters of a limit type's name or interval
MAX_KIND = 256  # characters of a kind of call the fleet is told of
USED_UP = 429000
_ROUTE = re.compile(r"^(/v4/[^/?]+)")
_SECONDS = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*s?\s*$")


def kind_of(method: str, raw_path: str) -> str:
    """The kind of call a request is: its method and path family (``GET /v4/hash/*``,
    ``POST /v4/hash``, ``POST /v4/file``, ``GET /v4/file/*``)."""
    path = raw_path.partition("?")[0]
    match = _ROUTE.match(path)
    family = match.group(1) if match else "/"
    return f"{method} {family}{'/*' if len(path) > len(family) + 1 else ''}"


def _seconds(value: str | None) -> float | None:
    """A ``Retry-After`` or ``X-RateLimit-Reset-In`` (``3294s``) in seconds."""
    if value is None:
        return None
    match = _SECONDS.match(value)
    return float(match.group(1)) if match else None


def _announced(headers: Mapping[str, str]) -> float | None:
    """The seconds until a throttle reopens, as an answer says: Retry-After, else
    X-RateLimit-Reset-In."""
    wait = _seconds(headers.get("Retry-After"))
    return wait if wait is not None else _seconds(headers.get("X-RateLimit-Reset-In"))


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def error_code(body: bytes) -> int | None:
    """The code of a MetaDefender error body, or None."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, int) else None


@dataclass
class Limit:
    """What the answers said of one limit type."""

    name: str
    limit: int | None = None
    remaining: int | None = None
    resets_at: float | None = None  # on the monotonic clock
    interval: str | None = None
    seen_at: float = float("-inf")  # when an answer last told of it


class Throttled(ProxyError):
    """A throttle's window is closed for longer than ``throttle.max_wait``: a 429 from the
    proxy, without asking the upstream for a certain one."""

    status = 429
    code = 429001

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QuotaWatch:
    """Quotas and throttles of the account, from every upstream answer."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        max_wait: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self.max_wait = max_wait
        self._clock = clock
        self.limits: dict[str, Limit] = {}
        # Per kind of call (GET /v4/hash/*, POST /v4/file): the limit type its answers name,
        # and until when a throttle said it is closed. A throttle on uploads does not hold up
        # the polls of their results, nor one on bulk lookups the single ones.
        self._kind_limits: dict[str, str] = {}
        self._closed_until: dict[str, float] = {}
        # For a fleet (proxy/shared.py): the limits whose figures changed since the last
        # ``changed()``, and who to tell of a throttle's window (kind, limit type, until).
        self._changed: set[str] = set()
        self.on_window: Callable[[str, str | None, float], None] | None = None

    def __repr__(self) -> str:
        return f"QuotaWatch(limits={sorted(self.limits)})"

    def limit_of(self, kind: str) -> str:
        """The limit type a ``kind_of`` call counts against, as answers said ("unknown")."""
        return self._kind_limits.get(kind, "unknown")

    def closed_for(self, kind: str) -> float | None:
        """Seconds while a ``kind_of`` call's throttle window is known to be closed."""
        until = self._closed_until.get(kind)
        if until is None:
            return None
        left = until - self._clock()
        return left if left > 0 else None

    def reopens_in(self, name: str) -> float:
        """Seconds until every throttle window of limit type ``name`` is open again."""
        now = self._clock()
        return max(
            [until - now for kind, until in self._closed_until.items()
             if self._kind_limits.get(kind) == name] + [0.0]
        )  # fmt: skip

    def seen(self, kind: str, status: int, headers: Mapping[str, str], code: int | None) -> None:
        """Note an upstream answer to a ``kind_of`` call: its rate-limit headers, a throttle
        it announces."""
        now = self._clock()
        name = headers.get("X-RateLimit-For") or None
        if name is not None and len(name) > MAX_NAME:
            name = None
        if status == 429 and code in THROTTLED:
            # The throttle's own reset. It moves no quota gauge; a window is never believed
            # closed for long.
            wait = _announced(headers)
            if wait is not None:
                until = now + min(wait, MAX_WINDOW)
                noted = self._close(kind, until)
                if noted and self.on_window is not None and len(kind) <= MAX_KIND:
                    self.on_window(kind, name, until)
        if name is None:
            return
        if name not in self.limits and len(self.limits) >= LIMIT_TYPES:
            return
        self._counts_against(kind, name)
        if status == 429 and code != USED_UP:
            return
        limit = self._limit(name)
        assert limit is not None  # there was room for it
        for field, header in (
            ("limit", "X-RateLimit-Limit"),
            ("remaining", "X-RateLimit-Remaining"),
        ):
            value = headers.get(header)
            if value is not None and value.strip().isdigit():
                setattr(limit, field, int(value))
        reset = _seconds(headers.get("X-RateLimit-Reset-In"))
        if reset is not None:
            limit.resets_at = now + reset
        interval = headers.get("X-RateLimit-Interval")
        limit.interval = interval[:MAX_NAME] if interval is not None else limit.interval
        limit.seen_at = now
        self._changed.add(name)

    def changed(self, to_wall: Callable[[float], float]) -> dict[str, dict[str, Any]]:
        """The figures of the limits that answers told of since the last call, for the fleet
        (times as ``to_wall`` makes them)."""
        figures = {}
        for name in sorted(self._changed):
            limit = self.limits[name]
            figures[name] = {
                "limit": limit.limit,
                "remaining": limit.remaining,
                "resets_at": None if limit.resets_at is None else to_wall(limit.resets_at),
                "interval": limit.interval,
                "seen_at": to_wall(limit.seen_at),
            }
        self._changed.clear()
        return figures

    def unsent(self, names: Iterable[str]) -> None:
        """The figures of ``names`` did not reach the fleet: ``changed()`` gives them again."""
        self._changed.update(name for name in names if name in self.limits)

    def merge_limit(
        self, name: str, figures: Mapping[str, Any], from_wall: Callable[[float], float]
    ) -> None:
        """Take another replica's figures of a limit type, if they are newer than ours."""
        seen_at, resets_at = figures.get("seen_at"), figures.get("resets_at")
        counts = [figures.get("limit"), figures.get("remaining")]
        interval = figures.get("interval")
        if not _number(seen_at) or not (resets_at is None or _number(resets_at)):
            return
        if not all(c is None or (isinstance(c, int) and not isinstance(c, bool)) for c in counts):
            return
        if not (interval is None or (isinstance(interval, str) and len(interval) <= MAX_NAME)):
            return
        if not name or len(name) > MAX_NAME:
            return
        limit = self._limit(name)
        if limit is None:
            return
        seen = from_wall(float(seen_at))  # type: ignore[arg-type]
        if seen <= limit.seen_at:
            return
        limit.limit, limit.remaining = counts
        limit.resets_at = None if resets_at is None else from_wall(resets_at)
        limit.interval, limit.seen_at = interval, seen

    def merge_window(self, window: Mapping[str, Any], from_wall: Callable[[float], float]) -> None:
        """Take a throttle window another replica saw."""
        kind, name, until = window.get("kind"), window.get("limit"), window.get("until")
        if not isinstance(kind, str) or len(kind) > MAX_KIND or not _number(until):
            return
        until = from_wall(float(until))  # type: ignore[arg-type]
        left = until - self._clock()
        if left <= 0 or left > MAX_WINDOW:
            return
        self._close(kind, until)
        if isinstance(name, str) and 0 < len(name) <= MAX_NAME:
            self._counts_against(kind, name)

    def _close(self, kind: str, until: float) -> bool:
        """Note ``kind``'s throttle window closed until ``until``, if there is room (KINDS
        kinds at most); whether it is noted."""
        if kind not in self._closed_until and len(self._closed_until) >= KINDS:
            return False
        self._closed_until[kind] = max(self._closed_until.get(kind, 0.0), until)
        return True

    def _counts_against(self, kind: str, name: str) -> None:
        """Note that ``kind`` of call counts against limit type ``name`` (KINDS at most)."""
        if kind in self._kind_limits or len(self._kind_limits) < KINDS:
            self._kind_limits[kind] = name

    def _limit(self, name: str) -> Limit | None:
        """Limit type ``name``, made with its gauges if there is room (LIMIT_TYPES)."""
        limit = self.limits.get(name)
        if limit is None and len(self.limits) < LIMIT_TYPES:
            limit = self.limits[name] = Limit(name)
            self._metrics.watch_limit(name, lambda: self.limits[name], self._clock)
        return limit

    def wait_for(
        self, status: int, headers: Mapping[str, str], code: int | None, tries: int, left: float
    ) -> float | None:
        """How long to wait before sending again an answer's request, or None to pass the
        answer on: not a throttle, no time left, or a reset beyond what is left."""
        if status != 429 or code == USED_UP or self.max_wait <= 0:
            return None
        announced = _announced(headers)
        if announced is None:
            if code not in THROTTLED:
                return None  # some other 429 that announces nothing: not ours to wait out
            announced = float(2 ** (tries - 1))  # 1 s, then doubling
        wait = announced + random.uniform(0.05, 0.25)
        return wait if wait <= left else None
