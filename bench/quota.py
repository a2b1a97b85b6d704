#!/usr/bin/env python3
"""The quota guard: a realistic day of a SOC in a few seconds.

    python bench/quota.py            # --json PATH keeps it; --fleet 0: one process only

Eight tools (asyncio tasks, each with its own ClientSession) make 20,000 calls over 2,000
observables (hashes, IPs, domains, URLs): single lookups, 2% bulk hash lookups drawn from 50
alert batches, and 5% uploads drawn from 200 attachments. Everything repeats as in a SOC:
rank-based weights 1/rank^1.1, so a few things are everywhere and most are seen once or
twice. Every so often 4 tools send the same call at the same moment (one alert fanned out to
several analyzers). The upstream is a counting aiohttp app written here; it answers after
2-5 ms, so that requests in flight overlap. The same seeded workload runs twice through the
proxy (``python -m proxy``, its own process): with ``cache.enabled: false``, then with the
guard on (``cache.ttl`` and ``cache.miss_ttl`` 1 h, ``cache.uploads: true``). The ideal is
one upstream call per distinct lookup and per distinct upload; the waste is what the guard
sent beyond it.

Then the fleet (``--fleet 3``, the default; ``--fleet 0`` skips it): the same day over 3 proxy
processes with the guard's config plus ``cache.redis_url`` of one redis-server that the bench
starts (a free loopback port, no persistence) and stops. Each tool is bound to one replica,
tool i to replica i mod 3, as a tool is configured with one proxy URL (or keeps its
connection to one pod behind a Service); a burst of 4 tools then reaches 2 or 3 replicas at
the same moment. The ideal is the same; the fleet's waste is what it sent beyond it, each
upstream call beyond it is listed with the replicas and X-Cache-Status of its callers. Also the
replicas' ``mdcloud_proxy_redis_errors_total``, their CPU per request beside the single
process's, and the Redis commands per request (``INFO commandstats``). Every day run also says
how much of it some task of the machine waited for a CPU (/proc/pressure/cpu): on shared
cores a stall past ``cache.redis_timeout`` opens a replica's breaker, which ``--redis-timeout``
tells apart.

Then the proxy's CPU per cache miss and per cache hit, read from /proc/<pid>/stat.

Prints a table and PASS/FAIL for the targets: waste 0 (one process, and the fleet), and a hit
costing at most half the CPU of a miss. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import ipaddress
import itertools
import json
import os
import random
import re
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from yarl import URL

from proxy import Simulator, serve

ROOT = Path(__file__).resolve().parent.parent
CLIENT_ID, CLIENT_SECRET = "quota-client", "quota-secret"
OAUTH_PATH = "/v4/oauth2/token"
TICK = os.sysconf("SC_CLK_TCK")
KINDS = ("hash", "ip", "domain", "url")
ZIPF_S = 1.1
UPLOAD_SHARE, BULK_SHARE = 0.05, 0.02
BURST_SHARE, BURST_TOOLS = 0.02, 4  # share of steps that are bursts; tools in one burst
ATTACHMENTS, BATCHES = 200, 50
TTL = 3600.0  # longer than any run: the ideal is then one call per distinct request
RUN_TIMEOUT = 120.0
CPU_ROUNDS, CPU_WARMUP = 3, 300
FLEET = 3  # replicas of the fleet run, by default
REDIS_SERVER = "redis-server"
REDIS_ERRORS = re.compile(r'^mdcloud_proxy_redis_errors_total\{reason="(\w+)"\} (\S+)$', re.M)
WASTE_SHOWN, WASTE_KEPT = 8, 200  # wasted keys printed, and written to the JSON


@dataclass(frozen=True)
class Call:
    """One request a tool makes; ``kind`` is what the upstream counts it as.

    Every tool sends the same headers for the same call, so two calls are one upstream
    request, ideally, exactly when they are equal."""

    kind: str
    method: str
    path: str  # percent-encoded, sent as it is
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Step:
    """A call in one tool's day; the tools of one ``burst`` send it at the same moment."""

    call: Call
    burst: int | None = None


@dataclass(frozen=True)
class Plan:
    """The whole day: each tool's steps, in order."""

    tools: list[list[Step]]
    bursts: int
    burst_size: int

    def calls(self) -> Iterator[Call]:
        return (step.call for steps in self.tools for step in steps)


def zipf(n: int) -> list[float]:
    """Cumulative weights 1/rank^s for ranks 1..n (for ``random.choices``)."""
    return list(itertools.accumulate(1 / rank**ZIPF_S for rank in range(1, n + 1)))


