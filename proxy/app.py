"""Wiring: ``create_app(config)`` builds the application; ``serve`` runs it, ``drain`` stops it.

The main listener hands every request to the app's ``Pipeline`` (proxy/pipeline.py), which
owns the order of steps; the app's router answers only the proxy's own ``/-/`` endpoints.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from .cache import LookupCache
from .config import Config
from .errors import error_response
from .forward import Forwarder
from .inbound import InboundGuard
from .listener import (
    ENTRY,
    LISTEN_LIMITS,
    Entry,
    Limits,
    Runner,
    default_max_connections,
    stop_keeping_alive,
    under_way,
    wait_answered,
)
from .logs import HTTP_LOG
from .observe import Metrics, Traffic, readiness
from .pipeline import Pipeline
from .quota import QuotaWatch
from .route import Route
from .shared import SharedStore
from .status import page, status
from .tls import client_context
from .tokens import ClientCredentials, TokenCache

__all__ = [
    "FORWARDER",
    "METRICS",
    "QUOTA",
    "TOKENS",
    "TRAFFIC",
    "client_session",
    "create_admin_app",
    "create_app",
    "drain",
    "outbound_route",
    "serve",
]

log = logging.getLogger("mdcloud_proxy")

FORWARDER = web.AppKey("forwarder", Forwarder)
TOKENS = web.AppKey("tokens", TokenCache)
METRICS = web.AppKey("metrics", Metrics)
TRAFFIC = web.AppKey("traffic", Traffic)
QUOTA = web.AppKey("quota", QuotaWatch)
GUARD = web.AppKey("guard", LookupCache)
SHARED = web.AppKey("shared", SharedStore)
STARTED = web.AppKey("started", float)

# Not '.*': routes match the decoded path, and '.' would not match an encoded newline (%0A).
ANY_PATH = r"{tail:[\s\S]*}"

# One token fetch at a time (single-flight), and the odd `check` beside it.
TOKEN_CONNECTIONS = 2
# Descriptors kept out of listen.max_connections' default: the process's own files, logs,
# the admin listener, the token endpoint.
RESERVED_FILES = 64
ADMIN_CONNECTIONS = 64

# aiohttp defaults that would change what the caller sent or asked for.
_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
_SKIPPED: CIMultiDict[None] = CIMultiDict((name, None) for name in _SKIP_AUTO_HEADERS)


class _AsGiven(aiohttp.ClientRequest):
    """A client request that adds none of aiohttp's automatic headers (``_SKIP_AUTO_HEADERS``).

    The session's ``skip_auto_headers`` says the same, but aiohttp then copies each request's
    headers to check them against it: about 3% of a small request's CPU (bench/).
    """

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        self._skip_auto_headers = _SKIPPED  # still read when a body's Content-Type is set


def outbound_route(config: Config) -> Route:
    """How the proxy reaches the upstream and the token endpoint (direct, or which proxy)."""
    return Route(config.proxy, config.proxy_from_file, dict(config.proxy_environment))


def shared_store(
    config: Config, metrics: Metrics, clock: Callable[[], float]
) -> SharedStore | None:
    """The fleet's store in Redis, if ``cache.redis_url`` is set."""
    if config.redis_url is None:
        return None
    # Replicas of one account share state; nothing in a key or value gives a secret away:
    # keys hold digests, and values are sealed with a key derived from the client secret.
    account = _digest(config.token_url, config.client_id, config.api_key or "")[:32]
    seal_key = hmac.digest(config.client_secret.encode(), b"mdcloud-proxy redis seal", "sha256")
    return SharedStore(
        config.redis_url,
        prefix=config.redis_prefix,
        account=account,
        seal_key=seal_key,
        timeout=config.redis_timeout,
        lock_timeout=config.lock_timeout,
        metrics=metrics,
        clock=clock,
    )


