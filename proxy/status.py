"""The proxy's state at a glance: ``/-/status`` (JSON) and ``/-/`` (a page that refreshes).

Token, the quota of each limit type the answers told of, the quota guard's cache and the
throttle waits; never a secret (no token, key or credential is in any of it).
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from . import __version__
from .cache import LookupCache
from .observe import Metrics, utc_time
from .quota import QuotaWatch
from .shared import SharedStore
from .tokens import TokenCache

__all__ = ["page", "status"]

Clock = Callable[[], float]
REFRESH_SECONDS = 5


def _when(wall: float | None) -> str | None:
    return utc_time(wall) if wall else None


def status(
    *,
    tokens: TokenCache,
    quota: QuotaWatch,
    cache: LookupCache | None,
    shared: SharedStore | None,
    metrics: Metrics,
    started: float,
    clock: Clock,
) -> dict[str, Any]:
    """What ``/-/status`` answers."""
    now, wall = clock(), time.time()
    token = tokens.current
    error = tokens.error
    limits = {}
    for name, limit in sorted(quota.limits.items()):
        resets_in = None if limit.resets_at is None else max(0.0, limit.resets_at - now)
        limits[name] = {
            "limit": limit.limit,
            "remaining": limit.remaining,
            "interval": limit.interval,
            "resets_in_s": None if resets_in is None else round(resets_in),
            "resets_at": None if resets_in is None else _when(wall + resets_in),
            "throttle_reopens_in_s": round(quota.reopens_in(name), 1),
        }

    def sample(name: str, **labels: str) -> int:
        return int(metrics.registry.get_sample_value(name, labels) or 0)

    served = {
        kind: sample("mdcloud_proxy_cache_requests_total", status=kind)
        for kind in ("hit", "miss", "bypass", "stale")
    }
    looked_up = sum(served.values())
    waits: dict[str, int] = {}
    for family in metrics.throttle_waits.collect():
        for each in family.samples:
            if each.name.endswith("_total"):
                outcome = each.labels["outcome"]
                waits[outcome] = waits.get(outcome, 0) + int(each.value)
    return {
        "version": __version__,
        "uptime_s": round(now - started),
        "token": {
            "held": token is not None,
            "expires_in_s": None if token is None else round(token.expires_at - now),
            "last_refresh": _when(tokens.refreshed_at),
            "last_error": None if error is None else error.message,
            "failing_since": _when(tokens.failing_since),
        },
        "limits": limits,
        "cache": {
            "enabled": cache is not None,
            "entries": cache.entries if cache is not None else 0,
            "bytes": cache.size if cache is not None else 0,
            **served,
            "hit_ratio": round((served["hit"] + served["stale"]) / looked_up, 3)
            if looked_up
            else None,
            # Shared with the fleet through Redis (None: this process only); "degraded"
            # while Redis does not answer and each replica works alone.
            "shared": None if shared is None else shared.address,
            "degraded": shared is not None and shared.degraded,
            "degraded_for_s": None
            if shared is None or shared.degraded_for is None
            else round(shared.degraded_for),
        },
        "throttle_waits": waits,
    }


def page(state: dict[str, Any]) -> web.Response:
    """``/-/``: the state for a person; no scripts, no assets from elsewhere."""
    rows = []
    for name, limit in state["limits"].items():
        total, left = limit["limit"], limit["remaining"]
        share = min(1.0, left / total) if total and left is not None else 0.0
        resets = f"resets in {limit['resets_in_s']} s" if limit["resets_in_s"] is not None else ""
        throttle = (
            f"; throttled, reopens in {limit['throttle_reopens_in_s']} s"
            if limit["throttle_reopens_in_s"]
            else ""
        )
        rows.append(
            f"<tr><th>{html.escape(name)}</th>"
            f'<td><div class="bar"><div style="width:{share * 100:.1f}%"></div></div></td>'
            f'<td class="n">{left if left is not None else "?"} of {total or "?"} left</td>'
            f"<td>{html.escape(resets + throttle)}</td></tr>"
        )
    token = state["token"]
    held = (
        f"held, expires in {token['expires_in_s']} s"
        if token["held"]
        else f"none: {token['last_error'] or 'fetching the first one'}"
    )
    cache = state["cache"]
    ratio = cache["hit_ratio"]
    guard = (
        f"{cache['entries']} answers ({cache['bytes']} bytes); "
        f"{cache['hit']} hits, {cache['miss']} misses, {cache['stale']} stale"
        + (f"; {ratio:.0%} served without quota" if ratio is not None else "")
        if cache["enabled"]
        else "off"
    )
    if cache["degraded"]:
        guard += (
            f"; cache degraded: Redis ({cache['shared']}) has not answered for "
            f"{cache['degraded_for_s']} s, this replica works alone"
        )
    elif cache["shared"]:
        guard += f"; shared through Redis ({cache['shared']})"
    waits = ", ".join(f"{k} {v}" for k, v in sorted(state["throttle_waits"].items())) or "none"
    limits = "".join(rows) or '<tr><td colspan="4">no answer has told of a quota yet</td></tr>'
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<title>mdcloud-proxy</title>
<style>
body {{ font: 15px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} th, td {{ padding: .3em .8em; text-align: left; }}
.bar {{ width: 20em; height: 1em; background: #eee; border-radius: .3em; overflow: hidden; }}
.bar div {{ height: 100%; background: #2a7; }} .n {{ font-variant-numeric: tabular-nums; }}
</style></head><body>
<h1>mdcloud-proxy {html.escape(state["version"])}</h1>
<h2>Quota left</h2>
<table id="limits">{limits}</table>
<h2>Token</h2><p id="token">{html.escape(held)}</p>
<h2>Quota guard</h2><p id="cache">{html.escape(guard)}</p>
<h2>Throttle waits</h2><p id="waits">{html.escape(waits)}</p>
<p>Up {state["uptime_s"]} s. This page refreshes every {REFRESH_SECONDS} s;
<a href="/-/status">/-/status</a> has the same as JSON.</p>
</body></html>
"""
    return web.Response(text=body, content_type="text/html")
