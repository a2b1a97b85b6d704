"""A token endpoint that paces, frames or fills its answer unusually, or answers nonsense.

The token endpoints here are raw asyncio servers (every byte and every pause is the test's)
or aiohttp handlers; the API behind the proxy is a handler that takes any bearer token.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import ssl
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
import trustme
from aiohttp import web

from proxy import ClientCredentials, TokenCache, TokenError, create_app, load_config
from proxy.check import check

from .conftest import CLIENT_ID, CLIENT_SECRET, FakeClock, eventually, proxy_settings

TOKEN = "tok-0123456789abcdef_~+/=="
ANSWER = json.dumps({"access_token": TOKEN, "expires_in": 3600, "token_type": "Bearer"}).encode()


def head(length: int | None) -> bytes:
    framing = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    return (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{framing}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()


def in_two_writes(body: bytes) -> list[bytes]:
    """The head with the first 20 bytes of the body, then the rest."""
    return [head(len(body)) + body[:20], body[20:]]


def chunked(body: bytes, size: int = 16) -> list[bytes]:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return [head(None)] + [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"]


def slowly(body: bytes, count: int = 8) -> list[bytes]:
    size = -(-len(body) // count)
    return [head(len(body))] + [body[i : i + size] for i in range(0, len(body), size)]


class PacedServer:
    """Answers each request with ``pieces``, one write each, ``pause`` seconds apart."""

    def __init__(self, pieces: list[bytes], pause: float, tls: ssl.SSLContext | None) -> None:
        self.pieces, self.pause, self.tls = pieces, pause, tls
        self.requests = 0
        self.url = ""
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
            length = 0
            for line in request.split("\r\n"):
                name, _, value = line.partition(":")
                if name == "content-length":
                    length = int(value)
            await reader.readexactly(length)
            self.requests += 1
            for i, piece in enumerate(self.pieces):
                if i:
                    await asyncio.sleep(self.pause)  # the pause is what is being tested
                writer.write(piece)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def paced() -> AsyncIterator[Callable[..., Awaitable[PacedServer]]]:
    servers: list[PacedServer] = []

    async def _make(
        pieces: list[bytes], pause: float = 0.05, tls: ssl.SSLContext | None = None
    ) -> PacedServer:
        server = PacedServer(pieces, pause, tls)
        servers.append(server)
        await server.start()
        return server

    yield _make
    for server in servers:
        await server.stop()


@pytest.fixture
async def api(handler_upstream) -> tuple[str, list[str]]:
    """An API that answers 200 to any bearer token; it keeps the Authorization it got."""
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response({"ok": True})

    return await handler_upstream(handler), seen


async def md_error(resp: aiohttp.ClientResponse) -> tuple[int, int, str]:
    body = await resp.json()
    (message,) = body["error"]["messages"]
    assert message.startswith("mdcloud-proxy: ")
    return resp.status, body["error"]["code"], message


# -- the whole answer, however it arrives ---------------------------------------------------------


@pytest.mark.parametrize(
    ("pieces", "pause"),
    [(in_two_writes(ANSWER), 0.05), (chunked(ANSWER), 0.05), (slowly(ANSWER), 0.15)],
    ids=["two-writes", "chunked", "slowly"],
)
async def test_token_answer_arriving_in_pieces(make_proxy, paced, api, client, pieces, pause):
    endpoint = await paced(pieces, pause)
    api_url, seen = api
    # Each pause is within the read timeout, the whole answer (8 x 0.15 s) is not.
    proxy = await make_proxy(
        **{
            "upstream.url": api_url,
            "oauth.token_url": endpoint.url + "/token",
            "upstream.read_timeout": 0.5,
        }
    )
    async with client.get(proxy.url + "/v4/apikey/") as resp:
        assert resp.status == 200, await resp.text()
    assert seen == [f"Bearer {TOKEN}"]
    assert endpoint.requests == 1


async def test_token_answer_in_pieces_over_tls(make_proxy, paced, api, client, tmp_path):
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    endpoint = await paced(in_two_writes(ANSWER), tls=server_tls)
    api_url, seen = api
    proxy = await make_proxy(
        **{
            "upstream.url": api_url,
            "oauth.token_url": endpoint.url + "/token",
            "upstream.ca_file": str(ca_file),
        }
    )
    async with client.get(proxy.url + "/v4/apikey/") as resp:
        assert resp.status == 200, await resp.text()
    assert seen == [f"Bearer {TOKEN}"]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_oversized_token_answer_is_a_clear_error(make_proxy, paced, api, client, framing):
    body = json.dumps({"access_token": TOKEN, "expires_in": 3600, "pad": "x" * 70_000}).encode()
    pieces = [head(len(body)) + body] if framing == "content-length" else chunked(body, 8192)
    endpoint = await paced(pieces, pause=0)
    api_url, seen = api
    proxy = await make_proxy(
        **{"upstream.url": api_url, "oauth.token_url": endpoint.url + "/token"}
    )
    async with client.get(proxy.url + "/v4/apikey/") as resp:
        status, code, message = await md_error(resp)
    assert (status, code) == (502, 502010)
    assert "token endpoint answer is larger than 64 KiB" in message
    assert seen == [], "nothing goes upstream"


async def test_token_answer_that_breaks_off_is_a_clear_error(make_proxy, paced, api, client):
    endpoint = await paced([head(len(ANSWER) + 100) + ANSWER])  # then the connection closes
    api_url, _ = api
    token_url = endpoint.url + "/token"
    proxy = await make_proxy(**{"upstream.url": api_url, "oauth.token_url": token_url})
    async with client.get(proxy.url + "/v4/apikey/") as resp:
        status, _, message = await md_error(resp)
    assert status == 503
    assert f"token endpoint {token_url} broke off its answer" in message


async def test_check_reads_the_whole_api_answer(paced):
    info = json.dumps({"limit_interval": "daily", "limit_prevention": 4000}).encode()
    api = await paced(in_two_writes(info))
    endpoint = await paced(in_two_writes(ANSWER))
    settings = {
        "upstream.url": api.url,
        "oauth.token_url": endpoint.url + "/token",
        "oauth.client_id": CLIENT_ID,
        "oauth.client_secret": CLIENT_SECRET,
    }
    out = io.StringIO()
    assert await check(load_config(environ={}, overrides=settings), out)
    assert out.getvalue().splitlines()[1:4] == [
        "token    ok, valid for 3600 s",
        "api      ok, GET /v4/apikey/ answered HTTP 200",
        "limits   prevention 4000 per daily interval",
    ]


# -- a token that cannot be sent ------------------------------------------------------------------

MARKER = "leak-me-7f3a9c"


@pytest.mark.parametrize(
    "token",
    [
        f"{MARKER}\r\nX-Injected: 1",
        f"{MARKER}\n",
        f"{MARKER}\x00x",
        f"{MARKER} x",
        f"{MARKER}\u00e9",
        f"{MARKER}=x",
    ],
    ids=["crlf", "trailing-lf", "nul", "space", "non-ascii", "inner-equals"],
)
async def test_unusable_access_token_is_a_token_error(
    make_proxy, handler_upstream, api, client, caplog, token
):
    caplog.set_level(logging.DEBUG)
    fetches = 0

    async def endpoint(_request: web.Request) -> web.Response:
        nonlocal fetches
        fetches += 1
        return web.json_response({"access_token": token, "expires_in": 3600})

    api_url, seen = api
    token_url = await handler_upstream(endpoint) + "/token"
    proxy = await make_proxy(**{"upstream.url": api_url, "oauth.token_url": token_url})
    bodies = []
    for _ in range(3):
        async with client.get(proxy.url + "/v4/apikey/") as resp:
            bodies.append(await resp.text())
            status, code, message = await md_error(resp)
        assert (status, code) == (502, 502010)
        assert "access_token that cannot be sent as a bearer token" in message
        assert "RFC 6750" in message
    async with client.get(proxy.url + "/-/ready") as resp:
        assert resp.status == 503
        bodies.append(await resp.text())
    assert proxy.tokens.current is None, "not cached"
    assert seen == [], "nothing goes upstream"
    assert fetches <= 3, "one fetch and its retries; the backoff answers the rest"
    for text in [*bodies, caplog.text]:
        assert MARKER not in text
        assert "Server got itself in trouble" not in text


# -- announced lifetimes and pauses beyond reason -------------------------------------------------


@pytest.fixture
async def lifetime_endpoint(handler_upstream) -> Callable[..., Awaitable[tuple[str, list[int]]]]:
    """A token endpoint announcing ``expires_in`` as given, as JSON text; counts its fetches."""

    async def _make(expires_in: str) -> tuple[str, list[int]]:
        fetches = [0]

        async def endpoint(_request: web.Request) -> web.Response:
            fetches[0] += 1
            body = f'{{"access_token":"tok-{fetches[0]}","expires_in":{expires_in}}}'
            return web.Response(text=body, content_type="application/json")

        return await handler_upstream(endpoint) + "/token", fetches

    return _make


@pytest.mark.parametrize(
    "expires_in",
    ["1e400", "Infinity", "1" + "0" * 400, "1e12"],
    ids=["1e400", "inf", "10^400", "1e12"],
)
async def test_huge_lifetime_is_capped_at_a_day(
    make_proxy, lifetime_endpoint, api, client, clock, caplog, expires_in
):
    caplog.set_level(logging.INFO)
    token_url, fetches = await lifetime_endpoint(expires_in)
    api_url, seen = api
    proxy = await make_proxy(**{"upstream.url": api_url, "oauth.token_url": token_url})
    async with client.get(proxy.url + "/v4/apikey/") as resp:
        assert resp.status == 200
    async with client.get(proxy.url + "/-/ready") as resp:
        assert resp.status == 200
        assert (await resp.json())["token_expires_in_s"] == 86400
    async with client.get(proxy.url + "/-/metrics") as resp:
        assert resp.status == 200
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "using it for at most 86400 s" in warnings[0]
    clock.advance(86400 - 30)  # inside the refresh margin: a new token comes
    async with client.get(proxy.url + "/v4/apikey/") as resp:
        assert resp.status == 200
    await eventually(lambda: fetches[0] == 2)
    assert seen == ["Bearer tok-1", "Bearer tok-1"]


@pytest.mark.parametrize("value", ["inf", "1e400", "99999999999"])
async def test_absurd_retry_after_is_capped(sim, clock, make_proxy, client, value):
    sim.token_failure = (429, b"{}", {"Retry-After": value})
    proxy = await make_proxy()
    async with client.get(proxy.url + "/v4/apikey/") as resp:
        status, _, message = await md_error(resp)
        assert status == 503
        assert 1 <= int(resp.headers["Retry-After"]) <= 900
    assert "token endpoint answered HTTP 429" in message
    assert sim.token_requests == 1
    sim.token_failure = None
    clock.advance(901)  # the longest backoff: the endpoint is asked again
    async with client.get(proxy.url + "/v4/apikey/") as resp:
        assert resp.status == 200
    assert sim.token_requests == 2


# -- short lifetimes: the token endpoint asked at most once a second ------------------------------


class SimTime(FakeClock):
    """A fake clock whose sleeps pass simulated time at once."""

    async def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)


def cache_for(
    session: aiohttp.ClientSession, token_url: str, clock: SimTime, **kwargs
) -> TokenCache:
    credentials = ClientCredentials(session, token_url, CLIENT_ID, CLIENT_SECRET, clock=clock)
    return TokenCache(credentials.fetch, identity="test", clock=clock, sleep=clock.sleep, **kwargs)


@pytest.fixture
async def scripted_endpoint(handler_upstream) -> Callable[..., Awaitable[str]]:
    """A token endpoint giving tok-1, tok-2, ... valid for ``lifetime`` s; 503 after ``count``."""

    async def _make(lifetime: float, count: int) -> str:
        issued = 0

        async def endpoint(_request: web.Request) -> web.Response:
            nonlocal issued
            if issued == count:
                return web.Response(status=503, text="maintenance")
            issued += 1
            return web.json_response({"access_token": f"tok-{issued}", "expires_in": lifetime})

        return await handler_upstream(endpoint) + "/token"

    return _make


async def test_a_token_is_served_until_it_expires_and_never_after(scripted_endpoint, client):
    clock = SimTime()
    tokens = cache_for(client, await scripted_endpoint(100, 1), clock, attempts=1)
    first = await tokens.get()
    clock.now = first.expires_at - 0.001  # stale: served, and its refresh fails
    assert await tokens.get() is first
    await eventually(lambda: tokens.error is not None)
    assert tokens.current is first
    clock.now = first.expires_at
    assert tokens.current is None
    with pytest.raises(TokenError):
        await tokens.get()


async def test_invalidate_drops_a_token_only_while_it_is_current(scripted_endpoint, client):
    clock = SimTime()
    tokens = cache_for(client, await scripted_endpoint(3600, 2), clock)
    first = await tokens.get()
    tokens.invalidate(first)
    assert tokens.current is None
    asked = clock.now
    second = await tokens.get()
    assert second.access_token == "tok-2"
    assert clock.now == asked, "a refused token is replaced at once, without the fetch interval"
    tokens.invalidate(first)  # a caller still holding the old one
    assert tokens.current is second
    assert await tokens.get() is second


@pytest.mark.parametrize("expires_in", ["0.01", "0.3", "1e-9"])
async def test_short_lived_tokens_are_fetched_at_most_once_a_second(
    lifetime_endpoint, client, caplog, expires_in
):
    token_url, fetches = await lifetime_endpoint(expires_in)
    clock = SimTime()
    tokens = cache_for(client, token_url, clock)
    start = clock.now

    async def caller() -> None:
        token = await tokens.get()
        assert clock.now <= token.expires_at, "never an expired token"

    for _ in range(100):  # 100 rounds of 5 callers, 10 ms apart (plus the waits for tokens)
        await asyncio.gather(*(caller() for _ in range(5)))
        clock.advance(0.01)
    elapsed = clock.now - start
    assert fetches[0] <= elapsed + 1, (fetches[0], elapsed)
    assert fetches[0] >= 2, "it does fetch again when the token runs out"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "one warning, not one per fetch"
    assert "tokens valid for only" in warnings[0].getMessage()


async def test_short_lived_tokens_while_idle(lifetime_endpoint, client):
    token_url, fetches = await lifetime_endpoint("0.01")
    clock = SimTime()
    tokens = cache_for(client, token_url, clock)
    start = clock.now
    keeper = asyncio.create_task(tokens.keep_fresh())
    try:
        await eventually(lambda: clock.now >= start + 60)
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        await tokens.close()
    assert fetches[0] <= clock.now - start + 1


async def test_token_endpoint_is_asked_at_most_once_a_second_under_load(
    start, lifetime_endpoint, api, client
):
    # The real clock and the proxy's own settings: 10 ms tokens, callers without pause.
    token_url, fetches = await lifetime_endpoint("0.01")
    api_url, _ = api
    config = load_config(
        environ={},
        overrides={
            "upstream.url": api_url,
            "oauth.token_url": token_url,
            "oauth.client_id": CLIENT_ID,
            "oauth.client_secret": CLIENT_SECRET,
        },
    )
    began = time.monotonic()  # before the proxy's first fetch
    base = f"http://127.0.0.1:{await start(create_app(config))}"
    statuses: list[int] = []

    async def caller() -> None:
        while time.monotonic() - began < 2.5 and len(statuses) < 5000:
            async with client.get(base + "/v4/apikey/") as resp:
                await resp.read()
                statuses.append(resp.status)

    await asyncio.gather(*(caller() for _ in range(5)))
    elapsed = time.monotonic() - began
    assert set(statuses) == {200}
    assert fetches[0] <= elapsed + 1, (fetches[0], elapsed)


# -- the RFC 6749 error code decides, not words in a message -------------------------------------


@pytest.mark.parametrize(
    ("status", "answer", "error_code", "credentials"),
    [
        (400, {"error": "invalid_client"}, "invalid_client", True),
        (401, {"error": "invalid_request"}, "invalid_request", True),
        # The words of the description are the endpoint's, not a verdict on the credentials.
        (
            400,
            {"error": "invalid_scope", "error_description": "no such scope for invalid_client"},
            "invalid_scope",
            False,
        ),
        (400, {"error": {"code": 400000, "messages": ["invalid_client"]}}, None, False),
    ],
    ids=["400-invalid_client", "401", "400-invalid_scope", "400-metadefender-shape"],
)
async def test_the_error_code_of_a_refusal_decides_what_to_check(
    handler_upstream, client, status, answer, error_code, credentials
):
    async def refuse(_request: web.Request) -> web.Response:
        return web.json_response(answer, status=status)

    token_url = await handler_upstream(refuse) + "/token"
    tokens = cache_for(client, token_url, SimTime())
    for _ in range(2):  # the fetch, then the error kept for the backoff
        with pytest.raises(TokenError) as caught:
            await tokens.get()
        exc = caught.value
        assert exc.permanent and exc.status == 502
        if credentials:
            assert "rejected the client credentials" in exc.message
            assert "check oauth.client_id and oauth.client_secret" in exc.message
        else:
            assert "refused the token request" in exc.message
            assert "client_secret" not in exc.message
        assert exc.error_code == error_code
        assert exc.error_description == (answer.get("error_description") if error_code else None)


async def test_a_token_error_has_no_error_code_when_the_endpoint_gave_none(
    handler_upstream, client
):
    async def unavailable(_request: web.Request) -> web.Response:
        return web.Response(status=503, text="maintenance")

    credentials = ClientCredentials(
        client, await handler_upstream(unavailable) + "/token", CLIENT_ID, CLIENT_SECRET
    )
    with pytest.raises(TokenError) as caught:
        await credentials.fetch()
    assert (caught.value.error_code, caught.value.error_description) == (None, None)
    assert not caught.value.permanent


# -- a backoff that leaves nothing behind ---------------------------------------------------------


async def test_errors_during_a_backoff_are_distinct_and_memory_stays_flat(handler_upstream, client):
    async def refuse(_request: web.Request) -> web.Response:
        return web.json_response({"error": "invalid_client"}, status=401)

    token_url = await handler_upstream(refuse) + "/token"
    clock = SimTime()
    tokens = cache_for(client, token_url, clock)

    async def refused() -> TokenError:
        try:
            await tokens.get()
        except TokenError as exc:
            return exc
        raise AssertionError("a token was served")

    first = await refused()
    assert first.permanent and first.status == 502
    kept = [await refused() for _ in range(100)]
    assert len({id(exc) for exc in [first, *kept]}) == 101, "a new exception each time"
    assert all(exc.message == first.message and exc.permanent for exc in kept)
    assert all(exc.retry_after is not None and exc.retry_after > 0 for exc in kept)
    del kept
    tracemalloc.start()
    try:
        for _ in range(200):
            await refused()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(3000):
            await refused()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 100_000, grown


async def test_an_api_refusing_every_token_does_not_drive_token_requests(
    start, handler_upstream, upstream, sim, client
):
    """A refused token is replaced at once for the replay, but only once per second: an API
    that refuses them all must not make the proxy ask for a token per request. (The proxy
    on the real clock and real pauses: about 2.5 s.)"""

    async def refusing(_request: web.Request) -> web.Response:
        return web.json_response(
            {"error": {"code": 401010, "messages": ["OAuth token is invalid"]}}, status=401
        )

    settings = proxy_settings(await handler_upstream(refusing))
    settings["oauth.token_url"] = upstream + "/v4/oauth2/token"
    url = f"http://127.0.0.1:{await start(create_app(load_config(environ={}, overrides=settings)))}"
    await eventually(lambda: sim.token_requests >= 1)
    began, asked = time.monotonic(), sim.token_requests
    while time.monotonic() - began < 2.5:
        async with client.get(url + "/v4/apikey/") as resp:
            assert resp.status == 401
    elapsed = time.monotonic() - began
    assert sim.token_requests - asked <= elapsed + 1, (sim.token_requests - asked, elapsed)


async def test_retries_keep_the_interval_whatever_retry_after_says(clock):
    pauses: list[float] = []

    async def record(seconds: float) -> None:
        pauses.append(seconds)

    async def busy() -> None:
        raise TokenError("token endpoint answered HTTP 503", retry_after=0.0)

    tokens = TokenCache(busy, identity="x", clock=clock, sleep=record)  # type: ignore[arg-type]
    with pytest.raises(TokenError):
        await tokens.get()
    assert len(pauses) == 2 and min(pauses) >= 1.0  # three tries, a second apart
