"""Token fetching and caching, seen from outside: through the proxy, counted at the simulator."""

from __future__ import annotations

import asyncio
import base64

import pytest

from .conftest import CLIENT_ID, CLIENT_SECRET, eventually


async def get_status(client, url: str) -> int:
    async with client.get(url) as resp:
        await resp.read()
        return resp.status


async def settle() -> None:
    """Give a background refresh that should not start the time to show itself."""
    for _ in range(20):
        await asyncio.sleep(0.01)


def refreshed(sim, proxy, count: int) -> bool:
    """Whether the proxy fetched ``count`` tokens and holds the latest."""
    token = proxy.tokens.current
    latest = sim.issued_tokens[-1]
    return sim.token_requests == count and token is not None and token.access_token == latest


async def test_token_request_is_client_credentials_as_documented(sim, proxy, client):
    assert await get_status(client, proxy.url + "/v4/apikey/") == 200
    token_request = sim.requests[0]
    assert token_request.method == "POST"
    assert token_request.raw_path == "/v4/oauth2/token"
    expected = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    assert token_request.header("Authorization") == [f"Basic {expected}"]
    assert token_request.header("Content-Type") == ["application/x-www-form-urlencoded"]
    api_request = sim.requests[1]
    assert api_request.header("Authorization") == [f"Bearer {sim.issued_tokens[0]}"]


async def test_cold_start_single_flight(sim, proxy, client):
    statuses = await asyncio.gather(
        *(get_status(client, proxy.url + "/v4/apikey/") for _ in range(200))
    )
    assert statuses == [200] * 200
    assert sim.token_requests == 1


async def test_single_flight_after_expiry(sim, clock, proxy, client):
    await get_status(client, proxy.url + "/v4/apikey/")
    clock.advance(3600)  # the token is now expired for both sides
    statuses = await asyncio.gather(
        *(get_status(client, proxy.url + "/v4/apikey/") for _ in range(200))
    )
    assert statuses == [200] * 200
    assert sim.token_requests == 2
    # Expired tokens are never sent: every call after the expiry carried the new token.
    late = [r for r in sim.requests[-200:] if r.raw_path == "/v4/apikey/"]
    assert {tuple(r.header("Authorization")) for r in late} == {(f"Bearer {sim.issued_tokens[1]}",)}


async def test_refresh_ahead_of_expiry(sim, clock, make_proxy, client):
    proxy = await make_proxy(**{"oauth.refresh_margin": 60})
    await get_status(client, proxy.url + "/v4/apikey/")
    clock.advance(3600 - 90)
    await get_status(client, proxy.url + "/v4/apikey/")
    assert sim.token_requests == 1  # still fresh
    clock.advance(40)  # 50 s left: inside the margin
    assert await get_status(client, proxy.url + "/v4/apikey/") == 200
    await eventually(lambda: refreshed(sim, proxy, 2))
    # The stale token served that call; the fresh one serves the next.
    assert sim.requests[-2].header("Authorization") == [f"Bearer {sim.issued_tokens[0]}"]
    await get_status(client, proxy.url + "/v4/apikey/")
    assert sim.requests[-1].header("Authorization") == [f"Bearer {sim.issued_tokens[1]}"]
    assert sim.token_requests == 2


async def test_refresh_margin_is_capped_at_half_the_lifetime(sim, clock, make_proxy, client):
    sim.token_lifetime = 100
    proxy = await make_proxy(**{"oauth.refresh_margin": 3000})
    await get_status(client, proxy.url + "/v4/apikey/")
    clock.advance(40)
    await get_status(client, proxy.url + "/v4/apikey/")
    await settle()
    assert sim.token_requests == 1
    clock.advance(15)  # 45 s left, under half of 100
    await get_status(client, proxy.url + "/v4/apikey/")
    await eventually(lambda: refreshed(sim, proxy, 2))


