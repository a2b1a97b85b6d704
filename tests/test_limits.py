"""The listener's own limits: deadlines per connection, a connection cap, safe error answers."""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy.app import METRICS
from proxy.logs import throttle_loop_errors

from .conftest import API_KEY

GET = b"GET /v4/apikey/ HTTP/1.1\r\nHost: x\r\n\r\n"


async def read_all(reader: asyncio.StreamReader, within: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes; whether it closed within ``within`` s.

    A reset counts as closed: after our write to a socket the server has closed, the reader
    holds the broken pipe (or reset) and raises it instead of reporting the end."""
    data = b""
    try:
        async with asyncio.timeout(within):
            while chunk := await reader.read(65536):
                data += chunk
    except TimeoutError:
        return data, False
    except ConnectionError:
        pass
    return data, True


def closed_total(proxy, reason: str) -> float:
    metrics = proxy.app[METRICS]
    value = metrics.registry.get_sample_value(
        "mdcloud_proxy_connections_closed_total", {"reason": reason}
    )
    return value or 0.0


async def test_a_head_that_trickles_in_is_cut_off(make_proxy):
    proxy = await make_proxy(**{"listen.header_timeout": 0.5})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    started = time.monotonic()
    writer.write(b"GET /v4/apikey/ HTTP/1.1\r\n")
    closed = False
    for _ in range(20):  # slowloris: a byte every 0.1 s, never a whole head
        try:
            writer.write(b"X")
            await writer.drain()
        except ConnectionError:
            closed = True
            break
        if reader.at_eof():
            closed = True
            break
        await asyncio.sleep(0.1)
    _, ended = await read_all(reader, 1.0)
    writer.close()
    assert closed or ended
    assert time.monotonic() - started < 1.5
    assert closed_total(proxy, "header_timeout") == 1


async def test_a_connection_that_sends_nothing_is_closed(make_proxy):
    proxy = await make_proxy(**{"listen.header_timeout": 0.3})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    data, closed = await read_all(reader, 2.0)
    writer.close()
    assert closed and data == b""
    assert closed_total(proxy, "header_timeout") == 1


async def test_a_body_that_stops_coming_is_cut_off(make_proxy, sim):
    proxy = await make_proxy(**{"listen.body_timeout": 0.5})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /v4/file HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"a" * 10)
    await writer.drain()
    started = time.monotonic()
    _, closed = await read_all(reader, 3.0)
    writer.close()
    assert closed and time.monotonic() - started < 2.0
    assert closed_total(proxy, "body_timeout") == 1
    assert not sim._uploads  # nothing was uploaded from an incomplete body


async def test_a_slow_but_steady_body_is_not_cut_off(make_proxy, sim):
    proxy = await make_proxy(**{"listen.body_timeout": 0.5, "listen.header_timeout": 0.5})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /v4/file HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\n")
    for _ in range(8):  # a byte every 0.2 s: 1.6 s in all, longer than either timeout
        writer.write(b"b")
        await writer.drain()
        await asyncio.sleep(0.2)
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert head.startswith(b"HTTP/1.1 200")
    assert closed_total(proxy, "body_timeout") == 0


async def test_an_idle_kept_alive_connection_is_closed(make_proxy):
    proxy = await make_proxy(**{"listen.idle_timeout": 0.5})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(GET)
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"close" not in head.lower()
    started = time.monotonic()
    _, closed = await read_all(reader, 3.0)
    writer.close()
    assert closed and 0.4 < time.monotonic() - started < 2.0
    assert closed_total(proxy, "idle_timeout") == 1


async def test_after_a_body_an_idle_connection_gets_the_idle_timeout(make_proxy):
    """aiohttp calls data_received(b"") when it resumes reading: that is no new request."""
    proxy = await make_proxy(**{"listen.header_timeout": 0.3, "listen.idle_timeout": 1.5})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /v4/file HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\na=b")
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    _, closed = await read_all(reader, 3.0)
    writer.close()
    assert closed and time.monotonic() - started > 1.0
    assert closed_total(proxy, "header_timeout") == 0
    assert closed_total(proxy, "idle_timeout") == 1


async def test_past_max_connections_a_quick_503_then_recovery(make_proxy, client):
    proxy = await make_proxy(**{"listen.max_connections": 5})
    held = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(5)]
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    data, closed = await read_all(reader, 2.0)
    writer.close()
    assert closed and data.startswith(b"HTTP/1.1 503")
    assert b'"code":503030' in data and b"listen.max_connections" in data
    assert closed_total(proxy, "max_connections") >= 1
    for _, held_writer in held:
        held_writer.close()

    async def works() -> bool:
        async with client.get(proxy.url + "/v4/apikey/") as resp:
            return resp.status == 200

    async with asyncio.timeout(5):
        while not await works():
            await asyncio.sleep(0.05)


@pytest.mark.security
async def test_connection_close_then_more_bytes_answers_the_first(make_proxy, sim):
    proxy = await make_proxy()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /v4/apikey/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" + GET)
    data, closed = await read_all(reader, 5.0)
    writer.close()
    assert closed
    assert data.startswith(b"HTTP/1.1 200") and data.count(b"HTTP/1.1 ") == 1
    assert [r.raw_path for r in sim.requests if r.raw_path != "/v4/oauth2/token"] == ["/v4/apikey/"]


CLOSE_GET = b"GET /v4/apikey/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


@pytest.mark.security
@pytest.mark.parametrize(
    "writes",
    [
        [GET + CLOSE_GET + GET],  # the close request second in one write
        [CLOSE_GET[:40], CLOSE_GET[40:] + GET],  # its head split across two writes
    ],
    ids=["second-in-a-pipeline", "head-split-across-writes"],
)
async def test_requests_up_to_a_close_are_answered(make_proxy, writes):
    proxy = await make_proxy()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    for data in writes:
        writer.write(data)
        await writer.drain()
        await asyncio.sleep(0.05)
    data, closed = await read_all(reader, 5.0)
    writer.close()
    assert closed
    answered = 2 if len(writes) == 1 else 1  # up to and with the close request
    assert data.count(b"HTTP/1.1 ") == data.count(b"HTTP/1.1 200 OK") == answered


@pytest.mark.security
async def test_a_long_pipeline_up_to_a_close_is_answered(make_proxy):
    """More requests than aiohttp's parser queues at once (32), the last asking to close:
    the parser, paused while the first are answered, still gets the rest."""
    proxy = await make_proxy()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(GET * 39 + CLOSE_GET)
    data, closed = await read_all(reader, 10.0)
    writer.close()
    assert closed
    assert data.count(b"HTTP/1.1 200 OK") == 40


@pytest.mark.security
async def test_connect_then_more_is_answered_and_closed(make_proxy):
    proxy = await make_proxy()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n" + GET)
    started = time.monotonic()
    data, closed = await read_all(reader, 5.0)
    writer.close()
    assert closed and time.monotonic() - started < 2
    assert data.startswith(b"HTTP/1.1 405")


@pytest.mark.security
async def test_an_upgrade_is_answered_then_the_connection_closes(make_proxy):
    proxy = await make_proxy()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"GET /v4/apikey/ HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n" + GET
    )
    data, closed = await read_all(reader, 5.0)
    writer.close()
    assert closed, "the connection hung after an upgrade request"
    assert data.startswith(b"HTTP/1.1 200")


@pytest.mark.security
@pytest.mark.parametrize(
    ("name", "value"),
    [(b"X-Proxy-Key", b"proxy-key-\x7f-secret"), (b"apikey", API_KEY.encode() + b"\x00")],
)
async def test_malformed_requests_get_an_error_that_quotes_nothing(make_proxy, name, value):
    proxy = await make_proxy()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /v4/apikey/ HTTP/1.1\r\nHost: x\r\n" + name + b": " + value + b"\r\n\r\n")
    data, _ = await read_all(reader, 5.0)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert b" 400 " in head.split(b"\r\n")[0]
    assert b"application/json" in head
    assert body.startswith(b'{"error": {"code": 400005, "messages": ["mdcloud-proxy: malformed')
    assert b"secret" not in body and API_KEY.encode() not in body and b"\\x" not in body


async def test_loop_errors_are_logged_once_per_interval(caplog):
    """asyncio reports e.g. every failed accept() while descriptors run out; reprs with
    addresses in its messages must not make each one a new condition."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    throttle_loop_errors(loop)

    class Thing:
        pass

    def boom(_thing: Thing) -> None:
        raise RuntimeError("boom")

    try:
        for _ in range(1000):
            loop.call_soon(boom, Thing())
        await asyncio.sleep(0.05)
    finally:
        loop.set_exception_handler(previous)
    logged = [r for r in caplog.records if r.name == "mdcloud_proxy.loop"]
    assert len(logged) == 1
    assert logged[0].exc_info is not None  # the first one says where