def observable(kind: str, i: int, seed: int) -> Call:
    if kind == "hash":
        value = hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()
    elif kind == "ip":
        value = str(ipaddress.IPv4Address(0x0A000000 + i))
    elif kind == "domain":
        value = f"host-{i}.example.com"
    else:
        value = quote(f"http://site-{i}.example.net/login?id={i}", safe="")
    return Call(kind, "GET", f"/v4/{kind}/{value}")


def make_plan(calls: int, observables: int, tools: int, seed: int) -> Plan:
    """The seeded workload: the same arguments give the same day, call for call."""
    rng = random.Random(seed)
    lookups = [observable(KINDS[i % len(KINDS)], i, seed) for i in range(observables)]
    rng.shuffle(lookups)  # popularity is not tied to kind
    hashes = [call.path.rsplit("/", 1)[1] for call in lookups if call.kind == "hash"]
    json_type = (("Content-Type", "application/json"),)
    hash_weights = zipf(len(hashes))
    batches = []
    for _ in range(BATCHES):
        chosen = sorted(set(rng.choices(hashes, cum_weights=hash_weights, k=rng.randint(2, 8))))
        body = json.dumps({"hash": chosen}).encode()
        batches.append(Call("bulk", "POST", "/v4/hash", body, json_type))
    attachments = [
        Call(
            "upload", "POST", "/v4/file", rng.randbytes(rng.randint(1024, 32 * 1024)),
            (("Content-Type", "application/octet-stream"), ("filename", f"attachment-{j}.bin")),
        )
        for j in range(ATTACHMENTS)
    ]  # fmt: skip
    weights = {"lookup": zipf(len(lookups)), "bulk": zipf(BATCHES), "upload": zipf(ATTACHMENTS)}

    def draw() -> Call:
        share = rng.random()
        if share < UPLOAD_SHARE:
            return rng.choices(attachments, cum_weights=weights["upload"])[0]
        if share < UPLOAD_SHARE + BULK_SHARE:
            return rng.choices(batches, cum_weights=weights["bulk"])[0]
        return rng.choices(lookups, cum_weights=weights["lookup"])[0]

    steps: list[list[Step]] = [[] for _ in range(tools)]
    size = min(BURST_TOOLS, tools)
    made = bursts = turn = 0
    while made < calls:
        call = draw()
        if size > 1 and calls - made >= size and rng.random() < BURST_SHARE:
            for tool in rng.sample(range(tools), size):
                steps[tool].append(Step(call, bursts))
            bursts, made = bursts + 1, made + size
        else:
            steps[turn % tools].append(Step(call))
            turn, made = turn + 1, made + 1
    return Plan(steps, bursts, size)


def digest(method: str, path: str, body: bytes) -> bytes:
    return hashlib.sha256(f"{method} {path}\0".encode() + body).digest()


def not_found(method: str, path: str, body: bytes = b"") -> bool:
    """One hash in five is unknown to the upstream (404003), as in real traffic."""
    return path.startswith("/v4/hash/") and digest(method, path, body)[1] % 5 == 0


class Upstream:
    """MetaDefender's stand-in: small deterministic answers, counting requests by kind."""

    def __init__(self) -> None:
        self.kinds: Counter[str] = Counter()
        # Per request (method, raw path, body): the X-Request-Id of each upstream request
        # and when it arrived (monotonic), to tell which callers went upstream for it.
        self.asked: dict[bytes, list[tuple[str, float]]] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        method, path = request.method, request.raw_path
        if method == "POST":
            kind = "upload" if path == "/v4/file" else "bulk"
        else:
            kind = path.split("/")[2]
        self.kinds[kind] += 1
        key = digest(method, path, body)
        asked = (request.headers.get("X-Request-Id", ""), time.monotonic())
        self.asked.setdefault(key, []).append(asked)
        await asyncio.sleep((2 + key[0] % 4) / 1000)
        if kind == "upload":
            sha256 = hashlib.sha256(body).hexdigest()
            return web.json_response(
                {"data_id": key.hex()[:32], "status": "inqueue", "in_queue": 1,
                 "queue_priority": "normal", "sha256": sha256}
            )  # fmt: skip
        if not_found(method, path, body):
            error = {"code": 404003, "messages": ["The hash was not found"]}
            return web.json_response({"error": error}, status=404)
        verdict = ("No Threat Detected", "Suspicious", "Infected")[key[2] % 3]
        return web.json_response(
            {"lookup": kind, "value": path.rsplit("/", 1)[1], "verdict": verdict}
        )


