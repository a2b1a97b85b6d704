"""Fleets: replicas share the quota guard through a real redis-server on loopback.

Each replica is a proxy process of its own (``python -m proxy``), in front of the simulator
in this process; Redis is started per test on a free port, without persistence, and stopped.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from proxy import Simulator

from .conftest import (
    API_KEY,
    CLIENT_ID,
    CLIENT_SECRET,
    ProxyProcess,
    account_env,
    eventually,
    free_port,
    scrape,
    spawn,
)

REDIS_SERVER = Path("/usr/bin/redis-server")
REDIS_PASSWORD = "r3dis-passw0rd-value"
IP = "192.0.2.1"  # an address to look up (TEST-NET: only the simulator answers for it)


def ip(i: int) -> str:
    return f"198.51.{100 + i // 256}.{i % 256}"


@dataclass
class RedisServer:
    """A redis-server of one test; ``stop()``/``start()`` take it down and bring it back on
    the same port, empty (no persistence)."""

    folder: Path
    password: str | None = None
    port: int = field(default_factory=free_port)
    proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> aioredis.Redis:
        return aioredis.Redis(port=self.port, password=self.password, socket_timeout=5)

    async def start(self, *settings: str) -> None:
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
        args += ["no", "--dir", str(self.folder), "--logfile", str(self.folder / "redis.log")]
        args += ["--enable-debug-command", "local"]  # DEBUG SLEEP: a Redis that is slow
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = await asyncio.create_subprocess_exec(str(REDIS_SERVER), *args, *settings)
        async with self.client() as probe, asyncio.timeout(10):
            while True:
                try:
                    if await probe.ping():
                        return
                except aioredis.ConnectionError:
                    await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self.proc = None

    def pause(self) -> None:
        """A Redis that answers nothing: connections open, the process stopped."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    async def dump(self) -> dict[bytes, Any]:
        """Every key and its value (strings and hashes), as a reader of the Redis sees them."""
        found: dict[bytes, Any] = {}
        async with self.client() as r:
            async for key in r.scan_iter(count=1000):
                kind = await r.type(key)
                found[key] = await (r.hgetall(key) if kind == b"hash" else r.get(key))
        return found


@pytest.fixture(autouse=True)
def redis_installed() -> None:
    """CI installs redis-server (.ci/run): a missing one fails these tests, it does not skip."""
    assert REDIS_SERVER.exists(), "redis-server is not installed: apt-get install redis-server"


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path)
    await server.start()
    yield server
    if server.proc is not None and server.proc.returncode is None:
        server.resume()
    await server.stop()


class Replica(ProxyProcess):
    """A replica of the fleet: a proxy process."""

    async def status(self, client: aiohttp.ClientSession) -> dict[str, Any]:
        async with client.get(self.url + "/-/status") as resp:
            result: dict[str, Any] = await resp.json()
            return result


@pytest.fixture
async def fleet_sim(
    start: Callable[..., Awaitable[int]],
) -> AsyncIterator[tuple[Simulator, str]]:
    """The simulator on a real clock: the replicas are processes with their own clocks."""
    sim = Simulator(CLIENT_ID, CLIENT_SECRET, api_key=API_KEY, max_requests=100_000)
    port = await start(sim.app())
    yield sim, f"http://127.0.0.1:{port}"


@pytest.fixture
async def replicas(
    fleet_sim: tuple[Simulator, str],
) -> AsyncIterator[Callable[..., Awaitable[list[Replica]]]]:
    """Start proxy processes against the simulator, each with ``env`` on top of the
    account; all stop at the end."""
    started: list[Replica] = []
    _, upstream = fleet_sim

    async def _start(count: int, **env: str) -> list[Replica]:
        settings = {**account_env(upstream), "MDCLOUD_API_KEY": API_KEY, **env}
        procs = [await spawn("--port", "0", env=settings) for _ in range(count)]
        fresh = [Replica(proc) for proc in procs]
        started.extend(fresh)
        for replica in fresh:
            await replica.started()
        return fresh

    yield _start
    for replica in started:
        await replica.stop()