def _digest(*parts: str) -> str:
    """Who the upstream sees, as a digest: parts joined by NULs, which none of them holds."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def client_session(
    config: Config, tls: ssl.SSLContext | bool, *, for_tokens: bool = False
) -> aiohttp.ClientSession:
    """A client session that passes requests and answers on as they are.

    The token endpoint gets a session of its own (``for_tokens``), so that a pool full of
    long transfers never makes a token fetch wait, and a bound on the whole exchange.
    """
    return aiohttp.ClientSession(
        # Requests past the limit wait for a connection, instead of running out of descriptors.
        connector=aiohttp.TCPConnector(
            ssl=tls, limit=TOKEN_CONNECTIONS if for_tokens else config.upstream_max_connections
        ),
        # No total timeout for the API: it would cut long uploads and downloads; each read
        # is bounded instead. A token answer is small: its whole exchange is bounded too.
        timeout=aiohttp.ClientTimeout(
            total=config.connect_timeout + config.read_timeout if for_tokens else None,
            sock_connect=config.connect_timeout,
            sock_read=config.read_timeout,
        ),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),  # one jar would mix the cookies of all callers
        skip_auto_headers=_SKIP_AUTO_HEADERS,
        request_class=_AsGiven,
        # The environment's proxy settings are applied by Route, CIDR ranges in NO_PROXY
        # included; nothing else from the environment (.netrc) is wanted.
        trust_env=False,
    )


def _ops_routes(
    app: web.Application, clock: Callable[[], float], *, metrics: bool
) -> list[web.RouteDef]:
    """The reserved ``/-/`` endpoints of ``app``; they are answered here, never forwarded."""

    async def healthy(_request: web.Request) -> web.Response:
        return web.json_response({"status": "healthy"})

    async def ready(_request: web.Request) -> web.Response:
        return readiness(app[TOKENS], app[TRAFFIC], clock)

    async def render(_request: web.Request) -> web.Response:
        return app[METRICS].render()

    def state() -> dict[str, Any]:
        return status(
            tokens=app[TOKENS],
            quota=app[QUOTA],
            cache=app.get(GUARD),
            shared=app.get(SHARED),
            metrics=app[METRICS],
            started=app[STARTED],
            clock=clock,
        )

    async def at_a_glance(_request: web.Request) -> web.Response:
        return web.json_response(state())

    async def glance_page(_request: web.Request) -> web.Response:
        return page(state())

    async def unknown(request: web.Request) -> web.Response:
        return error_response(
            404, 404020, f"{request.path} is not an endpoint of the proxy (/-/ is reserved)"
        )

    routes = [
        web.get("/-/healthy", healthy),
        web.get("/-/ready", ready),
        web.get("/-/status", at_a_glance),
        web.get("/-/", glance_page),
    ]
    if metrics:
        routes.append(web.get("/-/metrics", render))
    return [*routes, web.route("*", "/-/" + ANY_PATH, unknown)]


def create_app(
    config: Config,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> web.Application:
    """The proxy as an aiohttp application; its client session lives as long as the app.

    The first token is fetched in the background, so the app serves at once; ``/-/ready``
    says when it has a token.
    """
    metrics, traffic = Metrics(), Traffic()

    inbound = InboundGuard(
        config.allowed_networks,
        config.inbound_keys,
        refused=lambda reason: metrics.inbound_refusals.labels(reason).inc(),
    )

    app = web.Application()
    app[METRICS], app[TRAFFIC], app[STARTED] = metrics, traffic, clock()
    # Each connection may also hold an upstream connection (up to the pool's limit) and a
    # spill file: half of what is left after the pool and a reserve.
    reserve = config.upstream_max_connections + RESERVED_FILES
    app[LISTEN_LIMITS] = Limits(
        header_timeout=config.header_timeout,
        body_timeout=config.body_timeout,
        idle_timeout=config.idle_timeout,
        max_connections=config.max_connections or default_max_connections(reserve),
        closed=lambda reason: metrics.connections_closed.labels(reason).inc(),
    )
    tls = client_context(config.ca_file)
    route = outbound_route(config)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        session = client_session(config, tls)
        token_session = client_session(config, tls, for_tokens=True)
        credentials = ClientCredentials(
            token_session,
            config.token_url,
            config.client_id,
            config.client_secret,
            tls,
            clock,
            route,
        )
        tokens = TokenCache(
            metrics.counting(credentials.fetch),
            identity=(config.token_url, config.client_id),
            refresh_margin=config.refresh_margin,
            clock=clock,
            sleep=sleep,
        )
        metrics.watch(traffic, lambda: tokens.current, clock)
        app[TOKENS] = tokens
        quota = app[QUOTA] = QuotaWatch(metrics, max_wait=config.throttle_max_wait, clock=clock)
        shared = shared_store(config, metrics, clock)
        if shared is not None:
            app[SHARED] = shared
            quota.on_window = shared.tell_window
            log.info(
                "the quota guard is shared through Redis at %s (keys %s...)",
                shared.address,
                config.redis_prefix,
            )
        app[FORWARDER] = Forwarder(
            session=session,
            tokens=tokens,
            metrics=metrics,
            upstream_url=config.upstream_url,
            api_key=config.api_key,
            max_body_size=config.max_body_size,
            replay_memory_limit=config.replay_memory_limit,
            replay_memory_total=config.replay_memory_total,
            quota=quota,
            ssl=tls,
            route=route,
            clock=clock,
            sleep=sleep,
        )
        metrics.body_memory.set_function(lambda: app[FORWARDER].budget.used)
        cache = None
        if config.cache_enabled:
            cache = LookupCache(
                forwarder=app[FORWARDER],
                metrics=metrics,
                identity=_digest(config.token_url, config.client_id),
                api_key=config.api_key,
                ttl=config.cache_ttl,
                miss_ttl=config.cache_miss_ttl,
                stale_ttl=config.cache_stale_ttl,
                max_size=config.cache_max_size,
                max_entry_size=config.cache_max_entry_size,
                uploads=config.cache_uploads,
                upload_ttl=config.cache_upload_ttl,
                shared=shared,
                clock=clock,
            )
        if cache is not None:
            app[GUARD] = cache
        pipeline: Entry = Pipeline(
            inbound=inbound,
            forwarder=app[FORWARDER],
            cache=cache,
            metrics=metrics,
            traffic=traffic,
            max_body_size=config.max_body_size,
        )
        app[ENTRY] = pipeline
        keepers = [asyncio.create_task(tokens.keep_fresh())]
        if shared is not None:
            await shared.warm_up()
            keepers.append(asyncio.create_task(shared.keep_in_step(quota)))
        yield
        for keeper in keepers:
            keeper.cancel()
        await asyncio.gather(*keepers, return_exceptions=True)
        if cache is not None:
            await cache.close()
        if shared is not None:
            await shared.close()
        await tokens.close()
        await session.close()
        await token_session.close()

    app.cleanup_ctx.append(lifecycle)
    app.add_routes(_ops_routes(app, clock, metrics=config.admin_port is None))
    return app


def create_admin_app(
    app: web.Application, *, clock: Callable[[], float] = time.monotonic
) -> web.Application:
    """A separate listener's app with the ``/-/`` endpoints of ``app``, metrics included."""
    admin = web.Application()
    # The main listener's deadlines, and a cap of its own: probes and scrapes are few.
    admin[LISTEN_LIMITS] = dataclasses.replace(
        app[LISTEN_LIMITS], max_connections=ADMIN_CONNECTIONS
    )
    admin.add_routes(_ops_routes(app, clock, metrics=True))
    return admin


