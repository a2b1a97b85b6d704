#!/usr/bin/env python3
"""The benchmark: mdcloud-proxy beside nginx as a tuned reverse proxy, and beside going direct.

    python bench/run.py            # about ten minutes; --quick for a smoke run of a minute or two

Installs nginx, wrk and curl from Debian if they are missing (as root). Starts one upstream
nginx (plain and TLS, with a throwaway CA from trustme) that answers a scan-result poll, a
hash lookup and a 1 GiB file; an upload sink (bench/sink.py) behind it and beside it; the
simulator's token endpoint; nginx as a reverse proxy adding a fixed Authorization header
(the C reference, with two buffer sets and one unbuffered variant: the best counts) and
mdcloud-proxy with one worker and with two. Then measures, in this one invocation, for a
plain and an HTTPS upstream:

- requests/s at 32 connections on ``GET /v4/file/{data_id}`` (a poll no lookup cache ever
  serves: forwarding beside forwarding) and CPU seconds per 10,000 requests of each proxy's
  processes (wrk, 2 threads); nginx with ``worker_processes 1`` beside one proxy worker, and
  ``worker_processes auto`` beside ``workers: 2``;
- latency p50/p99 at one connection, and what each proxy adds to going direct;
- new upstream connections and full or resumed TLS handshakes per 1,000 requests, from the
  upstream's access log;
- a 1 GiB download and a 1 GiB upload (curl): throughput, ratios, peak RSS of the proxy; the
  upload again with the token refused after the whole body went up (a replay);

and once: the spill floor (1 GiB written in 256 KiB blocks where the replay spills), the CPU
of a cache hit beside a miss (``GET /v4/hash/...``), 2,000 requests in flight at once to an
upstream that answers after 1 s, idle RSS and time to ready, how busy the rest of the machine
was. Prints a table with the targets of issue 15 and writes everything to JSON (--json).
Ratios are what count: absolute figures depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLIENT_ID, CLIENT_SECRET = "bench-client", "bench-secret"
TICK = os.sysconf("SC_CLK_TCK")
GiB, MB = 1 << 30, 1_000_000
DATA_ID = "bench0c4a1e7d2f9b4e6a8c3d5f7e9a1b2c4d"
SMALL_PATH = f"/v4/file/{DATA_ID}"  # a scan-result poll: never served by the lookup cache
SMALL_BODY = json.dumps(
    {"data_id": DATA_ID, "scan_results": {"progress_percentage": 100, "scan_all_result_i": 0,
     "scan_all_result_a": "No Threat Detected", "total_avs": 20, "total_detected_avs": 0}},
    separators=(",", ":"),
)  # fmt: skip
HASH = hashlib.sha256(b"mdcloud-proxy bench").hexdigest()
HASH_BODY = json.dumps(
    {"sha256": HASH, "file_info": {"file_size": 4096, "file_type_description": "ASCII text"},
     "scan_results": {"scan_all_result_i": 0, "scan_all_result_a": "No Threat Detected"}},
    separators=(",", ":"),
)  # fmt: skip
# wrk asks for a hash never asked before on each request: every one is a cache miss. The run
# salt keeps one run's hashes from another's, the thread number one thread's from the other's.
MISS_SCRIPT = """
local threads = 0
function setup(thread) threads = threads + 1; thread:set("tid", threads) end
function init(args) salt = args[1]; n = 0 end
function request()
  n = n + 1
  return wrk.format("GET", string.format("/v4/hash/%s%02x%054x", salt, tid, n))
end
"""
FLOOD, SLOW_MS = 2000, 1000
BLOCK = 256 * 1024  # the spill floor's block size

# The reference's buffers; nginx has no single "right" size for this job, so the bench tries
# these and lets the best of them count for each figure. Every variant also has request
# buffering off and no temp files (below): nginx streams both ways, as mdcloud-proxy does.
VARIANTS = {
    "64k": """
            # What a streaming proxy for large transfers is usually given: bodies read from
            # the caller in 128k, answers in up to eight 64k buffers, 128k of them
            # waiting for a slow caller while nginx reads on.
            client_body_buffer_size 128k;
            proxy_buffer_size 64k;
            proxy_buffers 8 64k;
            proxy_busy_buffers_size 128k;""",
    "256k": """
            # Four times larger: fewer reads and writes per GiB, at 2 MiB per connection.
            client_body_buffer_size 512k;
            proxy_buffer_size 256k;
            proxy_buffers 8 256k;
            proxy_busy_buffers_size 512k;""",
    "64k unbuffered": """
            # The 64k sizes, but each answer's bytes go to the caller as they come (one
            # 64k buffer per connection): no copy into the buffer ring. (nginx checks the
            # ring's sizes even when it is not used.)
            client_body_buffer_size 128k;
            proxy_buffer_size 64k;
            proxy_buffers 8 64k;
            proxy_buffering off;""",
}
SMALL_VARIANTS = ("64k", "256k")  # for small answers the unbuffered variant only adds runs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


def family(pid: int) -> list[int]:
    return [pid, *children(pid)]


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def status_kib(pid: int, key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(match.group(1)) if match else 0


def peak_mb(pids: list[int]) -> float:
    return sum(status_kib(pid, "VmHWM") for pid in pids) * 1024 / MB


def reset_peak(pids: list[int]) -> None:
    for pid in pids:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM back to the current RSS


def listen_overflows() -> int:
    """Connections the kernel dropped because a listener's backlog was full (all of them)."""
    names, values = [
        line.split() for line in Path("/proc/net/netstat").read_text().splitlines()
        if line.startswith("TcpExt:")
    ][:2]  # fmt: skip
    return int(values[names.index("ListenOverflows")])


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / TICK, sum(values) / TICK