@contextlib.asynccontextmanager
async def served(app: web.Application) -> AsyncIterator[str]:
    runner = await serve(app, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def wait_ready(session: aiohttp.ClientSession, base: str) -> None:
    async with asyncio.timeout(15):
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(base + "/-/ready") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.01)


@dataclass
class Proxy:
    """A ``python -m proxy`` child: its pid, URL, and what it said about Redis."""

    pid: int
    url: str
    redis_lines: list[str] = field(default_factory=list)


@dataclass
class Answered:
    """What the caller of one request saw (the fleet run keeps one per request)."""

    call: Call
    replica: int
    status: str  # X-Cache-Status ("(none)" without one), or the client error's name
    sent: float  # monotonic
    done: float


@dataclass
class Run:
    """What one pass of the workload saw."""

    upstream: Counter[str]  # requests that reached the upstream, by kind
    statuses: Counter[str]  # X-Cache-Status as the callers saw it
    answers: Counter[str]  # HTTP status, or the client error's name
    wall_s: float
    proxy_cpu_s: list[float]  # per replica
    requests: list[int]  # per replica
    started: float  # monotonic, for the times in ``callers``
    started_wall: float  # the same moment on the wall clock, to read the proxies' logs by
    asked: dict[bytes, list[tuple[str, float]]]  # the upstream's, by request
    callers: dict[str, Answered]  # by X-Request-Id
    metrics: list[str]  # each replica's /-/metrics page, at the end
    proxies: list[Proxy]
    cpu_waited: float | None  # share of the run some task waited for a CPU (Linux PSI)
    redis: dict[str, Any] | None = None


async def run_day(
    plan: Plan,
    token_url: str,
    *,
    guard: bool,
    redis: RedisServer | None = None,
    fleet: int = 1,
    redis_timeout: str | None = None,
) -> Run:
    """The whole plan through ``python -m proxy``, with the guard on or off; with ``redis``,
    through ``fleet`` of them sharing it, tool i bound to replica i mod ``fleet``."""
    upstream = Upstream()
    statuses: Counter[str] = Counter()
    answers: Counter[str] = Counter()
    callers: dict[str, Answered] = {}
    barriers = [asyncio.Barrier(plan.burst_size) for _ in range(plan.bursts)]
    replicas = 1 if redis is None else fleet
    requests = [0] * replicas
    async with contextlib.AsyncExitStack() as stack:
        upstream_url = await stack.enter_async_context(served(upstream.app()))
        redis_url = None if redis is None else redis.url
        proxies = [
            await stack.enter_async_context(
                child_proxy(
                    upstream_url,
                    token_url,
                    guard=guard,
                    redis_url=redis_url,
                    redis_timeout=redis_timeout,
                )
            )
            for _ in range(replicas)
        ]

        async def tool(number: int, steps: list[Step]) -> None:
            replica = number % replicas
            base = proxies[replica].url
            async with aiohttp.ClientSession() as session:
                for n, step in enumerate(steps):
                    if step.burst is not None:
                        await barriers[step.burst].wait()
                    call = step.call
                    url = URL(base + call.path, encoded=True)
                    # Not in the cache key: it tells the upstream which caller asked.
                    rid = f"r{replica}.t{number}.{n}"
                    headers = (*call.headers, ("X-Request-Id", rid))
                    requests[replica] += 1
                    sent = time.monotonic()
                    try:
                        async with session.request(
                            call.method, url, data=call.body, headers=headers
                        ) as resp:
                            await resp.read()
                    except aiohttp.ClientError as exc:
                        answers[type(exc).__name__] += 1
                        callers[rid] = Answered(
                            call, replica, type(exc).__name__, sent, time.monotonic()
                        )
                        continue
                    answers[str(resp.status)] += 1
                    cached = resp.headers.get("X-Cache-Status", "(none)")
                    statuses[cached] += 1
                    callers[rid] = Answered(call, replica, cached, sent, time.monotonic())

        pids = [proxy.pid for proxy in proxies]
        if redis is not None:
            redis_before = await redis.stats()
        pressure = cpu_pressure_us()
        started, started_wall = time.monotonic(), time.time()
        cpu = [cpu_seconds(pid) for pid in pids]
        async with asyncio.timeout(RUN_TIMEOUT), asyncio.TaskGroup() as group:
            for number, steps in enumerate(plan.tools):
                group.create_task(tool(number, steps))
        wall = time.monotonic() - started
        cpu = [cpu_seconds(pid) - before for pid, before in zip(pids, cpu, strict=True)]
        after = cpu_pressure_us()
        waited = None if pressure is None or after is None else (after - pressure) / 1e6 / wall
        redis_used = None if redis is None else redis.used(redis_before, await redis.stats())
        async with aiohttp.ClientSession() as probe:
            metrics = [await page(probe, proxy.url + "/-/metrics") for proxy in proxies]
    return Run(
        upstream.kinds, statuses, answers, wall, cpu, requests, started, started_wall,
        upstream.asked, callers, metrics, proxies, waited, redis_used,
    )  # fmt: skip


