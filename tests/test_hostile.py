"""Hostile and malformed requests: refused before anything reaches the upstream.

CI runs this file (marker ``security``) twice: with aiohttp's C parser and with its pure-Python
parser (``AIOHTTP_NO_EXTENSIONS=1``).
"""

from __future__ import annotations

import asyncio
import logging
import os

import aiohttp.http_parser
import pytest

from .conftest import api_requests, raw_exchange

pytestmark = pytest.mark.security

PURE_PYTHON = bool(os.environ.get("AIOHTTP_NO_EXTENSIONS"))
SECRET = "hostile-secret-0123456789"
POST = b"POST /v4/file HTTP/1.1\r\nHost: x\r\n"
GET = b"GET /v4/apikey/ HTTP/1.1\r\nHost: x\r\n"
CHUNKED = b"Transfer-Encoding: chunked\r\n"

MALFORMED = {
    "content-length with transfer-encoding": POST
    + b"Content-Length: 5\r\n"
    + CHUNKED
    + b"\r\n0\r\n\r\n",
    "two different content-lengths": POST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "two equal content-lengths": POST + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "signed content-length +": POST + b"Content-Length: +5\r\n\r\nhello",
    "signed content-length -": POST + b"Content-Length: -5\r\n\r\nhello",
    "content-length list": POST + b"Content-Length: 5, 5\r\n\r\nhello",
    "transfer-encoding chunked, identity": POST
    + b"Transfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "transfer-encoding chunked, chunked": POST
    + b"Transfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "transfer-encoding gzip then chunked twice": POST
    + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "transfer-encoding xchunked": POST
    + b"Transfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "space before colon": POST + b"Transfer-Encoding : chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "vertical tab in transfer-encoding": POST
    + b"Transfer-Encoding:\x0bchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "two transfer-encodings": POST + CHUNKED + CHUNKED + b"\r\n5\r\nhello\r\n0\r\n\r\n",
    "transfer-encoding in HTTP/1.0": b"POST /v4/file HTTP/1.0\r\nHost: x\r\n"
    + CHUNKED
    + b"\r\n5\r\nhello\r\n0\r\n\r\n",
    "obs-fold": GET + b"X-A: a\r\n b\r\n\r\n",
    "bare LF everywhere": b"POST /v4/file HTTP/1.1\nHost: x\nContent-Length: 5\n\nhello",
    "one bare LF": b"GET /v4/apikey/ HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n",
    "NUL in a value": GET + b"X-Proxy-Key: " + SECRET.encode() + b"\x00\r\n\r\n",
    "CR in a value": GET + b"X-A: " + SECRET.encode() + b"\rb\r\n\r\n",
    "oversize header": GET + b"X-A: " + b"a" * 10000 + b"\r\n\r\n",
    "too many headers": GET + b"".join(b"X-%d: a\r\n" % i for i in range(200)) + b"\r\n",
    "0x chunk size": POST + CHUNKED + b"\r\n0x5\r\nhello\r\n0\r\n\r\n",
    "bare LF after chunk size": POST + CHUNKED + b"\r\n5\nhello\n0\n\n",
    "space in a header name": GET + b"X A: b\r\n\r\n",
    "space in the target": b"GET /v4/api key/ HTTP/1.1\r\nHost: x\r\n\r\n",
    "no Host": b"GET /v4/apikey/ HTTP/1.1\r\n\r\n",
    "two Hosts": GET + b"Host: y\r\n\r\n",
    "bad version": b"GET /v4/apikey/ HTTP/1.x\r\nHost: x\r\n\r\n",
    "bad method": b"G(T /v4/apikey/ HTTP/1.1\r\nHost: x\r\n\r\n",
}


def test_the_parser_under_test():
    """The default run uses the C parser; the other run really uses the pure-Python one."""
    module = aiohttp.http_parser.HttpRequestParser.__module__
    assert module == ("aiohttp.http_parser" if PURE_PYTHON else "aiohttp._http_parser")


