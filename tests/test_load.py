"""A bounded load test: many concurrent callers while tokens keep expiring underneath them.

The proxy runs as its own process, so its descriptors and memory can be read from /proc.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from proxy import Simulator

from .conftest import CLIENT_ID, CLIENT_SECRET, eventually

ROOT = Path(__file__).resolve().parent.parent
REQUESTS = 2000
CONCURRENCY = 100


def proxy_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def proxy_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match is not None
    return int(match.group(1)) / 1024


async def run_load(base: str, total: int) -> collections.Counter[tuple[int, int | None]]:
    """``total`` GETs over CONCURRENCY connections; counts (status, MetaDefender error code)."""
    outcomes: collections.Counter[tuple[int, int | None]] = collections.Counter()
    queue = iter(range(total))
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for i in queue:
                async with session.get(f"{base}/v4/apikey/?n={i}") as resp:
                    body = await resp.json()
                code = body.get("error", {}).get("code") if resp.status != 200 else None
                outcomes[resp.status, code] += 1

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return outcomes


async def test_load_with_tokens_expiring_under_it():
    # Tokens are announced for an hour but refused after a quarter of a second (harsher than
    # the "every second": the run is short), so the proxy learns of each expiry from
    # a 401009 in the middle of the load and must replay.
    sim = Simulator(CLIENT_ID, CLIENT_SECRET, revoke_after=0.25)
    # The simulator closes idle connections after a second, as servers do, so that the
    # proxy's pool drains soon after the load.
    sim_runner = web.AppRunner(sim.app(), keepalive_timeout=1.0, access_log=None)
    await sim_runner.setup()
    site = web.TCPSite(sim_runner, "127.0.0.1", 0)
    await site.start()
    upstream = f"http://127.0.0.1:{sim_runner.addresses[0][1]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MDCLOUD")}
    env.update(
        MDCLOUD_CLIENT_ID=CLIENT_ID,
        MDCLOUD_CLIENT_SECRET=CLIENT_SECRET,
        MDCLOUD_PROXY_UPSTREAM_URL=upstream,
        MDCLOUD_PROXY_LOG_LEVEL="WARNING",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "--port", "0", "--log-level", "INFO",
        env=env, cwd=ROOT, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(15):
            while not (
                match := re.search(rb"listening on (http://\S+),", await proc.stderr.readline())
            ):
                pass
        base = match.group(1).decode()

        async def drain_stderr() -> None:
            assert proc.stderr is not None
            while await proc.stderr.readline():
                pass

        draining = asyncio.create_task(drain_stderr())
        await run_load(base, 200)  # warm up: imports, caches, the first token
        await eventually(lambda: proxy_fds(proc.pid) < 20, within=10)
        fds, rss = proxy_fds(proc.pid), proxy_rss_mib(proc.pid)
        fetched_before, expired_before = sim.token_requests, len(sim.expired_tokens)

        started = time.monotonic()
        outcomes = await run_load(base, REQUESTS)
        elapsed = time.monotonic() - started

        assert outcomes == {(200, None): REQUESTS}, outcomes  # no failure, no 401009 seen
        fetched = sim.token_requests - fetched_before
        expired = len(sim.expired_tokens) - expired_before
        assert expired >= 2, (elapsed, expired)  # tokens did expire under the load
        assert abs(fetched - expired) <= 1, (fetched, expired)  # one fetch per expiry
        await eventually(lambda: proxy_fds(proc.pid) <= fds, within=10)
        assert proxy_rss_mib(proc.pid) < rss + 10, (rss, proxy_rss_mib(proc.pid))
        print(
            f"\n{REQUESTS} requests at {CONCURRENCY} concurrent in {elapsed:.1f} s, "
            f"{expired} expiries, {fetched} token fetches, RSS {rss:.0f} -> "
            f"{proxy_rss_mib(proc.pid):.0f} MiB, descriptors {fds} -> {proxy_fds(proc.pid)}"
        )
        proc.terminate()
        await draining
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await sim_runner.cleanup()
