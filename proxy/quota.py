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
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .errors import ProxyError
from .observe import Metrics

__all__ = ["QuotaWatch", "Throttled", "route_of"]

THROTTLED = frozenset({429001, 429002})
USED_UP = 429000
_ROUTE = re.compile(r"^(/v4/[^/?]+)")
_SECONDS = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*s?\s*$")


def route_of(raw_path: str) -> str:
    """The family of calls a path belongs to (``/v4/hash``, ``/v4/file``): what one limit
    type counts, as the answers' ``X-RateLimit-For`` tell."""
    match = _ROUTE.match(raw_path)
    return match.group(1) if match else raw_path.partition("?")[0]


def _seconds(value: str | None) -> float | None:
    """A ``Retry-After`` or ``X-RateLimit-Reset-In`` (``3294s``) in seconds."""
    if value is None:
        return None
    match = _SECONDS.match(value)
    return float(match.group(1)) if match else None


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
    reopens_at: float = float("-inf")  # a throttle's window, once a 429 announced it


class Throttled(ProxyError):
    """A throttle's window is closed for longer than ``throttle.max_wait``: a 429 from the
    proxy, without asking the upstream for a certain one."""

    status = 429
    code = 429001

    def __init__(self, message: str, *, retry_after: float) -> None:
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
        self._route_limits: dict[str, str] = {}  # /v4/hash -> reputation_api
        self.waits = 0

    def __repr__(self) -> str:
        return f"QuotaWatch(limits={sorted(self.limits)})"

    def limit_of(self, raw_path: str) -> Limit | None:
        """The limit type the calls of this path count against, once an answer said so."""
        name = self._route_limits.get(route_of(raw_path))
        return self.limits.get(name) if name is not None else None

    def closed_for(self, raw_path: str) -> tuple[str, float] | None:
        """(limit type, seconds) while this path's throttle window is known to be closed."""
        limit = self.limit_of(raw_path)
        if limit is None:
            return None
        left = limit.reopens_at - self._clock()
        return (limit.name, left) if left > 0 else None

    def seen(
        self, raw_path: str, status: int, headers: Mapping[str, str], code: int | None
    ) -> None:
        """Note an upstream answer: its rate-limit headers, a throttle it announces."""
        name = headers.get("X-RateLimit-For")
        if not name:
            return
        self._route_limits[route_of(raw_path)] = name
        limit = self.limits.get(name)
        if limit is None:
            limit = self.limits[name] = Limit(name)
            self._metrics.watch_limit(name, lambda: self.limits[name], self._clock)
        now = self._clock()
        reset = _seconds(headers.get("X-RateLimit-Reset-In"))
        if status == 429 and code != USED_UP:
            # A throttle's reset is the throttle's, not the quota's: it moves no gauge.
            wait = _seconds(headers.get("Retry-After"))
            wait = reset if wait is None else wait
            if wait is not None:
                limit.reopens_at = max(limit.reopens_at, now + wait)
            return
        for field, header in (
            ("limit", "X-RateLimit-Limit"),
            ("remaining", "X-RateLimit-Remaining"),
        ):
            value = headers.get(header)
            if value is not None and value.strip().isdigit():
                setattr(limit, field, int(value))
        if reset is not None:
            limit.resets_at = now + reset
        limit.interval = headers.get("X-RateLimit-Interval", limit.interval)

    def wait_for(
        self, status: int, headers: Mapping[str, str], code: int | None, tries: int, left: float
    ) -> float | None:
        """How long to wait before sending again an answer's request, or None to pass the
        answer on: not a throttle, no time left, or a reset beyond what is left."""
        if status != 429 or code == USED_UP or self.max_wait <= 0:
            return None
        announced = _seconds(headers.get("Retry-After"))
        if announced is None:
            announced = _seconds(headers.get("X-RateLimit-Reset-In"))
        if announced is None:
            if code not in THROTTLED:
                return None  # some other 429 that announces nothing: not ours to wait out
            announced = float(2 ** (tries - 1))  # 1 s, then doubling
        wait = announced + random.uniform(0.05, 0.25)
        return wait if wait <= left else None
