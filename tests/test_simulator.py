"""The simulator itself: what it keeps of the requests it saw, its lookups and its quotas.

These talk to the simulator directly with a bearer token from its token endpoint, not through
the proxy: what the simulator answers is the subject, whatever the proxy does with it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from yarl import URL

from proxy import Simulator
from tests.conftest import CLIENT_ID, CLIENT_SECRET, FakeClock, eventually, spawn, wait_for_line


async def bearer(
    client: aiohttp.ClientSession, base: str, sim_id: str, secret: str
) -> dict[str, str]:
    """The Authorization header of a fresh token from the simulator at ``base``."""
    pair = base64.b64encode(f"{sim_id}:{secret}".encode()).decode()
    form, basic = {"grant_type": "client_credentials"}, {"Authorization": f"Basic {pair}"}
    async with client.post(f"{base}/v4/oauth2/token", data=form, headers=basic) as resp:
        assert resp.status == 200
        return {"Authorization": f"Bearer {(await resp.json())['access_token']}"}


class Api:
    """A simulator on loopback (``sim``, when it runs in this process) and a client with a token."""

    def __init__(
        self,
        client: aiohttp.ClientSession,
        base: str,
        auth: dict[str, str],
        sim: Simulator | None = None,
    ) -> None:
        self.client, self.base, self.auth = client, base, auth
        self.sim = sim

    async def call(
        self, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> tuple[int, Any, Any]:
        """Status, headers and parsed JSON body of one call; ``path`` is sent as it is."""
        url = URL(self.base + path, encoded=True)
        headers = {**self.auth, **(headers or {})}
        async with self.client.request(method, url, headers=headers, **kwargs) as resp:
            return resp.status, resp.headers, json.loads(await resp.read())

    async def raw(self, path: str) -> bytes:
        url = URL(self.base + path, encoded=True)
        async with self.client.get(url, headers=self.auth) as resp:
            assert resp.status == 200
            return await resp.read()


@pytest.fixture
def api(start, client):
    """Start a simulator (its fields as arguments; the test's FakeClock) and talk to it."""

    async def _make(clock: FakeClock | None = None, **fields: Any) -> Api:
        sim = Simulator(CLIENT_ID, CLIENT_SECRET, clock=clock or FakeClock(), **fields)
        base = f"http://127.0.0.1:{await start(sim.app())}"
        return Api(client, base, await bearer(client, base, CLIENT_ID, CLIENT_SECRET), sim)

    return _make


def rate(headers: Any) -> dict[str, str]:
    return {k.removeprefix("X-RateLimit-"): v for k, v in headers.items() if k.startswith("X-Rate")}


def code(body: Any) -> int:
    return int(body["error"]["code"])


async def test_the_request_log_keeps_only_the_newest(start, client):
    sim = Simulator(max_requests=5)
    base = f"http://127.0.0.1:{await start(sim.app())}"
    auth = await bearer(client, base, sim.client_id, sim.client_secret)
    for i in range(12):
        async with client.get(f"{base}/v4/ip/10.0.0.{i}", headers=auth) as resp:
            assert resp.status == 200
            used = resp.headers["X-RateLimit-Used"]
        async with client.get(f"{base}/nowhere/{i}") as resp:
            await resp.read()
    assert len(sim.requests) == 5
    assert [r.raw_path for r in sim.requests] == [
        "/nowhere/9", "/v4/ip/10.0.0.10", "/nowhere/10", "/v4/ip/10.0.0.11", "/nowhere/11",
    ]  # fmt: skip
    assert used == "12", "the quota counts every lookup, not the requests kept"


def test_the_request_log_holds_ten_thousand_by_default():
    assert Simulator().max_requests == 10_000


async def test_lookups_count_down_the_reputation_quota(api, clock):
    sim_api = await api(clock)
    clock.advance(500)  # the interval starts at the first call, not when the simulator did
    seen = []
    for path in ["/v4/ip/1.2.3.4", "/v4/domain/example.com", "/v4/cve/CVE-2021-44228"]:
        status, headers, _ = await sim_api.call("GET", path)
        assert status == 200
        seen.append(rate(headers))
        clock.advance(100)
    assert seen == [
        {"For": "reputation_api", "Interval": "daily", "Limit": "4000", "Used": str(n),
         "Remaining": str(4000 - n), "Reset-In": f"{86400 - 100 * (n - 1)}s"}
        for n in (1, 2, 3)
    ]  # fmt: skip
    sim = sim_api.sim
    assert (sim.served, sim.lookups, sim.throttled) == ({"reputation_api": 3}, 3, {})


async def test_a_bulk_lookup_of_n_counts_n(api):
    sim_api = await api()
    items = ["1.2.3.4", "unknown.host", "5.6.7.8"]
    status, headers, body = await sim_api.call("POST", "/v4/ip", json={"address": items})
    assert status == 200
    assert rate(headers)["Used"] == "3"
    single = [json.loads(await sim_api.raw(f"/v4/ip/{ip}")) for ip in ("1.2.3.4", "5.6.7.8")]
    assert body["data"][0] == single[0] and body["data"][2] == single[1]
    assert body["data"][1] == {
        "address": "unknown.host",
        "error": {"code": 404003, "messages": ["The address was not found"]},
    }
    assert sim_api.sim.served == {"reputation_api": 5}
    assert sim_api.sim.lookups == 3, "a bulk lookup is one request"
    for path, key in [("/v4/domain", "fqdn"), ("/v4/url", "url"), ("/v4/hash", "hash")]:
        status, headers, body = await sim_api.call("POST", path, json={key: ["a", "b"]})
        assert (status, len(body["data"])) == (200, 2)
    assert rate(headers)["Used"] == "11"


async def test_a_used_up_quota_gives_429000_until_the_interval_ends(api, clock):
    sim_api = await api(clock, limits={"reputation_api": 3}, limit_interval=60)
    sim = sim_api.sim
    assert (await sim_api.call("POST", "/v4/ip", json={"address": ["1.1.1.1", "2.2.2.2"]}))[
        0
    ] == 200
    clock.advance(10)
    status, headers, body = await sim_api.call("POST", "/v4/ip", json={"address": ["a", "b"]})
    assert (status, code(body)) == (429, 429000), "a bulk of 2 when 1 is left is refused whole"
    assert (await sim_api.call("GET", "/v4/ip/3.3.3.3"))[0] == 200
    clock.advance(20)
    status, headers, body = await sim_api.call("GET", "/v4/ip/4.4.4.4")
    assert status == 429
    assert body == {
        "error": {
            "code": 429000,
            "messages": [
                "API key limit exceeded, retry after the limit is reset. "
                "The limit will be reset in 30s"
            ],
        }
    }
    assert rate(headers) == {
        "For": "reputation_api", "Interval": "60", "Limit": "3", "Used": "3",
        "Remaining": "0", "Reset-In": "30s",
    }  # fmt: skip
    assert (sim.served, sim.throttled) == ({"reputation_api": 3}, {429000: 2})
    assert (await sim_api.call("POST", "/v4/file", data=b"x"))[0] == 200, "another limit type"
    clock.advance(30)
    status, headers, _ = await sim_api.call("GET", "/v4/ip/4.4.4.4")
    assert (status, rate(headers)["Used"], rate(headers)["Reset-In"]) == (200, "1", "60s")


async def test_a_throttle_gives_429001_with_retry_after_then_reopens(api, clock):
    sim_api = await api(clock, throttles={"prevention_api": (2, 10)})
    for _ in range(2):
        assert (await sim_api.call("POST", "/v4/file", data=b"x"))[0] == 200
    clock.advance(4)
    status, headers, body = await sim_api.call("POST", "/v4/file", data=b"x" * 100_000)
    assert (status, code(body), headers["Retry-After"]) == (429, 429001, "6")
    assert rate(headers) == {
        "For": "prevention_api", "Interval": "daily", "Limit": "4000", "Used": "2",
        "Remaining": "3998", "Reset-In": "6s",
    }  # fmt: skip
    assert (await sim_api.call("GET", "/v4/ip/1.2.3.4"))[0] == 200, "reputation is not throttled"
    clock.advance(6)
    status, headers, _ = await sim_api.call("POST", "/v4/file", data=b"x")
    assert (status, rate(headers)["Used"], "Retry-After" in headers) == (200, "3", False)
    assert sim_api.sim.throttled == {429001: 1}
    assert sim_api.sim.served == {"prevention_api": 3, "reputation_api": 1}


async def test_the_concurrency_cap_gives_429002(api):
    sim_api = await api(max_concurrent={"reputation_api": 2}, gate=asyncio.Event())
    sim = sim_api.sim
    held = [asyncio.create_task(sim_api.call("GET", f"/v4/ip/10.0.0.{i}")) for i in range(2)]
    await eventually(lambda: sim.in_flight["reputation_api"] == 2)
    status, _, body = await sim_api.call("POST", "/v4/ip", json={"address": ["10.0.0.3"]})
    assert (status, code(body)) == (429, 429002)
    sim.gate.set()
    async with asyncio.timeout(5):
        assert [status for status, _, _ in await asyncio.gather(*held)] == [200, 200]
    assert (await sim_api.call("GET", "/v4/ip/10.0.0.4"))[0] == 200
    assert sim.throttled == {429002: 1}
    assert sim.in_flight["reputation_api"] == 0


async def test_limits_status_and_apikey_agree_with_the_counts(api, clock):
    sim_api = await api(
        clock, limits={"reputation_api": 10, "prevention_api": 5}, limit_interval=600
    )
    await sim_api.call("POST", "/v4/hash", json={"hash": ["a", "b"]})
    await sim_api.call("GET", "/v4/url/" + quote("http://example.com/", safe=""))
    _, _, upload = await sim_api.call("POST", "/v4/file", data=b"hello")
    expected = {"reputation_api": 7, "prevention_api": 4, "sandbox_api": 4000, "feed_api": 4000}
    for _ in range(2):  # asking counts nothing, and neither does polling an upload
        assert (await sim_api.call("GET", "/v4/apikey/limits/status"))[2] == expected
        status, headers, _ = await sim_api.call("GET", f"/v4/file/{upload['data_id']}")
        assert (status, rate(headers)["For"], rate(headers)["Used"]) == (200, "prevention_api", "1")
    status, headers, info = await sim_api.call("GET", "/v4/apikey/")
    assert status == 200
    assert (info["limit_reputation"], info["limit_prevention"], info["limit_interval"]) == (
        10, 5, "600",
    )  # fmt: skip
    assert rate(headers)["Remaining"] == "7"
    clock.advance(600)
    assert (await sim_api.call("GET", "/v4/apikey/limits/status"))[2] == {
        **expected, "reputation_api": 10, "prevention_api": 5,
    }  # fmt: skip


async def test_lookup_answers_are_the_same_bytes_for_the_same_value(api):
    first, second = await api(), await api()
    url = "https://example.com/a%2Fb?q=1&r=/x"
    paths = [
        "/v4/ip/192.0.2.1",
        "/v4/ip/2001:db8::1",
        "/v4/domain/example.com",
        "/v4/url/" + quote(url, safe=""),
        "/v4/cve/CVE-2021-44228",
    ]
    answers = [await first.raw(p) for p in paths]
    assert answers == [await first.raw(p) for p in paths] == [await second.raw(p) for p in paths]
    assert json.loads(answers[3])["address"] == url, "decoded once, %2F inside kept"
    reports = [json.loads(a) for a in answers]
    assert [r.get("address", r.get("cve")) for r in reports] == [
        "192.0.2.1", "2001:db8::1", "example.com", url, "CVE-2021-44228",
    ]  # fmt: skip
    assert all(r["lookup_results"]["sources"] for r in reports[:4])
    assert await first.raw("/v4/ip/192.0.2.2") != answers[0]
    assert json.loads(await first.raw("/v4/url/a%0Ab"))["address"] == "a\nb", "any character"


async def test_unknown_values_are_404003_and_still_counted(api):
    sim_api = await api(unknown_values={"Nothing.Example"})
    paths = [
        "/v4/ip/unknown",
        "/v4/domain/nothing.example",
        "/v4/url/" + quote("http://unknown.example/", safe=""),
        "/v4/cve/CVE-unknown",
        "/v4/hash/" + "0" * 64,
    ]
    for n, path in enumerate(paths, 1):
        status, headers, body = await sim_api.call("GET", path)
        assert (status, code(body), rate(headers)["Used"]) == (404, 404003, str(n)), path


async def test_an_uploaded_file_is_found_by_each_of_its_hashes(api):
    sim_api = await api()
    _, _, upload = await sim_api.call("POST", "/v4/file", data=b"hello", headers={"filename": "h"})
    for digest in (upload["sha256"], upload["sha1"], "5d41402abc4b2a76b9719d911017c592"):
        status, _, report = await sim_api.call("GET", f"/v4/hash/{digest}")
        assert (status, report["file_info"]["sha256"]) == (200, upload["sha256"])
    _, _, bulk = await sim_api.call("POST", "/v4/hash", json={"hash": [upload["sha1"]]})
    assert bulk["data"][0]["data_id"] == upload["data_id"]


@pytest.mark.parametrize(
    "body",
    [b"{not json", b'{"ip": ["1.2.3.4"]}', b'{"address": "1.2.3.4"}', b'{"address": []}',
     b'{"address": [1]}', b"[]", json.dumps({"address": ["a"] * 1001}).encode()],
)  # fmt: skip
async def test_a_bad_bulk_body_is_400_and_counts_nothing(api, body):
    sim_api = await api()
    status, headers, answer = await sim_api.call("POST", "/v4/ip", data=body)
    assert (status, code(answer), rate(headers)) == (400, 400000, {})
    assert sim_api.sim.served == {}


async def test_refused_calls_count_nothing(api):
    sim_api = await api()
    sim_api.auth = {"Authorization": "Bearer not-a-token"}
    assert (await sim_api.call("GET", "/v4/ip/1.2.3.4"))[0] == 401
    assert (await sim_api.call("POST", "/v4/ip", json={"address": ["1.2.3.4"]}))[0] == 401
    assert (await sim_api.call("POST", "/v4/file", data=b"x"))[0] == 401
    assert (sim_api.sim.served, sim_api.sim.lookups) == ({}, 2)


async def stop(proc: asyncio.subprocess.Process) -> int:
    proc.send_signal(signal.SIGINT)
    async with asyncio.timeout(15):
        return await proc.wait()


async def test_the_simulator_command_takes_limits_and_throttles(client):
    proc = await spawn(
        "simulator", "--port", "0", "--limit-reputation", "1", "--limit-prevention", "9",
        "--limit-interval", "60", "--throttle-prevention", "1/30",
    )  # fmt: skip
    try:
        line = await wait_for_line(proc, r"simulator on (http://127\.0\.0\.1:\d+)")
        assert "per 60 s: reputation 1, prevention 9; prevention_api throttled to 1/30 s" in (
            line.string
        )
        base = line.group(1)
        sim_api = Api(client, base, await bearer(client, base, "demo-client", "demo-secret"))
        status, headers, _ = await sim_api.call("GET", "/v4/ip/1.2.3.4")
        assert (status, rate(headers)["Limit"], rate(headers)["Interval"]) == (200, "1", "60")
        status, _, body = await sim_api.call("GET", "/v4/ip/1.2.3.4")
        assert (status, code(body)) == (429, 429000)
        assert (await sim_api.call("POST", "/v4/file", data=b"x"))[0] == 200
        status, headers, body = await sim_api.call("POST", "/v4/file", data=b"x")
        assert (status, code(body)) == (429, 429001)
        assert 1 <= int(headers["Retry-After"]) <= 30
        _, _, info = await sim_api.call("GET", "/v4/apikey/")
        assert (info["limit_reputation"], info["limit_prevention"]) == (1, 9)
    finally:
        assert await stop(proc) == 0


async def test_the_simulator_command_refuses_a_bad_throttle():
    proc = await spawn("simulator", "--throttle-reputation", "10", stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(15):
        _, err = await proc.communicate()
    assert proc.returncode == 2
    assert b"expected CALLS/SECONDS such as 10/60, not '10'" in err