async def page(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url) as resp:
        return await resp.text()


def cpu_pressure_us() -> int | None:
    """Microseconds in which some task of this machine waited for a CPU (PSI), if known:
    how busy the shared cores were, beside the bench."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return int(some.rsplit("total=", 1)[1])
    return None


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime, all threads


@contextlib.asynccontextmanager
async def child_proxy(
    upstream_url: str,
    token_url: str,
    *,
    guard: bool,
    redis_url: str | None = None,
    redis_timeout: str | None = None,
) -> AsyncIterator[Proxy]:
    """``python -m proxy`` as its own process, ready (it has a token).

    Its own process, so that it has a core of its own as in real use, and so that its CPU
    time is its own (see ``measure_cpu``). With ``redis_url``, one replica of a fleet."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MDCLOUD")}
    env.update(
        MDCLOUD_CLIENT_ID=CLIENT_ID,
        MDCLOUD_CLIENT_SECRET=CLIENT_SECRET,
        MDCLOUD_PROXY_UPSTREAM_URL=upstream_url,
        MDCLOUD_PROXY_OAUTH_TOKEN_URL=token_url,
        MDCLOUD_PROXY_CACHE_ENABLED=str(guard).lower(),
        MDCLOUD_PROXY_CACHE_UPLOADS=str(guard).lower(),
        MDCLOUD_PROXY_CACHE_TTL=str(TTL),
        MDCLOUD_PROXY_CACHE_MISS_TTL=str(TTL),
    )
    if redis_url is not None:
        env["MDCLOUD_PROXY_CACHE_REDIS_URL"] = redis_url
    if redis_timeout is not None:
        env["MDCLOUD_PROXY_CACHE_REDIS_TIMEOUT"] = redis_timeout
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "--port", "0",
        env=env, cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    stderr = proc.stderr
    drain = None
    proxy = Proxy(proc.pid, "")
    try:
        async with asyncio.timeout(15):
            while True:
                line = await stderr.readline()
                if not line:
                    raise SystemExit("python -m proxy ended before it served")
                match = re.search(rb"listening on (http://\S+),", line)
                if match is not None:
                    break

        async def drain_stderr() -> None:
            # Kept: what the proxy says about Redis (an outage is one warning, not many).
            while line := await stderr.readline():
                if b"Redis" in line and len(proxy.redis_lines) < 50:
                    proxy.redis_lines.append(line.decode(errors="replace").rstrip())

        drain = asyncio.create_task(drain_stderr())
        proxy.url = match.group(1).decode()
        async with aiohttp.ClientSession() as probe:
            await wait_ready(probe, proxy.url)
        yield proxy
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()
        if drain is not None:
            await drain


