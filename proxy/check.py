"""The ``check`` and ``token`` commands: one token fetch and one API call, told to a person."""

from __future__ import annotations

import json
import time
from typing import TextIO

import aiohttp
from redis.asyncio import Redis
from redis.exceptions import RedisError
from yarl import URL

from .app import client_session, outbound_route
from .config import Config, redis_address
from .errors import TokenError, describe
from .route import Route, proxy_failure
from .shared import first_words
from .tls import client_context
from .tokens import ClientCredentials, Token, read_up_to

__all__ = ["check", "print_token"]

APIKEY_PATH = "/v4/apikey/"
LIMITS_PATH = "/v4/apikey/limits/status"


async def _fetch(config: Config, session: aiohttp.ClientSession) -> Token:
    """One token request; the session carries the TLS settings."""
    credentials = ClientCredentials(
        session,
        config.token_url,
        config.client_id,
        config.client_secret,
        route=outbound_route(config),
    )
    return await credentials.fetch()


async def print_token(config: Config, out: TextIO, err: TextIO) -> bool:
    """Print a fresh access token to ``out`` (for scripts); say why not to ``err``."""
    async with client_session(config, client_context(config.ca_file)) as session:
        try:
            token = await _fetch(config, session)
        except TokenError as exc:
            print(f"mdcloud-proxy: {exc.message}", file=err)
            return False
    print(token.access_token, file=out)
    return True


def _limits(info: object) -> str:
    """The account's limits from a ``GET /v4/apikey/`` answer, if it lists any."""
    if not isinstance(info, dict):
        return ""
    interval = info.get("limit_interval", "")
    parts = [
        f"{name.removeprefix('limit_')} {value}"
        for name, value in info.items()
        if name.startswith("limit_") and name != "limit_interval"
    ]
    text = ", ".join(parts) + (f" per {interval} interval" if parts and interval else "")
    if "max_upload_file_size" in info:
        text += ("; " if text else "") + f"max upload {info['max_upload_file_size']} MB"
    return text


def _api_error(body: bytes) -> str:
    try:
        messages = json.loads(body)["error"]["messages"]
        return "; ".join(str(m) for m in messages)
    except (ValueError, KeyError, TypeError):
        return ""


async def check(config: Config, out: TextIO) -> bool:
    """Fetch a token and call ``GET /v4/apikey/`` with it; print what happened, step by step."""

    def say(label: str, text: str) -> None:
        print(f"{label:<8} {text}", file=out)

    route = outbound_route(config)
    url = config.upstream_url + APIKEY_PATH
    hop = route(URL(url))
    via = f", through outbound proxy {hop.shown} from {hop.source}" if hop is not None else ""
    say(
        "config",
        f"ok (upstream {config.upstream_url}, token endpoint {config.token_url}{via})",
    )
    async with client_session(config, client_context(config.ca_file)) as session:
        try:
            token = await _fetch(config, session)
        except TokenError as exc:
            say("token", f"FAILED: {exc.message}")
            return False
        say("token", f"ok, valid for {token.lifetime:.0f} s")
        headers = {"Authorization": "Bearer " + token.access_token}
        if config.api_key is not None:
            headers["apikey"] = config.api_key
        try:
            async with session.get(
                url, headers=headers, allow_redirects=False, proxy=route.proxy_for(URL(url))
            ) as resp:
                body = await read_up_to(resp, 1024 * 1024)
                status, remaining = resp.status, resp.headers.get("X-RateLimit-Remaining")
            quota = await _quota(session, config.upstream_url + LIMITS_PATH, headers, route)
        except (aiohttp.ClientError, TimeoutError) as exc:
            failure = proxy_failure(exc, hop, URL(url))
            say("api", f"FAILED: GET {url}: {failure[0] if failure else describe(exc)}")
            return False
    if status != 200:
        reason = _api_error(body)
        say(
            "api",
            f"FAILED: GET {APIKEY_PATH} answered HTTP {status}" + (f": {reason}" if reason else ""),
        )
        return False
    say("api", f"ok, GET {APIKEY_PATH} answered HTTP 200")
    try:
        limits = _limits(json.loads(body))
    except ValueError:
        limits = ""
    if remaining is not None:
        limits += ("; " if limits else "") + f"{remaining} requests left now"
    if limits:
        say("limits", limits)
    if quota:
        say("quota", quota)
    if config.redis_url is not None:
        shared, text = await _redis(config.redis_url)
        say("redis", text)
        return shared
    return True


async def _redis(url: str) -> tuple[bool, str]:
    """Whether the fleet's Redis answers a PING, and how fast; a second at most."""
    address = redis_address(url)
    client = Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    began = time.perf_counter()
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        return False, (
            f"FAILED: {address}: {first_words(exc)} (the proxy serves without it, each replica "
            "with its own cache, until it answers)"
        )
    finally:
        await client.aclose()
    took = (time.perf_counter() - began) * 1000
    return True, f"ok, {address} answered PING in {took:.1f} ms: the quota guard is shared"


async def _quota(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], route: Route
) -> str:
    """What ``GET /v4/apikey/limits/status`` says is left per limit type (a call that costs no
    quota), and when the one it names resets; empty if it says nothing usable."""
    async with session.get(
        url, headers=headers, allow_redirects=False, proxy=route.proxy_for(URL(url))
    ) as resp:
        body = await read_up_to(resp, 64 * 1024)
        if resp.status != 200:
            return ""
        named, reset_in = (
            resp.headers.get("X-RateLimit-For"),
            resp.headers.get("X-RateLimit-Reset-In"),
        )
    try:
        left = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(left, dict):
        return ""
    parts = []
    for name, value in sorted(left.items()):
        if isinstance(value, int) and not isinstance(value, bool):
            resets = f", resets in {reset_in}" if name == named and reset_in else ""
            parts.append(f"{name} {value} left{resets}")
    return "; ".join(parts)
