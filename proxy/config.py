"""Configuration: one frozen ``Config`` from a YAML file, then environment variables, then flags."""

from __future__ import annotations

import ipaddress
import math
import os
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yarl import URL

from .errors import ConfigError

__all__ = ["DEFAULT_UPSTREAM", "KEYS", "Config", "Network", "load_config", "parse_size"]

DEFAULT_UPSTREAM = "https://api.metadefender.com"
MiB = 1024 * 1024
MIN_KEY_LENGTH = 16
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Config:
    """Everything the proxy needs to run; secrets are kept out of ``repr``."""

    client_id: str
    client_secret: str = field(repr=False)
    api_key: str | None = field(default=None, repr=False)
    host: str = "127.0.0.1"
    port: int = 8080
    upstream_url: str = DEFAULT_UPSTREAM
    allow_insecure_upstream: bool = False
    ca_file: str | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 300.0
    token_url: str = DEFAULT_UPSTREAM + "/v4/oauth2/token"
    refresh_margin: float = 60.0
    max_body_size: int = 256 * MiB
    replay_memory_limit: int = 1 * MiB
    shutdown_timeout: float = 30.0
    admin_host: str = "127.0.0.1"
    admin_port: int | None = None
    log_level: str = "INFO"
    log_format: str = "text"
    allowed_networks: tuple[Network, ...] = ()
    inbound_keys: tuple[str, ...] = field(default=(), repr=False)
    allow_unauthenticated: bool = False
    loop: str = "auto"
    workers: int = 1
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    idle_timeout: float = 75.0
    max_connections: int | None = None  # None: half the descriptor limit in force
    upstream_max_connections: int = 256
    replay_memory_total: int = 64 * MiB


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": MiB, "mb": 1000**2, "mib": MiB,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
}  # fmt: skip


