#!/usr/bin/env python3
"""The benchmark: mdcloud-proxy beside nginx as a reverse proxy, and beside going direct.

    python bench/run.py            # about three minutes; --quick for a short smoke run

Installs nginx, wrk and curl from Debian if they are missing (as root). Starts a static nginx
as the upstream (small JSON answers, a 1 GiB file), an upload sink (bench/sink.py), the
simulator's token endpoint, nginx as a reverse proxy adding a fixed Authorization header (the
C reference) and mdcloud-proxy; then measures, in this one invocation:

- requests/s at 32 connections on small JSON answers, and CPU seconds per 10,000 requests of
  the proxy processes (wrk, 2 threads);
- latency p50/p99 at one connection, and what each proxy adds to going direct;
- a 1 GiB download and a 1 GiB upload (curl): throughput, ratios, peak RSS of the proxy;
- the same upload when the upstream refuses the token after reading it all (replay);
- idle RSS and time to ready of mdcloud-proxy; how busy the rest of the machine was.

Prints a table with the targets of issue 5 and writes everything to JSON (--json).
Ratios are what count: absolute figures depend on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import socket
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
GiB = 1 << 30
SMALL_PATH = "/v4/apikey/"
SMALL_BODY = (
    '{"paid_user":0,"limit_interval":"daily","limit_prevention":4000,"max_upload_file_size":140}'
)


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


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / TICK, sum(values) / TICK


def own_cpu() -> float:
    usage = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    return sum(u.ru_utime + u.ru_stime for u in usage)


@dataclass
class Bench:
    tmp: Path
    quick: bool
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    others: list[float] = field(default_factory=list)  # share of the machine used by others

    @property
    def seconds(self) -> int:
        return 2 if self.quick else 5

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
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(url, timeout=1) as resp,  # noqa: S310 - loopback
            ):
                if resp.status == 200:
                    return time.monotonic() - started
            time.sleep(0.005)
        raise SystemExit(f"{url} did not answer 200 within {timeout} s")

    def nginx(self, name: str, server: str) -> str:
        port = free_port()
        conf = self.tmp / f"{name}.conf"
        conf.write_text(
            f"""worker_processes 1;
