#!/usr/bin/env python3
"""Build the image with podman and run it next to the simulator: the container test.

    sudo python3 scripts/container_test.py

Needs root, podman, runc and debootstrap (`.ci/run` installs them). No registry is reachable
here, so the base image is made with debootstrap and given to the Dockerfile as BASE_IMAGE.
The container and the simulator share a network namespace of their own, so the container
listens on its real port 8080 without clashing with anything on the host. Checks: the token is
fetched, a call and an upload go through, /-/ready, the HEALTHCHECK, the unprivileged user,
and a SIGTERM that ends the container with exit code 0. Exits 0 when all pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BASE = "localhost/mdcloud-proxy-base:bookworm"
IMAGE = "localhost/mdcloud-proxy:test"
NETNS = "mdcloud-proxy-test"
CONTAINER = "mdcloud-proxy-test"
PODMAN = ["podman", "--runtime", "runc"]
# This machine's limits are lower than podman's defaults.
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
CLIENT_ID, CLIENT_SECRET = "container-client", "container-secret-value"
PROXY = "http://127.0.0.1:8080"


def step(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def run(*cmd: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; its stderr is shown only if it fails (podman is noisy about systemd)."""
    kwargs.setdefault("stderr", subprocess.PIPE)
    try:
        result: subprocess.CompletedProcess[str] = subprocess.run(
            cmd, check=True, text=True, **kwargs
        )
        return result
    except subprocess.CalledProcessError as exc:
        print(f"failed: {' '.join(cmd)}\n{exc.stderr or ''}", file=sys.stderr)
        raise


def in_netns(*cmd: str) -> list[str]:
    return ["ip", "netns", "exec", NETNS, *cmd]


