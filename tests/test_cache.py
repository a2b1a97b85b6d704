"""The quota guard: lookups cost quota once (cache, coalescing, stale answers, upload dedup)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import aiohttp
import pytest
from aiohttp import web

from proxy import serve

from .conftest import API_KEY, api_requests, eventually, scrape

HASH = "6a5c19d9ffed3a6f9d0fbf94e0cce6ac5d2a6c9d8d4d0b2f9c1e7b2a0f5e4d3c"
MiB = 1024 * 1024


class Lookups:
    """An upstream for lookups whose answers a test steers, counting what reaches it."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()
        self.mode = "ok"
        self.delay = 0.0
        self.gate: asyncio.Event | None = None  # while unset, answers wait for it
        self.size = 0

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen[request.raw_path] += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.gate is not None:
            await self.gate.wait()
        if self.mode == "quota":
            error = {"code": 429000, "messages": ["API key limit exceeded"]}
            return web.json_response({"error": error}, status=429)
        if self.mode == "5xx":
            return web.json_response({"error": {"code": 500000, "messages": ["x"]}}, status=503)
        if self.mode == "hang up":
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        if self.mode == "not found":
            error = {"code": 404003, "messages": ["The hash was not found"]}
            return web.json_response({"error": error}, status=404)
        answer = {
            "path": request.raw_path,
            "n": sum(self.seen.values()),
            "body": body.decode(),
            "encoding": request.headers.get("Accept-Encoding"),
            "pad": "x" * self.size,
        }
        return web.json_response(answer)

    @property
    def total(self) -> int:
        return sum(self.seen.values())


@pytest.fixture
async def lookups(handler_upstream):
    upstream = Lookups()

    async def handle(request: web.Request) -> web.StreamResponse:
        return await upstream(request)

    return upstream, await handler_upstream(handle)


@pytest.fixture
async def guarded(proxy_before, lookups):
    upstream, url = lookups

    async def _make(**overrides):
        proxy = await proxy_before(url, **overrides)
        return proxy, upstream

    return _make


async def get(client, url, **kwargs):
    async with client.get(url, **kwargs) as resp:
        return resp.status, resp.headers.copy(), await resp.read()


async def test_repeats_within_the_ttl_cost_nothing_and_one_after_it(guarded, client, clock):
    proxy, upstream = await guarded()
    url = f"{proxy.url}/v4/hash/{HASH}"
    status, headers, first = await get(client, url)
    assert (status, headers["X-Cache-Status"]) == (200, "MISS")
    for _ in range(5):
        status, headers, again = await get(client, url)
        assert (status, headers["X-Cache-Status"], again) == (200, "HIT", first)
        assert "Age" in headers
    assert upstream.total == 1
    clock.advance(15 * 60 + 1)  # cache.ttl
    status, headers, _ = await get(client, url)
    assert headers["X-Cache-Status"] == "MISS" and upstream.total == 2


async def test_identical_lookups_in_flight_cause_one_upstream_request(guarded, client):
    proxy, upstream = await guarded()
    upstream.gate = asyncio.Event()
    url = f"{proxy.url}/v4/ip/203.0.113.7"
    asking = asyncio.gather(*(get(client, url) for _ in range(100)))

    async def all_in_flight() -> bool:  # the upstream answers once all 100 wait for it
        samples = await scrape(watching, proxy.url + "/-/metrics")
        return samples[("mdcloud_proxy_requests_in_flight", ())] == 100

    # Another session: the 100 requests hold all of the client's connections.
    async with aiohttp.ClientSession() as watching:
        try:
            await eventually(all_in_flight, 10)
        finally:
            upstream.gate.set()
    answers = await asyncio.wait_for(asking, 10)
    assert upstream.total == 1
    assert len({body for _, _, body in answers}) == 1
    assert Counter(h["X-Cache-Status"] for _, h, _ in answers) == {"MISS": 1, "HIT": 99}
    samples = await scrape(client, proxy.url + "/-/metrics")
    assert samples[("mdcloud_proxy_cache_coalesced_total", ())] == 99