daemon off;
pid {self.tmp}/{name}.pid;
error_log {self.tmp}/{name}.error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    client_max_body_size 0;
    client_body_temp_path {self.tmp}/{name}-body;
    proxy_temp_path {self.tmp}/{name}-proxy;
    server {{
        listen 127.0.0.1:{port};
{server}
    }}
}}
"""
        )
        self.start(["nginx", "-c", str(conf), "-e", f"{self.tmp}/{name}.error.log"])
        return f"http://127.0.0.1:{port}"

    def static_upstream(self) -> str:
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
        url = self.nginx(
            "upstream",
            f"""        location = {SMALL_PATH} {{
            default_type application/json;
            return 200 '{SMALL_BODY}';
        }}
        location = /big.bin {{ root {self.tmp}; }}""",
        )
        self.wait_http(url + SMALL_PATH)
        return url

    def nginx_proxy(self, upstream: str) -> tuple[str, subprocess.Popen[bytes]]:
        host = upstream.removeprefix("http://")
        url = self.nginx(
            "proxy",
            f"""        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer fixed-bench-token";
            proxy_request_buffering off;
            proxy_buffering off;
        }}
    }}
    upstream backend {{
        server {host};
        keepalive 64;""",
        )
        return url, self.procs[-1]

    def token_endpoint(self) -> str:
        port = free_port()
        self.start(
            [sys.executable, "-m", "proxy", "simulator", "--port", str(port),
             "--client-id", CLIENT_ID, "--client-secret", CLIENT_SECRET]
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                return url + "/v4/oauth2/token"
            time.sleep(0.01)
        raise SystemExit("the simulator did not start")

    def sink(self, *flags: str) -> str:
        port = free_port()
        self.start([sys.executable, str(ROOT / "bench" / "sink.py"), str(port), *flags])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                return f"http://127.0.0.1:{port}"
            time.sleep(0.01)
        raise SystemExit("the sink did not start")

    def mdcloud_proxy(
        self, upstream: str, token_url: str, workers: int = 1
    ) -> tuple[str, subprocess.Popen[bytes], float]:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MDCLOUD")}
        env.update(
            MDCLOUD_CLIENT_ID=CLIENT_ID,
            MDCLOUD_CLIENT_SECRET=CLIENT_SECRET,
            MDCLOUD_PROXY_UPSTREAM_URL=upstream,
            MDCLOUD_PROXY_OAUTH_TOKEN_URL=token_url,
            MDCLOUD_PROXY_LOG_LEVEL="WARNING",
            MDCLOUD_PROXY_LIMITS_MAX_BODY_SIZE="2GiB",  # the default 256 MiB refuses 1 GiB
        )
        cmd = [sys.executable, "-m", "proxy", "--port", str(port)]
        if workers != 1:
            cmd += ["--workers", str(workers)]
        proc = self.start(cmd, env)
        url = f"http://127.0.0.1:{port}"
        ready = self.wait_http(url + "/-/ready")
        return url, proc, ready

    # -- measurements ----------------------------------------------------------------------

    @contextlib.contextmanager
    def window(self, ours: list[int]) -> Iterator[dict[str, float]]:
        """Measures the CPU of ``ours`` over the block, and what the rest of the machine used."""
        out: dict[str, float] = {}
        busy0, total0 = machine_busy()
        mine0, self0 = cpu_seconds(ours), own_cpu()
        everyone = [p.pid for p in self.procs]
        all0 = cpu_seconds([q for p in everyone for q in family(p)])
        started = time.monotonic()
        yield out
        out["seconds"] = time.monotonic() - started
        out["cpu"] = cpu_seconds(ours) - mine0
        busy1, total1 = machine_busy()
        known = cpu_seconds([q for p in everyone for q in family(p)]) - all0 + own_cpu() - self0
        self.others.append(max(0.0, busy1 - busy0 - known) / max(total1 - total0, 1e-9))

    def wrk(self, url: str, connections: int, ours: list[int]) -> dict[str, float]:
        threads = min(2, connections)
        cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{self.seconds}s", "--latency", url]
        with self.window(ours) as out:
            text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        out["rps"] = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
        out["requests"] = out["rps"] * out["seconds"]
        for pct in ("50", "99"):
            value, unit = re.search(
                rf"^\s+{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s)", text, re.M
            ).groups()  # type: ignore[union-attr]
            out[f"p{pct}_ms"] = float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]
        out["cpu_per_10k"] = out["cpu"] / out["requests"] * 10_000
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", text)
        out["errors"] = 0.0 if errors is None else 1.0
        return out

    def curl(
        self, url: str, upload: Path | None, ours: list[int], watch: int | None
    ) -> dict[str, float]:
        if watch is not None:
            Path(f"/proc/{watch}/clear_refs").write_text("5")  # reset the peak RSS
        cmd = ["curl", "-s", "-o", "/dev/null", "-H", "Expect:", "--fail"]
        if upload is not None:
            cmd += ["-X", "POST", "-T", str(upload), "-w", "%{size_upload}"]
        else:
            cmd += ["-w", "%{size_download}"]
        with self.window(ours) as out:
            size = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
        assert int(float(size)) == self.big, (size, self.big)
        out["mib_per_s"] = self.big / out["seconds"] / (1 << 20)
        if watch is not None:
            out["peak_rss_mib"] = status_kib(watch, "VmHWM") / 1024
        return out


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 s runs and 256 MiB transfers")
    parser.add_argument("--workers", type=int, default=2, help="also measure with N workers")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results.json"))
    args = parser.parse_args()
    ensure_tools()
    with tempfile.TemporaryDirectory(prefix="mdcp-bench-") as tmp:
        os.chmod(tmp, 0o755)  # noqa: S103 - nginx workers drop root and must read the big file
        bench = Bench(Path(tmp), args.quick)
        try:
            run(bench, args.workers)
        finally:
            bench.stop_all()
    results = bench.results
    results["machine"] = {
        "cpus": os.cpu_count(),
        "others_cpu_share_max": round(max(bench.others), 3),
        "others_cpu_share_mean": round(sum(bench.others) / len(bench.others), 3),
    }
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    report(results, args.workers)
    print(f"\nwritten to {args.json}")
    return 0


def run(bench: Bench, workers: int) -> None:
    r = bench.results
    upstream = bench.static_upstream()
    token_url = bench.token_endpoint()
    nginx_url, nginx_proc = bench.nginx_proxy(upstream)
    bench.wait_http(nginx_url + SMALL_PATH)
    proxy_url, proxy_proc, ready = bench.mdcloud_proxy(upstream, token_url)
    time.sleep(1)
    r["mdcloud_proxy"] = {
        "ready_s": round(ready, 3),
        "idle_rss_mib": round(status_kib(proxy_proc.pid, "VmRSS") / 1024, 1),
    }
    nginx_pids, proxy_pids = family(nginx_proc.pid), [proxy_proc.pid]
    targets = {"direct": (upstream, []), "nginx": (nginx_url, nginx_pids),
               "mdcloud-proxy": (proxy_url, proxy_pids)}  # fmt: skip
    # Three rounds, the contenders taking turns, and the median of each: on a small shared
    # machine one run can be off by 20%, and which core each process lands on moves latency.
    runs: dict[str, dict[str, list[dict[str, float]]]] = {"small": {}, "latency": {}}
    for round_ in range(3):
        for name, (url, pids) in targets.items():
            print(f"small requests, round {round_ + 1}: {name}", flush=True)
            runs["small"].setdefault(name, []).append(bench.wrk(url + SMALL_PATH, 32, pids))
            runs["latency"].setdefault(name, []).append(bench.wrk(url + SMALL_PATH, 1, pids))
    for kind, key in (("small", "rps"), ("latency", "p50_ms")):
        for name, results in runs[kind].items():
            ordered = sorted(results, key=lambda run: run[key])
            median = ordered[1]
            median[f"runs_{key}"] = [round(run[key], 3) for run in results]  # type: ignore[assignment]
            r.setdefault(kind, {})[name] = median
    for name, (url, pids) in targets.items():
        print(f"1 GiB download: {name}", flush=True)
        watch = pids[0] if name == "mdcloud-proxy" else None
        r.setdefault("download", {})[name] = bench.curl(url + "/big.bin", None, pids, watch)
    bench.stop(proxy_proc)
    if workers > 1:
        url, proc, _ = bench.mdcloud_proxy(upstream, token_url, workers)
        name = f"mdcloud-proxy x{workers}"
        print(f"small requests: {name}", flush=True)
        r["small"][name] = bench.wrk(url + SMALL_PATH, 32, family(proc.pid))
        bench.stop(proc)
    bench.stop(nginx_proc)

    sink = bench.sink()
    nginx_url, nginx_proc = bench.nginx_proxy(sink)
    proxy_url, proxy_proc, _ = bench.mdcloud_proxy(sink, token_url)
    upload = bench.tmp / "big.bin"
    targets = {"direct": (sink, []), "nginx": (nginx_url, family(nginx_proc.pid)),
               "mdcloud-proxy": (proxy_url, [proxy_proc.pid])}  # fmt: skip
    for name, (url, pids) in targets.items():
        print(f"1 GiB upload: {name}", flush=True)
        watch = pids[0] if name == "mdcloud-proxy" else None
        r.setdefault("upload", {})[name] = bench.curl(url + "/v4/file", upload, pids, watch)
    bench.stop(proxy_proc)

    refusing = bench.sink("--refuse-first")
    proxy_url, proxy_proc, _ = bench.mdcloud_proxy(refusing, token_url)
    print("1 GiB upload, token refused after the upload: mdcloud-proxy replays", flush=True)
    r["upload"]["mdcloud-proxy replay"] = bench.curl(
        proxy_url + "/v4/file", upload, [proxy_proc.pid], proxy_proc.pid
    )


def report(r: dict[str, Any], workers: int) -> None:
    small, lat, down, up = r["small"], r["latency"], r["download"], r["upload"]
    who = ("direct", "nginx", "mdcloud-proxy")

    def share(data: dict[str, Any], key: str) -> float:
        return float(data["mdcloud-proxy"][key] / data["nginx"][key])

    nginx_cpu, proxy_cpu = small["nginx"]["cpu_per_10k"], small["mdcloud-proxy"]["cpu_per_10k"]
    rows: list[tuple[str, ...]] = [("measure", *who, "proxy/nginx", "proxy/direct")]
    rows.append(("req/s, 32 conns", *(f"{small[k]['rps']:.0f}" for k in who),
                 f"{share(small, 'rps'):.1%}", ""))  # fmt: skip
    rows.append(("CPU s / 10k req", "-", f"{nginx_cpu:.2f}", f"{proxy_cpu:.2f}",
                 f"{proxy_cpu / nginx_cpu:.1f}x", ""))  # fmt: skip
    for pct in ("p50_ms", "p99_ms"):
        rows.append((f"latency {pct[:3]} ms, 1 conn", *(f"{lat[k][pct]:.3f}" for k in who), "", ""))
    for label, data in (("download MiB/s", down), ("upload MiB/s", up)):
        direct = data["mdcloud-proxy"]["mib_per_s"] / data["direct"]["mib_per_s"]
        rows.append((label, *(f"{data[k]['mib_per_s']:.0f}" for k in who),
                     f"{share(data, 'mib_per_s'):.0%}", f"{direct:.0%}"))  # fmt: skip
    print()
    print(table(rows))
    added = lat["mdcloud-proxy"]["p50_ms"] - lat["direct"]["p50_ms"]
    nginx_added = lat["nginx"]["p50_ms"] - lat["direct"]["p50_ms"]
    replay = up["mdcloud-proxy replay"]
    md = r["mdcloud_proxy"]
    print(
        f"\nadded p50 latency: mdcloud-proxy {added:.3f} ms, nginx {nginx_added:.3f} ms"
        f"\nreplayed 1 GiB upload: {replay['mib_per_s']:.0f} MiB/s (the body goes up twice), "
        f"peak RSS {replay['peak_rss_mib']:.0f} MiB"
        f"\npeak RSS: download {down['mdcloud-proxy']['peak_rss_mib']:.0f} MiB, upload "
        f"{up['mdcloud-proxy']['peak_rss_mib']:.0f} MiB; idle {md['idle_rss_mib']:.0f} MiB; "
        f"ready {md['ready_s'] * 1000:.0f} ms after start"
        f"\nother processes used at most {r['machine']['others_cpu_share_max']:.0%} of the machine"
    )
    multi = small.get(f"mdcloud-proxy x{workers}")
    if multi is not None:
        ratio = multi["rps"] / small["nginx"]["rps"]
        print(f"{workers} workers: {multi['rps']:.0f} req/s ({ratio:.1%} of nginx)")
    checks = [
        ("req/s >= 10% of nginx", share(small, "rps") >= 0.10),
        ("CPU per request <= 12x nginx", proxy_cpu <= 12 * nginx_cpu),
        ("added p50 < 0.3 ms", added < 0.3),
        ("download >= 60% of nginx", share(down, "mib_per_s") >= 0.6),
        ("upload >= 60% of nginx", share(up, "mib_per_s") >= 0.6),
        ("peak RSS < 80 MiB (download, upload, replay)",
         max(down["mdcloud-proxy"]["peak_rss_mib"], up["mdcloud-proxy"]["peak_rss_mib"],
             replay["peak_rss_mib"]) < 80),
        ("idle RSS < 60 MiB", md["idle_rss_mib"] < 60),
        ("ready < 1 s", md["ready_s"] < 1),
    ]  # fmt: skip
    print()
    for text, ok in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {text}")


if __name__ == "__main__":
    sys.exit(main())
