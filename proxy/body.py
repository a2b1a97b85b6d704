"""Replayable request body: streams the caller's body once, keeps a copy to send it again."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import tempfile
from collections import deque
from collections.abc import AsyncIterator

from aiohttp import StreamReader

from .errors import BodyError

__all__ = ["MemoryBudget", "ReplayableBody"]

log = logging.getLogger("mdcloud_proxy.body")

READ_SIZE = 256 * 1024
# Reads from the caller while the memory budget is spent: each body may then hold one.
SPENT_READ_SIZE = 64 * 1024
# Bytes of the body that may wait in memory for a worker thread to write them to the file.
PENDING_LIMIT = 8 * 1024 * 1024
# Bytes and pieces of the body handed to a worker thread in one job (one pwritev: at most
# IOV_MAX pieces, 1024 on Linux).
BATCH_SIZE = 1024 * 1024
BATCH_PIECES = 64


def _pwrite_all(fd: int, buffers: list[bytes], offset: int) -> None:
    views = [memoryview(b) for b in buffers]
    while views:
        written = os.pwritev(fd, views, offset)
        if written == 0:  # a disk that takes nothing would have this thread loop forever
            raise OSError(errno.EIO, "the spill file took no bytes")
        offset += written
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if written:
            views[0] = views[0][written:]


def _copy_failed(exc: OSError) -> BodyError:
    return BodyError(
        f"cannot keep a copy of the body for a replay: {exc.strerror} "
        "(the temporary directory, TMPDIR)",
        status=507,
        code=507001,
    )


class MemoryBudget:
    """Bytes of request bodies that all requests together hold in memory (replay.memory_total).

    Copies kept for a replay and bytes waiting for a worker thread to write them to a spill
    file both count. Past the total, copies go to the file instead, and a caller's body is
    read no faster than the disk takes it: memory stays bounded in total, not per request.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0

    def __repr__(self) -> str:
        return f"MemoryBudget(used={self.used}, total={self.total})"

    @property
    def spent(self) -> bool:
        """Whether the total is used up."""
        return self.used >= self.total

    def take(self, size: int) -> bool:
        """Count ``size`` more bytes if they fit; whether they did."""
        if self.used + size > self.total:
            return False
        self.used += size
        return True


class _SpillFile:
    """An unlinked temporary file that worker threads write, so that a slow disk never stalls
    the event loop (which meanwhile forwards the body); at most PENDING_LIMIT bytes of one
    file wait, and none past the shared budget but the latest write.

    Pieces are handed to a thread in batches of up to BATCH_SIZE bytes, one ``pwritev`` each,
    no copy: a job per piece would mean one per socket read (each a future, a callback and
    a thread wake-up on the event loop).
    """

    def __init__(self, budget: MemoryBudget) -> None:
        self._budget = budget
        try:
            # TemporaryFile is unlinked at once on POSIX: nothing is left behind on a crash.
            self._file = tempfile.TemporaryFile(prefix="mdcloud-proxy-")  # noqa: SIM115
        except OSError as exc:
            raise _copy_failed(exc) from None
        self._fd = self._file.fileno()
        self._pending: deque[tuple[asyncio.Future[None], int]] = deque()
        self._pending_bytes = 0  # in threads' hands or in the batch
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        self._batch_offset = 0

    async def write(self, data: bytes, offset: int) -> None:
        """Queue ``data`` for ``offset``; waits while too much is queued."""
        if self._batch and offset != self._batch_offset + self._batch_bytes:
            self.flush()
        if not self._batch:
            self._batch_offset = offset
        size = len(data)
        self._batch.append(data)
        self._batch_bytes += size
        self._budget.used += size  # held until a thread has written it, whoever waits
        self._pending_bytes += size
        if self._batch_bytes >= BATCH_SIZE or len(self._batch) >= BATCH_PIECES:
            self.flush()
        while self._pending_bytes > PENDING_LIMIT or self._budget.spent:
            self.flush()
            if not self._pending:
                break
            await self._oldest_done()

    def flush(self) -> None:
        """Hand the batch to a worker thread."""
        if not self._batch:
            return
        batch, size = self._batch, self._batch_bytes
        self._batch, self._batch_bytes = [], 0
        write = asyncio.get_running_loop().run_in_executor(
            None, _pwrite_all, self._fd, batch, self._batch_offset
        )

        def written(_: object) -> None:
            self._budget.used -= size

        write.add_done_callback(written)
        self._pending.append((write, size))

    async def settle(self) -> None:
        """Wait until everything queued is in the file."""
        self.flush()
        while self._pending:
            await self._oldest_done()

    async def _oldest_done(self) -> None:
        write, size = self._pending[0]
        try:
            # Shielded: cancelling the future would not stop a thread already writing, but
            # would release its budget and let close() shut the file under it.
            await asyncio.shield(write)
        except OSError as exc:
            raise _copy_failed(exc) from None
        finally:
            if self._pending and self._pending[0][0] is write:
                self._pending.popleft()
                self._pending_bytes -= size

    def read(self, size: int, offset: int) -> bytes:
        """Bytes from the file (after ``settle()``)."""
        return os.pread(self._fd, size, offset)

    def close(self) -> None:
        """Close the file once the writes in flight are done; its space is freed then."""
        self._budget.used -= self._batch_bytes  # never written: nothing needs it now
        self._pending_bytes -= self._batch_bytes
        self._batch, self._batch_bytes = [], 0
        pending = [write for write, _ in self._pending]
        self._pending.clear()
        if not pending:
            self._file.close()
            return
        done = asyncio.gather(*pending, return_exceptions=True)
        done.add_done_callback(lambda _: self._file.close())


