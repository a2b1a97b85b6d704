"""No secret, api key or token reaches a log line, an error body or a repr."""

from __future__ import annotations

import base64
import logging

import pytest

from proxy.app import FORWARDER, TOKENS
from proxy.logs import TEXT_FORMAT, JsonFormatter

from .conftest import API_KEY, CLIENT_ID, CLIENT_SECRET, chunks, random_payload


def forbidden(sim) -> list[str]:
    basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    return [CLIENT_SECRET, API_KEY, basic, *sim.issued_tokens]


def assert_clean(text: str, sim) -> None:
    for secret in forbidden(sim):
        assert secret not in text


async def test_secrets_never_logged_nor_answered(
    sim, make_proxy, proxy_before, client, caplog, raw_upstream
):
    caplog.set_level(logging.DEBUG)
    sim.api_key = API_KEY
    proxy = await make_proxy(api_key=API_KEY)
    bodies: list[str] = []

    async def call(method, url, **kwargs):
        async with client.request(method, url, **kwargs) as resp:
            bodies.append(await resp.text())

    # normal calls, a replay of an upload, a replay with an early hang-up, a second refusal
    await call("GET", proxy.url + "/v4/apikey/")
    sim.expire_tokens()
    data, _ = random_payload(3 * 1024 * 1024)
    await call("POST", proxy.url + "/v4/file", data=chunks(data))
    sim.early_reject = True
    sim.expire_tokens()
    await call("POST", proxy.url + "/v4/file", data=chunks(data))
    sim.revoke_after = 0
    sim.expire_tokens()
    await call("GET", proxy.url + "/v4/apikey/", headers={"Authorization": "Bearer " + API_KEY})
    await call("GET", proxy.url + "/v4/hash/x?apikey=" + API_KEY)  # a key in the query string
    # token endpoint failures
    for failure in [(401, b'{"error":"invalid_client"}'), (500, b"x"), (200, b"nope")]:
        sim.token_failure = failure
        failing = await make_proxy(api_key=API_KEY)
        await call("GET", failing.url + "/v4/apikey/")
        await call("GET", failing.url + "/-/ready")
    sim.token_failure = None
    # upstream failures: refused connection, truncated answer
    _, broken = await raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12")
    broken_proxy = await proxy_before(broken, api_key=API_KEY)
    with pytest.raises(Exception):  # noqa: B017 - the caller sees a broken answer, any kind
        await call("GET", broken_proxy.url + "/v4/x")

    for app_url in (proxy.url, broken_proxy.url):
        await call("GET", app_url + "/-/ready")
        await call("GET", app_url + "/-/metrics")

    assert len(sim.issued_tokens) >= 3
    assert any("replaying" in r.getMessage() for r in caplog.records), "the flows above were logged"
    assert any("not ready: no access token" in body for body in bodies)
    # every record as both formats write it, exception texts and tracebacks included
    text, json_lines = logging.Formatter(TEXT_FORMAT), JsonFormatter()
    log_text = "\n".join(text.format(r) + json_lines.format(r) for r in caplog.records)
    assert_clean(log_text, sim)
    assert_clean("\n".join(bodies), sim)
    for app in (proxy.app, broken_proxy.app):
        assert_clean(repr(app[TOKENS]) + repr(app[FORWARDER]) + repr(app[TOKENS].current), sim)
