"""Who may use the proxy: shared keys, allowed networks, and what is never passed upstream."""

from __future__ import annotations

import base64

import pytest

from .conftest import api_requests, raw_exchange, scrape

pytestmark = pytest.mark.security

KEY = "inbound-key-0123456789"
OTHER_KEY = "other-inbound-key-0123456789"


def basic(password: str, user: str = "anything") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_keys(sim, make_proxy, client):
    proxy = await make_proxy(**{"inbound.keys": [KEY, OTHER_KEY]})
    url = proxy.url + "/v4/apikey/"

    async with client.get(url) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Basic realm="mdcloud-proxy"'
        body = await resp.json()
    assert body["error"]["code"] == 401020
    assert "X-Proxy-Key" in body["error"]["messages"][0]
    for headers in ({"X-Proxy-Key": KEY[:-1]}, {"Authorization": basic("wrong-key-0123456789")}):
        async with client.get(url, headers=headers) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == 401021
    assert api_requests(sim) == []

    for headers in (
        {"X-Proxy-Key": KEY},
        {"X-Proxy-Key": OTHER_KEY},
        {"Authorization": basic(KEY)},
        {"Authorization": basic(OTHER_KEY, user="")},
    ):
        async with client.get(url, headers=headers) as resp:
            assert resp.status == 200
    for seen in api_requests(sim):
        assert seen.header("X-Proxy-Key") == []
        (authorization,) = seen.header("Authorization")
        assert authorization.startswith("Bearer ")

    m = await scrape(client, proxy.url + "/-/metrics")  # /-/ needs no key
    assert m[("mdcloud_proxy_inbound_refusals_total", (("reason", "missing_key"),))] == 1
    assert m[("mdcloud_proxy_inbound_refusals_total", (("reason", "wrong_key"),))] == 2
    assert m[("mdcloud_proxy_inbound_refusals_total", (("reason", "network"),))] == 0
    assert m[("mdcloud_proxy_requests_total", (("method", "GET"), ("status_class", "4xx")))] == 3


async def test_networks(sim, make_proxy, client):
    allowed = await make_proxy(**{"inbound.allowed_networks": ["10.0.0.0/8", "127.0.0.0/8"]})
    async with client.get(allowed.url + "/v4/apikey/") as resp:
        assert resp.status == 200

    elsewhere = await make_proxy(**{"inbound.allowed_networks": ["10.0.0.0/8", "::1/128"]})
    async with client.get(
        elsewhere.url + "/v4/apikey/", headers={"X-Forwarded-For": "10.1.1.1"}
    ) as resp:
        assert resp.status == 403
        body = await resp.json()
    assert body == {
        "error": {
            "code": 403020,
            "messages": [
                "mdcloud-proxy: requests from 127.0.0.1 are not allowed (inbound.allowed_networks)"
            ],
        }
    }
    assert len(api_requests(sim)) == 1
    async with client.get(elsewhere.url + "/-/ready") as resp:
        assert resp.status in (200, 503)  # probes are answered whatever the address


async def test_networks_and_keys_are_both_required(sim, make_proxy, client):
    proxy = await make_proxy(
        **{"inbound.allowed_networks": ["127.0.0.1/32"], "inbound.keys": [KEY]}
    )
    async with client.get(proxy.url + "/v4/apikey/") as resp:
        assert resp.status == 401
    async with client.get(proxy.url + "/v4/apikey/", headers={"X-Proxy-Key": KEY}) as resp:
        assert resp.status == 200


async def test_no_body_is_asked_for_before_the_key_is_checked(sim, make_proxy):
    proxy = await make_proxy(**{"inbound.keys": [KEY]})
    resp = await raw_exchange(
        proxy.port,
        b"POST /v4/file HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: 5\r\nConnection: close\r\n\r\n",
    )
    assert resp.status == 401  # the final answer, with no 100 Continue before it
    assert api_requests(sim) == []


@pytest.mark.parametrize(
    "header",
    ["X-Forwarded-For", "Forwarded", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Real-IP"],
)
async def test_forwarding_headers_are_not_passed_on(sim, proxy, client, header):
    async with client.get(proxy.url + "/v4/apikey/", headers={header: "10.9.8.7"}) as resp:
        assert resp.status == 200
    (seen,) = api_requests(sim)
    assert seen.header(header) == []
    assert all("10.9.8.7" not in value for _, value in seen.headers)


async def test_refused_keys_never_reach_the_log(sim, make_proxy, client, caplog):
    proxy = await make_proxy(**{"inbound.keys": [KEY]})
    for headers in (
        {"X-Proxy-Key": KEY},
        {"X-Proxy-Key": KEY + "x"},
        {"Authorization": basic(KEY)},
    ):
        async with client.get(proxy.url + "/v4/apikey/?k=" + KEY, headers=headers) as resp:
            await resp.read()
    assert KEY not in caplog.text
    assert KEY not in repr(proxy.app)


async def test_malformed_basic_credentials_are_a_401(make_proxy, client):
    proxy = await make_proxy(**{"inbound.keys": [KEY]})
    for value in ("Basic !!not-base64!!", "Basic " + base64.b64encode(b"no-colon").decode()):
        async with client.get(proxy.url + "/v4/apikey/", headers={"Authorization": value}) as resp:
            assert resp.status == 401