class ReplayableBody:
    """The caller's body, teed while it streams upstream so that it can be replayed.

    The first ``memory_limit`` bytes are kept in memory, the rest in an unlinked temporary
    file. Each call to ``stream()`` starts a new attempt: it yields what was already captured,
    then goes on reading the caller's stream. The caller's stream is read once, never twice,
    and a newer attempt supersedes an older one, whose iterator then stops. ``close()`` drops
    the copy; it must be called when the request ends.

    If the file cannot be written (a full disk), capturing stops and ``not_replayable`` says
    why: the attempt under way goes on from the caller's stream, only a replay fails (507).
    """

    def __init__(
        self,
        source: StreamReader,
        *,
        memory_limit: int,
        max_size: int,
        budget: MemoryBudget | None = None,
    ):
        self._source = source
        self._budget = budget if budget is not None else MemoryBudget(memory_limit)
        self._memory_limit = memory_limit
        self._max_size = max_size
        self._memory = bytearray()
        self._file: _SpillFile | None = None
        self._size = 0
        self._eof = False
        self._attempt = 0
        self._delivered = 0  # the latest attempt that yielded the whole body
        self._closed = False
        self._lock = asyncio.Lock()
        self.error: BodyError | None = None
        self.not_replayable: BodyError | None = None

    @property
    def delivered(self) -> bool:
        """Whether the latest attempt yielded the whole body to its upstream request."""
        return self._delivered == self._attempt

    def stream(self) -> AsyncIterator[bytes]:
        """A new attempt at sending the whole body, from its first byte."""
        self._attempt += 1
        return self._iterate(self._attempt)

    def close(self) -> None:
        """Drop the captured copy; the temporary file disappears with it."""
        self._closed = True
        self._budget.used -= len(self._memory)
        self._memory = bytearray()
        if self._file is not None:
            self._file.close()
            self._file = None

    async def _iterate(self, attempt: int) -> AsyncIterator[bytes]:
        position = 0
        while attempt == self._attempt and not self._closed:
            if position < self._size:
                if position >= len(self._memory):
                    await self._settle()
                chunk = self._captured(position)
            elif self._eof:
                self._delivered = attempt
                return
            else:
                async with self._lock:
                    # An older attempt may have read more while this one waited for the lock.
                    if position < self._size or self._eof or attempt != self._attempt:
                        continue
                    chunk = await self._read_source()
                if not chunk:
                    self._delivered = attempt
                    return
            position += len(chunk)
            yield chunk

    def _captured(self, position: int) -> bytes:
        if position < len(self._memory):
            return bytes(self._memory[position : position + READ_SIZE])
        assert self._file is not None
        return self._file.read(READ_SIZE, position - len(self._memory))

    async def _read_source(self) -> bytes:
        try:
            # One piece as the reader got it (one socket read, up to 256 KiB, or what is
            # left of an HTTP chunk), never joined to the next: readany() would join all
            # that is buffered into a new object, a copy of every byte.
            if self._budget.spent:
                chunk = await self._source.read(SPENT_READ_SIZE)
            else:
                chunk, chunk_end = await self._source.readchunk()
                # The end of an HTTP chunk, not of the body (at_eof: aiohttp's empty payload
                # says chunk_end for ever).
                while not chunk and chunk_end and not self._source.at_eof():
                    chunk, chunk_end = await self._source.readchunk()
        except asyncio.CancelledError:
            raise
        except Exception:
            self.error = BodyError("the caller's request body broke off", status=400)
            raise self.error from None
        if not chunk:
            self._eof = True
            if self._file is not None:
                self._file.flush()  # the last batch: its bytes leave the shared budget
            return chunk
        if self._size + len(chunk) > self._max_size:
            self.error = BodyError(
                f"request body larger than limits.max_body_size ({self._max_size} bytes)",
                status=413,
                code=413001,
            )
            raise self.error
        await self._capture(chunk)
        return chunk

    async def read_all(self) -> str:
        """Take the whole body from the caller before any attempt (into the copy), and
        return its sha256; the attempts then send the copy. Raises the BodyError of a body
        too large, broken off, or whose copy could not be kept."""
        digest = hashlib.sha256()
        async with self._lock:
            while not self._eof:
                digest.update(await self._read_source())
        await self.settle_copy()
        if self.not_replayable is not None:
            raise self.not_replayable
        return digest.hexdigest()

    async def settle_copy(self) -> None:
        """Wait for the copy to be written; a failure makes the body not replayable."""
        if self._file is not None and self.not_replayable is None:
            try:
                await self._file.settle()
            except BodyError as exc:
                self._drop_copy(exc)

    async def _settle(self) -> None:
        try:
            if self.not_replayable is not None:
                raise self.not_replayable
            assert self._file is not None
            await self._file.settle()
        except BodyError as exc:
            self.error = exc
            raise

    async def _capture(self, chunk: bytes) -> None:
        offset = self._size - len(self._memory)  # where the file part of ``chunk`` goes
        self._size += len(chunk)
        room = self._memory_limit - len(self._memory)
        if room > 0 and not self._budget.take(min(room, len(chunk))):
            # The rest goes to the file: the part in memory stays the body's first bytes.
            self._memory_limit, room = len(self._memory), 0
        if room > 0:
            self._memory += chunk[:room]
            chunk = chunk[room:]
            offset = 0
        if chunk and self.not_replayable is None:
            try:
                if self._file is None:
                    self._file = _SpillFile(self._budget)
                await self._file.write(chunk, offset)
            except BodyError as exc:
                self._drop_copy(exc)

    def _drop_copy(self, exc: BodyError) -> None:
        # Only a replay needs the copy; this attempt streams on without it, and nothing more
        # is kept (not in memory either: memory stays bounded).
        log.warning("%s; a replay of this request would fail", exc.message)
        self.not_replayable = exc
        if self._file is not None:
            self._file.close()
            self._file = None
