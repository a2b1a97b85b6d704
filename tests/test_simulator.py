"""The simulator itself: what it keeps of the requests it saw."""

from __future__ import annotations

import base64

from proxy import Simulator


async def test_the_request_log_keeps_only_the_newest(start, client):
    sim = Simulator(max_requests=5)
    base = f"http://127.0.0.1:{await start(sim.app())}"
    pair = base64.b64encode(f"{sim.client_id}:{sim.client_secret}".encode()).decode()
    form, basic = {"grant_type": "client_credentials"}, {"Authorization": f"Basic {pair}"}
    async with client.post(f"{base}/v4/oauth2/token", data=form, headers=basic) as resp:
        bearer = {"Authorization": f"Bearer {(await resp.json())['access_token']}"}
    for i in range(12):
        async with client.get(f"{base}/v4/apikey/", headers=bearer) as resp:
            assert resp.status == 200
            used = resp.headers["X-RateLimit-Used"]
        async with client.get(f"{base}/nowhere/{i}") as resp:
            await resp.read()
    assert len(sim.requests) == 5
    assert [r.raw_path for r in sim.requests] == [
        "/nowhere/9", "/v4/apikey/", "/nowhere/10", "/v4/apikey/", "/nowhere/11",
    ]  # fmt: skip
    assert [r.raw_path for r in sim.requests[-2:]] == ["/v4/apikey/", "/nowhere/11"]
    assert used == "24", "the rate-limit headers count every request, not the ones kept"


def test_the_request_log_holds_ten_thousand_by_default():
    assert Simulator().max_requests == 10_000