def own_cpu() -> float:
    usage = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    return sum(u.ru_utime + u.ru_stime for u in usage)


def median_run(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run with the median ``key`` (the lower middle one), with every run's value."""
    ordered = sorted(runs, key=lambda run: float(run[key]))
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen[f"runs_{key}"] = [round(float(run[key]), 3) for run in runs]
    return chosen


@dataclass
class Peer:
    """Something to send requests to: its URL, the processes whose CPU it costs."""

    url: str
    pids: list[int]
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class Bench:
    tmp: Path
    quick: bool
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    others: list[float] = field(default_factory=list)  # share of the machine used by others
    marks: int = 0
    upstream_plain: str = ""

    @property
    def seconds(self) -> int:
        return 2 if self.quick else 5

    @property
    def rounds(self) -> int:
        return 1 if self.quick else 3

    @property
    def big(self) -> int:
        return GiB // 4 if self.quick else GiB

    # -- processes -----------------------------------------------------------------------

    def start(self, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        proc.terminate()
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.procs):
            self.stop(proc)

    def wait_http(self, url: str, timeout: float = 15) -> float:
        context = ssl.create_default_context(cafile=str(self.tmp / "ca.pem"))
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(url, timeout=1, context=context) as resp,  # noqa: S310
            ):
                if resp.status == 200:
                    return time.monotonic() - started
            time.sleep(0.005)
        raise SystemExit(f"{url} did not answer 200 within {timeout} s")

    def wait_port(self, port: int, what: str) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                return
            time.sleep(0.01)
        raise SystemExit(f"{what} did not start")

    def nginx(self, name: str, workers: str, http: str) -> subprocess.Popen[bytes]:
        conf = self.tmp / f"{name}.conf"
        conf.write_text(
            f"""worker_processes {workers};
daemon off;
pid {self.tmp}/{name}.pid;
error_log {self.tmp}/{name}.error.log warn;
# Room for the 2,000 callers of the concurrency run and their upstream connections.
events {{ worker_connections 16384; }}
http {{
    sendfile on;
    tcp_nopush on;
    # wrk's connections stay open for the whole run, as the proxies' do.
    keepalive_requests 1000000;
    client_max_body_size 0;
    client_body_temp_path {self.tmp}/{name}-body;
    proxy_temp_path {self.tmp}/{name}-proxy;
{http}
}}
"""
        )
        cmd = ["nginx", "-c", str(conf), "-e", f"{self.tmp}/{name}.error.log"]
        checked = subprocess.run([*cmd, "-t"], capture_output=True, text=True, check=False)
        if checked.returncode != 0:
            raise SystemExit(f"nginx refuses {conf}:\n{checked.stderr}")
        return self.start(cmd)

    def make_ca(self) -> None:
        try:
            import trustme  # a test dependency
        except ImportError:
            raise SystemExit("the bench needs trustme: pip install -e '.[test]'") from None
        ca = trustme.CA()
        # nginx checks a certificate's DNS names only, mdcloud-proxy is given 127.0.0.1.
        cert = ca.issue_cert("localhost", "127.0.0.1")
        ca.cert_pem.write_to_path(str(self.tmp / "ca.pem"))
        cert.private_key_pem.write_to_path(str(self.tmp / "server.key"))
        (self.tmp / "server.pem").write_bytes(b"".join(c.bytes() for c in cert.cert_chain_pems))

    def upstream(self, sink_port: int) -> tuple[str, str]:
        """The upstream nginx, one worker: (plain URL, https URL)."""
        # Real bytes, not a sparse file (the first read of a hole is slower than the rest),
        # on disk before the runs start, and read once: every contender finds it in the cache.
        big = self.tmp / "big.bin"
        block = os.urandom(1 << 24)
        with big.open("wb") as f:
            for _ in range(self.big // len(block)):
                f.write(block)
            os.fsync(f.fileno())
        with big.open("rb") as f:
            while f.read(1 << 24):
                pass
        plain, tls = free_port(), free_port()
        self.nginx(
            "upstream",
            "1",
            f"""    # Who opened which connection, and whether its TLS session was resumed; the
    # bench's marks (/-mark/N) cut the log into runs.
    log_format marks '$connection $connection_requests $ssl_session_reused $uri';
    access_log {self.tmp}/upstream.access.log marks buffer=256k flush=1s;
    ssl_certificate {self.tmp}/server.pem;
    ssl_certificate_key {self.tmp}/server.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    # Resumption by session id besides tickets (nginx's default): whichever a client uses.
    ssl_session_cache shared:SSL:10m;
    upstream sink {{
        server 127.0.0.1:{sink_port};
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{plain};
        listen 127.0.0.1:{tls} ssl;
        location = {SMALL_PATH} {{
            default_type application/json;
            return 200 '{SMALL_BODY}';
        }}
        location /v4/hash/ {{
            default_type application/json;
            return 200 '{HASH_BODY}';
        }}
        location /-mark/ {{ return 204; }}
        location = /big.bin {{ root {self.tmp}; }}
        # Uploads over TLS end in the sink, which reads them and can refuse the token.
        location = /v4/file {{
            proxy_pass http://sink;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
            proxy_max_temp_file_size 0;
            {VARIANTS["64k"]}
        }}
    }}""",
        )
        self.upstream_plain = f"http://127.0.0.1:{plain}"
        self.wait_http(self.upstream_plain + SMALL_PATH)
        self.wait_http(f"https://127.0.0.1:{tls}{SMALL_PATH}")
        return self.upstream_plain, f"https://127.0.0.1:{tls}"

    def reference(self, name: str, workers: str, targets: dict[str, str]) -> dict[str, Peer]:
        """nginx as the reverse proxy: one server per target and variant, "target variant"."""
        # The only log is the upstream's: nothing on the proxies' side writes per request.
        servers, upstreams, ports = ["    access_log off;"], [], {}
        for target, url in targets.items():
            scheme, host = url.split("://")
            upstreams.append(f"""    upstream up_{target.replace(" ", "_")} {{
        server {host};
        # Idle connections kept per worker: more than the 32 wrk opens, so none is closed.
        keepalive 128;
        # nginx closes an upstream connection after 1,000 requests unless told otherwise.
        keepalive_requests 1000000;
    }}""")
            tls = ""
            if scheme == "https":
                tls = f"""
            # Re-encrypting towards a verified upstream, resuming TLS sessions.
            proxy_ssl_trusted_certificate {self.tmp}/ca.pem;
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
            # nginx 1.22 offers TLS 1.2 at most to an upstream unless told.
            proxy_ssl_protocols TLSv1.2 TLSv1.3;"""
            for variant, buffers in VARIANTS.items():
                port = free_port()
                ports[f"{target} {variant}"] = port
                servers.append(f"""    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass {scheme}://up_{target.replace(" ", "_")};
            # Upstream keep-alive needs HTTP/1.1 and no "Connection: close" from nginx.
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer fixed-bench-token";
            # Stream uploads as they come, as mdcloud-proxy does (no 1 GiB temp file).
            proxy_request_buffering off;
            # Never park an answer in a temp file: memory buffers only.
            proxy_max_temp_file_size 0;{buffers}{tls}
        }}
    }}""")
        proc = self.nginx(name, workers, "\n".join(upstreams + servers))
        pids = family(proc.pid)
        peers = {key: Peer(f"http://127.0.0.1:{port}", pids, proc) for key, port in ports.items()}
        for key, peer in peers.items():
            if "sink" not in key:
                self.wait_http(peer.url + SMALL_PATH)
        pids[:] = family(proc.pid)  # the workers exist by now; every peer shares the list
        return peers

    def token_endpoint(self) -> str:
        port = free_port()
        self.start(
            [sys.executable, "-m", "proxy", "simulator", "--port", str(port),
             "--client-id", CLIENT_ID, "--client-secret", CLIENT_SECRET]
        )  # fmt: skip
        self.wait_port(port, "the simulator")
        return f"http://127.0.0.1:{port}/v4/oauth2/token"

    def sink(self) -> tuple[str, int]:
        port = free_port()
        self.start([sys.executable, str(ROOT / "bench" / "sink.py"), str(port)])
        self.wait_port(port, "the sink")
        return f"http://127.0.0.1:{port}", port

    def mdcloud_proxy(
        self,
        upstream: str,
        token_url: str,
        workers: int = 1,
        settings: dict[str, str] | None = None,
    ) -> tuple[Peer, float]:
        """mdcloud-proxy as its users run it; ``settings`` are MDCLOUD_PROXY_* variables."""
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MDCLOUD")}
        env.update(
            MDCLOUD_CLIENT_ID=CLIENT_ID,
            MDCLOUD_CLIENT_SECRET=CLIENT_SECRET,
            MDCLOUD_PROXY_UPSTREAM_URL=upstream,
            MDCLOUD_PROXY_OAUTH_TOKEN_URL=token_url,
            # No access log, as nginx here: forwarding is compared with forwarding.
            MDCLOUD_PROXY_LOG_LEVEL="WARNING",
            MDCLOUD_PROXY_LIMITS_MAX_BODY_SIZE="2GiB",  # the default 256 MiB refuses 1 GiB
        )
        if upstream.startswith("https"):
            env["MDCLOUD_PROXY_UPSTREAM_CA_FILE"] = str(self.tmp / "ca.pem")
        env.update({f"MDCLOUD_PROXY_{k.upper()}": v for k, v in (settings or {}).items()})
        cmd = [sys.executable, "-m", "proxy", "--port", str(port)]
        if workers != 1:
            cmd += ["--workers", str(workers)]
        proc = self.start(cmd, env)
        url = f"http://127.0.0.1:{port}"
        ready = self.wait_http(url + "/-/ready")
        if workers > 1:  # every worker has its own token: wait until each answers
            deadline = time.monotonic() + 15
            while len(children(proc.pid)) < workers and time.monotonic() < deadline:
                time.sleep(0.05)
        pids = family(proc.pid)
        return Peer(url, pids, proc), ready

    # -- measurements ----------------------------------------------------------------------

    @contextlib.contextmanager
    def window(self, ours: list[int]) -> Iterator[dict[str, Any]]:
        """Measures the CPU of ``ours`` over the block, and what the rest of the machine used."""
        out: dict[str, Any] = {}
        busy0, total0 = machine_busy()
        mine0, self0 = cpu_seconds(ours), own_cpu()
        everyone = [q for p in self.procs for q in family(p.pid)]
        all0 = cpu_seconds(everyone)
        started = time.monotonic()
        yield out
        out["seconds"] = time.monotonic() - started
        out["cpu"] = cpu_seconds(ours) - mine0
        busy1, total1 = machine_busy()
        known = cpu_seconds(everyone) - all0 + own_cpu() - self0
        self.others.append(max(0.0, busy1 - busy0 - known) / max(total1 - total0, 1e-9))

    def mark(self) -> int:
        """Writes a line into the upstream's access log that ends the run before it."""
        self.marks += 1
        url = f"{self.upstream_plain}/-mark/{self.marks}"
        with urllib.request.urlopen(url, timeout=5):  # noqa: S310 - loopback
            pass
        return self.marks

    def wrk(
        self, url: str, connections: int, peer: Peer, script: Path | None = None
    ) -> dict[str, Any]:
        threads = min(2, connections)
        cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{self.seconds}s", "--latency"]
        if script is not None:
            cmd += ["-s", str(script), url, "--", f"{self.marks + 1:08x}"]
        else:
            cmd.append(url)
        with self.window(peer.pids) as out:
            text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        out["mark"] = self.mark()
        out["rps"] = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
        out["requests"] = int(re.search(r"(\d+) requests in", text).group(1))  # type: ignore[union-attr]
        for pct in ("50", "99"):
            value, unit = re.search(
                rf"^\s+{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s)", text, re.M
            ).groups()  # type: ignore[union-attr]
            out[f"p{pct}_ms"] = float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]
        out["cpu_per_10k"] = out["cpu"] / out["requests"] * 10_000
        bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
        sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                            text)  # fmt: skip
        out["non_2xx"] = int(bad.group(1)) if bad else 0
        out["socket_errors"] = sum(int(n) for n in sockets.groups()) if sockets else 0
        if out["non_2xx"]:
            raise SystemExit(f"{url}: {out['non_2xx']} answers were not 2xx:\n{text}")
        return out

    def curl(
        self, url: str, peer: Peer, upload: Path | None = None, watch: list[int] | None = None,
        refuse: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        if watch:
            reset_peak(watch)
        cmd = ["curl", "-s", "-o", "/dev/null", "-H", "Expect:", "--fail"]
        cmd += ["--cacert", str(self.tmp / "ca.pem")]
        if refuse is not None:  # a new run for the sink: it refuses its first token
            self.marks += 1
            cmd += ["-H", f"X-Bench-Refuse: {refuse}-{self.marks}"]
        if upload is not None:
            cmd += ["-X", "POST", "-T", str(upload), "-w", "%{size_upload} %{time_total}"]
        else:
            cmd += ["-w", "%{size_download} %{time_total}"]
        with self.window(peer.pids) as out:
            done = subprocess.run([*cmd, url], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"curl {url} failed ({done.returncode}): {done.stdout}")
        size, spent = done.stdout.split()
        assert int(float(size)) == self.big, (size, self.big)
        out["seconds"] = float(spent)  # curl's own clock: without its start-up
        out["mb_per_s"] = self.big / float(spent) / MB
        if watch:
            out["peak_rss_mb"] = peak_mb(watch)
        return out

    def transfers(
        self, url: str, peer: Peer, upload: Path | None = None, watch: list[int] | None = None,
        refuse: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """The median of a few runs of one transfer (one in --quick), the highest peak RSS."""
        runs = [self.curl(url, peer, upload, watch, refuse) for _ in range(self.rounds)]
        chosen = median_run(runs, "mb_per_s")
        if watch:
            chosen["peak_rss_mb"] = max(run["peak_rss_mb"] for run in runs)
        return chosen

    def spill_floor(self) -> dict[str, Any]:
        """How fast 1 GiB goes into the replay spill's directory, in 256 KiB blocks.

        As the spill does (proxy/body.py): an unlinked ``tempfile.TemporaryFile`` in
        ``tempfile.gettempdir()`` (TMPDIR), ``os.pwrite`` of each block, no fsync: the spill
        is read back within the same request and never has to survive a crash, so the page
        cache is its floor, not the disk. The same with one fsync at the end (the disk's
        floor) is reported beside it.
        """
        block = os.urandom(BLOCK)
        out: dict[str, Any] = {"dir": tempfile.gettempdir(), "block": BLOCK, "counts": "no fsync"}
        out["filesystem"] = subprocess.run(
            ["findmnt", "-n", "-o", "SOURCE,FSTYPE", "-T", out["dir"]],
            capture_output=True, text=True, check=False,
        ).stdout.strip()  # fmt: skip
        for fsync in (False, True):
            runs = []
            for _ in range(1 if fsync else self.rounds):
                with tempfile.TemporaryFile(prefix="mdcloud-proxy-bench-") as f:
                    started = time.monotonic()
                    for offset in range(0, self.big, BLOCK):
                        os.pwrite(f.fileno(), block, offset)
                    if fsync:
                        os.fsync(f.fileno())
                    runs.append(self.big / (time.monotonic() - started) / MB)
            out["fsync_mb_per_s" if fsync else "mb_per_s"] = statistics.median(runs)
            out["runs_fsync" if fsync else "runs"] = [round(run) for run in runs]
        return out

    def flood(self, url: str, watch: list[int] | None) -> dict[str, Any]:
        """``FLOOD`` requests at once from a child process; the proxy's peak RSS."""
        before = 0.0
        if watch:
            reset_peak(watch)
            before = sum(status_kib(pid, "VmRSS") for pid in watch) * 1024 / MB
        cmd = [sys.executable, __file__, "--flood", url]
        overflows = listen_overflows()
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300)
        out: dict[str, Any] = json.loads(done.stdout)
        # A full accept backlog makes a caller's SYN wait for its retry (1 s, then 3 s):
        # counted machine-wide, so other work on the machine may add to it.
        out["listen_overflows"] = listen_overflows() - overflows
        if watch:
            out["rss_before_mb"] = before
            out["peak_rss_mb"] = peak_mb(watch)
            out["rss_per_request_kb"] = (out["peak_rss_mb"] - before) * 1000 / FLOOD
        return out

    def metrics(self, url: str, name: str, label: str) -> dict[str, float]:
        """One counter of mdcloud-proxy's /-/metrics, by the value of one label."""
        with urllib.request.urlopen(url + "/-/metrics", timeout=5) as resp:  # noqa: S310
            text = resp.read().decode()
        found = re.findall(rf'^{name}\{{[^}}]*{label}="(\w+)"[^}}]*\}} (\S+)', text, re.M)
        return {value: float(count) for value, count in found}

    def handshakes(self) -> dict[int, dict[str, int]]:
        """Per mark: requests, new connections, full and resumed TLS handshakes upstream."""
        log = self.tmp / "upstream.access.log"
        last = f" /-mark/{self.mark()}"
        deadline = time.monotonic() + 10  # the log is flushed every second
        while time.monotonic() < deadline:
            with log.open("rb") as f:
                f.seek(max(0, log.stat().st_size - 200))
                if last.encode() in f.read():
                    break
            time.sleep(0.1)
        counts: dict[int, dict[str, int]] = {}
        run = {"requests": 0, "new": 0, "full": 0, "resumed": 0}
        with log.open() as f:
            for line in f:
                _, served, reused, uri = line.split(" ", 3)
                if uri.startswith("/-mark/"):
                    counts[int(uri.removeprefix("/-mark/"))] = run
                    run = {"requests": 0, "new": 0, "full": 0, "resumed": 0}
                    continue
                run["requests"] += 1
                if served == "1":
                    run["new"] += 1
                    if reused == "r":
                        run["resumed"] += 1
                    elif reused == ".":
                        run["full"] += 1
        return counts


def per_1k(runs: list[dict[str, Any]], counts: dict[int, dict[str, int]]) -> dict[str, float]:
    """New connections and handshakes per 1,000 requests over these runs."""
    total = {"requests": 0, "new": 0, "full": 0, "resumed": 0}
    for run in runs:
        for key, value in counts.get(run["mark"], {}).items():
            total[key] += value
    requests = max(total.pop("requests"), 1)
    return {key: value * 1000 / requests for key, value in total.items()}


Check = tuple[str, str, bool]  # what, the figure, whether it passes


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def ensure_tools() -> None:
    missing = [tool for tool in ("nginx", "wrk", "curl") if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"missing {', '.join(missing)}: apt-get install nginx-light wrk curl")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "nginx-light", "wrk", "curl"],
        check=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        stdout=subprocess.DEVNULL,
    )