def shared(server: RedisServer, **more: str) -> dict[str, str]:
    """Replicas sharing ``server``. A Redis call may take up to a second here, not 50 ms:
    these tests are about what is shared, on a machine that may be busy; the bound on what
    Redis adds has tests of its own, at 50 ms."""
    return {
        "MDCLOUD_PROXY_CACHE_REDIS_URL": server.url,
        "MDCLOUD_PROXY_CACHE_REDIS_TIMEOUT": "1s",
        **more,
    }


async def lookup(client: aiohttp.ClientSession, base: str, value: str) -> tuple[int, str, float]:
    """Status, X-Cache-Status and seconds taken of one IP lookup (its answer checked)."""
    began = time.monotonic()
    async with client.get(f"{base}/v4/ip/{value}") as resp:
        body = await resp.json()
        if resp.status == 200:
            assert body["address"] == value  # never another lookup's answer
        return resp.status, resp.headers.get("X-Cache-Status", ""), time.monotonic() - began


# -- sharing ---------------------------------------------------------------------------------


async def test_a_lookup_through_one_replica_is_a_hit_through_another(
    redis_server, replicas, fleet_sim, client
):
    sim, _ = fleet_sim
    a, b = await replicas(2, **shared(redis_server))
    assert (await lookup(client, a.url, IP))[:2] == (200, "MISS")
    assert (await lookup(client, b.url, IP))[:2] == (200, "HIT")
    assert sim.lookups == 1
    state = await b.status(client)
    assert state["cache"]["shared"] == f"redis://127.0.0.1:{redis_server.port}/0"
    assert state["cache"]["degraded"] is False


async def test_without_redis_each_replica_asks_for_itself(replicas, fleet_sim, client):
    """The reference for the test above: the same two lookups, no Redis, two upstream calls."""
    sim, _ = fleet_sim
    a, b = await replicas(2)
    assert (await lookup(client, a.url, IP))[:2] == (200, "MISS")
    assert (await lookup(client, b.url, IP))[:2] == (200, "MISS")
    assert sim.lookups == 2


async def test_a_cold_burst_over_two_replicas_goes_upstream_once(
    redis_server, replicas, fleet_sim, client
):
    sim, _ = fleet_sim
    sim.gate = asyncio.Event()  # the first lookup waits until every request has arrived
    a, b = await replicas(2, **shared(redis_server))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as many:
        burst = [asyncio.create_task(lookup(many, (a, b)[i % 2].url, IP)) for i in range(200)]
        await eventually(lambda: sim.in_flight["reputation_api"] >= 1, 10)

        async def all_waiting() -> bool:  # for the flight, or the fleet's lock
            waiting = 0
            for replica in (a, b):
                metrics = await scrape(client, replica.url + "/-/metrics")
                waiting += int(metrics[("mdcloud_proxy_requests_in_flight", ())])
            return waiting == 200

        await eventually(all_waiting, 10)
        sim.gate.set()
        results = await asyncio.gather(*burst)
    assert [status for status, _, _ in results] == [200] * 200
    assert sim.lookups == 1, Counter(cached for _, cached, _ in results)
    assert sorted({cached for _, cached, _ in results}) == ["HIT", "MISS"]


async def test_an_expired_answer_is_refreshed_once_for_the_fleet(
    redis_server, replicas, fleet_sim, client
):
    """Past its ttl, an answer is still in Redis (for STALE): the replica that finds it so
    and does not get the lock waits for the one that has it, instead of asking too."""
    sim, _ = fleet_sim
    a, b = await replicas(2, **shared(redis_server, MDCLOUD_PROXY_CACHE_TTL="1s"))
    assert (await lookup(client, a.url, IP))[:2] == (200, "MISS")
    await asyncio.sleep(1.2)
    sim.gate = asyncio.Event()
    first = asyncio.create_task(lookup(client, a.url, IP))
    await eventually(lambda: sim.in_flight["reputation_api"] >= 1, 10)
    second = asyncio.create_task(lookup(client, b.url, IP))
    await asyncio.sleep(0.5)
    sim.gate.set()
    assert (await first)[:2] == (200, "MISS")
    assert (await second)[:2] == (200, "HIT")
    assert sim.lookups == 2