def http(method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    """A request from inside the namespace (urllib in a child process there)."""
    code = (
        "import sys, urllib.request, urllib.error\n"
        "req = urllib.request.Request(sys.argv[1], data=sys.stdin.buffer.read() or None,"
        " method=sys.argv[2])\n"
        "try:\n"
        "    resp = urllib.request.urlopen(req, timeout=10)\n"
        "except urllib.error.HTTPError as exc:\n"
        "    resp = exc\n"
        "sys.stdout.write(str(resp.status) + '\\n')\n"
        "sys.stdout.flush()\n"
        "sys.stdout.buffer.write(resp.read())\n"
    )
    out = subprocess.run(
        in_netns(sys.executable, "-c", code, PROXY + path, method),
        input=body or b"",
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout
    status, _, answer = out.partition(b"\n")
    return int(status), answer


def eventually(what: str, check: Callable[[], bool], within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.2)


def base_image() -> None:
    if subprocess.run([*PODMAN, "image", "exists", BASE]).returncode == 0:
        step(f"base image {BASE} exists")
        return
    step("making the base image with debootstrap (about a minute)")
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        run(
            "debootstrap",
            "--variant=minbase",
            "--include=python3,python3-venv,ca-certificates",
            "bookworm",
            str(rootfs),
            stdout=subprocess.DEVNULL,
        )
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        run(*PODMAN, "import", "-", BASE, stdin=tar.stdout, stdout=subprocess.DEVNULL)
        tar.wait()


def build(tmp: Path) -> None:
    step("building the image from the project's Dockerfile")
    # pip inside the build reaches PyPI through this machine's TLS setup: its CA bundle and a
    # pip.conf that points at it. Nothing of this is in the Dockerfile.
    pip_conf = tmp / "pip.conf"
    pip_conf.write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
    ca = "/etc/ssl/certs/ca-certificates.crt"
    run(
        *PODMAN, "build", "--format", "docker", "--layers=false", "--network=host",
        "-v", f"{ca}:{ca}:ro", "-v", f"{pip_conf}:/etc/pip.conf:ro",
        "--build-arg", f"BASE_IMAGE={BASE}", "-t", IMAGE, str(ROOT),
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    config = json.loads(run(*PODMAN, "image", "inspect", IMAGE, stdout=subprocess.PIPE).stdout)[0]
    assert config["Config"]["User"] == "10001:10001", config["Config"]["User"]
    assert "/-/healthy" in " ".join(config["Healthcheck"]["Test"])  # kept: docker format
    assert "8080/tcp" in config["Config"]["ExposedPorts"]


def check_container(tmp: Path) -> None:
    secret = tmp / "client_secret"
    secret.write_text(CLIENT_SECRET + "\n")
    secret.chmod(0o644)  # as a Kubernetes secret volume mounts it: readable by the app's user
    step("starting the simulator and the container in their own network namespace")
    sim = subprocess.Popen(
        in_netns(
            sys.executable, "-m", "proxy", "simulator", "--port", "9000",
            "--client-id", CLIENT_ID, "--client-secret", CLIENT_SECRET,
        ),
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        run(
            *PODMAN, "run", "-d", "--name", CONTAINER, *ULIMITS,
            "--network", f"ns:/run/netns/{NETNS}", "--health-interval=disable",
            "-e", f"MDCLOUD_CLIENT_ID={CLIENT_ID}",
            "-e", "MDCLOUD_CLIENT_SECRET_FILE=/run/secrets/mdcloud_client_secret",
            "-e", "MDCLOUD_PROXY_UPSTREAM_URL=http://127.0.0.1:9000",
            "-v", f"{secret}:/run/secrets/mdcloud_client_secret:ro",
            IMAGE,
        stdout=subprocess.DEVNULL)  # fmt: skip
        started = time.monotonic()

        def ready() -> bool:
            try:
                return http("GET", "/-/ready")[0] == 200
            except subprocess.CalledProcessError:
                return False  # not listening yet

        eventually("/-/ready answers 200", ready)
        step(f"ready {time.monotonic() - started:.1f} s after start")
        status, answer = http("GET", "/v4/apikey/")
        assert status == 200 and b"max_upload_file_size" in answer, (status, answer)
        data = os.urandom(3 * 1024 * 1024)
        status, answer = http("POST", "/v4/file", data)
        assert status == 200, (status, answer)
        assert json.loads(answer)["sha256"].lower() == hashlib.sha256(data).hexdigest()
        status, answer = http("GET", "/-/metrics")
        assert status == 200 and b'mdcloud_proxy_requests_total{method="POST"' in answer
        run(*PODMAN, "healthcheck", "run", CONTAINER, stdout=subprocess.DEVNULL)
        user = run(*PODMAN, "exec", CONTAINER, "python3", "-c", "import os; print(os.getuid())",
                   stdout=subprocess.PIPE).stdout.strip()  # fmt: skip
        assert user == "10001", user
        step("calls, upload, metrics, healthcheck and user: ok; stopping with SIGTERM")
        run(*PODMAN, "stop", "--time", "20", CONTAINER, stdout=subprocess.DEVNULL)
        state = run(*PODMAN, "inspect", "--format", "{{.State.ExitCode}}", CONTAINER,
                    stdout=subprocess.PIPE).stdout.strip()  # fmt: skip
        logs = run(
            *PODMAN, "logs", CONTAINER, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        ).stdout
        assert state == "0", (state, logs)
        assert "access token fetched" in logs and "stopped" in logs, logs
        assert "(uvloop event loop," in logs, logs  # the image installs the fast extra
        assert CLIENT_SECRET not in logs
        step("stopped with exit code 0")
    finally:
        sim.terminate()
        sim.wait()


def remove_leftovers() -> None:
    subprocess.run([*PODMAN, "rm", "-f", CONTAINER], capture_output=True)
    subprocess.run(["ip", "netns", "delete", NETNS], capture_output=True)


def main() -> int:
    started = time.monotonic()
    remove_leftovers()
    run("ip", "netns", "add", NETNS)
    try:
        run("ip", "-n", NETNS, "link", "set", "lo", "up")
        base_image()
        with tempfile.TemporaryDirectory() as tmp:
            build(Path(tmp))
            check_container(Path(tmp))
    finally:
        remove_leftovers()
    step(f"container test passed in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