def parse_size(value: object) -> int:
    """Parse a byte size: an integer, or a string such as ``512MiB``, ``1GB`` or ``64k``."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 1048576 or '512MiB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    match = _SIZE_RE.match(str(value))
    if match is None or (match.group(2) or "").lower() not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size such as 1048576, '64KiB' or '512MiB'")
    return int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()]


def _text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a non-empty string")
    return value.strip()


def _host(value: object) -> str:
    """An address or name to listen on; ``[::1]``, as IPv6 is written in URLs, means ``::1``."""
    text = _text(value)
    if not (text.startswith("[") or text.endswith("]")):
        return text
    inner = text[1:-1] if text.startswith("[") and text.endswith("]") else ""
    try:
        return str(ipaddress.IPv6Address(inner))
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv6 address in brackets such as [::1]") from None


def _clean_secret(text: str) -> str:
    # A BOM (Windows editors) or trailing whitespace (`echo`, CRLF, a stray space) is never
    # part of a secret, and left in it fails later as a bare 401 and a long backoff.
    return text.removeprefix("\ufeff").rstrip(" \t\r\n")


def _secret(value: object) -> str:
    # Not _text: the message must never quote the value.
    if not isinstance(value, str) or not _clean_secret(value):
        raise ValueError("expected a non-empty string")
    return _clean_secret(value)


def _integer(low: int, high: int, what: str) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{value!r} is not {what} ({low}-{high})")
        return value

    return parse


_port = _integer(0, 65535, "a port number")
_workers = _integer(1, 64, "a number of processes")
_connections = _integer(1, 1 << 20, "a number of connections")


def _choice(*allowed: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = _text(value)
        for choice in allowed:
            if text.lower() == choice.lower():
                return choice
        raise ValueError(f"{text!r} is not one of {', '.join(allowed)}")

    return parse


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"{value!r} is not true or false")


def _items(value: object) -> list[object]:
    """A YAML list, or a string of items separated by commas or newlines (env vars, files)."""
    if isinstance(value, str):
        return [item.strip() for item in re.split(r"[,\n]", value) if item.strip()]
    if isinstance(value, list):
        return value
    raise ValueError("expected a list, or a string of items separated by commas")


def _networks(value: object) -> tuple[Network, ...]:
    networks = []
    for item in _items(value):
        try:
            networks.append(ipaddress.ip_network(str(item).strip(), strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not a network such as 10.0.0.0/8 or ::1") from None
    if not networks:
        raise ValueError("expected at least one network")
    return tuple(networks)


def _keys(value: object) -> tuple[str, ...]:
    # Never quote a key in a message.
    items = _items(_clean_secret(value) if isinstance(value, str) else value)
    if not items or not all(isinstance(item, str) for item in items):
        raise ValueError("expected one or more keys (strings)")
    keys = tuple(_clean_secret(str(item)) for item in items)
    if any(len(key) < MIN_KEY_LENGTH for key in keys):
        raise ValueError(f"every key must be at least {MIN_KEY_LENGTH} characters long")
    return keys


_DURATION_RE = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*([smh]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600}


def _seconds(value: object) -> float:
    """A duration in seconds: a number, or a string such as ``90``, ``1.5s``, ``15m``, ``24h``."""
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match is None:
            raise ValueError(
                f"{value!r} is not a number of seconds or a duration such as 90s, 15m or 24h"
            )
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ValueError(f"{value!r} is not a non-negative number of seconds")
    if not math.isfinite(seconds):  # YAML's .inf and .nan
        raise ValueError(f"{value!r} is not a finite number of seconds")
    if seconds < 0:
        raise ValueError(f"{value!r} is not a non-negative number of seconds")
    return seconds


def _positive_seconds(value: object) -> float:
    seconds = _seconds(value)
    if seconds == 0:
        raise ValueError("must be greater than 0")
    return seconds


def _http_url(value: object) -> str:
    text = _text(value)
    url = URL(text)
    # Quote the URL without its user:password part: that may be a secret.
    shown = repr(str(url.with_user(None)) if url.user or url.password else text)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{shown} is not an http:// or https:// URL with a host")
    if url.user or url.password:
        raise ValueError(f"{shown} must not carry user:password; credentials go in oauth.*")
    if url.query_string or url.fragment:
        raise ValueError(f"{shown} must not carry a query or fragment")
    return text.rstrip("/")


def _ca_bundle(value: object) -> str:
    path = _text(value)
    try:
        ssl.create_default_context(cafile=path)
    except OSError as exc:  # ssl.SSLError is an OSError too
        reason = exc.strerror if not isinstance(exc, ssl.SSLError) else "not a PEM CA bundle"
        raise ValueError(f"cannot use {path}: {reason}") from None
    return path


@dataclass(frozen=True)
class _Key:
    parse: Callable[[object], Any]
    env: str
    attr: str


def _env(key: str) -> str:
    return "MDCLOUD_PROXY_" + key.upper().replace(".", "_")


# Every accepted key, its parser, its environment variable and the Config field it fills.
KEYS: dict[str, _Key] = {
    "listen.host": _Key(_host, _env("listen.host"), "host"),
    "listen.port": _Key(_port, _env("listen.port"), "port"),
    "upstream.url": _Key(_http_url, _env("upstream.url"), "upstream_url"),
    "upstream.allow_insecure": _Key(_boolean, _env("upstream.allow_insecure"),
                                    "allow_insecure_upstream"),
    "upstream.ca_file": _Key(_ca_bundle, _env("upstream.ca_file"), "ca_file"),
    "upstream.connect_timeout": _Key(_positive_seconds, _env("upstream.connect_timeout"),
                                     "connect_timeout"),
    "upstream.read_timeout": _Key(_positive_seconds, _env("upstream.read_timeout"),
                                  "read_timeout"),
    "oauth.token_url": _Key(_http_url, _env("oauth.token_url"), "token_url"),
    "oauth.client_id": _Key(_text, "MDCLOUD_CLIENT_ID", "client_id"),
    "oauth.client_secret": _Key(_secret, "MDCLOUD_CLIENT_SECRET", "client_secret"),
    "oauth.client_secret_file": _Key(_text, "MDCLOUD_CLIENT_SECRET_FILE", ""),
    "oauth.refresh_margin": _Key(_seconds, _env("oauth.refresh_margin"), "refresh_margin"),
    "api_key": _Key(_secret, "MDCLOUD_API_KEY", "api_key"),
    "api_key_file": _Key(_text, "MDCLOUD_API_KEY_FILE", ""),
    "limits.max_body_size": _Key(parse_size, _env("limits.max_body_size"), "max_body_size"),
    "replay.memory_limit": _Key(parse_size, _env("replay.memory_limit"), "replay_memory_limit"),
    "shutdown_timeout": _Key(_seconds, _env("shutdown_timeout"), "shutdown_timeout"),
    "admin.host": _Key(_host, _env("admin.host"), "admin_host"),
    "admin.port": _Key(_port, _env("admin.port"), "admin_port"),
    "log.level": _Key(_choice("DEBUG", "INFO", "WARNING", "ERROR"), _env("log.level"),
                      "log_level"),
    "log.format": _Key(_choice("text", "json"), _env("log.format"), "log_format"),
    "inbound.allowed_networks": _Key(_networks, _env("inbound.allowed_networks"),
                                     "allowed_networks"),
    "inbound.keys": _Key(_keys, _env("inbound.keys"), "inbound_keys"),
    "inbound.keys_file": _Key(_text, _env("inbound.keys_file"), ""),
    "inbound.allow_unauthenticated": _Key(_boolean, _env("inbound.allow_unauthenticated"),
                                          "allow_unauthenticated"),
    "loop": _Key(_choice("auto", "asyncio", "uvloop"), _env("loop"), "loop"),
    "workers": _Key(_workers, _env("workers"), "workers"),
    "listen.header_timeout": _Key(_seconds, _env("listen.header_timeout"), "header_timeout"),
    "listen.body_timeout": _Key(_seconds, _env("listen.body_timeout"), "body_timeout"),
    "listen.idle_timeout": _Key(_seconds, _env("listen.idle_timeout"), "idle_timeout"),
    "listen.max_connections": _Key(_connections, _env("listen.max_connections"),
                                   "max_connections"),
    "upstream.max_connections": _Key(_connections, _env("upstream.max_connections"),
                                     "upstream_max_connections"),
    "replay.memory_total": _Key(parse_size, _env("replay.memory_total"), "replay_memory_total"),
}  # fmt: skip
# Secrets that may come from a file instead (Docker and Kubernetes secrets are files).
_SECRET_FILES = {
    "oauth.client_secret_file": "oauth.client_secret",
    "api_key_file": "api_key",
    "inbound.keys_file": "inbound.keys",
}
CONFIG_ENV = "MDCLOUD_PROXY_CONFIG"


def _flatten(data: Mapping[Any, Any], prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping) and key not in KEYS:
            flat.update(_flatten(value, key + "."))
        else:
            flat[key] = value
    return flat


def _read_yaml(path: str) -> dict[str, object]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path}: not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path}: the top level must be a mapping of keys")
    flat = _flatten(data)
    for key in flat:
        if key not in KEYS:
            raise ConfigError(f"config file {path}: {key}: unknown key")
    return flat


def _read_secret_file(key: str, path: str) -> str:
    try:
        secret = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{key}: cannot read {path}: {reason}") from None
    secret = _clean_secret(secret)
    if not secret:
        raise ConfigError(f"{key}: {path} is empty")
    return secret


def load_config(
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Config:
    """Build the Config from a YAML file, then ``environ``, then ``overrides`` (flags).

    ``path`` defaults to ``$MDCLOUD_PROXY_CONFIG``. Raises ``ConfigError`` naming the key and
    the problem; no message ever quotes a secret.
    """
    environ = os.environ if environ is None else environ
    path = path or environ.get(CONFIG_ENV) or None
    raw: dict[str, object] = _read_yaml(path) if path else {}
    for key, spec in KEYS.items():
        if environ.get(spec.env):
            raw[key] = environ[spec.env]
    for key, value in (overrides or {}).items():
        if key not in KEYS:
            raise ConfigError(f"{key}: unknown key")
        if value is not None:
            raw[key] = value

    values: dict[str, Any] = {}
    for key, value in raw.items():
        if value is None:
            continue
        try:
            values[key] = KEYS[key].parse(value)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None

    for file_key, key in _SECRET_FILES.items():
        path = values.pop(file_key, None)
        if path is None:
            continue
        if key in values:
            raise ConfigError(f"{file_key}: set either {key} or {file_key}, not both")
        text = _read_secret_file(file_key, path)
        try:
            values[key] = KEYS[key].parse(text)
        except ValueError as exc:
            raise ConfigError(f"{file_key}: {path}: {exc}") from None
    for key in ("oauth.client_id", "oauth.client_secret"):
        if key not in values:
            raise ConfigError(f"{key}: missing (set it in the config file or {KEYS[key].env})")
    upstream = values.get("upstream.url", DEFAULT_UPSTREAM)
    values.setdefault("oauth.token_url", upstream + "/v4/oauth2/token")
    config = Config(**{KEYS[key].attr: value for key, value in values.items()})
    if not config.allow_insecure_upstream:
        _refuse_plain_http(config)
    protected = config.allowed_networks or config.inbound_keys or config.allow_unauthenticated
    if not _is_loopback(config.host) and not protected:
        raise ConfigError(
            f"listen.host: {config.host} is not a loopback address, and anyone who can reach "
            "the proxy acts as your MetaDefender account; set inbound.allowed_networks or "
            "inbound.keys, or inbound.allow_unauthenticated: true to accept that"
        )
    return config


# What crosses the network with each URL; a plain http:// URL to another machine shows it
# to anyone on the path.
_CARRIES = {
    "upstream.url": "access tokens and the apikey",
    "oauth.token_url": "the client secret and access tokens",
}


def _refuse_plain_http(config: Config) -> None:
    for key, url in (("upstream.url", config.upstream_url), ("oauth.token_url", config.token_url)):
        parsed = URL(url)
        if parsed.scheme == "http" and not _is_loopback(parsed.host or ""):
            raise ConfigError(
                f"{key}: {url} is plain http:// to a host that is not loopback, so "
                f"{_CARRIES[key]} would cross the network unencrypted; use https://, or set "
                "upstream.allow_insecure: true to accept that"
            )


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve to anything
