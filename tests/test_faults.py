"""Faults on either side: the caller gets a clear answer, the proxy leaks nothing and serves on.

Each fault runs several times in a row: a descriptor, socket or temporary file leaked per
occurrence would show as growth.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from .conftest import chunks, eventually, get_status, md_error, open_deleted_files, scrape

REPEAT = 8
# A token fetch that fails is retried inside the fetch, with real pauses of about a second.
TOKEN_REPEAT = 3
SLACK_FDS = 4  # pooled keep-alive connections may come and go: two descriptors each here


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def assert_no_leak_over_repeats(
    fault: Callable[[], Awaitable[None]],
    healthy: Callable[[], Awaitable[None]],
    repeat: int = REPEAT,
) -> None:
    """Run ``fault`` once to warm up, then ``repeat`` times; descriptors and temp files must
    not grow, and the proxy must serve after each."""
    await fault()
    await healthy()
    fds, temp_files = open_fds(), open_deleted_files()
    for _ in range(repeat):
        await fault()
        await healthy()
    await eventually(lambda: open_fds() <= fds + SLACK_FDS)
    await eventually(lambda: open_deleted_files() <= temp_files)


@pytest.fixture
def healthy(client, upstream):
    """A check that a proxy still serves: its health endpoint and a real call."""

    def for_proxy(proxy) -> Callable[[], Awaitable[None]]:
        async def check() -> None:
            async with client.get(proxy.url + "/-/healthy") as resp:
                assert resp.status == 200

        return check

    return for_proxy


# -- the token endpoint ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "status", "code", "phrase"),
    [
        ((500, b"oops"), 503, 503010, "token endpoint answered HTTP 500"),
        ((429, b"{}", {"Retry-After": "30"}), 503, 503010, "token endpoint answered HTTP 429"),
        ((200, b"<html>login</html>"), 502, 502010, "not JSON"),
        ((200, b'{"token_type":"Bearer"}'), 502, 502010, "has no access_token"),
        ((400, b'{"error":"invalid_client"}'), 502, 502010, "rejected the client credentials"),
    ],
    ids=["500", "429", "garbage", "no-token", "invalid_client"],
)
async def test_token_endpoint_faults(
    sim, clock, make_proxy, client, healthy, failure, status, code, phrase
):
    sim.token_failure = failure
    proxy = await make_proxy()

    async def fault() -> None:
        clock.advance(1000)  # past any backoff, so that each round asks the endpoint again
        async with client.get(proxy.url + "/v4/apikey/") as resp:
            got = await md_error(resp)
        assert got[:2] == (status, code)
        assert phrase in got[2]

    await assert_no_leak_over_repeats(fault, healthy(proxy), TOKEN_REPEAT)
    assert not any(r.raw_path == "/v4/apikey/" for r in sim.requests)
    sim.token_failure = None
    clock.advance(1000)
    async with client.get(proxy.url + "/v4/apikey/") as resp:
        assert resp.status == 200, "it recovers once the endpoint does"


async def test_token_endpoint_down_and_slow(
    make_proxy, handler_upstream, unused_tcp_port, client, healthy, clock
):
    down = await make_proxy(**{"oauth.token_url": f"http://127.0.0.1:{unused_tcp_port}/t"})

    async def stall(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({})

    slow_url = await handler_upstream(stall)
    slow = await make_proxy(**{"oauth.token_url": slow_url + "/t", "upstream.read_timeout": 0.2})
    down_phrase = (
        f"token endpoint http://127.0.0.1:{unused_tcp_port}/t unreachable: Connection refused"
    )
    for proxy, phrase in [(down, down_phrase), (slow, "timed out")]:

        async def fault(proxy=proxy, phrase=phrase) -> None:
            clock.advance(1000)
            async with client.get(proxy.url + "/v4/apikey/") as resp:
                got = await md_error(resp)
                assert resp.headers["Retry-After"].isdigit()
            assert got[:2] == (503, 503010)
            assert phrase in got[2]

        await assert_no_leak_over_repeats(fault, healthy(proxy), TOKEN_REPEAT)


async def test_token_requests_stay_bounded_while_the_endpoint_fails(sim, clock, make_proxy, client):
    """A failing token endpoint is asked with growing, jittered pauses, however many callers
    keep coming: never more than three tries per fetch and fetches 1, 2, 4, 8 ... s apart."""
    sim.token_failure = (503, b"down")
    proxy = await make_proxy()
    for _ in range(30):  # 30 s of 10 callers a second
        statuses = await asyncio.gather(
            *(get_status(client, proxy.url + "/v4/apikey/") for _ in range(10))
        )
        assert set(statuses) == {503}
        clock.advance(1)
    # fetches at about 0, 1, 3, 7, 15 (and 31) s: at most 6 of them, 3 tries each
    assert 9 <= sim.token_requests <= 18


# -- the upstream ------------------------------------------------------------------------------


async def test_upstream_refusing_connections(proxy_before, unused_tcp_port, client, healthy):
    proxy = await proxy_before(f"http://127.0.0.1:{unused_tcp_port}")

    async def fault() -> None:
        async with client.get(proxy.url + "/v4/apikey/") as resp:
            got = await md_error(resp)
        assert got == (
            502,
            502001,
            f"mdcloud-proxy: cannot connect to upstream 127.0.0.1:{unused_tcp_port}: "
            "Connection refused",
        )

    await assert_no_leak_over_repeats(fault, healthy(proxy))


async def test_upstream_resetting_mid_upload(proxy_before, raw_upstream, client, healthy):
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(64 * 1024)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST, not FIN

    server, url = await raw_upstream(reset)
    proxy = await proxy_before(url, **{"replay.memory_limit": 1024})
    data = os.urandom(2 * 1024 * 1024)

    async def fault() -> None:
        async with client.post(proxy.url + "/v4/file", data=chunks(data)) as resp:
            got = await md_error(resp)
        assert got[:2] == (502, 502003)

    await assert_no_leak_over_repeats(fault, healthy(proxy))
    assert server.connections == 2 * (REPEAT + 1), "each upload was tried twice, no more"


async def test_upstream_stalling_past_read_timeout(proxy_before, raw_upstream, client, healthy):
    # Say nothing until the proxy gives up and hangs up.
    _, url = await raw_upstream(b"", close=False)
    proxy = await proxy_before(url, **{"upstream.read_timeout": 0.2})

    async def fault() -> None:
        async with client.get(proxy.url + "/v4/apikey/") as resp:
            got = await md_error(resp)
        assert got[:2] == (504, 504001)

    await assert_no_leak_over_repeats(fault, healthy(proxy))


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 OK\r\nContent-Length: 0\r\n\r\n",
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nX-A: a\x00b\r\n\r\nx",
        b"",
    ],
    ids=["cl-and-te", "no-status-code", "garbage", "nul-in-header", "nothing"],
)
async def test_malformed_upstream_answers_are_a_502(
    proxy_before, raw_upstream, client, healthy, answer
):
    _, url = await raw_upstream(answer)
    proxy = await proxy_before(url)

    async def fault() -> None:
        async with client.get(proxy.url + "/v4/apikey/") as resp:
            got = await md_error(resp)
        assert got[:2] == (502, 502003)

    await assert_no_leak_over_repeats(fault, healthy(proxy))


@pytest.mark.security
@pytest.mark.parametrize(
    ("head", "what"),
    [
        (b"".join(b"X-Filler-%05d: %s\r\n" % (i, b"a" * 48) for i in range(1600)), "too many"),
        (b"X-Filler: " + b"a" * (100 * 1024) + b"\r\n", "a line of more than 8190 bytes"),
    ],
    ids=["100-KiB-of-headers", "one-100-KiB-header"],
)
async def test_answer_headers_too_large_are_a_502_that_says_so(
    proxy_before, raw_upstream, client, healthy, head, what
):
    _, url = await raw_upstream(b"HTTP/1.1 200 OK\r\n" + head + b"Content-Length: 2\r\n\r\n{}")
    proxy = await proxy_before(url)

    async def fault() -> None:
        async with client.get(proxy.url + "/v4/apikey/") as resp:
            status, code, message = await md_error(resp)
        assert (status, code) == (502, 502004)
        assert message.startswith("mdcloud-proxy: upstream answer headers too large: 127.0.0.1 ")
        assert what in message

    await assert_no_leak_over_repeats(fault, healthy(proxy))


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 100_000,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n",
    ],
    ids=["content-length", "chunked"],
)
async def test_upstream_closing_mid_answer_is_never_a_complete_200(
    proxy_before, raw_upstream, client, healthy, answer
):
    _, url = await raw_upstream(answer)  # and then it closes
    proxy = await proxy_before(url)

    async def fault() -> None:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with client.get(proxy.url + "/v4/file/x") as resp:
                assert resp.status == 200
                await resp.read()

    await assert_no_leak_over_repeats(fault, healthy(proxy))


async def test_upstream_closing_a_kept_alive_connection(proxy_before, raw_upstream, client):
    """A server may close an idle connection just as the next request arrives on it; a
    request without a body is then sent again on a new connection (RFC 9112 9.3.1)."""

    async def one_answer_per_connection(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # the next request: hang up without answering

    server, url = await raw_upstream(one_answer_per_connection)
    proxy = await proxy_before(url)
    for _ in range(5):
        async with client.get(proxy.url + "/v4/apikey/") as resp:
            assert (resp.status, await resp.read()) == (200, b"ok")
    assert server.connections >= 5


# -- the caller --------------------------------------------------------------------------------


async def test_caller_hanging_up_mid_download(proxy_before, handler_upstream, client, healthy):
    ended: list[str] = []

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 1 << 40
        await resp.prepare(request)
        try:
            while True:
                await resp.write(b"x" * 65536)
                await asyncio.sleep(0.001)
        except (ConnectionError, asyncio.CancelledError):
            ended.append("stopped")
            raise

    proxy = await proxy_before(await handler_upstream(endless))

    async def fault() -> None:
        before = len(ended)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET /v4/file/x HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.readexactly(256 * 1024)
        writer.close()
        await eventually(lambda: len(ended) > before)  # the upstream stops sending too

    await assert_no_leak_over_repeats(fault, healthy(proxy))


async def test_caller_hanging_up_as_its_answer_arrives_is_no_error(
    proxy_before, raw_upstream, client, caplog
):
    """The caller resets its connection in the same instant as the upstream's answer arrives
    (as wrk does at the end of a run): the proxy, woken by the answer before it learns of the
    reset, finds the caller's connection closing when it writes. That is the caller's doing:
    no error and no traceback in the log, the request counted as 499, the proxy serves on."""
    callers: list[socket.socket] = []
    body = b"x" * 300_000  # more than one write: the writes after the reset fail too

    async def answer_and_hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            if b"/v4/file/gone" in head:
                callers.pop().close()  # the reset reaches the proxy right behind the answer

    _, url = await raw_upstream(answer_and_hang_up)
    proxy = await proxy_before(url)
    caplog.set_level(logging.DEBUG, logger="mdcloud_proxy")
    loop = asyncio.get_running_loop()
    for _ in range(REPEAT):
        sock = socket.create_connection(("127.0.0.1", proxy.port))
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        callers.append(sock)
        await loop.sock_sendall(sock, b"GET /v4/file/gone HTTP/1.1\r\nHost: x\r\n\r\n")
        await eventually(lambda: not callers)
    answered = ("mdcloud_proxy_requests_total", (("method", "GET"), ("status_class", "4xx")))
    samples: dict = {}

    async def all_counted() -> bool:
        samples.update(await scrape(client, proxy.url + "/-/metrics"))
        return samples.get(answered, 0) >= REPEAT

    async with asyncio.timeout(5):
        while not await all_counted():
            await asyncio.sleep(0.01)
    assert (await get_status(client, proxy.url + "/v4/file/small")) == 200
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, [r.getMessage() for r in errors]
    assert "Traceback" not in caplog.text
