"""What an operator sees: /-/healthy, /-/ready, /-/metrics, the request log, draining."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import time

import aiohttp
import trustme

from proxy import Simulator, create_app, serve
from proxy.app import TRAFFIC, create_admin_app, drain
from proxy.logs import JsonFormatter

from .conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    TOKEN_PATH,
    eventually,
    proxy_config,
    random_payload,
    scrape,
)


async def get_json(client, url):
    async with client.get(url) as resp:
        return resp.status, await resp.json()


async def wait_ready(client, base, timeout=10.0):
    async with asyncio.timeout(timeout):
        while True:
            status, body = await get_json(client, base + "/-/ready")
            if status == 200:
                return body
            await asyncio.sleep(0.05)


async def test_healthy_and_ready_once_a_token_is_held(sim, proxy, client):
    assert await get_json(client, proxy.url + "/-/healthy") == (200, {"status": "healthy"})
    body = await wait_ready(client, proxy.url)
    assert body["status"] == "ready"
    assert body["token_expires_in_s"] == 3600
    # The token was fetched at start-up, in the background: no request needed it.
    assert sim.token_requests == 1
    assert [r.raw_path for r in sim.requests] == [TOKEN_PATH]


async def test_ready_says_why_not_when_credentials_are_rejected(sim, make_proxy, client):
    sim.token_failure = (401, b'{"error":"invalid_client"}')
    proxy = await make_proxy()
    # It listens at once, whatever the token endpoint says.
    assert (await get_json(client, proxy.url + "/-/healthy"))[0] == 200
    await eventually(lambda: proxy.tokens.error is not None)
    status, body = await get_json(client, proxy.url + "/-/ready")
    assert status == 503
    assert body["error"]["code"] == 503020
    (message,) = body["error"]["messages"]
    assert message.startswith(
        "mdcloud-proxy: not ready: no access token: token endpoint rejected the client "
        "credentials (HTTP 401: invalid_client); check oauth.client_id and oauth.client_secret"
    )
    assert " (failing since 20" in message
    assert CLIENT_SECRET not in message
    assert sim.token_requests == 1  # rejected credentials are not retried


async def test_start_up_without_the_token_endpoint_then_recovery(sim, clock, make_proxy, client):
    sim.token_failure = (503, b'{"error":"temporarily_unavailable"}')
    proxy = await make_proxy()
    assert (await get_json(client, proxy.url + "/-/healthy"))[0] == 200
    await eventually(lambda: proxy.tokens.error is not None, within=10)
    status, body = await get_json(client, proxy.url + "/-/ready")
    assert status == 503
    (message,) = body["error"]["messages"]
    assert "token endpoint answered HTTP 503: temporarily_unavailable" in message
    sim.token_failure = None
    clock.advance(120)  # past any backoff: the proxy tries again by itself
    await wait_ready(client, proxy.url)


async def test_idle_proxy_keeps_its_token_fresh(start, client):
    # Real clock, 2 s tokens: the token is refreshed ahead of expiry with no request at all.
    sim = Simulator(CLIENT_ID, CLIENT_SECRET, token_lifetime=2)
    sim_url = f"http://127.0.0.1:{await start(sim.app())}"
    base = f"http://127.0.0.1:{await start(create_app(proxy_config(sim_url)))}"
    await wait_ready(client, base)
    await asyncio.sleep(3.5)
    assert 3 <= sim.token_requests <= 4  # at about 0 s, 1 s, 2 s (and 3 s): half the lifetime
    body = await wait_ready(client, base, timeout=0.5)
    assert body["token_expires_in_s"] >= 1
    assert [r.raw_path for r in sim.requests] == [TOKEN_PATH] * sim.token_requests


async def test_reserved_paths_are_never_forwarded(sim, proxy, client):
    for path in ("/-/", "/-/nope", "/-/metrics/x", "/-/%0A"):
        async with client.post(proxy.url + path, data=b"x") as resp:
            assert resp.status == 404
            body = await resp.json()
        assert body["error"]["code"] == 404020
    assert all(r.raw_path == TOKEN_PATH for r in sim.requests)


async def test_metrics(sim, proxy, client):
    await wait_ready(client, proxy.url)
    for _ in range(3):
        async with client.get(proxy.url + "/v4/apikey/") as resp:
            assert resp.status == 200
            answer = await resp.read()
    async with client.get(proxy.url + "/v4/nothing") as resp:
        assert resp.status == 404
        not_found = await resp.read()
    sim.expire_tokens()
    data, _ = random_payload(300_000)
    async with client.post(proxy.url + "/v4/file", data=data) as resp:
        assert resp.status == 200
        uploaded = await resp.read()

    m = await scrape(client, proxy.url + "/-/metrics")
    assert m[("mdcloud_proxy_requests_total", (("method", "GET"), ("status_class", "2xx")))] == 3
    assert m[("mdcloud_proxy_requests_total", (("method", "GET"), ("status_class", "4xx")))] == 1
    assert m[("mdcloud_proxy_requests_total", (("method", "POST"), ("status_class", "2xx")))] == 1
    assert m[("mdcloud_proxy_replays_total", (("outcome", "ok"),))] == 1
    assert m[("mdcloud_proxy_replays_total", (("outcome", "failed"),))] == 0
    assert m[("mdcloud_proxy_token_fetches_total", (("outcome", "ok"),))] == 2
    assert m[("mdcloud_proxy_token_fetches_total", (("outcome", "rejected"),))] == 0
    assert m[("mdcloud_proxy_request_bytes_total", ())] == len(data)
    sent = 3 * len(answer) + len(not_found) + len(uploaded)
    assert m[("mdcloud_proxy_response_bytes_total", ())] == sent
    # one attempt per request, two for the replayed upload
    assert m[("mdcloud_proxy_upstream_latency_seconds_count", ())] == 6
    assert m[("mdcloud_proxy_requests_in_flight", ())] == 0
    assert m[("mdcloud_proxy_token_expiry_seconds", ())] == 3600
    assert m[("process_open_fds", ())] > 0


async def test_metrics_count_rejected_token_fetches(sim, make_proxy, client):
    sim.token_failure = (401, b'{"error":"invalid_client"}')
    proxy = await make_proxy()
    async with client.get(proxy.url + "/v4/apikey/") as resp:
        assert resp.status == 502
    m = await scrape(client, proxy.url + "/-/metrics")
    assert m[("mdcloud_proxy_token_fetches_total", (("outcome", "rejected"),))] == 1
    assert m[("mdcloud_proxy_requests_total", (("method", "GET"), ("status_class", "5xx")))] == 1
    assert m[("mdcloud_proxy_token_expiry_seconds", ())] == 0


async def test_admin_listener_takes_the_metrics(sim, make_proxy, start, client):
    proxy = await make_proxy(**{"admin.port": 0})
    admin = f"http://127.0.0.1:{await start(create_admin_app(proxy.app))}"
    async with client.get(proxy.url + "/-/metrics") as resp:
        assert resp.status == 404
    await wait_ready(client, admin)
    await wait_ready(client, proxy.url)  # probes stay on the main port too
    m = await scrape(client, admin + "/-/metrics")
    assert m[("mdcloud_proxy_token_fetches_total", (("outcome", "ok"),))] == 1


async def test_one_log_line_per_request(sim, proxy, client, caplog):
    caplog.set_level(logging.INFO, logger="mdcloud_proxy")
    await wait_ready(client, proxy.url)
    sim.expire_tokens()
    async with client.post(
        proxy.url + "/v4/file?apikey=hunter2&rule=multiscan", data=b"0123456789"
    ) as resp:
        assert resp.status == 200
        answer = await resp.read()
    access = [r for r in caplog.records if r.name == "mdcloud_proxy.access"]
    assert len(access) == 1
    (record,) = access
    assert record.getMessage().startswith(
        f"POST /v4/file?apikey=***&rule=*** -> 200, 10 bytes in, {len(answer)} bytes out, "
    )
    assert record.getMessage().endswith(" s, replayed: ok")
    entry = json.loads(JsonFormatter().format(record))
    assert entry["level"] == "INFO"
    assert entry["method"] == "POST"
    assert entry["path"] == "/v4/file?apikey=***&rule=***"
    assert (entry["status"], entry["bytes_in"], entry["bytes_out"]) == (200, 10, len(answer))
    assert entry["replayed"] == "ok"
    assert "hunter2" not in caplog.text
    # probes are not logged at INFO
    caplog.clear()
    await get_json(client, proxy.url + "/-/healthy")
    assert not [r for r in caplog.records if r.name == "mdcloud_proxy.access"]


async def test_drain_lets_an_upload_in_flight_finish(sim, upstream, clock, client):
    runner = await serve(create_app(proxy_config(upstream), clock=clock), "127.0.0.1", 0)
    port = runner.addresses[0][1]
    data, digest = random_payload(4 * 1024 * 1024)
    halfway = asyncio.Event()

    async def slow_body():
        for i in range(0, len(data), 128 * 1024):
            if i >= len(data) // 2:
                halfway.set()
                await asyncio.sleep(0.05)
            yield data[i : i + 128 * 1024]

    async def upload():
        async with client.post(f"http://127.0.0.1:{port}/v4/file", data=slow_body()) as resp:
            return resp.status, await resp.json()

    uploading = asyncio.create_task(upload())
    await halfway.wait()
    await eventually(lambda: runner.app[TRAFFIC].in_flight == 1)
    started = time.monotonic()
    draining = asyncio.create_task(drain(runner, grace=30))
    await asyncio.sleep(0.1)
    # no new connections while draining
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        pass
    else:
        writer.close()
        raise AssertionError("still accepting connections while draining")
    status, answer = await uploading
    await draining
    assert status == 200
    assert answer["sha256"].lower() == digest
    assert sim.requests[-1].body_sha256 == digest
    assert time.monotonic() - started < 10


GET = b"GET /v4/hash/ABC HTTP/1.1\r\nHost: x\r\n\r\n"


async def stalled_upload(client, port: int) -> asyncio.Task[int]:
    """An upload that sends 1 KiB of the 2,034 bytes it announces, then stalls; returned
    once it has stalled."""
    stalled = asyncio.Event()

    async def stalling_body():
        yield b"x" * 1024
        stalled.set()
        await asyncio.sleep(60)
        yield b"never sent"

    async def upload() -> int:
        headers = {"Content-Length": "2034"}
        url = f"http://127.0.0.1:{port}/v4/file"
        async with client.post(url, data=stalling_body(), headers=headers) as resp:
            return resp.status

    uploading = asyncio.create_task(upload())
    await stalled.wait()
    return uploading


async def test_drain_cuts_off_after_the_grace_period(upstream, clock, client):
    runner = await serve(create_app(proxy_config(upstream), clock=clock), "127.0.0.1", 0)
    uploading = await stalled_upload(client, runner.addresses[0][1])
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await drain(runner, grace=0.5)
    assert 0.5 <= time.monotonic() - started < 5
    assert runner.app[TRAFFIC].in_flight == 0
    try:
        result = await uploading
    except aiohttp.ClientError:
        result = "cut off"
    assert result != 200


async def test_drain_answers_a_connection_made_before_it(upstream, clock):
    """A caller connected before the signal gets its answer, even if its request comes only
    after draining began; the answer closes the connection."""
    runner = await serve(create_app(proxy_config(upstream), clock=clock), "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
    assert runner.server is not None
    await eventually(lambda: runner.server.connections)  # accepted: not in the listen queue
    draining = asyncio.create_task(drain(runner, grace=30))
    await asyncio.sleep(0.2)  # draining has begun
    assert not draining.done()
    writer.write(GET)
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        await draining
    writer.close()
    assert head.startswith(b"HTTP/1.1 404 ")
    assert b"\r\nConnection: close\r\n" in head


async def test_drain_closes_idle_connections_at_once(upstream, clock, client):
    """An idle kept-alive connection is closed when draining begins, not when the last
    request in flight ends; one in flight is left to finish."""
    runner = await serve(create_app(proxy_config(upstream), clock=clock), "127.0.0.1", 0)
    port = runner.addresses[0][1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(GET)
    head = await reader.readuntil(b"\r\n\r\n")
    assert b"Connection: close" not in head
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)  # the answer read whole: the connection is idle
    uploading = await stalled_upload(client, port)
    await eventually(lambda: runner.app[TRAFFIC].in_flight == 1)
    started = time.monotonic()
    draining = asyncio.create_task(drain(runner, grace=3))
    async with asyncio.timeout(2):
        assert await reader.read() == b""  # closed by the proxy
    writer.close()
    await draining
    assert time.monotonic() - started >= 3  # it waited for the upload
    uploading.cancel()
    await asyncio.gather(uploading, return_exceptions=True)


async def test_drain_answers_pipelined_requests_parsed_before_it(sim, upstream, clock):
    runner = await serve(create_app(proxy_config(upstream), clock=clock), "127.0.0.1", 0)
    sim.gate = asyncio.Event()
    reader, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
    writer.write(GET + GET)  # two requests in one write: both parsed at once
    await eventually(lambda: sum(sim.in_flight.values()) == 1)  # the first is upstream
    draining = asyncio.create_task(drain(runner, grace=5))
    await asyncio.sleep(0.1)
    sim.gate.set()
    async with asyncio.timeout(8):
        data = await reader.read()  # to the end: the proxy closes after the last answer
        await draining
    writer.close()
    assert data.count(b"HTTP/1.1 404 ") == 2


async def test_drain_answers_a_request_waiting_in_an_idle_connections_socket(upstream, clock):
    runner = await serve(create_app(proxy_config(upstream), clock=clock), "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
    writer.write(GET)
    head = await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
    writer.write(GET)  # in the proxy's socket, not read yet when draining begins
    draining = asyncio.create_task(drain(runner, grace=5))
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        await draining
    writer.close()
    assert head.startswith(b"HTTP/1.1 404 ")


async def test_drain_does_not_wait_for_a_tls_connection_it_closed(upstream, clock):
    """A silent TLS caller cut off by header_timeout ends the wait then, though its TLS
    shutdown would take 30 s to report the connection lost."""
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    config = proxy_config(upstream, **{"listen.header_timeout": 0.5})
    app = create_app(config, clock=clock)
    runner = await serve(app, "127.0.0.1", 0, ssl_context=server_tls)
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)

    def connect() -> ssl.SSLSocket:  # the handshake, then nothing: a peer gone silent
        raw = socket.create_connection(("127.0.0.1", runner.addresses[0][1]))
        return client_tls.wrap_socket(raw, server_hostname="127.0.0.1")

    silent = await asyncio.to_thread(connect)
    try:
        assert runner.server is not None
        await eventually(lambda: runner.server.connections)
        started = time.monotonic()
        await drain(runner, grace=10)
        assert time.monotonic() - started < 5
    finally:
        silent.close()


async def test_drain_does_not_wait_for_a_tls_connection_aiohttp_closed(sim, upstream, clock):
    """The answer a connection carries when stopping begins closes it; a TLS connection then
    reports its loss only once the peer answers the close, which a silent one never does."""
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    runner = await serve(
        create_app(proxy_config(upstream), clock=clock), "127.0.0.1", 0, ssl_context=server_tls
    )
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)

    def connect() -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", runner.addresses[0][1]))
        return client_tls.wrap_socket(raw, server_hostname="127.0.0.1")

    sim.gate = asyncio.Event()
    tls = await asyncio.to_thread(connect)
    try:
        await asyncio.to_thread(tls.sendall, GET)
        await eventually(lambda: sum(sim.in_flight.values()) == 1)
        started = time.monotonic()
        draining = asyncio.create_task(drain(runner, grace=10))
        await asyncio.sleep(0.1)
        await asyncio.to_thread(tls.sendall, GET[:20])  # the start of a next request
        sim.gate.set()  # the answer goes out, then the connection closes; nothing is read
        await draining
        assert time.monotonic() - started < 5
    finally:
        tls.close()


async def test_drain_lets_an_answered_upload_finish_sending(upstream, clock):
    """A caller refused before its body was read (413) is still sending it when stopping
    begins: it may finish, and reads its answer."""
    config = proxy_config(upstream, **{"limits.max_body_size": "1MiB"})
    runner = await serve(create_app(config, clock=clock), "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
    size, step = 2 * 1024 * 1024, 128 * 1024
    writer.write(b"POST /v4/file HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
    head = await reader.readuntil(b"\r\n\r\n")  # answered before the body
    assert head.startswith(b"HTTP/1.1 413 ")
    draining = asyncio.create_task(drain(runner, grace=10))
    started = time.monotonic()
    for _ in range(size // step):  # about 1.6 s, more than aiohttp's 1 s shutdown
        writer.write(b"x" * step)
        await writer.drain()
        await asyncio.sleep(0.1)
    async with asyncio.timeout(5):
        await draining
    assert time.monotonic() - started >= 1.5  # it waited for the body
    writer.close()
