"""The command as a user runs it: real processes, real ports, signals."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


async def spawn(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MDCLOUD")}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**clean, **(env or {})},
        cwd=ROOT,
    )


async def wait_for_line(proc: asyncio.subprocess.Process, pattern: str) -> re.Match[str]:
    assert proc.stdout is not None
    seen = []
    async with asyncio.timeout(15):
        while True:
            line = (await proc.stdout.readline()).decode()
            seen.append(line)
            if not line:
                raise AssertionError(
                    "process ended without printing " + pattern + ":\n" + "".join(seen)
                )
            match = re.search(pattern, line)
            if match:
                return match


async def stop(proc: asyncio.subprocess.Process, sig: int = signal.SIGTERM) -> int:
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
