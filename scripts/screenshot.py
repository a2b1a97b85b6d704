#!/usr/bin/env python3
"""Take a picture of the status page ``/-/`` with headless Chromium, for the README.

    python scripts/screenshot.py [--screenshot docs/status-page.png]

Starts on loopback the simulator (for tokens), a small upstream that answers with
MetaDefender's rate-limit headers for two limit types and throttles the first upload, and a
proxy in front of them; makes a few lookups and uploads so that the page has bars, cache hits
and a throttle wait, then has Chromium (Debian's ``chromium``) draw the page. Exits 0 when the
picture is written.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
from pathlib import Path

import aiohttp
from aiohttp import web

from proxy import Simulator, create_app, load_config, serve

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
# Headless, as root (CI), and without the background traffic this machine's closed network
# refuses (tests/test_page.py uses the same).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
CLIENT_ID, CLIENT_SECRET = "screenshot-client", "screenshot-secret-value"


class Upstream:
    """Lookups count against reputation_api (1000 a day), uploads against prevention_api
    (100 a day); the first upload meets a throttle of one second."""

    def __init__(self) -> None:
        self.left = {"reputation_api": 642, "prevention_api": 23}
        self.throttled = False

    async def __call__(self, request: web.Request) -> web.Response:
        await request.read()
        limit = "prevention_api" if request.path == "/v4/file" else "reputation_api"
        headers = {
            "X-RateLimit-For": limit,
            "X-RateLimit-Interval": "daily",
            "X-RateLimit-Limit": "100" if limit == "prevention_api" else "1000",
        }
        if limit == "prevention_api" and not self.throttled:
            self.throttled = True
            headers.update({"Retry-After": "1", "X-RateLimit-Reset-In": "1s"})
            error = {"code": 429001, "messages": ["Too many requests"]}
            return web.json_response({"error": error}, status=429, headers=headers)
        self.left[limit] -= 1
        headers.update(
            {"X-RateLimit-Remaining": str(self.left[limit]), "X-RateLimit-Reset-In": "30194s"}
        )
        return web.json_response({"data_id": "d" * 32, "path": request.path}, headers=headers)


async def start(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = await serve(app, "127.0.0.1", 0)
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def chromium(url: str, screenshot: Path) -> None:
    """Have headless Chromium draw ``url`` into ``screenshot`` (within 60 s)."""
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        proc = await asyncio.create_subprocess_exec(
            CHROMIUM,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--screenshot={screenshot}",
            "--window-size=1000,700",
            url,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        try:
            async with asyncio.timeout(60):
                _, err = await proc.communicate()
        except TimeoutError:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise SystemExit("chromium did not finish within 60 s") from None
    if proc.returncode != 0:
        raise SystemExit(f"chromium failed ({proc.returncode}):\n{err.decode(errors='replace')}")


async def main(screenshot: Path) -> None:
    runners = []
    try:
        sim_runner, sim_url = await start(Simulator(CLIENT_ID, CLIENT_SECRET).app())
        runners.append(sim_runner)
        upstream = web.Application()
        upstream.router.add_route("*", "/{tail:.*}", Upstream())
        upstream_runner, upstream_url = await start(upstream)
        runners.append(upstream_runner)
        config = load_config(
            environ={},
            overrides={
                "upstream.url": upstream_url,
                "oauth.token_url": sim_url + "/v4/oauth2/token",
                "oauth.client_id": CLIENT_ID,
                "oauth.client_secret": CLIENT_SECRET,
            },
        )
        proxy_runner, proxy_url = await start(create_app(config))
        runners.append(proxy_runner)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client:
            for i in (*range(12), 0, 1, 2):  # the last three are cache hits
                async with client.get(f"{proxy_url}/v4/hash/{i:064x}") as resp:
                    assert resp.status == 200, resp.status
            for i in range(2):  # the first one waits out the throttle
                async with client.post(f"{proxy_url}/v4/file", data=b"upload %d" % i) as resp:
                    assert resp.status == 200, resp.status
        await chromium(proxy_url + "/-/", screenshot)
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
    print(f"wrote {screenshot}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument(
        "--screenshot", type=Path, default=ROOT / "docs/status-page.png", help="where to write"
    )
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"{CHROMIUM} is missing: apt-get install -y chromium")
    asyncio.run(main(parser.parse_args().screenshot))
    sys.exit(0)
