#!/usr/bin/env python3
"""An upload sink for the benchmark: reads request bodies at memory speed, then answers.

    python bench/sink.py PORT [--refuse-first]

Reads each request's body (Content-Length or chunked) to the end and throws it away, then
answers 200 with a small JSON body, keeping the connection open. With --refuse-first, the
first token it sees is refused with MetaDefender's 401009 (after the body was read), as the
API does when a token expires in the middle of a run: the proxy must replay the upload.
"""

from __future__ import annotations

import asyncio
import sys


def answer(status: bytes, body: bytes) -> bytes:
    head = b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    return head % (status, len(body)) + body


OK = answer(b"200 OK", b'{"data_id":"bench-1"}')
EXPIRED = answer(
    b"401 Unauthorized", b'{"error":{"code":401009,"messages":["OAuth token has expired"]}}'
)


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, refused: set[bytes],
                refuse_first: bool) -> None:  # fmt: skip
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            headers = {}
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if b"content-length" in headers:
                left = int(headers[b"content-length"])
                while left:
                    chunk = await reader.read(min(left, 1 << 20))
                    if not chunk:
                        return
                    left -= len(chunk)
            elif headers.get(b"transfer-encoding") == b"chunked":
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    left = size + 2
                    while left:
                        chunk = await reader.read(min(left, 1 << 20))
                        if not chunk:
                            return
                        left -= len(chunk)
                    if size == 0:
                        break
            token = headers.get(b"authorization", b"")
            if refuse_first and (not refused or token in refused):
                refused.add(token)
                writer.write(EXPIRED)
            else:
                writer.write(OK)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main() -> None:
    port = int(sys.argv[1])
    refuse_first = "--refuse-first" in sys.argv
    refused: set[bytes] = set()
    server = await asyncio.start_server(
        lambda r, w: serve(r, w, refused, refuse_first), "127.0.0.1", port, limit=1 << 20
    )
    print(f"sink on 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