async def serve(
    app: web.Application,
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    reuse_port: bool = False,
) -> web.AppRunner:
    """Start ``app`` on host:port with the settings a proxy needs; ``runner.addresses`` says
    where it listens, ``runner.cleanup()`` stops it. ``reuse_port`` lets several processes
    listen on the port (workers); off otherwise, so that no other process can join in.
    Connections keep the app's ``LISTEN_LIMITS`` (or the defaults)."""
    runner = Runner(
        app,
        # What is left after drain() has waited is cut off soon; drain() does the waiting.
        shutdown_timeout=1.0,
        handler_cancellation=True,  # a caller that hangs up cancels its upstream request
        auto_decompress=False,  # bodies are opaque bytes, passed on as sent
        access_log=None,
        logger=HTTP_LOG,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_port=reuse_port)
        await site.start()
    except BaseException:
        await runner.cleanup()  # closes the client session the app opened on start-up
        raise
    return runner


async def drain(runner: web.AppRunner, grace: float) -> None:
    """Stop the proxy gently: stop accepting connections, let requests in flight finish (an
    upload keeps streaming) for up to ``grace`` seconds, then close everything.

    aiohttp's own shutdown stops reading request bodies at once (aio-libs/aiohttp#2298), which
    would stall an upload in flight; so the listening sockets are closed first and the
    remaining requests are awaited before aiohttp's shutdown runs.
    """
    runner.app[TRAFFIC].draining = True
    for site in list(runner.sites):
        await site.stop()
    # One turn of the loop first, as aiohttp's own cleanup does: a request already in an idle
    # connection's socket is read then, and not mistaken for idleness.
    await asyncio.sleep(0)
    stop_keeping_alive(runner)
    # Counted by the connections, not by the handlers: aiohttp starts a handler a moment
    # after it parsed the request, and a request parsed just before the signal still counts.
    if waiting := under_way(runner):
        log.info("stopping: waiting up to %.0f s for %d request(s)", grace, waiting)
    try:
        async with asyncio.timeout(grace):
            await wait_answered(runner)
    except TimeoutError:
        log.warning("stopping: cutting off %d request(s) still in flight", under_way(runner))
    await runner.cleanup()
