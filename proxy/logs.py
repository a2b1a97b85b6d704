"""Logging set-up: a readable line for people, or one JSON object per line for machines."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "HTTP_LOG",
    "JsonFormatter",
    "TextFormatter",
    "Throttled",
    "setup_logging",
    "throttle_loop_errors",
]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and the record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``, with the time's text made once per second instead of once per line
    (``time.strftime`` is a good part of an access log line's cost; bench/)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second = -1
        self._text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._second, self._text = second, super().formatTime(record, datefmt)[:-4]
        return f"{self._text},{int(record.msecs):03d}"


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Send log records to stderr at ``level`` in ``fmt`` ("text" or "json")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # What no format here shows, and logging would otherwise work out for every record: the
    # caller's source line (a walk up the stack), thread and process names. The Logging
    # HOWTO's "Optimization" section names these switches; with one line per request at
    # INFO they cost about 2% of a small request's CPU (bench/).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # type: ignore[attr-defined]  # 3.12+: the task name


_MAX_KEYS = 1000


class Throttled:
    """Logs one condition at most once per ``interval`` seconds, whatever the rate it recurs at.

    A flood (malformed requests, connections past a limit, a loop out of descriptors) is a
    line every few seconds saying how often it happened, never a line per event.
    """

    def __init__(
        self,
        logger: logging.Logger,
        level: int,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger, self._level, self._interval, self._clock = logger, level, interval, clock
        self._seen: dict[str, tuple[float, int]] = {}

    def __call__(
        self, key: str, message: str, *args: object, exc_info: BaseException | None = None
    ) -> None:
        """Log ``message % args`` unless ``key`` was logged less than ``interval`` ago;
        ``exc_info``'s traceback only the first time ``key`` is logged."""
        now = self._clock()
        first = key not in self._seen
        last, skipped = self._seen.get(key, (float("-inf"), 0))
        if now - last < self._interval:
            self._seen[key] = (last, skipped + 1)
            return
        if first and len(self._seen) >= _MAX_KEYS:
            self._seen.clear()  # keys are conditions, few; this only bounds a bad key's cost
        self._seen[key] = (now, 0)
        if skipped:
            message += " (%d more like it in the last %.0f s)"
            args = (*args, skipped, now - last)
        self._logger.log(self._level, message, *args, exc_info=exc_info if first else None)


def throttle_loop_errors(loop: asyncio.AbstractEventLoop, interval: float = 5.0) -> None:
    """Report the event loop's errors (such as "socket.accept() out of system resource",
    which asyncio reports at every accept while descriptors run out) once per ``interval``."""
    throttled = Throttled(logging.getLogger("mdcloud_proxy.loop"), logging.ERROR, interval)

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        message = str(context.get("message"))
        # Messages can hold reprs with addresses ("Exception in callback f(<X at 0x7f..>)"):
        # the condition is the message up to its first detail, and the exception's type.
        key = re.split(r"[(<:]", message, maxsplit=1)[0][:80] + type(exc).__name__
        throttled(key, "%s", message, exc_info=exc)

    loop.set_exception_handler(handler)


# aiohttp's server reports connection-level errors here (see serve()).
HTTP_LOG = logging.getLogger("mdcloud_proxy.http")
