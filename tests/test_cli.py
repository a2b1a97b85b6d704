"""The command as a user runs it: real processes, real ports, signals."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import socket

import aiohttp
import pytest

from .conftest import (
    API_KEY,
    account_env,
    eventually,
    spawn,
    wait_for_line,
)


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1) here")


async def stop(proc: asyncio.subprocess.Process, sig: int | None = signal.SIGTERM) -> int:
    """Send ``sig`` (None: none, it is stopping already) and wait for the exit code."""
    if sig is not None:
        proc.send_signal(sig)
    async with asyncio.timeout(15):
        await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode


async def test_demo_works_without_an_account(client):
    proc = await spawn("--demo", "--port", "0")
    try:
        base = (await wait_for_line(proc, r"curl (http://127\.0\.0\.1:\d+)/v4/apikey/")).group(1)
        async with client.get(base + "/v4/apikey/") as resp:
            assert resp.status == 200
            assert "max_upload_file_size" in await resp.json()
        async with client.post(
            base + "/v4/file", data=b"hello\n", headers={"filename": "s.txt"}
        ) as resp:
            answer = await resp.json()
        async with client.get(base + "/v4/hash/" + answer["sha256"]) as resp:
            assert (await resp.json())["file_info"]["display_name"] == "s.txt"
            assert resp.headers["X-Cache-Status"] == "MISS"
        async with client.get(base + "/v4/hash/" + answer["sha256"]) as resp:
            assert resp.headers["X-Cache-Status"] == "HIT"  # the demo's repeated lookup
    finally:
        assert await stop(proc, signal.SIGINT) == 0


async def test_env_only_against_standalone_simulator(client):
    sim = await spawn(
        "simulator", "--port", "0", "--client-id", "cid", "--client-secret", "csecret"
    )
    try:
        sim_url = (await wait_for_line(sim, r"simulator on (http://127\.0\.0\.1:\d+)")).group(1)
        proxy = await spawn(
            "--port",
            "0",
            env={
                "MDCLOUD_CLIENT_ID": "cid",
                "MDCLOUD_CLIENT_SECRET": "csecret",
                "MDCLOUD_PROXY_UPSTREAM_URL": sim_url,
            },
        )
        try:
            base = (await wait_for_line(proxy, r"listening on (http://127\.0\.0\.1:\d+)")).group(1)
            async with client.get(base + "/v4/apikey/") as resp:
                assert resp.status == 200
        finally:
            assert await stop(proxy) == 0
    finally:
        assert await stop(sim) == 0


async def test_console_script_is_installed():
    """`pip install .` puts `mdcloud-proxy` on PATH (CI installs the package before testing)."""
    script = shutil.which("mdcloud-proxy")
    if script is None:
        pytest.skip("the package is not installed in this environment")
    proc = await asyncio.create_subprocess_exec(script, "--version", stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    assert out.decode().startswith("mdcloud-proxy ")


async def test_port_in_use_is_a_clear_error():
    holder = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = holder.sockets[0].getsockname()[1]
    try:
        proc = await spawn(
            "--port", str(port), env={"MDCLOUD_CLIENT_ID": "x", "MDCLOUD_CLIENT_SECRET": "y"}
        )
        async with asyncio.timeout(15):
            out, _ = await proc.communicate()
    finally:
        holder.close()
    assert proc.returncode == 1
    assert (
        out.decode()
        == f"mdcloud-proxy: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    )


async def run(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Run the command to its end; its exit code, stdout and stderr."""
    proc = await spawn(*args, env=env, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_check_reports_token_limits_and_the_quota_left(sim, upstream, clock):
    sim.limits["reputation_api"] = 1000
    code, out, err = await run("check", env=account_env(upstream))
    assert (code, err) == (0, "")
    assert out.splitlines()[:4] == [
        f"config   ok (upstream {upstream}, token endpoint {upstream}/v4/oauth2/token)",
        "token    ok, valid for 3600 s",
        "api      ok, GET /v4/apikey/ answered HTTP 200",
        "limits   prevention 4000, reputation 1000 per daily interval; max upload 140 MB; "
        "1000 requests left now",  # GET /v4/apikey/ counts against no quota
    ]
    quota = out.splitlines()[4]
    assert quota.startswith("quota    ")
    assert "reputation_api 1000 left" in quota and "prevention_api 4000 left" in quota
    # It makes no call that costs quota.
    assert [r.raw_path for r in sim.requests] == [
        "/v4/oauth2/token",
        "/v4/apikey/",
        "/v4/apikey/limits/status",
    ]
    assert sum(sim.served.values()) == 0


async def test_check_fails_clearly_and_quietly(sim, upstream):
    code, out, _ = await run("check", env=account_env(upstream, secret="wrong-secret-value"))
    assert code == 1
    assert out.splitlines()[1] == (
        "token    FAILED: token endpoint rejected the client credentials (HTTP 401: "
        "invalid_client; Client authentication failed); check oauth.client_id and "
        "oauth.client_secret"
    )
    assert "wrong-secret-value" not in out

    sim.api_key = API_KEY  # the account needs an apikey the config does not give
    code, out, _ = await run("check", env=account_env(upstream))
    assert code == 1
    assert out.splitlines()[-1] == (
        "api      FAILED: GET /v4/apikey/ answered HTTP 401: Invalid apikey"
    )


async def test_token_prints_a_fresh_access_token(sim, upstream):
    code, out, err = await run("token", env=account_env(upstream))
    assert (code, err) == (0, "")
    assert out == sim.issued_tokens[-1] + "\n"

    code, out, err = await run("token", "--log-level", "ERROR", env=account_env(upstream, "bad"))
    assert (code, out) == (1, "")
    assert err.startswith("mdcloud-proxy: token endpoint rejected the client credentials")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_sigterm_lets_an_upload_in_flight_finish(sim, upstream, client, loop):
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    proxy = await spawn("--port", "0", "--loop", loop, env=account_env(upstream))
    line = await wait_for_line(
        proxy, r"listening on (http://127\.0\.0\.1:\d+).* \((\w+) event loop"
    )
    base = line.group(1)
    assert line.group(2) == loop
    data = os.urandom(8 * 1024 * 1024)
    halfway = asyncio.Event()

    async def slow_body():
        step = 256 * 1024
        for i in range(0, len(data), step):
            if i >= len(data) // 2:
                halfway.set()
                await asyncio.sleep(0.05)
            yield data[i : i + step]

    async def upload():
        async with client.post(base + "/v4/file", data=slow_body()) as resp:
            return resp.status, await resp.json()

    uploading = asyncio.create_task(upload())
    await halfway.wait()
    proxy.send_signal(signal.SIGTERM)
    status, answer = await uploading
    assert status == 200
    assert answer["sha256"].lower() == hashlib.sha256(data).hexdigest()
    await wait_for_line(proxy, r"stopping: waiting up to 30 s for 1 request")
    await wait_for_line(proxy, r"INFO mdcloud_proxy: stopped")
    assert await stop(proxy, None) == 0


async def test_json_logs(sim, upstream, client):
    proxy = await spawn("--port", "0", "--log-format", "json", env=account_env(upstream))
    match = await wait_for_line(proxy, r'"message": "mdcloud-proxy \S+ listening on (http://\S+),')
    base = match.group(1)
    async with client.get(base + "/v4/hash/ABC?x=1") as resp:
        assert resp.status == 404
    line = await wait_for_line(proxy, r'"logger": "mdcloud_proxy.access"')
    entry = json.loads(line.string)
    assert entry["level"] == "INFO"
    assert (entry["method"], entry["path"], entry["status"]) == ("GET", "/v4/hash/ABC?x=***", 404)
    assert entry["replayed"] is None
    assert await stop(proxy) == 0


async def test_admin_listener(sim, upstream, client):
    env = {**account_env(upstream), "MDCLOUD_PROXY_ADMIN_PORT": "0"}
    proxy = await spawn("--port", "0", env=env)
    try:
        base = (await wait_for_line(proxy, r"listening on (http://127\.0\.0\.1:\d+)")).group(1)
        admin = (await wait_for_line(proxy, r"metrics on (http://127\.0\.0\.1:\d+)/-/")).group(1)
        async with client.get(admin + "/-/metrics") as resp:
            assert resp.status == 200
            assert "mdcloud_proxy_token_fetches_total" in await resp.text()
        async with client.get(base + "/-/metrics") as resp:
            assert resp.status == 404
    finally:
        assert await stop(proxy) == 0


async def test_admin_port_in_use_is_a_clear_error(upstream):
    holder = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = holder.sockets[0].getsockname()[1]
    try:
        env = {**account_env(upstream), "MDCLOUD_PROXY_ADMIN_PORT": str(port)}
        code, _, err = await run("--port", "0", "--log-level", "ERROR", env=env)
    finally:
        holder.close()
    assert code == 1
    assert (
        err == f"mdcloud-proxy: cannot listen on admin 127.0.0.1:{port}: Address already in use\n"
    )


async def test_workers_share_the_port_and_each_keeps_its_own_token(sim, upstream):
    proxy = await spawn("--port", "0", "--workers", "2", env=account_env(upstream))
    try:
        bases, loops = set(), set()
        for _ in range(2):
            line = await wait_for_line(
                proxy, r"worker \d \(pid \d+\): .* on (http://\S+),.* \((\w+) event loop"
            )
            bases.add(line.group(1))
            loops.add(line.group(2))
        assert loops == {"uvloop"}  # the default install's, without being asked for
        (base,) = bases  # one port for both
        await eventually(lambda: sim.token_requests == 2)  # one token per worker at start-up
        sim.expire_tokens()
        # New connections spread over the workers (SO_REUSEPORT hashes each connection).
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as fresh:
            for _ in range(40):
                async with fresh.get(base + "/v4/apikey/") as resp:
                    assert resp.status == 200
        # each worker learnt of the expiry and fetched one new token: once per worker
        assert sim.token_requests == 4
        assert len(set(sim.issued_tokens)) == 4
    finally:
        assert await stop(proxy) == 0


async def test_a_worker_that_dies_stops_the_rest(sim, upstream):
    proxy = await spawn("--port", "0", "--workers", "2", env=account_env(upstream))
    pids = [
        int((await wait_for_line(proxy, r"worker \d \(pid (\d+)\)")).group(1)) for _ in range(2)
    ]
    os.kill(pids[0], signal.SIGKILL)
    await wait_for_line(proxy, rf"worker \d \(pid {pids[0]}\) ended with -9; stopping the others")
    assert await stop(proxy, None) == 1  # for the supervisor to restart it whole
    with pytest.raises(ProcessLookupError):
        os.kill(pids[1], 0)


@needs_ipv6
async def test_bracketed_ipv6_host_listens_on_it_and_logs_a_usable_url(upstream, client):
    env = {
        **account_env(upstream),
        "MDCLOUD_PROXY_ADMIN_HOST": "[::1]",
        "MDCLOUD_PROXY_ADMIN_PORT": "0",
    }
    proxy = await spawn("--host", "[::1]", "--port", "0", env=env)
    try:
        base = (await wait_for_line(proxy, r"listening on (http://\[::1\]:\d+),")).group(1)
        admin = (await wait_for_line(proxy, r"metrics on (http://\[::1\]:\d+)/-/")).group(1)
        for url in (base, admin):
            async with client.get(url + "/-/healthy") as resp:
                assert resp.status == 200
        async with client.get(base + "/v4/apikey/") as resp:
            assert resp.status == 200
    finally:
        assert await stop(proxy) == 0


@needs_ipv6
async def test_demo_on_a_bracketed_ipv6_host(client):
    proc = await spawn("--demo", "--host", "[::1]", "--port", "0")
    try:
        base = (await wait_for_line(proc, r"curl (http://\[::1\]:\d+)/v4/apikey/")).group(1)
        async with client.get(base + "/v4/apikey/") as resp:
            assert resp.status == 200
    finally:
        assert await stop(proc, signal.SIGINT) == 0
