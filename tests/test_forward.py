"""Forwarding: exact paths, header rules both ways, opaque streamed bodies, TLS upstreams.

Upstream failures (refused, stalled, reset, malformed, cut short) are in test_faults."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import ssl

import aiohttp
import pytest
import trustme
from aiohttp import web

from proxy import Simulator, create_app
from proxy.tls import client_context

from .conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    api_requests,
    chunks,
    eventually,
    proxy_config,
    random_payload,
    raw_exchange,
)

MiB = 1024 * 1024


def raw_get(target: str, *headers: str, host: str = "127.0.0.1") -> bytes:
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}", *headers, "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1")


@pytest.mark.security
@pytest.mark.parametrize(
    "target",
    [
        "/v4/hash/a%2Fb",
        "/v4/x/../y",
        "/v4/./x",
        "//evil.example/x",
        "/v4/url/https%3A%2F%2Fexample.com%2F%3Fq%3D1",
        "/v4/%7euser?a=%7e&b=+&c=%2F&d=%2f&e",
        "/v4/a;b=c/@evil.example",
        "/\\evil.example/x",
        "/v4/x\\..\\y",
        "/@evil.example:443/x",
        "/v4/url/a%0Ab%0d%00",
    ],
)
async def test_path_and_query_arrive_byte_for_byte(sim, upstream, proxy, target):
    resp = await raw_exchange(proxy.port, raw_get(target, host="evil.example"))
    assert resp.status in (200, 404)  # from the simulator (a lookup or its catch-all)
    seen = sim.requests[-1]
    assert seen.raw_path == target
    assert seen.header("Host") == [upstream.removeprefix("http://")]


@pytest.mark.security
@pytest.mark.parametrize(
    ("request_line", "status"),
    [
        ("GET http://evil.example/v4/apikey/ HTTP/1.1", 400),
        ("CONNECT evil.example:443 HTTP/1.1", 405),
        ("OPTIONS * HTTP/1.1", 400),
    ],
)
async def test_other_hosts_cannot_be_reached(sim, proxy, request_line, status):
    resp = await raw_exchange(
        proxy.port, f"{request_line}\r\nHost: evil.example\r\nConnection: close\r\n\r\n".encode()
    )
    assert resp.status == status
    assert b'"code"' in resp.body
    # Only the proxy's own token request (made at start-up) reached the simulator.
    assert [r.raw_path for r in sim.requests] in ([], ["/v4/oauth2/token"])


async def test_request_header_rules(sim, proxy):
    resp = await raw_exchange(
        proxy.port,
        raw_get(
            "/v4/x",
            "Authorization: Bearer the-callers-own",
            "Connection: X-Private, keep-alive",
            "X-Private: must-not-pass",
            "Keep-Alive: timeout=5",
            "Proxy-Authorization: Basic abc",
            "Proxy-Connection: keep-alive",
            "TE: trailers",
            "Upgrade: h2c",
            "X-Repeat: 1",
            "apikey: callers-key",
            "X-Repeat: 2",
        ),
    )
    assert resp.status == 404
    seen = sim.requests[-1]
    names = [k.lower() for k, _ in seen.headers]
    for dropped in (
        "x-private",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "upgrade",
    ):
        assert dropped not in names
    assert seen.header("Authorization") == [f"Bearer {sim.issued_tokens[0]}"]
    assert seen.header("X-Repeat") == ["1", "2"]
    assert seen.header("apikey") == ["callers-key"], "without api_key configured it passes"
    for added in ("user-agent", "accept", "accept-encoding", "content-type"):
        assert added not in names, f"the proxy must not invent {added}"


async def test_repeats_of_a_name_in_other_cases_all_arrive(sim, proxy):
    """Found by the property test: aiohttp's client kept only the last of X-A / x-a."""
    resp = await raw_exchange(proxy.port, raw_get("/v4/x", "X-A: 1", "x-a: 2", "X-a: 3"))
    assert resp.status == 404
    seen = sim.requests[-1]
    assert [(n, v) for n, v in seen.headers if n.lower() == "x-a"] == [
        ("X-A", "1"),
        ("X-A", "2"),
        ("X-A", "3"),
    ]


async def test_configured_api_key_replaces_the_callers(sim, make_proxy, client):
    sim.api_key = "real-key"
    proxy = await make_proxy(api_key="real-key")
    async with client.get(proxy.url + "/v4/apikey/", headers={"apikey": "dummy"}) as resp:
        assert resp.status == 200
    assert sim.requests[-1].header("apikey") == ["real-key"]