@pytest.mark.parametrize("request_bytes", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_requests_never_reach_the_upstream(
    sim, proxy, client, caplog, request_bytes
):
    caplog.set_level(logging.INFO)
    resp = await raw_exchange(proxy.port, request_bytes + b"")
    assert resp.status in (400, 431)
    assert api_requests(sim) == []
    # one short line, no traceback, no bytes of the request
    assert SECRET not in caplog.text
    assert "Traceback" not in caplog.text
    async with client.get(proxy.url + "/v4/apikey/") as ok:
        assert ok.status == 200


async def test_huge_chunk_size(sim, proxy, client):
    """A chunk size beyond 2**64: the C parser refuses it at once; the pure-Python parser
    takes it as a very long chunk, so the request may start upstream, but it never completes
    there and the proxy stays healthy."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(POST + CHUNKED + b"\r\nffffffffffffffffffff\r\nhello\r\n0\r\n\r\n")
    await writer.drain()
    try:
        async with asyncio.timeout(1):
            head = await reader.read(100)
    except TimeoutError:
        head = b""
    writer.close()
    if not PURE_PYTHON:
        assert head.startswith(b"HTTP/1.1 400 ") or head.startswith(b"HTTP/1.0 400 ")
        assert api_requests(sim) == []
    await asyncio.sleep(0.2)
    assert all(r.body_sha256 is None for r in api_requests(sim))
    async with client.get(proxy.url + "/v4/apikey/") as ok:
        assert ok.status == 200


async def test_oversize_chunked_body_is_cut_off(sim, make_proxy):
    proxy = await make_proxy(**{"limits.max_body_size": 1000})
    chunk = b"%x\r\n%s\r\n" % (600, b"a" * 600)
    resp = await raw_exchange(
        proxy.port, POST + CHUNKED + b"Connection: close\r\n\r\n" + chunk * 2 + b"0\r\n\r\n"
    )
    assert resp.status == 413
    assert all(r.body_sha256 is None for r in api_requests(sim))


# obs-text: aiohttp decodes header bytes as UTF-8 (surrogateescape) and sends them encoded as
# UTF-8, so valid UTF-8 can pass on byte for byte; other bytes cannot and are refused.
UTF8 = b"caf\xc3\xa9 \xe2\x82\xac\t\xf0\x9f\x98\x80 \xc2\xa0end"
NOT_UTF8 = {
    "utf-8 then 0xff": b"\xc3\xa9\xff",
    "latin-1": b"caf\xe9",
    "lone continuation byte": b"\x80",
    "encoded surrogate": b"\xed\xa0\x80",
    "truncated sequence": b"\xe2\x82",
}


async def test_utf8_request_header_values_arrive_byte_for_byte(sim, proxy):
    resp = await raw_exchange(
        proxy.port,
        GET
        + b"X-A: "
        + UTF8
        + b"\r\nx-a: \xc3\xa9\r\n"
        + b"X-Forwarded-For: \xff\r\n"  # not forwarded, so it does not matter
        + b"Connection: close\r\n\r\n",
    )
    assert resp.status == 200
    seen = api_requests(sim)[-1]  # raw bytes, decoded as latin-1
    assert [(n, v.encode("latin-1")) for n, v in seen.headers if n.lower() == "x-a"] == [
        ("X-A", UTF8),
        ("X-A", b"\xc3\xa9"),
    ]


@pytest.mark.parametrize("value", NOT_UTF8.values(), ids=NOT_UTF8.keys())
async def test_request_header_values_that_are_not_utf8_are_refused(sim, proxy, value):
    resp = await raw_exchange(
        proxy.port, GET + b"X-A: ok\r\nX-Obs: " + value + b"\r\nConnection: close\r\n\r\n"
    )
    assert resp.status == 400
    assert b'"code": 400004' in resp.body
    assert b"request header X-Obs is not valid UTF-8" in resp.body
    assert api_requests(sim) == []


async def test_utf8_answer_header_values_arrive_byte_for_byte(proxy_before, raw_upstream):
    _, url = await raw_upstream(
        b"HTTP/1.1 200 OK\r\nX-A: " + UTF8 + b"\r\nx-a: \xc3\xa9\r\nContent-Length: 0\r\n\r\n"
    )
    proxy = await proxy_before(url)
    resp = await raw_exchange(proxy.port, GET + b"Connection: close\r\n\r\n")
    assert resp.status == 200
    assert [v.encode("latin-1") for v in resp.header("X-A")] == [UTF8, b"\xc3\xa9"]


@pytest.mark.parametrize("value", NOT_UTF8.values(), ids=NOT_UTF8.keys())
async def test_answer_header_values_that_are_not_utf8_are_a_502(proxy_before, raw_upstream, value):
    _, url = await raw_upstream(
        b"HTTP/1.1 200 OK\r\nX-Obs: " + value + b"\r\nContent-Length: 2\r\n\r\n{}"
    )
    proxy = await proxy_before(url)
    resp = await raw_exchange(proxy.port, GET + b"Connection: close\r\n\r\n")
    assert resp.status == 502
    assert b'"code": 502005' in resp.body
    assert b"upstream answer header X-Obs is not valid UTF-8" in resp.body