async def test_a_throttle_seen_by_one_replica_holds_the_others(
    redis_server, replicas, fleet_sim, client
):
    sim, _ = fleet_sim
    sim.throttles = {"reputation_api": (1, 4.0)}  # one lookup per 4 s window
    a, b = await replicas(2, **shared(redis_server))
    assert (await lookup(client, a.url, ip(1)))[0] == 200  # opens the window
    waiting = asyncio.create_task(lookup(client, a.url, ip(2)))  # throttled, waits it out
    await eventually(lambda: sim.throttled[429001] == 1, 5)

    async def b_knows() -> bool:  # A tells Redis; B reads it at its sync (every 0.5 s)
        limit = (await b.status(client))["limits"].get("reputation_api", {})
        return bool(limit.get("throttle_reopens_in_s"))

    await eventually(b_knows, 3)
    held = asyncio.create_task(lookup(client, b.url, ip(3)))
    await eventually(lambda: "throttle is closed" in b.log, 3)  # B waits, and says so
    # B knows of the window: it waits instead of asking the upstream for a certain 429.
    assert sim.throttled[429001] == 1
    assert not held.done()
    assert (await held)[0] == 200
    assert (await waiting)[0] == 200


async def test_workers_share_through_redis_too(redis_server, replicas, fleet_sim, client):
    sim, _ = fleet_sim
    (proxy,) = await replicas(1, **shared(redis_server, MDCLOUD_PROXY_WORKERS="2"))
    for _ in range(20):
        # A new connection each time: SO_REUSEPORT spreads them over both workers.
        async with aiohttp.ClientSession() as fresh:
            assert (await lookup(fresh, proxy.url, IP))[0] == 200
    assert sim.lookups == 1, proxy.log


async def test_quota_figures_are_the_fleets(redis_server, replicas, fleet_sim, client):
    """/-/status of a replica that made no call shows what another replica's answers said."""
    sim, _ = fleet_sim
    a, b = await replicas(2, **shared(redis_server))
    for i in range(3):
        assert (await lookup(client, a.url, ip(i)))[0] == 200

    async def b_knows() -> bool:
        limits = (await b.status(client))["limits"]
        left = limits.get("reputation_api", {}).get("remaining")
        return bool(left == sim.limits["reputation_api"] - 3)

    await eventually(b_knows, 5)


# -- Redis in trouble ----------------------------------------------------------------------


async def test_redis_down_at_start_and_back_later(tmp_path, replicas, fleet_sim, client):
    sim, _ = fleet_sim
    server = RedisServer(tmp_path)  # not started: nothing listens on its port
    a, b = await replicas(2, **shared(server))
    for _ in range(5):
        assert (await lookup(client, a.url, IP))[0] == 200
    assert sim.lookups == 1  # each replica still has its own cache
    state = await a.status(client)
    assert state["cache"]["degraded"] is True
    async with client.get(a.url + "/-/ready") as resp:
        assert resp.status == 200  # Redis is an optimisation, not a dependency
    assert a.log.count("Redis: ") == 1  # one warning per outage, not per request
    await server.start()
    try:
        # The fleet sync probes on its own (after 1 s, 2 s, 4 s, ...: within 30 s).
        await eventually(lambda: _healthy(a, client), 35)
        await eventually(lambda: _healthy(b, client), 35)
        assert (await lookup(client, a.url, ip(200)))[:2] == (200, "MISS")
        assert (await lookup(client, b.url, ip(200)))[:2] == (200, "HIT")
        assert "Redis answers again" in a.log
    finally:
        await server.stop()


async def _healthy(replica: Replica, client: aiohttp.ClientSession) -> bool:
    return not (await replica.status(client))["cache"]["degraded"]


def _answer_keys(dump: dict[bytes, Any]) -> set[bytes]:
    return {k for k in dump if b":answer:" in k}


