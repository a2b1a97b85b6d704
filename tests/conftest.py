"""Fixtures and helpers, defined once: the simulator and the proxy on loopback, raw TCP
servers, real sockets, a controllable clock, the proxy as a child process."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import os
import re
import socket
import ssl
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy import Config, Simulator, create_app, load_config, serve
from proxy.app import TOKENS
from proxy.tokens import TokenCache

CLIENT_ID = "test-client"
CLIENT_SECRET = "s3cr3t-client-secret-value"
API_KEY = "0123456789abcdef-api-key-value"
TOKEN_PATH = "/v4/oauth2/token"
ROOT = Path(__file__).resolve().parent.parent


def proxy_settings(upstream: str, **overrides: Any) -> dict[str, Any]:
    """The least a proxy needs (its upstream and the test account), as ``load_config``
    overrides; ``overrides`` use the same dotted keys: ``**{"upstream.read_timeout": 0.2}``."""
    return {
        "upstream.url": upstream,
        "oauth.client_id": CLIENT_ID,
        "oauth.client_secret": CLIENT_SECRET,
        **overrides,
    }


def proxy_config(upstream: str, **overrides: Any) -> Config:
    """A ``Config`` from `proxy_settings` alone: no file, no environment."""
    return load_config(environ={}, overrides=proxy_settings(upstream, **overrides))


def account_env(upstream: str, secret: str = CLIENT_SECRET) -> dict[str, str]:
    """The same least settings as environment variables, for the proxy as a process."""
    return {
        "MDCLOUD_CLIENT_ID": CLIENT_ID,
        "MDCLOUD_CLIENT_SECRET": secret,
        "MDCLOUD_PROXY_UPSTREAM_URL": upstream,
    }


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


async def quick_sleep(seconds: float) -> None:
    """The proxy's pauses (token retries, the interval between fetches), 100 times shorter:
    real waits, in order, without the seconds. Not the FakeClock: moving the clock shared
    with the simulator from inside the proxy would expire tokens under the tests."""
    await asyncio.sleep(seconds / 100)


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
        app = create_app(proxy_config(upstream, **overrides), clock=clock, sleep=quick_sleep)
        port = await start(app)
        return Proxy(f"http://127.0.0.1:{port}", port, app)

    return _make


@pytest.fixture
def proxy_before(
    make_proxy: Callable[..., Awaitable[Proxy]], upstream: str
) -> Callable[..., Awaitable[Proxy]]:
    """A proxy in front of a test's own upstream; tokens still come from the simulator."""

    async def _make(url: str, **overrides: Any) -> Proxy:
        token_url = upstream + TOKEN_PATH
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
    """Wait until ``condition()`` holds (awaited, if it is a coroutine: a question to a
    server); fail after ``within`` seconds."""
    async with asyncio.timeout(within):
        while True:
            held = condition()
            if inspect.isawaitable(held):
                held = await held
            if held:
                return
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


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A TCP server on 127.0.0.1 that says only what a test scripts, for what an aiohttp
    server would tidy up or refuse to do: hop-by-hop answer headers, broken framing, resets,
    stalls, answers in pieces.

    ``script`` is either a coroutine run for each connection, or fixed bytes: each connection
    then has its request head read (and kept in ``requests``) and answered with those bytes,
    then closed (``close=False``: held open until the peer hangs up). A peer hanging up is
    not an error. ``tls`` serves HTTPS.
    """

    def __init__(
        self, script: Script | bytes, *, close: bool = True, tls: ssl.SSLContext | None = None
    ) -> None:
        self.connections = 0
        self.requests: list[bytes] = []
        self.url = ""
        self._script = self._answer_with(script, close) if isinstance(script, bytes) else script
        self._tls = tls
        self._server: asyncio.AbstractServer | None = None

    def _answer_with(self, response: bytes, close: bool) -> Script:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.requests.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(response)
            await writer.drain()
            if not close:
                await reader.read()

        return answer

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self._tls)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"{'https' if self._tls else 'http'}://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self._script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[..., Awaitable[tuple[RawServer, str]]]]:
    """Start a `RawServer` (same arguments); returns it and its URL. All stop at the end."""
    servers: list[RawServer] = []

    async def _make(script: Script | bytes, **kwargs: Any) -> tuple[RawServer, str]:
        server = RawServer(script, **kwargs)
        servers.append(server)
        return server, await server.start()

    yield _make
    for server in servers:
        await server.stop()


# -- asking and reading ----------------------------------------------------------------------


async def get_status(client: aiohttp.ClientSession, url: str, **kwargs: Any) -> int | str:
    """GET ``url`` and read the whole answer: its status, or where there is no answer the
    client error's type name (``"ClientOSError"``), so that many outcomes compare in one
    assert and an unexpected failure shows in its message."""
    try:
        async with client.get(url, **kwargs) as resp:
            await resp.read()
            return resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        return type(exc).__name__


async def md_error(resp: aiohttp.ClientResponse) -> tuple[int, int, str]:
    """Status, code and the one message of the proxy's own MetaDefender-shaped error."""
    body = await resp.json()
    (message,) = body["error"]["messages"]
    assert message.startswith("mdcloud-proxy: ")
    return resp.status, body["error"]["code"], message


