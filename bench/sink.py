#!/usr/bin/env python3
"""The benchmark's plain upstream for uploads and slow answers.

    python bench/sink.py PORT

Reads each request's body (Content-Length or chunked) to the end and throws it away, then
answers 200 with a small JSON body, keeping the connection open. It must never be what holds
an upload back: bodies are received into one buffer per connection (``BufferedProtocol``,
1 MiB per read) and counted, never copied. Two behaviours on demand:

- ``X-Bench-Refuse: RUN`` on a request: the first token seen with that RUN is refused with
  MetaDefender's 401009 (after the body was read), as the API does when a token expires in
  the middle of an upload, and so is every later request with it: the proxy must replay the
  upload with a new token. Each RUN refuses once, so one sink serves several runs.
- ``GET /slow/MS``: answered after MS milliseconds, with how many such requests were waiting
  when it came (``{"in_flight":N}``), so a client can see they really were in flight together.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field


def answer(status: bytes, body: bytes) -> bytes:
    head = b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    return head % (status, len(body)) + body


OK = answer(b"200 OK", b'{"data_id":"bench-1"}')
EXPIRED = answer(
    b"401 Unauthorized", b'{"error":{"code":401009,"messages":["OAuth token has expired"]}}'
)
HEAD_LIMIT = 64 * 1024


@dataclass
class State:
    refused: dict[bytes, set[bytes]] = field(default_factory=dict)  # run -> tokens refused
    in_flight: int = 0


class Sink(asyncio.BufferedProtocol):
    """One connection: a request head, then its body skipped, then the answer; again."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.raw = bytearray(1 << 20)
        self.buffer = memoryview(self.raw)
        self.line = bytearray()  # a request head or a chunk-size line, until it is whole
        self.left = 0  # body bytes still to skip
        self.chunked = False
        self.target = b""
        self.headers: dict[bytes, bytes] = {}
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        data, at = self.buffer[:nbytes], 0
        while at < nbytes:
            if self.left:  # in a body (or a chunk and its CRLF): count the bytes, keep none
                step = min(self.left, nbytes - at)
                self.left -= step
                at += step
                if not self.left and not self.chunked:
                    self.done()
                continue
            end = self.raw.find(b"\n", at, nbytes)
            if end < 0:
                self.line += data[at:]
                at = nbytes
            else:
                self.line += data[at : end + 1]
                at = end + 1
                self.take_line()
            if len(self.line) > HEAD_LIMIT and self.transport is not None:
                self.transport.close()
                return

    def take_line(self) -> None:
        if self.chunked:  # a chunk's size line
            size = int(bytes(self.line).split(b";")[0], 16)
            self.line.clear()
            if size == 0:  # the last chunk, then its (empty) trailer line
                self.chunked, self.left = False, 2
                if not self.left:
                    self.done()
            else:
                self.left = size + 2
            return
        if not self.line.endswith(b"\r\n\r\n"):
            return  # the head is not whole yet
        lines = bytes(self.line).split(b"\r\n")
        self.line.clear()
        self.target = lines[0].split(b" ")[1] if lines[0].count(b" ") >= 2 else b"/"
        self.headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            self.headers[name.strip().lower()] = value.strip()
        if self.headers.get(b"transfer-encoding") == b"chunked":
            self.chunked = True
        else:
            self.left = int(self.headers.get(b"content-length", b"0"))
            if not self.left:
                self.done()

    def done(self) -> None:
        """The request was read whole: answer it."""
        transport, state = self.transport, self.state
        assert transport is not None
        token = self.headers.get(b"authorization", b"")
        run = self.headers.get(b"x-bench-refuse")
        refused = state.refused.setdefault(run, set()) if run is not None else None
        if self.target.startswith(b"/slow/"):
            state.in_flight += 1
            body = b'{"in_flight":%d}' % state.in_flight

            def late() -> None:
                state.in_flight -= 1
                if not transport.is_closing():
                    transport.write(answer(b"200 OK", body))

            delay = int(self.target.removeprefix(b"/slow/")) / 1000
            asyncio.get_running_loop().call_later(delay, late)
        elif refused is not None and (not refused or token in refused):
            refused.add(token)
            transport.write(EXPIRED)
        else:
            transport.write(OK)


async def main() -> None:
    port = int(sys.argv[1])
    state = State()
    # A backlog for thousands of connections arriving at once (asyncio's default is 100).
    server = await asyncio.get_running_loop().create_server(
        lambda: Sink(state), "127.0.0.1", port, backlog=4096
    )
    print(f"sink on 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