def read(*path: str) -> str:
    return Path(*path).read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class RedisServer:
    """The fleet's redis-server (see ``redis_server``) and a client of the bench's own."""

    pid: int
    url: str
    client: Redis

    async def stats(self) -> dict[str, Any]:
        stats, commands = await self.client.info("stats"), await self.client.info("commandstats")
        return {
            "commands": int(stats["total_commands_processed"]),
            "by_command": {
                name.removeprefix("cmdstat_"): int(figures["calls"])
                for name, figures in commands.items()
            },
            "cpu_s": cpu_seconds(self.pid),
        }

    @staticmethod
    def used(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
        """What Redis did between two ``stats()`` (the bench's own INFO calls included: 2)."""
        by_command = {
            name: calls - before["by_command"].get(name, 0)
            for name, calls in sorted(after["by_command"].items())
        }
        return {
            "commands": after["commands"] - before["commands"],
            "by_command": {name: calls for name, calls in by_command.items() if calls},
            "cpu_s": round(after["cpu_s"] - before["cpu_s"], 2),
        }


@contextlib.asynccontextmanager
async def redis_server() -> AsyncIterator[RedisServer]:
    """A redis-server on a free loopback port, without persistence, for the fleet run."""
    with tempfile.TemporaryDirectory(prefix="quota-redis-") as folder:
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", folder, "--logfile", f"{folder}/redis.log",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        url = f"redis://127.0.0.1:{port}/0"
        client = Redis.from_url(url, socket_timeout=5)
        try:
            async with asyncio.timeout(10):
                while True:
                    if proc.returncode is not None:
                        raise SystemExit(
                            f"redis-server ended before it served:\n{read(folder, 'redis.log')}"
                        )
                    with contextlib.suppress(RedisConnectionError):
                        if await client.ping():
                            break
                    await asyncio.sleep(0.02)
            yield RedisServer(proc.pid, url, client)
        finally:
            await client.aclose()
            if proc.returncode is None:
                proc.terminate()
            await proc.wait()


async def cpu_phase(
    session: aiohttp.ClientSession, base: str, paths: list[str], concurrency: int, pid: int
) -> tuple[float, Counter[str]]:
    """Send every GET in ``paths`` over ``concurrency`` connections: the proxy's CPU seconds
    meanwhile, and the X-Cache-Status of the answers."""
    statuses: Counter[str] = Counter()
    todo = iter(paths)

    async def worker() -> None:
        for path in todo:  # shared: each path is sent once
            async with session.get(URL(base + path, encoded=True)) as resp:
                await resp.read()
                statuses[resp.headers.get("X-Cache-Status", "(none)")] += 1

    before = cpu_seconds(pid)
    async with asyncio.timeout(RUN_TIMEOUT), asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(worker())
    return cpu_seconds(pid) - before, statuses


async def measure_cpu(requests: int, concurrency: int, token_url: str) -> dict[str, Any]:
    """The proxy's CPU per miss (distinct keys) and per hit (one warm key).

    The proxy runs as its own process and its CPU comes from /proc/<pid>/stat: that counts
    the proxy and nothing else. Timing this process with ``time.process_time()`` would mix
    in the client and the upstream, and subtracting a direct run would also subtract the
    cost of an HTTP server, which a hit does pay. Misses and hits take turns, and the
    median of the rounds counts: other work on a small shared machine moves single rounds.
    """
    upstream = Upstream()

    def hashes(prefix: str, n: int) -> list[str]:
        return [
            f"/v4/hash/{hashlib.sha256(f'{prefix}:{i}'.encode()).hexdigest()}" for i in range(n)
        ]

    async with (
        served(upstream.app()) as upstream_url,
        child_proxy(upstream_url, token_url, guard=True) as proxy,
        aiohttp.ClientSession() as session,
    ):
        pid, base = proxy.pid, proxy.url
        warm = hashes("warm", CPU_WARMUP)
        hot = next(path for path in warm if not not_found("GET", path))  # a 200, not a 404
        await cpu_phase(session, base, [*warm, *[hot] * CPU_WARMUP], concurrency, pid)
        miss, hit = [], []
        seen: Counter[str] = Counter()
        for round_ in range(CPU_ROUNDS):
            spent, statuses = await cpu_phase(
                session, base, hashes(f"miss-{round_}", requests), concurrency, pid
            )
            miss.append(spent / requests)
            seen.update({f"miss phase {k}": v for k, v in statuses.items()})
            spent, statuses = await cpu_phase(session, base, [hot] * requests, concurrency, pid)
            hit.append(spent / requests)
            seen.update({f"hit phase {k}": v for k, v in statuses.items()})
    miss_ms, hit_ms = statistics.median(miss) * 1000, statistics.median(hit) * 1000
    return {
        "method": "proxy as its own process, utime+stime from /proc/<pid>/stat",
        "requests_per_phase": requests,
        "rounds": CPU_ROUNDS,
        "miss_ms": miss_ms,
        "hit_ms": hit_ms,
        "hit_over_miss": hit_ms / miss_ms if miss_ms else float("inf"),
        "miss_ms_rounds": [round(v * 1000, 4) for v in miss],
        "hit_ms_rounds": [round(v * 1000, 4) for v in hit],
        "statuses": dict(seen),
        "clean": seen["miss phase MISS"] == seen["hit phase HIT"] == requests * CPU_ROUNDS,
    }


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def report(results: dict[str, Any]) -> bool:
    """Print the figures and the targets; whether every target was met."""
    work, off, on = results["workload"], results["without_guard"], results["with_guard"]
    ideal, cpu = results["ideal"], results["cpu"]
    print(
        f"\n{work['calls']} calls by {work['tools']} tools over {work['observables']} observables"
        f" (seed {work['seed']}): {work['bursts']} bursts of {work['burst_size']} tools"
    )
    rows: list[tuple[str, ...]] = [("upstream calls", "calls", "without guard", "with guard",
                                    "ideal", "waste")]  # fmt: skip
    for kind in (*KINDS, "bulk", "upload", "total"):
        with_, best = on["upstream"].get(kind, 0), ideal.get(kind, 0)
        rows.append((kind, str(work["by_kind"].get(kind, 0)), str(off["upstream"].get(kind, 0)),
                     str(with_), str(best), str(with_ - best)))  # fmt: skip
    print(table(rows))
    print()
    names = sorted(set(off["statuses"]) | set(on["statuses"]))
    rows = [("X-Cache-Status", *names)]
    for label, run in (("without guard", off), ("with guard", on)):
        rows.append((label, *(str(run["statuses"].get(name, 0)) for name in names)))
    print(table(rows))
    for label, run in (("without guard", off), ("with guard", on)):
        answers = ", ".join(f"{k}: {v}" for k, v in sorted(run["answers"].items()))
        print(
            f"{label}: {run['wall_s']:.2f} s wall, proxy CPU {run['proxy_cpu_s']:.2f} s"
            f" ({answers}){waited(run)}"
        )
    print(
        f"\nproxy CPU per request ({cpu['method']}, median of {cpu['rounds']} rounds of "
        f"{cpu['requests_per_phase']}):\n  miss {cpu['miss_ms']:.3f} ms,"
        f" hit {cpu['hit_ms']:.3f} ms, hit/miss {cpu['hit_over_miss']:.2f}"
        f"  (rounds: miss {cpu['miss_ms_rounds']}, hit {cpu['hit_ms_rounds']})"
    )
    fleet = results.get("fleet")
    if fleet is not None:
        report_fleet(fleet, on, ideal)
    runs = (off, on) if fleet is None else (off, on, fleet)
    answered = (
        all(set(run["answers"]) <= {"200", "404"} for run in runs)
        and off["upstream"]["total"] == work["calls"]
    )
    checks = [
        ("with the guard, upstream calls = ideal (waste 0)",
         on["upstream"]["total"] == ideal["total"]),
        ("hit CPU <= half of miss CPU (and every miss a MISS, every hit a HIT)",
         cpu["clean"] and cpu["hit_over_miss"] <= 0.5),
        ("every call answered 200/404; without the guard each reached the upstream", answered),
    ]  # fmt: skip
    if fleet is not None:
        checks.insert(1, (
            f"a fleet of {fleet['replicas']} over one Redis: upstream calls = ideal "
            "(waste 0, as with one process)",
            fleet["upstream"]["total"] == ideal["total"],
        ))  # fmt: skip
    print()
    for text, ok in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {text}")
    return all(ok for _, ok in checks)


def report_fleet(fleet: dict[str, Any], single: dict[str, Any], ideal: dict[str, Any]) -> None:
    n = fleet["replicas"]
    print(
        f"\nthe fleet: {n} replicas, one Redis ({fleet['binding']}; "
        f"requests per replica {fleet['requests']}; redis_timeout {fleet['redis_timeout']})"
    )
    rows: list[tuple[str, ...]] = [("upstream calls", "one process", "fleet", "ideal", "waste")]
    for kind in (*KINDS, "bulk", "upload", "total"):
        got, best = fleet["upstream"].get(kind, 0), ideal.get(kind, 0)
        rows.append((kind, str(single["upstream"].get(kind, 0)), str(got), str(best),
                     str(got - best)))  # fmt: skip
    print(table(rows))
    print()
    names = sorted({name for counts in fleet["statuses_by_replica"] for name in counts})
    rows = [("X-Cache-Status", *names)]
    for i, counts in enumerate(fleet["statuses_by_replica"]):
        rows.append((f"replica {i}", *(str(counts.get(name, 0)) for name in names)))
    rows.append(("fleet", *(str(fleet["statuses"].get(name, 0)) for name in names)))
    print(table(rows))
    answers = ", ".join(f"{k}: {v}" for k, v in sorted(fleet["answers"].items()))
    cpu = " + ".join(f"{v:.2f}" for v in fleet["proxy_cpu_s"])
    print(f"fleet: {fleet['wall_s']:.2f} s wall, replicas' CPU {cpu} s ({answers}){waited(fleet)}")
    print(
        f"CPU per request: replicas {fleet['cpu_ms_per_request']:.3f} ms"
        f" (+ redis-server {fleet['redis_cpu_ms_per_request']:.3f} ms),"
        f" one process {single['cpu_ms_per_request']:.3f} ms"
    )
    redis = fleet["redis"]
    top = ", ".join(
        f"{name} {calls}"
        for name, calls in sorted(redis["by_command"].items(), key=lambda kv: -kv[1])
    )
    print(
        f"Redis: {redis['commands']} commands, {redis['commands_per_request']:.2f} per request"
        f" ({top})"
    )
    errors = "; ".join(
        f"replica {i}: " + (", ".join(f"{k} {v:g}" for k, v in counts.items() if v) or "none")
        for i, counts in enumerate(fleet["redis_errors"])
    )
    print(f"mdcloud_proxy_redis_errors_total: {errors}")
    for i, lines in enumerate(fleet["redis_log"]):
        for line in lines[:3]:
            print(f"  replica {i} said: {line}")
    wasted = fleet["wasted"]
    if wasted:
        print(f"\nlookups that went upstream more than once: {fleet['wasted_keys']} (first shown)")
        for item in wasted[:WASTE_SHOWN]:
            asked = ", ".join(
                f"{u['by']} (caller saw {u['caller_saw']}) at {u['at_ms']:.1f} ms"
                for u in item["upstream_requests"]
            )
            callers = ", ".join(f"{k}: {v}" for k, v in sorted(item["callers"].items()))
            print(f"  {item['request']}\n    upstream: {asked}\n    callers: {callers}")


def waited(run: dict[str, Any]) -> str:
    share = run.get("cpu_waited")
    return "" if share is None else f"; some task waited for a CPU {share:.0%} of it"


def wasted(run: Run) -> list[dict[str, Any]]:
    """Each request the upstream got more than once: which callers' requests went upstream,
    what they saw, and what every caller of it saw (replica, X-Cache-Status)."""
    by_key: dict[bytes, list[tuple[str, Answered]]] = {}
    for rid, answered in run.callers.items():
        call = answered.call
        key = digest(call.method, call.path, call.body or b"")
        by_key.setdefault(key, []).append((rid, answered))

    def ms(at: float) -> float:
        return round((at - run.started) * 1000, 1)

    found: list[dict[str, Any]] = []
    for key, asked in run.asked.items():
        if len(asked) < 2:
            continue
        callers = sorted(by_key.get(key, []), key=lambda pair: pair[1].sent)
        call = callers[0][1].call
        who = dict(callers)
        found.append({
            "kind": call.kind,
            "request": f"{call.method} {call.path[:72]}",
            "upstream_requests": [
                {"by": rid, "at_ms": ms(at),
                 "caller_saw": who[rid].status if rid in who else "(unknown)",
                 "caller_done_ms": ms(who[rid].done) if rid in who else None}
                for rid, at in sorted(asked, key=lambda pair: pair[1])
            ],
            "callers": dict(Counter(f"r{a.replica} {a.status}" for _, a in callers)),
            "caller_times_ms": [(rid, a.status, ms(a.sent), ms(a.done)) for rid, a in callers],
        })  # fmt: skip
    found.sort(key=lambda item: item["upstream_requests"][0]["at_ms"])
    return found


def redis_errors(metrics: str) -> dict[str, float]:
    return {reason: float(value) for reason, value in REDIS_ERRORS.findall(metrics)}


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    plan = make_plan(args.calls, args.observables, args.tools, args.seed)
    calls = list(plan.calls())
    ideal = Counter(call.kind for call in set(calls))
    ideal["total"] = sum(ideal.values())
    by_kind = Counter(call.kind for call in calls)
    by_kind["total"] = len(calls)
    results: dict[str, Any] = {
        "workload": {
            "calls": len(calls), "tools": args.tools, "observables": args.observables,
            "seed": args.seed, "bursts": plan.bursts, "burst_size": plan.burst_size,
            "by_kind": dict(by_kind),
        },
        "ideal": dict(ideal),
        "load_average_before": os.getloadavg(),
    }  # fmt: skip
    async with served(Simulator(CLIENT_ID, CLIENT_SECRET).app()) as sim_url:
        token_url = sim_url + OAUTH_PATH
        for name, guard in (("without_guard", False), ("with_guard", True)):
            print(f"the day {name.replace('_', ' ')}...", flush=True)
            run = await run_day(plan, token_url, guard=guard)
            run.upstream["total"] = sum(run.upstream.values())
            results[name] = {
                "upstream": dict(run.upstream),
                "waste": run.upstream["total"] - ideal["total"],
                "statuses": dict(run.statuses),
                "answers": dict(run.answers),
                "wall_s": round(run.wall_s, 3),
                "proxy_cpu_s": round(run.proxy_cpu_s[0], 2),
                "cpu_ms_per_request": run.proxy_cpu_s[0] / len(calls) * 1000,
                "cpu_waited": run.cpu_waited,
            }
        if args.fleet:
            print(f"the day over a fleet of {args.fleet} and one Redis...", flush=True)
            async with redis_server() as redis:
                run = await run_day(
                    plan, token_url, guard=True, redis=redis, fleet=args.fleet,
                    redis_timeout=args.redis_timeout,
                )  # fmt: skip
            results["fleet"] = fleet_results(run, args, len(calls), ideal["total"])
        print("proxy CPU per miss and per hit...", flush=True)
        results["cpu"] = await measure_cpu(args.cpu_requests, args.tools, token_url)
    results["load_average_after"] = os.getloadavg()
    return results


def fleet_results(run: Run, args: argparse.Namespace, calls: int, ideal: int) -> dict[str, Any]:
    run.upstream["total"] = sum(run.upstream.values())
    assert run.redis is not None
    by_replica: list[Counter[str]] = [Counter() for _ in range(args.fleet)]
    for answered in run.callers.values():
        by_replica[answered.replica][answered.status] += 1
    found = wasted(run)
    return {
        "replicas": args.fleet,
        "binding": f"tool i -> replica i mod {args.fleet}",
        "redis_timeout": args.redis_timeout or "the proxy's default (50ms)",
        "tools_per_replica": [len(range(i, args.tools, args.fleet)) for i in range(args.fleet)],
        "requests": run.requests,
        "upstream": dict(run.upstream),
        "waste": run.upstream["total"] - ideal,
        "statuses": dict(run.statuses),
        "statuses_by_replica": [dict(counts) for counts in by_replica],
        "answers": dict(run.answers),
        "wall_s": round(run.wall_s, 3),
        "started_wall": run.started_wall,  # the times in "wasted" are ms after it
        "cpu_waited": run.cpu_waited,
        "proxy_cpu_s": [round(cpu, 2) for cpu in run.proxy_cpu_s],
        "cpu_ms_per_request": sum(run.proxy_cpu_s) / calls * 1000,
        "redis_cpu_ms_per_request": run.redis["cpu_s"] / calls * 1000,
        "redis": {**run.redis, "commands_per_request": run.redis["commands"] / calls},
        "redis_errors": [redis_errors(metrics) for metrics in run.metrics],
        "redis_log": [proxy.redis_lines for proxy in run.proxies],
        "wasted_keys": len(found),
        "wasted": found[:WASTE_KEPT],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000, help="calls in the whole day")
    parser.add_argument("--observables", type=int, default=2_000, help="distinct observables")
    parser.add_argument("--tools", type=int, default=8, help="concurrent tools")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cpu-requests", type=int, default=1_000, help="requests per CPU phase")
    parser.add_argument(
        "--fleet", type=int, default=FLEET, metavar="N",
        help=f"also the day over N replicas and one Redis (default {FLEET}; 0: not)",
    )  # fmt: skip
    parser.add_argument(
        "--redis-timeout", metavar="DURATION",
        help="the fleet's cache.redis_timeout (default: the proxy's, 50ms)",
    )  # fmt: skip
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH")
    args = parser.parse_args()
    if args.calls < 1 or args.observables < len(KINDS) or args.tools < 1 or args.cpu_requests < 1:
        parser.error("--calls, --tools, --cpu-requests >= 1 and --observables >= 4")
    if args.fleet < 0:
        parser.error("--fleet >= 0")
    if args.fleet and shutil.which(REDIS_SERVER) is None:
        raise SystemExit(
            f"missing {REDIS_SERVER} for the fleet run: apt-get install redis-server"
            " (or --fleet 0 to skip it)"
        )
    results = asyncio.run(bench(args))
    ok = report(results)
    results["pass"] = ok
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwritten to {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