async def _published(server: RedisServer, answers: int) -> bool:
    """Whether Redis holds ``answers`` answers and no flight lock: what the replicas publish
    in the background once their callers have the answer (the answer, then the lock)."""
    dump = await server.dump()
    return len(_answer_keys(dump)) == answers and not any(b":lock:" in k for k in dump)


async def test_redis_killed_mid_load_loses_no_request(redis_server, replicas, fleet_sim, client):
    sim, _ = fleet_sim
    a, b = await replicas(2, **shared(redis_server))
    results: list[tuple[int, str, float]] = []

    async def load(count: int, first: int) -> int:
        """``count`` lookups of 100 addresses from ``first`` on, over both replicas; how
        many reached the upstream."""
        before = sim.lookups
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=20)) as many:
            batch = [
                lookup(many, (a, b)[i // 100 % 2].url, ip(first + i * 7 % 100))
                for i in range(count)
            ]
            results.extend(await asyncio.gather(*batch))
        return sim.lookups - before

    assert await load(700, 0) == 100  # shared: each address once for the fleet
    await redis_server.stop()
    assert await load(600, 100) > 100  # alone: each address once per replica, about
    await redis_server.start()
    await eventually(lambda: _healthy(a, client), 35)
    await eventually(lambda: _healthy(b, client), 35)
    assert await load(700, 200) == 100  # shared again (Redis came back empty)
    assert len(results) == 2000
    assert [status for status, _, _ in results] == [200] * 2000
    metrics = await scrape(client, a.url + "/-/metrics")
    assert metrics[("mdcloud_proxy_redis_errors_total", (("reason", "unreachable"),))] >= 1


async def test_a_stalled_redis_adds_at_most_redis_timeout(redis_server, replicas, client):
    # 200 ms, not the default 50: a bound far above this machine's noise, so that paying it
    # twice (two calls timing out in one request) fails the test.
    (a,) = await replicas(1, **shared(redis_server, MDCLOUD_PROXY_CACHE_REDIS_TIMEOUT="200ms"))
    for i in range(20):  # the connections to Redis are open and warm
        assert (await lookup(client, a.url, ip(i)))[0] == 200
    quick = sorted([(await lookup(client, a.url, ip(i)))[2] for i in range(20, 40)])
    redis_server.pause()
    try:
        took = [await lookup(client, a.url, ip(i)) for i in range(40, 60)]
        # Read while Redis is still stalled: once it answers, the next sync closes the
        # breaker again.
        metrics = await scrape(client, a.url + "/-/metrics")
    finally:
        redis_server.resume()
    assert [status for status, _, _ in took] == [200] * 20
    typical = quick[len(quick) // 2]
    # The first call to time out opens the breaker; the others do not ask Redis at all.
    # The margin is for a busy machine: scheduling, not Redis.
    assert 0.2 <= max(t for _, _, t in took) < typical + 0.2 + 0.1
    assert sorted(t for _, _, t in took)[10] < typical + 0.05
    assert metrics[("mdcloud_proxy_redis_errors_total", (("reason", "timeout"),))] >= 1
    assert metrics[("mdcloud_proxy_redis_degraded", ())] == 1


async def _slow_relay(port: int, delay: list[float]) -> asyncio.Server:
    """A TCP relay to 127.0.0.1:``port`` that holds each write of the proxy (a command, or a
    pipeline of them) ``delay[0]`` seconds, as set at the time: a Redis that answers every
    call, slowly."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, slow: bool):
        try:
            while data := await reader.read(65536):
                if slow and delay[0]:
                    await asyncio.sleep(delay[0])
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def relay(caller_r: asyncio.StreamReader, caller_w: asyncio.StreamWriter) -> None:
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(pipe(caller_r, redis_w, True), pipe(redis_r, caller_w, False))

    return await asyncio.start_server(relay, "127.0.0.1", 0)


async def test_a_slow_redis_adds_at_most_redis_timeout_to_a_miss(redis_server, replicas, client):
    """Redis answers every call, each in 0.9 of ``redis_timeout``: a miss's two calls (the
    read, then the lock) share one ``redis_timeout``, they do not add one each."""
    delay = [0.0]
    relay = await _slow_relay(redis_server.port, delay)
    try:
        port = relay.sockets[0].getsockname()[1]
        url = redis_server.url.replace(f":{redis_server.port}/", f":{port}/")
        env = shared(redis_server, MDCLOUD_PROXY_CACHE_REDIS_TIMEOUT="200ms")
        (a,) = await replicas(1, **{**env, "MDCLOUD_PROXY_CACHE_REDIS_URL": url})
        # Warm first, at full speed: a new connection's first call is two round trips
        # (redis-py's health check), and slow ones would open the breaker.
        quick = sorted([(await lookup(client, a.url, ip(i)))[2] for i in range(20)])
        delay[0] = 0.18
        took = [(await lookup(client, a.url, ip(i)))[2] for i in range(20, 30)]
    finally:
        relay.close()
    typical = quick[len(quick) // 2]
    # The first slow lookup asked Redis. (A call cut off at the deadline costs its
    # connection, a new one two slow round trips: the breaker may open for the later ones.)
    assert took[0] > 0.15
    # Paying it twice would be 0.36 s; the margin is for a busy machine.
    assert max(took) < typical + 0.2 + 0.1


async def test_a_lock_held_when_redis_failed_is_still_released(
    redis_server, replicas, fleet_sim, client
):
    """A replica whose breaker opened while it held the fleet's lock for a key (one Redis
    call of another request timed out) still stores its answer and gives up the lock: the
    other replicas must not wait ``lock_timeout`` for it, then ask the upstream again."""
    sim, _ = fleet_sim
    sim.gate = asyncio.Event()  # A's lookup waits upstream, holding the fleet's lock
    a, b = await replicas(
        2,
        **shared(
            redis_server,
            MDCLOUD_PROXY_CACHE_REDIS_TIMEOUT="300ms",
            MDCLOUD_PROXY_CACHE_LOCK_TIMEOUT="5s",
        ),
    )
    leading = asyncio.create_task(lookup(client, a.url, IP))
    await eventually(lambda: sim.in_flight["reputation_api"] >= 1, 10)
    timeouts = ("mdcloud_proxy_redis_errors_total", (("reason", "timeout"),))

    async def a_timed_out(count: int) -> bool:
        return (await scrape(client, a.url + "/-/metrics"))[timeouts] >= count

    async def a_is_degraded() -> bool:
        metrics = await scrape(client, a.url + "/-/metrics")
        return metrics[timeouts] >= 3 and metrics[("mdcloud_proxy_redis_degraded", ())] == 1

    redis_server.pause()
    try:
        # Three Redis calls time out, one after the other (their lookups then wait upstream
        # too): A's breaker opens.
        others = []
        for i in (1, 2, 3):
            others.append(asyncio.create_task(lookup(client, a.url, ip(i))))
            await eventually(lambda i=i: a_timed_out(i), 10)
        await eventually(a_is_degraded, 10)
    finally:
        redis_server.resume()
        sim.gate.set()
    assert (await leading)[:2] == (200, "MISS")
    assert [(await each)[0] for each in others] == [200] * 3
    status, cached, took = await lookup(client, b.url, IP)
    assert (status, cached) == (200, "HIT"), took
    assert took < 2.0  # not the lock's 5 s
    assert sim.lookups == 4  # IP once (by A), ip(1), ip(2), ip(3) once each (A alone)


async def test_a_slow_redis_debug_sleep(redis_server, replicas, client):
    """Redis busy (a slow command of someone else's) rather than stopped: the same bound."""
    (a,) = await replicas(1, **shared(redis_server, MDCLOUD_PROXY_CACHE_REDIS_TIMEOUT="200ms"))
    assert (await lookup(client, a.url, IP))[0] == 200
    async with redis_server.client() as r:
        sleeper = asyncio.create_task(r.execute_command("DEBUG", "SLEEP", "2"))
        await asyncio.sleep(0.1)
        took = [await lookup(client, a.url, ip(i)) for i in range(5)]
        await sleeper
    assert [status for status, _, _ in took] == [200] * 5
    assert max(t for _, _, t in took) < 0.2 + 0.1


async def test_flushed_and_full_redis_cost_nothing_but_sharing(
    redis_server, replicas, fleet_sim, client
):
    sim, _ = fleet_sim
    a, b = await replicas(2, **shared(redis_server))
    assert (await lookup(client, a.url, IP))[:2] == (200, "MISS")
    # A stores its answer and gives up the lock after its caller has the answer: flushed
    # before that, the answer would arrive in Redis after the flush.
    await eventually(lambda: _published(redis_server, 1))
    async with redis_server.client() as r:
        await r.flushall()
        assert (await lookup(client, b.url, IP))[:2] == (200, "MISS")  # gone from the fleet
        await r.config_set("maxmemory", "1")  # full, and nothing may be evicted
        await r.config_set("maxmemory-policy", "noeviction")
        for i in range(5):
            assert (await lookup(client, a.url, ip(i)))[0] == 200
        await r.config_set("maxmemory", "0")
    assert sim.lookups == 7
    metrics = await scrape(client, a.url + "/-/metrics")
    assert metrics[("mdcloud_proxy_redis_errors_total", (("reason", "refused"),))] >= 1
    assert not (await a.status(client))["cache"]["degraded"]  # Redis answers: not an outage


# -- what is in Redis ----------------------------------------------------------------------


async def test_a_value_the_fleet_did_not_write_is_ignored_and_overwritten(
    redis_server, replicas, fleet_sim, client
):
    sim, _ = fleet_sim
    (a,) = await replicas(1, **shared(redis_server))
    keys = {}
    for i in range(5):  # which key holds which answer: the one each lookup added
        before = _answer_keys(await redis_server.dump())
        assert (await lookup(client, a.url, ip(i)))[:2] == (200, "MISS")
        await eventually(lambda i=i: _published(redis_server, i + 1))  # after the answer
        (keys[i],) = _answer_keys(await redis_server.dump()) - before
    async with redis_server.client() as r:
        planted = [b"garbage", b"1" + b"\0" * 40, await r.get(keys[4])]
        await r.set(keys[0], planted[0])
        await r.set(keys[1], planted[1])  # our format's version, a wrong seal
        await r.set(keys[2], planted[2])  # a real answer, under another key
        await r.delete(keys[3])
        await r.rpush(keys[3], "a list, not a string")
        (b,) = await replicas(1, **shared(redis_server))
        for i in range(4):  # lookup() checks that each answer is the address's own
            assert (await lookup(client, b.url, ip(i)))[:2] == (200, "MISS")
        assert sim.lookups == 5 + 4

        async def b_overwrote_them() -> bool:  # in the background, after its callers
            values = [await r.get(keys[i]) for i in range(3)]
            fresh = all(value not in (planted[i], None) for i, value in enumerate(values))
            return fresh and await r.type(keys[3]) == b"string"

        await eventually(b_overwrote_them)
        assert [await r.type(keys[i]) for i in range(4)] == [b"string"] * 4
    (c,) = await replicas(1, **shared(redis_server))
    for i in range(5):
        assert (await lookup(client, c.url, ip(i)))[:2] == (200, "HIT")  # b overwrote them
    metrics = await scrape(client, b.url + "/-/metrics")
    assert metrics[("mdcloud_proxy_redis_errors_total", (("reason", "invalid"),))] >= 3
    assert metrics[("mdcloud_proxy_redis_errors_total", (("reason", "refused"),))] >= 1


async def test_no_secret_in_any_key_value_log_or_status(tmp_path, replicas, fleet_sim, client):
    sim, _ = fleet_sim
    server = RedisServer(tmp_path, password=REDIS_PASSWORD)
    await server.start()
    url_file = tmp_path / "redis_url"
    url_file.write_text(server.url + "\n")
    sim.throttles = {"reputation_api": (1, 1.0)}
    try:
        (a,) = await replicas(
            1,
            MDCLOUD_PROXY_CACHE_REDIS_URL_FILE=str(url_file),
            MDCLOUD_PROXY_CACHE_UPLOADS="true",
            MDCLOUD_PROXY_LOG_LEVEL="debug",
        )
        for value in (IP, ip(200)):  # the second is throttled: a window for the fleet
            assert (await lookup(client, a.url, value))[0] == 200
        async with client.post(a.url + "/v4/file", data=b"an upload") as resp:
            assert resp.status == 200
        state = await a.status(client)
        async with client.get(a.url + "/-/metrics") as resp:
            metrics = await resp.text()
        dump: dict[bytes, Any] = {}

        async def all_stored() -> bool:  # the upload's answer, then its figures at a sync
            dump.update(await server.dump())
            limits = [v for k, v in dump.items() if k.startswith(b"mdcloud-proxy:v1:limits:")]
            uploads = any(b":upload:" in k for k in dump)
            return uploads and any(b"prevention_api" in fields for fields in limits)

        await eventually(all_stored)
    finally:
        await server.stop()
    assert any(b":answer:" in k for k in dump)
    assert any(b":upload:" in k for k in dump)
    assert any(k.startswith(b"mdcloud-proxy:v1:windows:") for k in dump)
    assert any(k.startswith(b"mdcloud-proxy:v1:limits:") for k in dump)
    assert all(re.fullmatch(rb"mdcloud-proxy:v1:[a-z]+:[0-9a-f]+", k) for k in dump), dump.keys()
    stored = repr(dump).encode()
    secrets = [CLIENT_SECRET, API_KEY, REDIS_PASSWORD, *sim.issued_tokens]
    assert sim.issued_tokens
    for secret in secrets:
        assert secret.encode() not in stored
        assert secret not in repr(state)
        assert secret not in metrics
        assert secret not in a.log
    assert f"127.0.0.1:{server.port}" in a.log  # where it shares, without the password


def test_a_wrong_redis_url_names_the_key_and_not_the_password():
    from proxy import load_config
    from proxy.errors import ConfigError

    env = {"MDCLOUD_CLIENT_ID": "x", "MDCLOUD_CLIENT_SECRET": "y"}
    for url, problem in (
        (f"http://u:{REDIS_PASSWORD}@h:6379/0", "is not a redis://, rediss:// or unix:// URL"),
        (f"redis://u:{REDIS_PASSWORD}@h:6379/0?socket_timeout=x", "asks for socket_timeout"),
        (f"redis://h:6379/0?password={REDIS_PASSWORD}", "asks for password"),
        ("redis://h:6379/0?ssl_ca_certs=/ca.pem", "has TLS options: they need rediss://"),
        ("redis://h:6379/0?db=abc", "is not a URL redis-py accepts"),
        ("redis://h:6379/zero", "the database, after the port, is a number"),
        ("rediss://h:6379/0?ssl_cert_reqs=bogus", "ssl_cert_reqs is one of none, optional"),
        ("rediss://h:6379/0?ssl_check_hostname=maybe", "ssl_check_hostname is one of"),
        ("unix://", "has no socket path"),
    ):
        with pytest.raises(ConfigError) as info:
            load_config(environ={**env, "MDCLOUD_PROXY_CACHE_REDIS_URL": url})
        assert str(info.value).startswith("cache.redis_url: ")
        assert problem in str(info.value)
        assert REDIS_PASSWORD not in str(info.value)
    config = load_config(
        environ={**env, "MDCLOUD_PROXY_CACHE_REDIS_URL": f"redis://:{REDIS_PASSWORD}@h/1"}
    )
    assert REDIS_PASSWORD not in repr(config)
    for good in ("redis://h", "redis://h:6379/", "rediss://h/2?ssl_cert_reqs=Required"):
        assert load_config(environ={**env, "MDCLOUD_PROXY_CACHE_REDIS_URL": good}).redis_url


async def test_the_page_says_the_cache_is_degraded(tmp_path, replicas, client):
    server = RedisServer(tmp_path)
    (a,) = await replicas(1, **shared(server))
    assert (await lookup(client, a.url, IP))[0] == 200
    page = ""

    async def degraded() -> bool:  # the failure that opens the breaker may be the answer's
        nonlocal page  # store, in the background after the lookup
        async with client.get(a.url + "/-/") as resp:
            page = await resp.text()
        return "cache degraded" in page

    await eventually(degraded)
    assert "cache degraded: Redis (redis://127.0.0.1:" in page
    assert "this replica works alone" in page


async def test_check_says_whether_redis_answers(tmp_path, fleet_sim):
    _, upstream = fleet_sim
    server = RedisServer(tmp_path, password=REDIS_PASSWORD)
    env = {**account_env(upstream), "MDCLOUD_API_KEY": API_KEY}
    env["MDCLOUD_PROXY_CACHE_REDIS_URL"] = server.url
    down = await spawn("check", env=env)
    out = (await down.communicate())[0].decode()
    assert down.returncode == 1
    assert out.splitlines()[-1].startswith(
        f"redis    FAILED: redis://127.0.0.1:{server.port}/0: Error 111 connecting to"
    )
    assert "the proxy serves without it" in out
    await server.start()
    try:
        up = await spawn("check", env=env)
        out = (await up.communicate())[0].decode()
    finally:
        await server.stop()
    assert up.returncode == 0, out
    assert re.fullmatch(
        rf"redis    ok, redis://127\.0\.0\.1:{server.port}/0 answered PING in [\d.]+ ms: "
        "the quota guard is shared",
        out.splitlines()[-1],
    )
    assert REDIS_PASSWORD not in out


def test_the_breaker_judges_calls_by_when_they_started():
    """Three failures in a row open it, each of a call begun after the one before failed:
    calls that time out together are one failure. A call that began before the latest
    failure neither closes it (status would say healthy while nothing is asked) nor opens
    it again (a second warning)."""
    from proxy.shared import _Breaker

    now = [100.0]
    breaker = _Breaker(lambda: now[0])

    def fail(started: float) -> None:
        breaker.failed("down", started=started)

    fail(99.9)
    fail(99.95)  # begun before the first was seen: the same trouble
    breaker.succeeded(started=99.99)  # so does this one: it says nothing of now
    now[0] = 100.1
    fail(100.0)
    now[0] = 100.15
    breaker.succeeded(started=100.12)  # a success in between: not in a row
    now[0] = 100.2
    fail(100.15)
    now[0] = 100.3
    fail(100.25)
    assert (breaker.allows(), breaker.down_since) == (True, None)
    now[0] = 100.4
    fail(100.35)  # the third in a row: open
    assert (breaker.allows(), breaker.down_since) == (False, 100.4)
    breaker.succeeded(started=100.38)  # in flight when it opened
    fail(100.39)
    assert (breaker.allows(), breaker.down_since) == (False, 100.4)
    now[0] = 101.4  # the first backoff: a probe may go
    assert breaker.allows()
    fail(101.4)  # a failed probe reopens it at once, for longer
    now[0] = 102.9
    assert not breaker.allows()  # 2 s now
    now[0] = 103.4
    breaker.succeeded(started=103.4)
    assert (breaker.allows(), breaker.down_since) == (True, None)


async def test_at_shutdown_the_answer_is_stored_and_the_lock_given_up(redis_server):
    """Stopping a replica (a rolling deploy) while its last answer is being published: the
    others must find the answer, not wait out a lock nobody holds."""
    from proxy.observe import Metrics
    from proxy.shared import Claim, SharedStore

    store = SharedStore(
        redis_server.url,
        prefix="t:",
        account="a",
        seal_key=b"k" * 32,
        timeout=1.0,
        lock_timeout=10.0,
        metrics=Metrics(),
    )
    digest = bytes(32)
    claim, token, _ = await store.claim("answer", digest, 1024)
    assert claim is Claim.LEAD
    store.publish("answer", digest, b"the answer", 60.0, token)
    await store.close()
    async with redis_server.client() as r:
        assert await r.exists(f"t:v1:lock:{digest.hex()}") == 0
        assert (await r.get(f"t:v1:answer:{digest.hex()}") or b"").endswith(b"the answer")
