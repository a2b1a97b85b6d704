"""Fixtures: the simulator and the proxy on loopback, real sockets, a controllable clock."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy import Simulator, create_app, load_config, serve
from proxy.app import TOKENS
from proxy.tokens import TokenCache

CLIENT_ID = "test-client"
CLIENT_SECRET = "s3cr3t-client-secret-value"
API_KEY = "0123456789abcdef-api-key-value"


class FakeClock:
    """A monotonic clock that moves only when a test says so; shared by proxy and simulator."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Proxy:
    """A running proxy: its URL, its app (for inspection only) and its port."""

    url: str
    port: int
    app: web.Application

    @property
    def tokens(self) -> TokenCache:
        return self.app[TOKENS]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sim(clock: FakeClock) -> Simulator:
    return Simulator(CLIENT_ID, CLIENT_SECRET, clock=clock)


@pytest.fixture
async def start() -> AsyncIterator[Callable[..., Awaitable[int]]]:
    """Start any aiohttp app on 127.0.0.1 and return its port; everything stops at the end."""
    runners: list[web.AppRunner] = []

    async def _start(app: web.Application, **kwargs: Any) -> int:
        runner = await serve(app, "127.0.0.1", 0, **kwargs)
        runners.append(runner)
        return int(runner.addresses[0][1])

    yield _start
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
async def upstream(sim: Simulator, start: Callable[..., Awaitable[int]]) -> str:
    port = await start(sim.app())
    return f"http://127.0.0.1:{port}"


@pytest.fixture
async def make_proxy(
    upstream: str, clock: FakeClock, start: Callable[..., Awaitable[int]]
) -> Callable[..., Awaitable[Proxy]]:
    async def _make(**overrides: Any) -> Proxy:
        settings: dict[str, Any] = {
            "upstream.url": upstream,
            "oauth.client_id": CLIENT_ID,
            "oauth.client_secret": CLIENT_SECRET,
        }
        settings.update(overrides)
        config = load_config(environ={}, overrides=settings)
        app = create_app(config, clock=clock)
        port = await start(app)
        return Proxy(f"http://127.0.0.1:{port}", port, app)

    return _make


@pytest.fixture
def proxy_before(
    make_proxy: Callable[..., Awaitable[Proxy]], upstream: str
) -> Callable[..., Awaitable[Proxy]]:
    """A proxy in front of a test's own upstream; tokens still come from the simulator."""

    async def _make(url: str, **overrides: Any) -> Proxy:
        token_url = upstream + "/v4/oauth2/token"
        return await make_proxy(**{"upstream.url": url, "oauth.token_url": token_url, **overrides})

    return _make


@pytest.fixture
def handler_upstream(start: Callable[..., Awaitable[int]]) -> Callable[..., Awaitable[str]]:
    """Start a test's own upstream, one aiohttp handler for every path; returns its URL."""

    async def _make(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        return f"http://127.0.0.1:{await start(app)}"

    return _make


@pytest.fixture
async def proxy(make_proxy: Callable[..., Awaitable[Proxy]]) -> Proxy:
    return await make_proxy()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


async def raw_exchange(port: int, request: bytes) -> RawResponse:
    """Send exact bytes to 127.0.0.1:port and parse one HTTP/1.1 response (Content-Length,
    chunked, or until close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = [
                (k.strip(), v.strip())
                for k, _, v in (line.partition(":") for line in lines[1:] if line)
            ]
            names = {k.lower(): v for k, v in headers}
            if "content-length" in names:
                body = await reader.readexactly(int(names["content-length"]))
            elif names.get("transfer-encoding") == "chunked":
                body = b""
                while True:
                    size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                    if size == 0:
                        await reader.readuntil(b"\r\n")
                        break
                    body += await reader.readexactly(size)
                    await reader.readexactly(2)
            else:
                body = await reader.read()
        return RawResponse(status, headers, body)
    finally:
        writer.close()


async def eventually(condition: Callable[[], object], within: float = 5.0) -> None:
    """Wait until ``condition()`` holds; fail after ``within`` seconds."""
    async with asyncio.timeout(within):
        while not condition():
            await asyncio.sleep(0.01)


def open_deleted_files() -> set[str]:
    """Open descriptors of this process that point at deleted files in the temp directory.

    TemporaryFile has no name on disk (O_TMPFILE, or unlinked at once), so this is how a
    spill file shows. Compare with a baseline: pytest's output capture uses such files too.
    """
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(tempfile.gettempdir()) and target.endswith("(deleted)"):
            found.add(target)
    return found


def random_payload(size: int) -> tuple[bytes, str]:
    data = os.urandom(size)
    return data, hashlib.sha256(data).hexdigest()


async def chunks(data: bytes, size: int = 256 * 1024) -> AsyncIterator[bytes]:
    """Yield ``data`` in pieces, as a streaming uploader would."""
    for i in range(0, len(data), size):
        yield data[i : i + size]
        await asyncio.sleep(0)


class RawUpstream:
    """An upstream that answers every request with fixed bytes and keeps the raw requests.

    For what an aiohttp server would tidy up: hop-by-hop response headers, broken framing.
    """

    def __init__(self, response: bytes, *, close: bool = True) -> None:
        self.response = response
        self.close = close
        self.requests: list[bytes] = []
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests.append(head)
            writer.write(self.response)
            await writer.drain()
            if not self.close:
                await reader.read()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[..., Awaitable[tuple[RawUpstream, str]]]]:
    servers: list[RawUpstream] = []

    async def _make(response: bytes, **kwargs: Any) -> tuple[RawUpstream, str]:
        server = RawUpstream(response, **kwargs)
        servers.append(server)
        port = await server.start()
        return server, f"http://127.0.0.1:{port}"

    yield _make
    for server in servers:
        await server.stop()