async def test_body_is_opaque_bytes(sim, proxy, client):
    body = b"a=1&b=%ZZ&c=\xff\x00"
    async with client.post(
        proxy.url + "/v4/hash",
        data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ) as resp:
        assert resp.status == 400  # the simulator's bulk lookup: not JSON
    seen = sim.requests[-1]
    assert seen.body_sha256 == hashlib.sha256(body).hexdigest()
    assert seen.header("Content-Type") == ["application/x-www-form-urlencoded"]
    assert seen.header("Content-Length") == [str(len(body))]


async def test_expect_100_continue_is_answered_by_the_proxy(sim, proxy):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    body = b"0123456789"
    writer.write(
        b"POST /v4/file HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: 10\r\nConnection: close\r\n\r\n"
    )
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(body)
    final = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert final.startswith(b"HTTP/1.1 200")
    seen = sim.requests[-1]
    assert seen.header("Expect") == []
    assert seen.body_sha256 == hashlib.sha256(body).hexdigest()


async def test_expect_with_too_large_body_gets_413_without_continue(sim, make_proxy):
    proxy = await make_proxy(**{"limits.max_body_size": 100})
    resp = await raw_exchange(
        proxy.port,
        b"POST /v4/file HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: 101\r\nConnection: close\r\n\r\n",
    )
    assert resp.status == 413
    assert not any(r.raw_path == "/v4/file" for r in sim.requests)


async def test_response_header_rules(proxy_before, raw_upstream):
    gz = gzip.compress(b'{"compressed": true}')
    server, url = await raw_upstream(
        b"HTTP/1.1 200 OK\r\n"
        b"Connection: close, X-Hop\r\n"
        b"X-Hop: secret-hop\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Proxy-Authenticate: Basic\r\n"
        b"Set-Cookie: a=1; Path=/\r\n"
        b"X-RateLimit-Remaining: 41\r\n"
        b"Set-Cookie: b=2; Path=/\r\n"
        b"X-RateLimit-Reset-In: 3294s\r\n"
        b"Content-Encoding: gzip\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: " + str(len(gz)).encode() + b"\r\n\r\n" + gz
    )
    proxy = await proxy_before(url)
    resp = await raw_exchange(proxy.port, raw_get("/v4/x"))
    assert resp.status == 200
    assert resp.body == gz, "the body is passed on compressed, as the upstream sent it"
    names = [k.lower() for k, _ in resp.headers]
    assert "x-hop" not in names and "keep-alive" not in names
    assert "proxy-authenticate" not in names
    assert resp.header("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert resp.header("X-RateLimit-Remaining") == ["41"]
    assert resp.header("X-RateLimit-Reset-In") == ["3294s"]
    assert resp.header("Content-Encoding") == ["gzip"]
    assert resp.header("Content-Length") == [str(len(gz))]
    assert b"Accept-Encoding" not in server.requests[0]


async def test_redirects_and_cookies_are_the_callers_business(
    handler_upstream, proxy_before, client
):
    cookies_seen = []

    async def handler(request):
        cookies_seen.append(request.headers.get("Cookie"))
        if request.path == "/v4/login":
            resp = web.Response(status=302, headers={"Location": "/v4/elsewhere"})
            resp.set_cookie("session", "caller-a")
            return resp
        return web.Response(text="ok")

    proxy = await proxy_before(await handler_upstream(handler))
    async with client.get(proxy.url + "/v4/login", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/v4/elsewhere"
        assert "session=caller-a" in resp.headers["Set-Cookie"]
    async with aiohttp.ClientSession() as other, other.get(proxy.url + "/v4/other") as resp:
        assert resp.status == 200
    assert cookies_seen == [None, None], "no redirect followed, no cookie kept by the proxy"


async def test_large_download_streams_intact(handler_upstream, proxy_before, client):
    data, digest = random_payload(20 * MiB)

    async def download(request):
        resp = web.StreamResponse()
        resp.content_length = len(data)
        await resp.prepare(request)
        async for chunk in chunks(data):
            await resp.write(chunk)
        return resp

    proxy = await proxy_before(await handler_upstream(download))
    sha = hashlib.sha256()
    async with client.get(proxy.url + "/v4/file/converted/abc") as resp:
        assert resp.status == 200
        assert resp.content_length == len(data)
        async for chunk in resp.content.iter_any():
            sha.update(chunk)
    assert sha.hexdigest() == digest


async def test_head_keeps_content_length_without_body(sim, proxy):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"HEAD /v4/apikey/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"\r\nContent-Length: 146" in head, "the length of the body a GET would get"
    assert body == b""
    assert sim.requests[-1].method == "HEAD"


@pytest.fixture(scope="module")
def tls_ca() -> trustme.CA:
    return trustme.CA()


async def test_https_upstream_with_private_ca(tls_ca, clock, start, client, tmp_path):
    sim = Simulator(CLIENT_ID, CLIENT_SECRET, clock=clock)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    port = await start(sim.app(), ssl_context=server_ctx)
    ca_file = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(ca_file))
    url = f"https://127.0.0.1:{port}"

    trusted = await start(
        create_app(proxy_config(url, **{"upstream.ca_file": str(ca_file)}), clock=clock)
    )
    async with client.get(f"http://127.0.0.1:{trusted}/v4/apikey/") as resp:
        assert resp.status == 200
    assert sim.token_requests == 1

    untrusted = await start(create_app(proxy_config(url), clock=clock))
    async with client.get(f"http://127.0.0.1:{untrusted}/v4/apikey/") as resp:
        assert resp.status == 502
        message = (await resp.json())["error"]["messages"][0]
    assert "set oauth" not in message and "upstream.ca_file" in message


async def test_tls_sessions_to_the_upstream_are_resumed(
    tls_ca, start, proxy_before, client, tmp_path
):
    # An upstream that closes each connection after its answer: every request needs a new
    # handshake, which resumes the session of the one before (as nginx's proxy_ssl does).
    resumed = []

    async def handler(request):
        resumed.append(request.transport.get_extra_info("ssl_object").session_reused)
        answer = web.json_response({"ok": True})
        answer.force_close()
        return answer

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    port = await start(app, ssl_context=server_ctx)
    ca_file = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(ca_file))
    proxy = await proxy_before(f"https://127.0.0.1:{port}", **{"upstream.ca_file": str(ca_file)})
    for _ in range(3):
        async with client.get(proxy.url + "/v4/file/abc") as resp:
            assert resp.status == 200
    assert resumed == [False, True, True]

    # Connections opened together: each starts while the one before is still in its
    # handshake, whose session cannot be taken yet.
    async def one():
        async with client.get(proxy.url + "/v4/file/abc") as resp:
            return resp.status

    assert await asyncio.gather(*(one() for _ in range(20))) == [200] * 20