async def test_missing_expires_in_means_an_hour(sim, clock, proxy, client, upstream, start):
    from aiohttp import web

    async def token(request):
        return web.json_response({"access_token": "tok-without-expiry", "token_type": "Bearer"})

    app = web.Application()
    app.router.add_post("/token", token)
    port = await start(app)
    from proxy import create_app, load_config

    config = load_config(
        environ={},
        overrides={
            "upstream.url": upstream,
            "oauth.token_url": f"http://127.0.0.1:{port}/token",
            "oauth.client_id": CLIENT_ID,
            "oauth.client_secret": CLIENT_SECRET,
        },
    )
    proxy_app = create_app(config, clock=clock)
    await start(proxy_app)
    from proxy.app import TOKENS

    token_obj = await proxy_app[TOKENS].get()
    assert token_obj.lifetime == 3600
    assert token_obj.expires_at == clock.now + 3600


@pytest.mark.parametrize(
    ("failure", "status", "phrase"),
    [
        (
            (401, b'{"error":"invalid_client","error_description":"Client authentication failed"}'),
            502,
            "token endpoint rejected the client credentials (HTTP 401: invalid_client",
        ),
        ((200, b"<html>captive portal</html>"), 502, "not JSON"),
        ((200, b'{"token_type":"Bearer"}'), 502, "no access_token"),
        (
            (503, b'{"error":{"code":503000,"messages":["maintenance"]}}'),
            503,
            "HTTP 503: maintenance",
        ),
    ],
    ids=["rejected", "garbage", "no-token", "unavailable"],
)
async def test_token_endpoint_failure_is_a_clear_error(
    sim, make_proxy, client, failure, status, phrase
):
    sim.token_failure = failure
    proxy = await make_proxy()
    async with client.get(proxy.url + "/v4/apikey/") as resp:
        assert resp.status == status
        body = await resp.json()
    assert body["error"]["code"] == status * 1000 + 10
    (message,) = body["error"]["messages"]
    assert message.startswith("mdcloud-proxy: ")
    assert phrase in message
    assert not any(r.raw_path == "/v4/apikey/" for r in sim.requests), "nothing goes upstream"


async def test_token_endpoint_down(sim, make_proxy, client, unused_tcp_port):
    proxy = await make_proxy(**{"oauth.token_url": f"http://127.0.0.1:{unused_tcp_port}/token"})
    async with client.get(proxy.url + "/v4/apikey/") as resp:
        assert resp.status == 503
        message = (await resp.json())["error"]["messages"][0]
        assert resp.headers["Retry-After"].isdigit()
    assert f"token endpoint http://127.0.0.1:{unused_tcp_port}/token unreachable" in message


async def test_rejected_credentials_are_not_hammered(sim, make_proxy, client):
    sim.token_failure = (401, b'{"error":"invalid_client"}')
    proxy = await make_proxy()
    statuses = [await get_status(client, proxy.url + "/v4/apikey/") for _ in range(20)]
    assert statuses == [502] * 20
    assert sim.token_requests == 1, "a rejection is a configuration error: no retry loop"


async def test_transient_failure_is_retried_then_recovers(sim, clock, make_proxy, client):
    sim.token_failure = (500, b"oops")
    proxy = await make_proxy()
    assert await get_status(client, proxy.url + "/v4/apikey/") == 503
    assert sim.token_requests == 3  # bounded retries with backoff inside one fetch
    assert await get_status(client, proxy.url + "/v4/apikey/") == 503
    assert sim.token_requests == 3, "during the backoff callers get the last error at once"
    sim.token_failure = None
    clock.advance(61)
    assert await get_status(client, proxy.url + "/v4/apikey/") == 200
    assert sim.token_requests == 4


async def test_retry_after_is_honoured(sim, clock, make_proxy, client):
    sim.token_failure = (
        429,
        b'{"error":{"code":429001,"messages":["too many"]}}',
        {"Retry-After": "30"},
    )
    proxy = await make_proxy()
    async with client.get(proxy.url + "/v4/apikey/") as resp:
        assert resp.status == 503
        assert 25 <= int(resp.headers["Retry-After"]) <= 30
    assert sim.token_requests == 1, "a 30 s Retry-After is not waited out inside one request"
    clock.advance(20)
    assert await get_status(client, proxy.url + "/v4/apikey/") == 503
    assert sim.token_requests == 1, "nor is it ignored"
    sim.token_failure = None
    clock.advance(11)
    assert await get_status(client, proxy.url + "/v4/apikey/") == 200
    assert sim.token_requests == 2