async def flood_client(url: str) -> dict[str, Any]:
    """``FLOOD`` requests to ``url`` at once, each on its own connection."""
    import aiohttp  # only the flood's child needs it

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8 * FLOOD)), hard))
    outcomes: dict[str, int] = {}
    peaks = [0]
    connector = aiohttp.TCPConnector(limit=0)  # no pool limit: every request connects now
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one() -> None:
            try:
                async with session.get(url) as resp:
                    body = await resp.read()
                    outcome = str(resp.status)
                    if resp.status == 200:
                        peaks.append(int(json.loads(body).get("in_flight", 0)))
            except (aiohttp.ClientError, TimeoutError) as exc:
                outcome = type(exc).__name__
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

        started = time.monotonic()
        await asyncio.gather(*(one() for _ in range(FLOOD)))
        wall = time.monotonic() - started
    return {
        "requests": FLOOD,
        "ok": outcomes.get("200", 0),
        "errors": FLOOD - outcomes.get("200", 0),
        "outcomes": outcomes,
        "wall_s": wall,
        "upstream_in_flight_peak": max(peaks),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s runs, 256 MiB, no repeats")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results.json"))
    parser.add_argument("--flood", metavar="URL", help=argparse.SUPPRESS)  # the child's job
    args = parser.parse_args()
    if args.flood:
        print(json.dumps(asyncio.run(flood_client(args.flood))))
        return 0
    ensure_tools()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mdcp-bench-") as tmp:
        os.chmod(tmp, 0o755)  # noqa: S103 - nginx workers drop root and must read the big file
        bench = Bench(Path(tmp), args.quick)
        try:
            run(bench)
        finally:
            bench.stop_all()
    results = bench.results
    results["machine"] = {
        "cpus": os.cpu_count(),
        "others_cpu_share_max": round(max(bench.others), 3),
        "others_cpu_share_mean": round(sum(bench.others) / len(bench.others), 3),
        "load_average": os.getloadavg(),
        "bench_seconds": round(time.monotonic() - started),
        "quick": args.quick,
    }
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    report(results)
    print(f"\nwritten to {args.json}")
    return 0


