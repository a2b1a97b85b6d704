"""The outbound route: straight to a URL, or through the corporate HTTP proxy.

``upstream.proxy`` names the proxy (``none``: always direct); unset, the conventions of curl
and Python's requests apply: ``https_proxy`` / ``HTTPS_PROXY`` for an https:// URL,
``http_proxy`` / ``HTTP_PROXY`` for an http:// one, and ``no_proxy`` / ``NO_PROXY`` to bypass
it, with host names, domain suffixes, IP addresses, CIDR ranges and ``*``. aiohttp's own
``trust_env`` knows no CIDR ranges, so the route is decided here and passed on every request.
An https:// URL goes through the proxy with CONNECT: TLS stays end to end.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp
from yarl import URL

from .errors import describe

__all__ = ["PROXY_VARIABLES", "Hop", "Route", "proxy_failure", "proxy_url"]

# Lower case first: it wins when both are set, as in curl, requests and urllib.
PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY")


def proxy_url(text: str) -> URL:
    """An outbound proxy's URL: ``http://[user:password@]host:port`` (``host:port`` alone
    means http://). Raises ValueError, whose message never quotes the password."""
    url = URL(text.strip() if "://" in text else "http://" + text.strip())
    shown = str(url.with_user(None)) if url.user or url.password else text.strip()
    if url.scheme != "http" or not url.host:
        raise ValueError(f"{shown!r} is not a proxy URL such as http://proxy.example:3128")
    if url.path not in ("", "/") or url.query_string or url.fragment:
        raise ValueError(f"{shown!r} must be http://[user:password@]host:port, with no path")
    return url.with_path("")


@dataclass(frozen=True)
class Hop:
    """The outbound proxy one request goes through; ``source`` says where it was set."""

    url: URL = field(repr=False)  # may carry user:password
    source: str  # upstream.proxy, upstream.proxy_file, HTTPS_PROXY, https_proxy, ...

    @property
    def shown(self) -> str:
        """The proxy's address, fit for a log line or an error: no credentials."""
        return f"{self.url.host}:{self.url.port}"


def _bypassed(host: str, no_proxy: str) -> bool:
    """Whether ``host`` matches an entry of a NO_PROXY list."""
    host = host.lower().rstrip(".").strip("[]")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        entry = entry.strip("[]")
        if entry == "*":
            return True
        if not entry:
            continue
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            network = None
        if network is not None:
            if address is not None and address in network:
                return True
            continue
        suffix = entry.removeprefix("*").removeprefix(".").rstrip(".")
        if suffix and (host == suffix or host.endswith("." + suffix)):
            return True
    return False


@dataclass(frozen=True)
class Route:
    """Decides, per URL, whether a request goes through an outbound proxy, and which."""

    proxy: str | None = field(default=None, repr=False)  # upstream.proxy: a URL or "none"
    from_file: bool = False
    environment: Mapping[str, str] = field(default_factory=dict, repr=False)

    def __call__(self, url: URL) -> Hop | None:
        """The proxy ``url`` goes through, or None for a direct connection."""
        if self.proxy is not None:
            if self.proxy == "none":
                return None
            source = "upstream.proxy_file" if self.from_file else "upstream.proxy"
            return Hop(proxy_url(self.proxy), source)
        env = self.environment
        scheme = "https" if url.scheme == "https" else "http"
        names = (f"{scheme}_proxy", f"{scheme}_proxy".upper())
        name = next((n for n in names if env.get(n)), None)
        if name is None:
            return None
        no_proxy = env.get("no_proxy") or env.get("NO_PROXY") or ""
        if url.host is not None and _bypassed(url.host, no_proxy):
            return None
        return Hop(proxy_url(env[name]), name)

    def proxy_for(self, url: URL) -> URL | None:
        """aiohttp's ``proxy=`` for a request to ``url``: None for a direct connection.

        The proxy URL carries the credentials: aiohttp sends them as Proxy-Authorization on
        the CONNECT (https://) or on the request itself (http://), and nowhere else.
        """
        hop = self(url)
        return None if hop is None else hop.url


def proxy_failure(exc: BaseException, hop: Hop | None, target: URL) -> tuple[str, bool] | None:
    """What the outbound proxy did wrong in ``exc``, and whether it refused its credentials;
    None when the failure was not the proxy's. Never quotes the credentials."""
    if hop is None:
        return None
    where = f"outbound proxy {hop.shown} (from {hop.source})"
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        return f"{where} unreachable: {describe(exc)}", False
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        if exc.status in (401, 407):
            return (
                f"{where} refused its credentials (HTTP {exc.status}); check {hop.source}",
                True,
            )
        return (
            f"{where} refused the CONNECT to {target.host}:{target.port} (HTTP {exc.status})",
            False,
        )
    return None