def test_a_tls_connection_may_start_while_the_one_before_is_in_its_handshake(tls_ca):
    # What uvloop does when connections are opened together; the connection before has
    # sent its ClientHello and waits for the server's answer.
    context = client_context(None)
    tls_ca.configure_trust(context)
    before = context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        before.do_handshake()
    after = context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        after.do_handshake()


async def test_upstream_connections_are_reused(sim, proxy, client):
    for _ in range(5):
        async with client.get(proxy.url + "/v4/apikey/") as resp:
            assert resp.status == 200
        async with client.get(proxy.url + "/v4/hash/00") as resp:
            assert resp.status == 404
    peers = {r.peer for r in api_requests(sim)}
    assert len(peers) == 1, "one kept-alive connection, not one per request (a TLS handshake each)"


async def test_answer_headers_leave_with_the_first_body_bytes(proxy_before, handler_upstream):
    """forward._Relayed relies on aiohttp's private _send_headers_immediately: if a newer
    aiohttp sends the headers alone again at prepare(), the caller sees them early here."""

    async def late_body(request: web.Request) -> web.StreamResponse:
        answer = web.StreamResponse(headers={"Content-Type": "application/json"})
        answer.content_length = 2
        await answer.prepare(request)
        await asyncio.sleep(0.6)
        await answer.write(b"{}")
        return answer

    proxy = await proxy_before(await handler_upstream(late_body))
    await eventually(lambda: proxy.tokens.current is not None)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /v4/file/x HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await reader.read(1)  # nothing yet: the upstream has sent only its headers
    async with asyncio.timeout(5):
        first = await reader.read(65536)
    writer.close()
    assert first.startswith(b"HTTP/1.1 200") and first.endswith(b"\r\n\r\n{}")


async def test_the_proxy_adds_none_of_aiohttps_automatic_headers(
    handler_upstream, proxy_before, client
):
    """A caller's request without Content-Type, User-Agent, Accept or Accept-Encoding goes
    upstream without them: the client session adds none of its defaults."""
    seen: dict[str, str] = {}

    async def record(request: web.Request) -> web.Response:
        seen.update(request.headers)
        await request.read()
        return web.json_response({"data_id": "x"})

    proxy = await proxy_before(await handler_upstream(record))
    bare = ["Content-Type", "User-Agent", "Accept", "Accept-Encoding"]
    async with client.post(proxy.url + "/v4/file", data=b"bytes", skip_auto_headers=bare) as resp:
        assert resp.status == 200
    assert seen["Content-Length"] == "5"
    assert not {name.lower() for name in seen} & {name.lower() for name in bare}


def test_the_upstream_tls_settings_check_what_pythons_default_checks():
    ours, default = client_context(None), ssl.create_default_context()
    assert (ours.verify_mode, ours.check_hostname) == (ssl.CERT_REQUIRED, True)
    assert ours.verify_flags == default.verify_flags
    assert ours.options == default.options
    assert (ours.minimum_version, ours.maximum_version) == (
        default.minimum_version,
        default.maximum_version,
    )