async def test_a_caller_hanging_up_cancels_nobody(guarded, client):
    proxy, upstream = await guarded()
    upstream.delay = 0.3
    url = f"{proxy.url}/v4/domain/example.org"
    first = asyncio.create_task(get(client, url))
    await asyncio.sleep(0.1)
    others = asyncio.gather(*(get(client, url) for _ in range(3)))
    await asyncio.sleep(0.05)
    first.cancel()  # the request that went upstream
    answers = await others
    assert [status for status, _, _ in answers] == [200] * 3
    assert upstream.total == 1
    status, headers, _ = await get(client, url)
    assert (status, headers["X-Cache-Status"]) == (200, "HIT")


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"apikey": API_KEY}, {"apikey": API_KEY + "-other"}),
        ({"Accept-Encoding": "gzip"}, {"Accept-Encoding": "identity"}),
        ({"includescandetails": "1"}, {}),
    ],
    ids=["apikey", "accept-encoding", "includescandetails"],
)
async def test_what_can_change_the_answer_is_in_the_key(guarded, client, first, second):
    proxy, upstream = await guarded()
    url = f"{proxy.url}/v4/hash/{HASH}"
    await get(client, url, headers=first)
    _, headers, _ = await get(client, url, headers=second)
    assert headers["X-Cache-Status"] == "MISS" and upstream.total == 2


async def test_what_cannot_change_the_answer_is_not(guarded, client):
    proxy, upstream = await guarded()
    url = f"{proxy.url}/v4/hash/{HASH}"
    await get(client, url, headers={"User-Agent": "a", "X-Request-Id": "1"})
    _, headers, _ = await get(
        client, url.replace(HASH, HASH.upper()), headers={"User-Agent": "b", "X-Request-Id": "2"}
    )
    assert headers["X-Cache-Status"] == "HIT" and upstream.total == 1


async def test_a_bulk_lookup_is_keyed_by_its_body(guarded, client):
    proxy, upstream = await guarded()
    url = proxy.url + "/v4/hash"
    one, two = json.dumps({"hash": [HASH]}), json.dumps({"hash": [HASH, HASH[::-1]]})
    for body, expected in [(one, "MISS"), (two, "MISS"), (one, "HIT"), (two, "HIT")]:
        async with client.post(url, data=body) as resp:
            assert resp.headers["X-Cache-Status"] == expected
            assert json.loads(await resp.read())["body"] == body
    assert upstream.total == 2


async def test_no_cache_refreshes_and_no_store_bypasses(guarded, client):
    proxy, upstream = await guarded()
    url = f"{proxy.url}/v4/cve/CVE-2024-3094"
    _, _, first = await get(client, url)
    _, headers, second = await get(client, url, headers={"Cache-Control": "no-cache"})
    assert headers["X-Cache-Status"] == "MISS" and second != first and upstream.total == 2
    _, headers, third = await get(client, url)
    assert headers["X-Cache-Status"] == "HIT" and third == second
    _, headers, fourth = await get(client, url, headers={"Cache-Control": "no-store"})
    assert headers["X-Cache-Status"] == "BYPASS" and upstream.total == 3 and fourth != second
    _, headers, fifth = await get(client, url)
    assert headers["X-Cache-Status"] == "HIT" and fifth == second  # no-store wrote nothing


async def test_not_found_is_kept_for_the_miss_ttl(guarded, client, clock):
    proxy, upstream = await guarded()
    upstream.mode = "not found"
    url = f"{proxy.url}/v4/hash/{HASH}"
    await get(client, url)
    status, headers, _ = await get(client, url)
    assert (status, headers["X-Cache-Status"], upstream.total) == (404, "HIT", 1)
    clock.advance(2 * 60 + 1)
    _, headers, _ = await get(client, url)
    assert headers["X-Cache-Status"] == "MISS" and upstream.total == 2


@pytest.mark.parametrize("trouble", ["quota", "5xx", "hang up"])
async def test_stale_answers_when_the_upstream_cannot_answer(guarded, client, clock, trouble):
    proxy, upstream = await guarded()
    url = f"{proxy.url}/v4/url/https%3A%2F%2Fexample.org%2F"
    _, _, fresh = await get(client, url)
    clock.advance(15 * 60 + 1)  # expired, but within cache.stale_ttl
    upstream.mode = trouble
    status, headers, body = await get(client, url)
    assert (status, headers["X-Cache-Status"], body) == (200, "STALE", fresh)
    clock.advance(24 * 3600)  # past cache.stale_ttl: the trouble shows
    status, headers, _ = await get(client, url)
    assert status != 200


async def test_answers_past_max_entry_size_are_not_kept(guarded, client):
    proxy, upstream = await guarded()
    upstream.size = 2 * MiB
    url = f"{proxy.url}/v4/hash/{HASH}"
    for _ in range(2):
        status, headers, body = await get(client, url)
        assert (status, headers["X-Cache-Status"]) == (200, "BYPASS")
        assert len(body) > 2 * MiB
    assert upstream.total == 2


async def test_memory_stays_within_max_size(guarded, client):
    proxy, _ = await guarded(**{"cache.max_size": "256KiB"})
    connector_client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=50))
    async with connector_client as session:

        async def lookup(i: int) -> None:
            async with session.get(f"{proxy.url}/v4/ip/10.0.{i // 256}.{i % 256}") as resp:
                assert resp.status == 200
                await resp.read()

        await asyncio.gather(*(lookup(i) for i in range(2000)))
    samples = await scrape(client, proxy.url + "/-/metrics")
    assert samples[("mdcloud_proxy_cache_bytes", ())] <= 256 * 1024
    assert 0 < samples[("mdcloud_proxy_cache_entries", ())] < 2000


