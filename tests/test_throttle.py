"""Quota awareness: throttles are waited out, a used-up quota is passed on, gauges follow."""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest
from aiohttp import web

from proxy import Simulator, create_app

from .conftest import (
    API_KEY,
    CLIENT_ID,
    CLIENT_SECRET,
    TOKEN_PATH,
    api_requests,
    chunks,
    eventually,
    proxy_config,
    random_payload,
    scrape,
)

MiB = 1024 * 1024


class Throttle:
    """An upstream with a throttle: ``allowed`` calls per window of ``window`` seconds from
    its first call, then 429001 until the window ends (as MetaDefender), on the real clock;
    and a quota it can say is used up."""

    def __init__(self, allowed: int = 1, window: float = 1.0) -> None:
        self.allowed, self.window = allowed, window
        self.started = float("-inf")
        self.in_window = 0
        self.calls = 0
        self.throttled = 0
        self.used_up = False
        self.bodies: list[str] = []
        self.remaining = 1000

    async def __call__(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        async for chunk in request.content.iter_any():
            digest.update(chunk)
        now = time.monotonic()
        limit = "prevention_api" if request.path == "/v4/file" else "reputation_api"
        headers = {
            "X-RateLimit-For": limit,
            "X-RateLimit-Interval": "daily",
            "X-RateLimit-Limit": "1000",
        }
        if self.used_up:
            headers.update({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset-In": "3600s"})
            error = {"code": 429000, "messages": ["API key limit exceeded"]}
            return web.json_response({"error": error}, status=429, headers=headers)
        if now >= self.started + self.window:
            self.started, self.in_window = now, 0
        if self.in_window >= self.allowed:
            self.throttled += 1
            left = self.started + self.window - now
            headers.update({"X-RateLimit-Reset-In": f"{left:.0f}s", "Retry-After": f"{left:.0f}"})
            error = {"code": 429001, "messages": ["Too many requests"]}
            return web.json_response({"error": error}, status=429, headers=headers)
        self.calls += 1
        self.in_window += 1
        self.remaining -= 1
        self.bodies.append(digest.hexdigest())
        headers.update(
            {"X-RateLimit-Remaining": str(self.remaining), "X-RateLimit-Reset-In": "3294s"}
        )
        return web.json_response({"ok": True, "path": request.path}, headers=headers)


@pytest.fixture
async def throttled(start, handler_upstream, upstream):
    """A proxy on the real clock and real pauses, in front of a Throttle."""

    async def _make(throttle: Throttle, **overrides):
        async def handle(request: web.Request) -> web.Response:
            return await throttle(request)

        url = await handler_upstream(handle)
        config = proxy_config(url, **{"oauth.token_url": upstream + TOKEN_PATH, **overrides})
        return f"http://127.0.0.1:{await start(create_app(config))}"

    return _make


async def test_a_throttled_lookup_waits_for_the_reset(throttled, client):
    throttle = Throttle(allowed=1, window=2.0)
    url = await throttled(throttle)
    async with client.get(url + "/v4/hash/aa") as resp:
        assert resp.status == 200  # opens the window's count
    started = time.monotonic()
    async with client.get(url + "/v4/hash/bb") as resp:
        assert resp.status == 200
    took = time.monotonic() - started
    assert 1.5 < took < 4.0
    assert throttle.throttled <= 1  # the closed window, once seen, is waited for


async def test_requests_behind_a_closed_window_wait_instead_of_walking_into_429s(throttled, client):
    throttle = Throttle(allowed=1, window=1.0)
    url = await throttled(throttle)
    assert await _status(client, url + "/v4/hash/00") == 200
    first = asyncio.create_task(_status(client, url + "/v4/hash/01"))
    await eventually(lambda: throttle.throttled)  # the first 429 of the window: now it knows
    throttle.allowed = 100  # the next window has room for all of them
    statuses = await asyncio.gather(
        first, *(_status(client, f"{url}/v4/hash/{i:02x}0") for i in range(50))
    )
    assert statuses == [200] * 51
    assert throttle.throttled == 1  # no further 429 upstream


async def _status(client, url: str) -> int:
    async with client.get(url) as resp:
        await resp.read()
        return resp.status


async def test_a_used_up_quota_is_passed_on_at_once(throttled, client):
    throttle = Throttle()
    throttle.used_up = True
    url = await throttled(throttle)
    started = time.monotonic()
    async with client.get(url + "/v4/hash/aa") as resp:
        assert resp.status == 429
        assert (await resp.json())["error"]["code"] == 429000
    assert time.monotonic() - started < 0.5


async def test_a_reset_past_max_wait_is_passed_on_within_it(throttled, client):
    throttle = Throttle(allowed=1, window=5.0)
    url = await throttled(throttle, **{"throttle.max_wait": "1s"})
    async with client.get(url + "/v4/hash/aa") as resp:
        assert resp.status == 200
    started = time.monotonic()
    async with client.get(url + "/v4/hash/bb") as resp:  # the upstream's own 429
        assert resp.status == 429 and (await resp.json())["error"]["code"] == 429001
    async with client.get(url + "/v4/hash/cc") as resp:  # the proxy's, without asking
        assert resp.status == 429 and "Retry-After" in resp.headers
        body = await resp.json()
    assert body["error"]["messages"][0].startswith("mdcloud-proxy: the reputation_api throttle")
    assert time.monotonic() - started < 1.0
    assert throttle.throttled == 1


async def test_max_wait_0_never_waits(throttled, client):
    throttle = Throttle(allowed=1, window=2.0)
    url = await throttled(throttle, **{"throttle.max_wait": 0})
    await _status(client, url + "/v4/hash/aa")
    started = time.monotonic()
    assert await _status(client, url + "/v4/hash/bb") == 429
    assert time.monotonic() - started < 0.5


async def test_an_upload_throttled_once_arrives_whole(throttled, client):
    throttle = Throttle(allowed=1, window=1.0)
    url = await throttled(throttle)
    data, digest = random_payload(20 * MiB)
    async with client.post(url + "/v4/file", data=chunks(data)) as resp:
        assert resp.status == 200
    async with client.post(url + "/v4/file", data=chunks(data)) as resp:
        assert resp.status == 200
    assert throttle.bodies == [digest, digest]


async def test_quota_gauges_follow_the_answers(throttled, client, sim):
    throttle = Throttle(allowed=1000)
    url = await throttled(throttle)
    for i in range(7):
        assert await _status(client, f"{url}/v4/hash/{i:02x}") == 200
    samples = await scrape(client, url + "/-/metrics")
    labels = (("limit", "reputation_api"),)
    assert samples[("mdcloud_proxy_quota_limit", labels)] == 1000
    assert samples[("mdcloud_proxy_quota_remaining", labels)] == throttle.remaining == 993
    assert 3200 < samples[("mdcloud_proxy_quota_reset_seconds", labels)] <= 3294
    assert not api_requests(sim)  # the simulator only gave tokens


async def test_status_and_the_page_show_the_quota_and_no_secret(throttled, client, sim):
    throttle = Throttle(allowed=1000)
    url = await throttled(throttle, **{"api_key": API_KEY})
    for i in range(3):
        assert await _status(client, f"{url}/v4/hash/{i:02x}") == 200
    assert await _status(client, f"{url}/v4/hash/00") == 200  # a hit
    async with client.get(url + "/-/status") as resp:
        state = await resp.json()
        text = await resp.text()
    assert state["token"]["held"] is True
    assert state["limits"]["reputation_api"]["remaining"] == 997
    assert state["limits"]["reputation_api"]["limit"] == 1000
    assert state["cache"]["hit"] == 1 and state["cache"]["miss"] == 3
    async with client.get(url + "/-/") as resp:
        assert resp.content_type == "text/html"
        page = await resp.text()
    assert "997 of 1000 left" in page
    for secret in (CLIENT_SECRET, API_KEY, *sim.issued_tokens):
        assert secret not in text and secret not in page


async def test_the_gauges_match_the_simulators_count(make_proxy, sim, client):
    sim.limits["reputation_api"] = 500
    proxy = await make_proxy()
    for i in range(7):
        assert await _status(client, f"{proxy.url}/v4/ip/198.51.100.{i}") == 200
    assert await _status(client, f"{proxy.url}/v4/ip/198.51.100.0") == 200  # a hit: no quota
    samples = await scrape(client, proxy.url + "/-/metrics")
    labels = (("limit", "reputation_api"),)
    assert sim.served["reputation_api"] == 7
    assert samples[("mdcloud_proxy_quota_remaining", labels)] == sim.remaining("reputation_api")
    assert samples[("mdcloud_proxy_quota_limit", labels)] == 500


async def test_the_simulators_throttle_is_waited_out(start, client):
    """The simulator's own throttle, on the real clock: 2 lookups a second."""
    sim = Simulator(CLIENT_ID, CLIENT_SECRET, throttles={"reputation_api": (2, 1.0)})
    upstream = f"http://127.0.0.1:{await start(sim.app())}"
    url = f"http://127.0.0.1:{await start(create_app(proxy_config(upstream)))}"
    statuses = [await _status(client, f"{url}/v4/domain/d{i}.example") for i in range(4)]
    assert statuses == [200] * 4
    assert sim.throttled[429001] >= 1 and sim.served["reputation_api"] == 4


async def test_the_proxys_own_429_on_a_cached_route(throttled, client):
    throttle = Throttle(allowed=1, window=5.0)
    url = await throttled(throttle, **{"throttle.max_wait": "1s"})
    assert await _status(client, url + "/v4/hash/aa") == 200
    assert await _status(client, url + "/v4/hash/bb") == 429  # the upstream's
    answers = await asyncio.gather(*(_answer(client, url + "/v4/hash/cc") for _ in range(3)))
    for status, retry_after, code in answers:  # the proxy's, to each of them
        assert (status, code) == (429, 429001) and retry_after is not None
    assert throttle.throttled == 1


async def _answer(client, url: str) -> tuple[int, str | None, int]:
    async with client.get(url) as resp:
        return resp.status, resp.headers.get("Retry-After"), (await resp.json())["error"]["code"]


async def test_an_upload_throttle_does_not_hold_up_polls_or_lookups(throttled, client):
    throttle = Throttle(allowed=1, window=30.0)
    url = await throttled(throttle, **{"throttle.max_wait": "1s"})
    async with client.post(url + "/v4/file", data=b"a") as resp:
        assert resp.status == 200
    async with client.post(url + "/v4/file", data=b"b") as resp:
        assert resp.status == 429  # the window is closed for uploads now
    throttle.allowed = 100
    assert await _status(client, url + "/v4/file/some-data-id") == 200
    assert await _status(client, url + "/v4/hash/aa") == 200
