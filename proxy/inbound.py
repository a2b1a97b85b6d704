"""Who may use the proxy: allowed networks and shared keys, checked before anything is forwarded."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable, Sequence

import aiohttp
from aiohttp import web

from .config import Network
from .errors import error_response

__all__ = ["KEY_HEADER", "InboundGuard"]

# Where a caller presents a shared key; tools that only know HTTP Basic send it as the password.
KEY_HEADER = "X-Proxy-Key"


def _presented_key(request: web.BaseRequest) -> str | None:
    key = request.headers.get(KEY_HEADER)
    if key:
        return key
    authorization = request.headers.get("Authorization", "")
    if authorization[:6].lower() == "basic ":
        try:
            return aiohttp.BasicAuth.decode(authorization).password or None
        except ValueError:
            return None
    return None


class InboundGuard:
    """Refuses callers outside ``networks`` (403) and callers without one of ``keys`` (401).

    Either check is off when its list is empty. ``refused`` is told the reason of each
    refusal ("network", "missing_key", "wrong_key"), for the metrics.
    """

    def __init__(
        self,
        networks: Sequence[Network],
        keys: Sequence[str],
        refused: Callable[[str], None] = lambda _reason: None,
    ):
        self._networks = tuple(networks)
        self._keys = tuple(key.encode() for key in keys)
        self._refused = refused

    def __repr__(self) -> str:
        return f"InboundGuard(networks={[str(n) for n in self._networks]}, keys={len(self._keys)})"

    def refusal(self, request: web.BaseRequest) -> web.Response | None:
        """The answer to a caller who may not use the proxy, or None for one who may."""
        if self._networks and not self._allowed(request.remote):
            self._refused("network")
            return error_response(
                403,
                403020,
                f"requests from {request.remote} are not allowed (inbound.allowed_networks)",
            )
        if not self._keys:
            return None
        presented = _presented_key(request)
        if presented is None:
            self._refused("missing_key")
            return error_response(
                401,
                401020,
                f"this proxy needs a key: send it in the {KEY_HEADER} header or as the "
                "HTTP Basic password",
                {"WWW-Authenticate": 'Basic realm="mdcloud-proxy"'},
            )
        # Compare with every key, so the time taken does not tell which one nearly matched.
        matches = [hmac.compare_digest(presented.encode(), key) for key in self._keys]
        if not any(matches):
            self._refused("wrong_key")
            return error_response(401, 401021, "the proxy key is not valid")
        return None

    def _allowed(self, remote: str | None) -> bool:
        try:
            address = ipaddress.ip_address((remote or "").split("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)
