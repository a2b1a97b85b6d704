#!/usr/bin/env python3
"""The benchmark's plain upstream for uploads and slow answers.

    python bench/sink.py PORT

Reads each request's body (Content-Length or chunked) to the end and throws it away, then
answers 200 with a small JSON body, keeping the connection open. Two behaviours on demand:

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


@dataclass
class State:
    refused: dict[bytes, set[bytes]] = field(default_factory=dict)  # run -> tokens refused
    in_flight: int = 0


async def skip(reader: asyncio.StreamReader, left: int) -> bool:
    while left:
        chunk = await reader.read(min(left, 1 << 20))
        if not chunk:
            return False
        left -= len(chunk)
    return True


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: State) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            target = lines[0].split(b" ")[1] if lines[0].count(b" ") >= 2 else b"/"
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if b"content-length" in headers:
                if not await skip(reader, int(headers[b"content-length"])):
                    return
            elif headers.get(b"transfer-encoding") == b"chunked":
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    if not await skip(reader, size + 2):
                        return
                    if size == 0:
                        break
            token = headers.get(b"authorization", b"")
            run = headers.get(b"x-bench-refuse")
            refused = state.refused.setdefault(run, set()) if run is not None else None
            if target.startswith(b"/slow/"):
                state.in_flight += 1
                seen = state.in_flight
                try:
                    await asyncio.sleep(int(target.removeprefix(b"/slow/")) / 1000)
                finally:
                    state.in_flight -= 1
                writer.write(answer(b"200 OK", b'{"in_flight":%d}' % seen))
            elif refused is not None and (not refused or token in refused):
                refused.add(token)
                writer.write(EXPIRED)
            else:
                writer.write(OK)
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


async def main() -> None:
    port = int(sys.argv[1])
    state = State()
    # A backlog for thousands of connections arriving at once (asyncio's default is 100).
    server = await asyncio.start_server(
        lambda r, w: serve(r, w, state), "127.0.0.1", port, limit=1 << 20, backlog=4096
    )
    print(f"sink on 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
