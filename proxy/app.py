"""Wiring: ``create_app(config)`` builds the application; ``serve`` runs it on a socket."""

from __future__ import annotations

import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from .config import Config
from .forward import Forwarder
from .tokens import ClientCredentials, TokenCache

__all__ = ["FORWARDER", "TOKENS", "create_app", "serve"]

FORWARDER = web.AppKey("forwarder", Forwarder)
TOKENS = web.AppKey("tokens", TokenCache)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# aiohttp defaults that would change what the caller sent or asked for.
_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


def _ssl_context(ca_file: str | None) -> ssl.SSLContext | bool:
    return ssl.create_default_context(cafile=ca_file) if ca_file else True


def create_app(config: Config, *, clock: Callable[[], float] = time.monotonic) -> web.Application:
    """The proxy as an aiohttp application; its client session lives as long as the app."""

    # The guard is a middleware so that it also sees what the router cannot match: CONNECT's
    # authority-form and '*' targets.
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        refusal = request.app[FORWARDER].refuse(request)
        return refusal if refusal is not None else await handler(request)

    app = web.Application(middlewares=[guard])
    tls = _ssl_context(config.ca_file)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=tls, limit=0),
            # No total timeout: it would cut long uploads and downloads; bound each read instead.
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=config.connect_timeout, sock_read=config.read_timeout
            ),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # one jar would mix the cookies of all callers
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            trust_env=False,
        )
        credentials = ClientCredentials(
            session, config.token_url, config.client_id, config.client_secret, tls, clock
        )
        tokens = TokenCache(
            credentials.fetch,
            identity=(config.token_url, config.client_id),
            refresh_margin=config.refresh_margin,
            clock=clock,
        )
        app[TOKENS] = tokens
        app[FORWARDER] = Forwarder(
            session=session,
            tokens=tokens,
            upstream_url=config.upstream_url,
            api_key=config.api_key,
            max_body_size=config.max_body_size,
            replay_memory_limit=config.replay_memory_limit,
            ssl=tls,
        )
        yield
        await tokens.close()
        await session.close()

    async def forward(request: web.Request) -> web.StreamResponse:
        return await request.app[FORWARDER](request)

    async def expect(request: web.Request) -> web.StreamResponse | None:
        return await request.app[FORWARDER].expect(request)

    app.cleanup_ctx.append(lifecycle)
    app.router.add_route("*", "/{tail:.*}", forward, expect_handler=expect)
    return app


async def serve(
    app: web.Application, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None
) -> web.AppRunner:
    """Start ``app`` on host:port with the settings a proxy needs; ``runner.addresses`` says
    where it listens, ``runner.cleanup()`` stops it."""
    runner = web.AppRunner(
        app,
        handler_cancellation=True,  # a caller that hangs up cancels its upstream request
        auto_decompress=False,  # bodies are opaque bytes, passed on as sent
        access_log=None,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    except BaseException:
        await runner.cleanup()  # closes the client session the app opened on start-up
        raise
    return runner