def best_nginx(variants: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """nginx at its best: each figure from the variant that did best at it, and which."""
    best: dict[str, Any] = {}
    for key, higher in (("rps", True), ("cpu_per_10k", False), ("p50_ms", False),
                        ("p99_ms", False), ("mb_per_s", True)):  # fmt: skip
        have = {name: run[key] for name, run in variants.items() if key in run}
        if have:
            name = (max if higher else min)(have, key=have.__getitem__)
            best[key], best[f"{key}_variant"] = have[name], name
    return best


def small_runs(bench: Bench, scheme: dict[str, Any], peers: dict[str, Peer], small: str) -> None:
    """Rounds of small requests, the peers taking turns; the median of each peer."""
    # On a small shared machine one run can be off by 20%, and which core each process lands
    # on moves latency: the median of three rounds, each peer in turn.
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {"small": {}, "latency": {}}
    for round_ in range(bench.rounds):
        for name, peer in peers.items():
            print(f"  small requests, round {round_ + 1}: {name}", flush=True)
            runs["small"].setdefault(name, []).append(bench.wrk(peer.url + small, 32, peer))
            runs["latency"].setdefault(name, []).append(bench.wrk(peer.url + small, 1, peer))
    for kind, key in (("small", "rps"), ("latency", "p50_ms")):
        for name, each in runs[kind].items():
            chosen = median_run(each, key)
            chosen["marks"] = [run["mark"] for run in each]
            scheme.setdefault(kind, {})[name] = chosen


def stop_peer(bench: Bench, peer: Peer) -> None:
    assert peer.proc is not None
    bench.stop(peer.proc)


def run(bench: Bench) -> None:
    r = bench.results
    bench.make_ca()
    sink, sink_port = bench.sink()
    plain, https = bench.upstream(sink_port)
    token_url = bench.token_endpoint()
    r["spill_floor"] = bench.spill_floor()
    print(f"spill floor: {r['spill_floor']['mb_per_s']:.0f} MB/s", flush=True)
    targets = {"plain": plain, "plain sink": sink, "https": https}
    ref1 = bench.reference("reference", "1", targets)
    upload = bench.tmp / "big.bin"
    for label, upstream in (("plain", plain), ("https", https)):
        scheme: dict[str, Any] = r.setdefault(label, {})
        print(f"{label} upstream", flush=True)
        proxy, ready = bench.mdcloud_proxy(upstream, token_url)
        time.sleep(1)
        assert proxy.proc is not None
        scheme["mdcloud_proxy"] = {
            "ready_s": round(ready, 3),
            "idle_rss_mb": status_kib(proxy.proc.pid, "VmRSS") * 1024 / MB,
        }
        peers = {"direct": Peer(upstream, [])}
        peers |= {f"nginx {v}": ref1[f"{label} {v}"] for v in SMALL_VARIANTS}
        peers["mdcloud-proxy"] = proxy
        small_runs(bench, scheme, peers, SMALL_PATH)

        for name, peer in [("direct", peers["direct"]), *((f"nginx {v}", ref1[f"{label} {v}"])
                           for v in VARIANTS), ("mdcloud-proxy", proxy)]:  # fmt: skip
            print(f"  1 GiB download: {name}", flush=True)
            watch = proxy.pids if name == "mdcloud-proxy" else None
            scheme.setdefault("download", {})[name] = bench.transfers(
                peer.url + "/big.bin", peer, watch=watch
            )
        # Plain uploads go straight to the sink; over TLS the upstream nginx ends the TLS.
        up_url = sink if label == "plain" else upstream
        if label == "plain":
            stop_peer(bench, proxy)
            proxy, _ = bench.mdcloud_proxy(up_url, token_url)
        uploads = [("direct", Peer(up_url, [])),
                   *((f"nginx {v}", ref1[f"{label}{' sink' if label == 'plain' else ''} {v}"])
                     for v in VARIANTS), ("mdcloud-proxy", proxy)]  # fmt: skip
        for name, peer in uploads:
            print(f"  1 GiB upload: {name}", flush=True)
            watch = proxy.pids if name == "mdcloud-proxy" else None
            scheme.setdefault("upload", {})[name] = bench.transfers(
                peer.url + "/v4/file", peer, upload, watch
            )
        print("  1 GiB upload, token refused after the upload: mdcloud-proxy replays", flush=True)
        replays = "mdcloud_proxy_replays_total", "outcome"
        before = bench.metrics(proxy.url, *replays).get("ok", 0)
        replay = bench.transfers(proxy.url + "/v4/file", proxy, upload, proxy.pids, label)
        replay["replays"] = bench.metrics(proxy.url, *replays).get("ok", 0) - before
        if replay["replays"] != bench.rounds:
            raise SystemExit(f"{replay['replays']} replays for {bench.rounds} refused uploads")
        scheme["upload"]["mdcloud-proxy replay"] = replay
        stop_peer(bench, proxy)
        scheme["nginx_variants"] = {
            kind: {name: {k: v for k, v in run.items() if not k.startswith("runs_")}
                   for name, run in scheme[kind].items() if name.startswith("nginx ")}
            for kind in ("small", "latency", "download", "upload")
        }  # fmt: skip
        for kind in ("small", "latency", "download", "upload"):
            variants = {name.removeprefix("nginx "): scheme[kind].pop(name)
                        for name in list(scheme[kind]) if name.startswith("nginx ")}  # fmt: skip
            scheme[kind]["nginx"] = best_nginx(variants)
    stop_peer(bench, ref1["plain 64k"])

    # Two processes each: nginx's worker_processes auto (2 here) beside workers: 2, each
    # nginx with the buffer set that did best with one worker (small answers hardly care).
    ref2 = bench.reference("reference-auto", "auto", {"plain": plain, "https": https})
    for label, upstream in (("plain", plain), ("https", https)):
        scheme = r[label]
        variant = scheme["small"]["nginx"]["rps_variant"]
        proxy, _ = bench.mdcloud_proxy(upstream, token_url, workers=2)
        peers = {"nginx auto": ref2[f"{label} {variant}"], "mdcloud-proxy x2": proxy}
        runs: dict[str, list[dict[str, Any]]] = {}
        for round_ in range(bench.rounds):
            for name, peer in peers.items():
                print(f"  {label}, two processes, round {round_ + 1}: {name}", flush=True)
                runs.setdefault(name, []).append(bench.wrk(peer.url + SMALL_PATH, 32, peer))
        for name, each in runs.items():
            scheme["small"][name] = median_run(each, "rps") | {"marks": [x["mark"] for x in each]}
        scheme["small"]["nginx auto"]["variant"] = variant
        stop_peer(bench, proxy)
    stop_peer(bench, ref2["plain 64k"])

    print("cache: hits beside misses", flush=True)
    proxy, _ = bench.mdcloud_proxy(plain, token_url)
    hit_url = f"{proxy.url}/v4/hash/{HASH}"
    for expected in ("MISS", "HIT"):
        with urllib.request.urlopen(hit_url, timeout=5) as resp:  # noqa: S310 - loopback
            if resp.headers.get("X-Cache-Status") != expected:
                raise SystemExit(f"{hit_url}: X-Cache-Status {resp.headers.get('X-Cache-Status')}")
    script = bench.tmp / "miss.lua"
    script.write_text(MISS_SCRIPT)
    cache_runs: dict[str, list[dict[str, Any]]] = {"hit": [], "miss": []}
    for round_ in range(bench.rounds):
        for kind in ("hit", "miss"):
            print(f"  round {round_ + 1}: {kind}", flush=True)
            counted = bench.metrics(proxy.url, "mdcloud_proxy_cache_requests_total", "status")
            one = bench.wrk(hit_url, 32, proxy, script if kind == "miss" else None)
            after = bench.metrics(proxy.url, "mdcloud_proxy_cache_requests_total", "status")
            one["served"] = {k: after[k] - counted.get(k, 0) for k in after}
            cache_runs[kind].append(one)
    r["cache"] = {kind: median_run(runs, "cpu_per_10k") for kind, runs in cache_runs.items()}
    stop_peer(bench, proxy)

    print(f"{FLOOD} requests at once, answered after {SLOW_MS} ms", flush=True)
    slow = f"/slow/{SLOW_MS}"
    flood: dict[str, Any] = r.setdefault("flood", {})
    flood["direct"] = bench.flood(sink + slow, None)
    # upstream.max_connections (256 by default) raised so that all 2,000 wait upstream at
    # once; listen.max_connections is left alone (half the descriptor limit: 10,000 here).
    for name, settings in (("mdcloud-proxy", {"upstream_max_connections": "4096"}),
                           ("mdcloud-proxy, default upstream.max_connections", {})):  # fmt: skip
        proxy, _ = bench.mdcloud_proxy(sink, token_url, settings=settings)
        print(f"  {name}", flush=True)
        flood[name] = bench.flood(proxy.url + slow, proxy.pids)
        stop_peer(bench, proxy)

    counts = bench.handshakes()
    for label in ("plain", "https"):
        r[label]["upstream_connections_per_1k"] = {
            name: per_1k([{"mark": m} for m in run["marks"]], counts)
            for name, run in r[label]["small"].items() if "marks" in run
        }  # fmt: skip
        # nginx's figures come from each variant's runs: all of its 32-connection runs.
        r[label]["upstream_connections_per_1k"]["nginx"] = per_1k(
            [{"mark": m} for name, run in r[label]["nginx_variants"]["small"].items()
             for m in run["marks"]], counts
        )  # fmt: skip


def report_scheme(label: str, s: dict[str, Any], spill: dict[str, Any]) -> list[Check]:
    """Prints one upstream's table and the nginx variants; returns its targets."""
    small, lat, down, up = s["small"], s["latency"], s["download"], s["upload"]
    conns = s["upstream_connections_per_1k"]
    who = ("direct", "nginx", "mdcloud-proxy")
    rows: list[tuple[str, ...]] = [(f"{label} upstream", *who, "proxy/nginx")]

    def ratio(data: dict[str, Any], key: str) -> float:
        return float(data["mdcloud-proxy"][key] / data["nginx"][key])

    def line(title: str, data: dict[str, Any], key: str, fmt: str, share: str = "") -> None:
        cells = [format(data[n][key], fmt) if key in data.get(n, {}) else "-" for n in who]
        if key == "cpu_per_10k":
            cells[0] = "-"  # going direct costs no proxy CPU
        rows.append((title, *cells, share))

    line("req/s, 32 conns", small, "rps", ".0f", f"{ratio(small, 'rps'):.1%}")
    line("CPU s / 10k req", small, "cpu_per_10k", ".2f", f"{ratio(small, 'cpu_per_10k'):.1f}x")
    line("p50 ms, 1 conn", lat, "p50_ms", ".3f")
    line("p99 ms, 1 conn", lat, "p99_ms", ".3f")
    added = lat["mdcloud-proxy"]["p50_ms"] - lat["direct"]["p50_ms"]
    nginx_added = lat["nginx"]["p50_ms"] - lat["direct"]["p50_ms"]
    rows.append(("added p50 ms", "", f"{nginx_added:.3f}", f"{added:.3f}", ""))
    kinds = {"new": "new upstream conns / 1k req"}
    if label == "https":
        kinds |= {"full": "full TLS handshakes / 1k req", "resumed": "resumed TLS / 1k req"}
    for key, title in kinds.items():  # each run's first connections count too
        rows.append((title, *(f"{conns[n][key]:.2f}" for n in who), ""))
    nginx2, proxy2 = small["nginx auto"], small["mdcloud-proxy x2"]
    rows.append(("req/s, 2 processes", "", f"{nginx2['rps']:.0f}", f"{proxy2['rps']:.0f}",
                 f"{proxy2['rps'] / nginx2['rps']:.1%}"))  # fmt: skip
    rows.append(("CPU s / 10k req, 2 processes", "", f"{nginx2['cpu_per_10k']:.2f}",
                 f"{proxy2['cpu_per_10k']:.2f}",
                 f"{proxy2['cpu_per_10k'] / nginx2['cpu_per_10k']:.1f}x"))  # fmt: skip
    rows.append(("new upstream conns / 1k, 2 proc", "", f"{conns['nginx auto']['new']:.2f}",
                 f"{conns['mdcloud-proxy x2']['new']:.2f}", ""))  # fmt: skip
    floor = min(up["nginx"]["mb_per_s"], spill["mb_per_s"])
    line("1 GiB download MB/s", down, "mb_per_s", ".0f", f"{ratio(down, 'mb_per_s'):.0%}")
    ours, replay = up["mdcloud-proxy"], up["mdcloud-proxy replay"]
    line("1 GiB upload MB/s", up, "mb_per_s", ".0f", f"{ours['mb_per_s'] / floor:.0%} of floor")
    rows.append(("1 GiB upload, replayed MB/s", "", "", f"{replay['mb_per_s']:.0f}",
                 f"{replay['mb_per_s'] / floor:.0%} of floor"))  # fmt: skip
    peaks = [down["mdcloud-proxy"]["peak_rss_mb"], ours["peak_rss_mb"], replay["peak_rss_mb"]]
    rows.append(("peak RSS MB down/up/replay", "", "", "/".join(f"{v:.0f}" for v in peaks), ""))
    print()
    print(table(rows))
    md = s["mdcloud_proxy"]
    print(
        f"floor for uploads: min(nginx {up['nginx']['mb_per_s']:.0f}, spill "
        f"{spill['mb_per_s']:.0f}) = {floor:.0f} MB/s; "
        f"idle RSS {md['idle_rss_mb']:.0f} MB, ready {md['ready_s'] * 1000:.0f} ms; "
        f"nginx x2 used the {nginx2['variant']} set"
    )
    rows = [("nginx variant", "req/s", "CPU s/10k", "p50 ms", "down MB/s", "up MB/s")]
    for variant in VARIANTS:
        cells = []
        for kind, key, fmt in (("small", "rps", ".0f"), ("small", "cpu_per_10k", ".2f"),
                               ("latency", "p50_ms", ".3f"), ("download", "mb_per_s", ".0f"),
                               ("upload", "mb_per_s", ".0f")):  # fmt: skip
            run = s["nginx_variants"][kind].get(f"nginx {variant}", {})
            cells.append(format(run[key], fmt) if key in run else "-")
        rows.append((f"  {variant}", *cells))
    print(table(rows))
    return [
        (f"{label}: req/s >= 10% of nginx", f"{ratio(small, 'rps'):.2%}",
         ratio(small, "rps") >= 0.10),
        (f"{label}: CPU per request <= 12x nginx", f"{ratio(small, 'cpu_per_10k'):.1f}x",
         ratio(small, "cpu_per_10k") <= 12),
        (f"{label}: added p50 <= 0.3 ms", f"{added:.3f} ms", added <= 0.3),
        (f"{label}: download >= 60% of nginx", f"{ratio(down, 'mb_per_s'):.1%}",
         ratio(down, "mb_per_s") >= 0.6),
        (f"{label}: upload >= 80% of min(nginx, spill floor)",
         f"{ours['mb_per_s'] / floor:.1%}", ours["mb_per_s"] >= 0.8 * floor),
        (f"{label}: replayed upload >= 40% of it", f"{replay['mb_per_s'] / floor:.1%}",
         replay["mb_per_s"] >= 0.4 * floor),
        (f"{label}: peak RSS < 80 MB (download, upload, replay)", f"{max(peaks):.0f} MB",
         max(peaks) < 80),
    ]  # fmt: skip


def report(r: dict[str, Any]) -> None:
    spill = r["spill_floor"]
    checks = report_scheme("plain", r["plain"], spill) + report_scheme("https", r["https"], spill)
    print(
        f"\nspill floor: {spill['mb_per_s']:.0f} MB/s into {spill['dir']} ({spill['filesystem']}),"
        f" 1 GiB in {spill['block'] // 1024} KiB blocks, no fsync (as the spill; runs "
        f"{spill['runs']}); with one fsync at the end {spill['fsync_mb_per_s']:.0f} MB/s"
    )
    hit, miss = r["cache"]["hit"], r["cache"]["miss"]
    share = hit["cpu_per_10k"] / miss["cpu_per_10k"]
    print(
        f"cache (plain): hit {hit['cpu_per_10k']:.2f} CPU s/10k at {hit['rps']:.0f} req/s "
        f"(served {hit['served']}), miss {miss['cpu_per_10k']:.2f} at {miss['rps']:.0f} req/s "
        f"(served {miss['served']}): a hit costs {share:.0%} of a miss"
    )
    for name, f in r["flood"].items():
        rss = ""
        if "peak_rss_mb" in f:
            rss = (f" peak RSS {f['peak_rss_mb']:.0f} MB (from {f['rss_before_mb']:.0f}), "
                   f"{f['rss_per_request_kb']:.0f} kB per request")  # fmt: skip
        print(f"{FLOOD} at once, {name}: {f['ok']} ok, {f['errors']} errors {f['outcomes']}, "
              f"{f['wall_s']:.2f} s, upstream saw {f['upstream_in_flight_peak']} at once, "
              f"{f['listen_overflows']} listen overflows;"
              f"{rss}")  # fmt: skip
    flood = r["flood"]["mdcloud-proxy"]
    m = r["machine"]
    print(
        f"other processes used at most {m['others_cpu_share_max']:.0%} of the machine "
        f"(mean {m['others_cpu_share_mean']:.0%}); load average {m['load_average'][0]:.2f} at "
        f"the end; {m['bench_seconds']} s in all{' (--quick)' if m['quick'] else ''}"
    )
    checks += [
        (f"{FLOOD} in flight: all complete, zero errors", f"{flood['errors']} errors",
         flood["errors"] == 0 and flood["ok"] == FLOOD),
        (f"{FLOOD} in flight: peak RSS < 150 MB", f"{flood['peak_rss_mb']:.0f} MB",
         flood["peak_rss_mb"] < 150),
        ("a cache hit costs <= 1/3 of a miss's CPU", f"{share:.1%}", share <= 1 / 3),
    ]  # fmt: skip
    print()
    width = max(len(text) for text, _, _ in checks)
    for text, value, ok in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {text.ljust(width)}  {value}")


if __name__ == "__main__":
    sys.exit(main())