def api_requests(sim: Simulator) -> list[Any]:
    """What reached the simulator besides the proxy's token requests."""
    return [r for r in sim.requests if r.raw_path != TOKEN_PATH]


async def scrape(
    client: aiohttp.ClientSession, url: str
) -> dict[tuple[str, tuple[Any, ...]], float]:
    """The samples of a metrics page as {(name, sorted labels): value}."""
    async with client.get(url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# -- the proxy as a process ------------------------------------------------------------------


async def spawn(
    *args: str,
    env: dict[str, str] | None = None,
    stderr: int = asyncio.subprocess.STDOUT,
    preexec_fn: Callable[[], None] | None = None,
) -> asyncio.subprocess.Process:
    """``python -m proxy ARGS`` with ``env`` on top of this environment without MDCLOUD_*;
    its output on ``proc.stdout``. ``preexec_fn`` runs in the child (resource limits)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MDCLOUD")}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
        env={**clean, **(env or {})},
        cwd=ROOT,
        preexec_fn=preexec_fn,
    )


@dataclass
class ProxyProcess:
    """A proxy started by ``spawn``: where it listens, and its output, read all along (a full
    pipe would stall it). ``stop()`` ends it and prints the output, which pytest shows when
    a test fails."""

    proc: asyncio.subprocess.Process
    url: str = ""
    lines: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    async def started(self) -> ProxyProcess:
        """Read the output up to the line that says where it listens (15 s at most)."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(15):
            while not self.url:
                line = (await self.proc.stdout.readline()).decode(errors="replace")
                assert line, "the proxy ended:\n" + self.log
                self.lines.append(line)
                match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
                self.url = match.group(1) if match else ""
        self.reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.lines.append(line.decode(errors="replace"))

    @property
    def log(self) -> str:
        return "".join(self.lines)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
        async with asyncio.timeout(20):
            await self.proc.wait()
        if self.reader is not None:
            await self.reader
        print(f"--- {self.url}\n{self.log}")


def free_port() -> int:
    """A loopback port free now (for a server that must be told its port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def wait_for_line(proc: asyncio.subprocess.Process, pattern: str) -> re.Match[str]:
    """Read ``proc.stdout`` up to the first line matching ``pattern`` (15 s at most)."""
    assert proc.stdout is not None
    seen = []
    async with asyncio.timeout(15):
        while True:
            line = (await proc.stdout.readline()).decode()
            seen.append(line)
            if not line:
                raise AssertionError(
                    "process ended without printing " + pattern + ":\n" + "".join(seen)
                )
            match = re.search(pattern, line)
            if match:
                return match