async def test_a_miss_still_replays_after_an_expired_token(sim, proxy, client):
    await get(client, f"{proxy.url}/v4/hash/{HASH}")  # the simulator's own "not found"
    sim.expire_tokens()
    status, headers, _ = await get(client, f"{proxy.url}/v4/hash/{HASH[::-1]}")
    assert (status, headers["X-Cache-Status"]) == (404, "MISS")
    assert len(sim.expired_tokens) == 1


async def test_with_the_cache_off_there_is_no_cache_status(guarded, client):
    proxy, upstream = await guarded(**{"cache.enabled": False})
    for _ in range(2):
        _, headers, _ = await get(client, f"{proxy.url}/v4/hash/{HASH}")
        assert "X-Cache-Status" not in headers
    assert upstream.total == 2


async def test_upload_dedup(sim, make_proxy, client):
    proxy = await make_proxy(**{"cache.uploads": True})
    data = b"the same attachment, again and again\n"

    async def upload(**headers: str) -> tuple[str, str]:
        async with client.post(proxy.url + "/v4/file", data=data, headers=headers) as resp:
            assert resp.status == 200
            return (await resp.json())["data_id"], resp.headers["X-Cache-Status"]

    first = await upload(filename="a.eml")
    again = await upload(filename="a.eml")
    other = await upload(filename="a.eml", rule="sanitize")
    assert first[1] == "MISS" and again == (first[0], "HIT")
    assert other[1] == "MISS" and other[0] != first[0]
    assert sum(r.raw_path == "/v4/file" for r in api_requests(sim)) == 2


async def test_uploads_are_not_deduplicated_by_default(sim, proxy, client):
    for _ in range(2):
        async with client.post(proxy.url + "/v4/file", data=b"same") as resp:
            assert resp.status == 200 and "X-Cache-Status" not in resp.headers
    assert sum(r.raw_path == "/v4/file" for r in api_requests(sim)) == 2


async def test_stale_answer_when_the_upstream_refuses_connections(proxy_before, client, clock):
    upstream = Lookups()

    async def handle(request: web.Request) -> web.StreamResponse:
        return await upstream(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = await serve(app, "127.0.0.1", 0)
    proxy = await proxy_before(f"http://127.0.0.1:{runner.addresses[0][1]}")
    url = f"{proxy.url}/v4/hash/{HASH}"
    _, _, fresh = await get(client, url)
    await runner.cleanup()  # nothing listens there any more
    clock.advance(15 * 60 + 1)
    status, headers, body = await get(client, url)
    assert (status, headers["X-Cache-Status"], body) == (200, "STALE", fresh)


async def test_identical_uploads_at_once_go_upstream_once(sim, make_proxy, client):
    proxy = await make_proxy(**{"cache.uploads": True})

    async def upload() -> str:
        async with client.post(
            proxy.url + "/v4/file", data=b"one attachment, four analyzers\n"
        ) as resp:
            assert resp.status == 200
            return (await resp.json())["data_id"]

    data_ids = await asyncio.gather(*(upload() for _ in range(4)))
    assert len(set(data_ids)) == 1
    assert sum(r.raw_path == "/v4/file" for r in api_requests(sim)) == 1


async def test_coalesced_bulk_lookups_too_large_to_keep_all_arrive(guarded, client):
    proxy, upstream = await guarded()
    upstream.size, upstream.delay = 2 * MiB, 0.2
    body = json.dumps({"hash": [HASH] * 3})

    async def bulk() -> tuple[int, int]:
        async with client.post(proxy.url + "/v4/hash", data=body) as resp:
            answer = await resp.read()
            return resp.status, json.loads(answer)["body"] == body

    assert await asyncio.gather(*(bulk() for _ in range(3))) == [(200, True)] * 3


async def test_an_answer_with_a_cookie_is_not_shared(handler_upstream, proxy_before, client):
    calls = 0

    async def cookie(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        mine = calls
        await asyncio.sleep(0.2)
        return web.json_response({"n": mine}, headers={"Set-Cookie": f"s={mine}"})

    proxy = await proxy_before(await handler_upstream(cookie))
    answers = await asyncio.gather(*(get(client, f"{proxy.url}/v4/ip/192.0.2.1") for _ in range(3)))
    cookies = [headers.get("Set-Cookie") for _, headers, _ in answers]
    assert len(set(cookies)) == 3 and calls == 3
