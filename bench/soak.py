#!/usr/bin/env python3
"""Soak: hours-long (or minutes-long) load through the proxy while tokens keep expiring.

    python bench/soak.py --minutes 10

Starts the simulator (tokens refused after --revoke-after seconds) and the proxy as their own
processes, drives a mix of GETs and small uploads over --concurrency connections, and prints,
every --report seconds: requests/s, failures, replays, token fetches, the proxy's RSS and
open descriptors. Exits 1 if any request failed or the proxy's RSS grew by more than
--max-growth-mib after the first interval. The default test run has a short version of this
(tests/test_load.py); this is the long one, run on demand.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
CLIENT_ID, CLIENT_SECRET = "soak-client", "soak-secret"


async def spawn(
    *args: str, env: dict[str, str], pattern: bytes
) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args,
        env=env, cwd=ROOT, stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stderr is not None
    async with asyncio.timeout(15):
        while not (match := re.search(pattern, line := await proc.stderr.readline())):
            if not line:
                raise SystemExit(f"mdcloud-proxy {' '.join(args)} ended before it served")

    async def drain() -> None:
        assert proc.stderr is not None
        while await proc.stderr.readline():
            pass

    asyncio.get_running_loop().create_task(drain())
    return proc, match.group(1).decode()


def rss_mib(pid: int) -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


def metric(text: str, name: str) -> float:
    return sum(
        float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    )


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--revoke-after", type=float, default=1.0)
    parser.add_argument("--report", type=float, default=10)
    parser.add_argument("--max-growth-mib", type=float, default=10)
    args = parser.parse_args()

    env = {k: v for k, v in os.environ.items() if not k.startswith("MDCLOUD")}
    sim, upstream = await spawn(
        "simulator", "--port", "0", "--client-id", CLIENT_ID, "--client-secret", CLIENT_SECRET,
        "--revoke-after", str(args.revoke_after),
        env=env, pattern=rb"simulator on (http://\S+) ",
    )  # fmt: skip
    proxy_env = {
        **env,
        "MDCLOUD_CLIENT_ID": CLIENT_ID,
        "MDCLOUD_CLIENT_SECRET": CLIENT_SECRET,
        "MDCLOUD_PROXY_UPSTREAM_URL": upstream,
    }
    proxy, base = await spawn("--port", "0", env=proxy_env, pattern=rb"listening on (http://\S+),")
    counts = {"ok": 0, "failed": 0}
    stop = time.monotonic() + args.minutes * 60
    payload = os.urandom(64 * 1024)

    async def worker(session: aiohttp.ClientSession, n: int) -> None:
        i = 0
        while time.monotonic() < stop:
            i += 1
            try:
                if (n + i) % 10 == 0:
                    request = session.post(base + "/v4/file", data=payload)
                else:
                    request = session.get(base + "/v4/apikey/")
                async with request as resp:
                    await resp.read()
                    counts["ok" if resp.status == 200 else "failed"] += 1
            except aiohttp.ClientError:
                counts["failed"] += 1

    first_rss = None
    failed = False
    try:
        connector = aiohttp.TCPConnector(limit=args.concurrency)
        # Metrics on a session of their own: the load keeps every pooled connection busy.
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            aiohttp.ClientSession() as probe,
        ):
            workers = [asyncio.create_task(worker(session, n)) for n in range(args.concurrency)]
            last, last_ok = time.monotonic(), 0
            while time.monotonic() < stop:
                await asyncio.sleep(min(args.report, max(0.1, stop - time.monotonic())))
                async with probe.get(base + "/-/metrics") as resp:
                    text = await resp.text()
                now, rss = time.monotonic(), rss_mib(proxy.pid)
                first_rss = rss if first_rss is None else first_rss
                fds = len(os.listdir(f"/proc/{proxy.pid}/fd"))
                print(
                    f"{(counts['ok'] - last_ok) / (now - last):8.0f} req/s  "
                    f"failed {counts['failed']}  "
                    f"replays {metric(text, 'mdcloud_proxy_replays_total'):.0f}  "
                    f"token fetches {metric(text, 'mdcloud_proxy_token_fetches_total'):.0f}  "
                    f"RSS {rss:.1f} MiB  fds {fds}",
                    flush=True,
                )
                last, last_ok = now, counts["ok"]
            await asyncio.gather(*workers)
        growth = rss_mib(proxy.pid) - (first_rss or 0)
        print(f"total: {counts['ok']} ok, {counts['failed']} failed; RSS growth {growth:.1f} MiB")
        failed = counts["failed"] > 0 or growth > args.max_growth_mib
    finally:
        for proc in (proxy, sim):
            proc.terminate()
            await proc.wait()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
