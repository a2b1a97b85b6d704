"""Configuration: one frozen ``Config`` from a YAML file, then environment variables, then flags."""

from __future__ import annotations

import ipaddress
import math
import os
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml
from redis.asyncio.connection import parse_url as parse_redis_url
from yarl import URL

from .errors import ConfigError
from .route import PROXY_VARIABLES, proxy_url

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_UPSTREAM",
    "KEYS",
    "Config",
    "Network",
    "Setting",
    "is_loopback",
    "load_config",
    "parse_size",
    "redis_address",
    "token_url_for",
]

DEFAULT_UPSTREAM = "https://api.metadefender.com"
TOKEN_PATH = "/v4/oauth2/token"  # noqa: S105 - a path, not a password
CONFIG_ENV = "MDCLOUD_PROXY_CONFIG"
MiB = 1024 * 1024
MIN_KEY_LENGTH = 16
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def token_url_for(upstream: str) -> str:
    """The token endpoint of an upstream, unless ``oauth.token_url`` says otherwise."""
    return upstream + TOKEN_PATH


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


@dataclass(frozen=True)
class _Choice:
    """A parser for one of a few words; the flag offers the same words."""

    allowed: tuple[str, ...]

    def __call__(self, value: object) -> str:
        text = _text(value)
        for choice in self.allowed:
            if text.lower() == choice.lower():
                return choice
        raise ValueError(f"{text!r} is not one of {', '.join(self.allowed)}")


_log_level = _Choice(("DEBUG", "INFO", "WARNING", "ERROR"))
_log_format = _Choice(("text", "json"))
_loop = _Choice(("auto", "asyncio", "uvloop"))


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


_DURATION_RE = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*(ms|[smh]?)\s*$")
_DURATION_UNITS = {"": 1, "ms": 0.001, "s": 1, "m": 60, "h": 3600}


def _seconds(value: object) -> float:
    """A duration in seconds: a number, or a string such as ``90``, ``1.5s``, ``50ms``, ``15m``,
    ``24h``."""
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match is None:
            raise ValueError(
                f"{value!r} is not a number of seconds or a duration such as 90s, 50ms, 15m or 24h"
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


def _proxy_url(value: object) -> str:
    """An outbound proxy: ``http://[user:password@]host:port``, or ``none`` for direct."""
    text = _secret(value)
    if text.lower() == "none":
        return "none"
    return str(proxy_url(text))


# What a Redis URL may ask for besides host, port, user, password and database: the TLS
# settings of rediss://. Timeouts, pools and retries are the proxy's (cache.redis_timeout).
_REDIS_OPTIONS = frozenset(
    {"db", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname"}
)


_REDIS_DB = re.compile(r"/?(\d+)?")
_REDIS_CHOICES = {
    "ssl_cert_reqs": frozenset({"none", "optional", "required"}),
    "ssl_check_hostname": frozenset({"true", "false", "yes", "no", "1", "0"}),
}


def redis_address(url: str) -> str:
    """Where a Redis URL points, to be shown: never its user, password or query (which may
    hold a secret)."""
    parsed = URL(url)
    if parsed.scheme == "unix":
        return f"unix://{parsed.path}"
    return str(parsed.with_user(None).with_password(None).with_query(None))


def _redis_url(value: object) -> str:
    """``redis://[user:password@]host:port/db``, ``rediss://`` (TLS) or ``unix:///path``."""
    text = _secret(value)
    url = URL(text)
    shown = repr(redis_address(text)) if url.is_absolute() else "it"
    if url.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"{shown} is not a redis://, rediss:// or unix:// URL")
    if url.scheme != "unix" and not url.host:
        raise ValueError(f"{shown} has no host")
    if url.scheme == "unix" and not url.path.startswith("/"):
        raise ValueError(f"{shown} has no socket path")
    unknown = sorted(set(url.query) - _REDIS_OPTIONS)
    if unknown:
        raise ValueError(
            f"{shown} asks for {', '.join(unknown)[:80]}; the options it may carry are "
            f"{', '.join(sorted(_REDIS_OPTIONS))} (a password goes in user:password@)"
        )
    if url.scheme != "rediss" and any(name.startswith("ssl_") for name in url.query):
        raise ValueError(f"{shown} has TLS options: they need rediss://")
    if url.scheme != "unix" and not _REDIS_DB.fullmatch(url.path):
        raise ValueError(f"{shown}: the database, after the port, is a number such as /0")
    # redis-py reads these only when it connects: a wrong one would fail every call.
    for name, allowed in _REDIS_CHOICES.items():
        if name in url.query and url.query[name].lower() not in allowed:
            raise ValueError(f"{shown}: {name} is one of {', '.join(sorted(allowed))}")
    try:
        parse_redis_url(text)
    except ValueError:
        raise ValueError(
            f"{shown} is not a URL redis-py accepts (its database or options)"
        ) from None
    return text


def _redis_prefix(value: object) -> str:
    text = _text(value)
    if len(text) > 64 or not text.isascii() or not text.isprintable() or " " in text:
        raise ValueError(f"{text!r} must be up to 64 printable ASCII characters, no spaces")
    return text


def _ca_bundle(value: object) -> str:
    path = _text(value)
    try:
        ssl.create_default_context(cafile=path)
    except OSError as exc:  # ssl.SSLError is an OSError too
        reason = exc.strerror if not isinstance(exc, ssl.SSLError) else "not a PEM CA bundle"
        raise ValueError(f"cannot use {path}: {reason}") from None
    return path


@dataclass(frozen=True)
class Setting:
    """One configuration key: how it is parsed, where it is read from, what it fills."""

    key: str
    parse: Callable[[object], Any]
    env: str  # MDCLOUD_PROXY_<SECTION>_<KEY>, but for the account's own variables
    doc: str
    default: object  # dataclasses.MISSING: required
    attr: str | None = None  # the Config field; None for a *_file key, which ``fills`` one
    fills: str | None = None  # a *_file key: the key of the secret its file holds
    secret: bool = False  # kept out of repr; may come from ``<key>_file`` / ``<env>_FILE`` instead
    flag: str | None = None  # the command-line flag, if any
    on_subcommands: bool = False  # the flag is accepted after ``check`` and ``token`` too

    @property
    def required(self) -> bool:
        """Whether the proxy cannot start without it."""
        return self.default is MISSING and self.fills is None

    @property
    def choices(self) -> tuple[str, ...] | None:
        """The words it accepts, when it is one of a few."""
        return self.parse.allowed if isinstance(self.parse, _Choice) else None

    @property
    def help(self) -> str:
        """The flag's help text."""
        if self.default is None or self.default is MISSING:
            return f"{self.doc} ({self.key})"
        shown = str(self.default).lower() if isinstance(self.default, bool) else self.default
        return f"{self.doc} ({self.key}, default {shown})"


def _env(key: str) -> str:
    return "MDCLOUD_PROXY_" + key.upper().replace(".", "_")


def setting(
    key: str,
    parse: Callable[[object], Any],
    default: object = MISSING,
    *,
    doc: str,
    env: str | None = None,
    flag: str | None = None,
    on_subcommands: bool = False,
    secret: bool = False,
) -> Any:
    """Declare a ``Config`` field as the setting ``key``; everything else is derived from it.

    ``env`` defaults to ``MDCLOUD_PROXY_<SECTION>_<KEY>``. A ``secret`` stays out of ``repr``
    and may also be given as ``<key>_file`` (``<env>_FILE``), the path of a file that holds it.
    """
    declared = Setting(
        key,
        parse,
        env or _env(key),
        doc,
        default,
        secret=secret,
        flag=flag,
        on_subcommands=on_subcommands,
    )
    metadata = {"setting": declared}
    if default is MISSING:
        return field(repr=not secret, metadata=metadata)
    return field(default=default, repr=not secret, metadata=metadata)


@dataclass(frozen=True)
class Config:
    """Everything the proxy needs to run; secrets are kept out of ``repr``.

    Each field is one setting: its key, parser, default and documentation (see ``setting``).
    """

    client_id: str = setting(
        "oauth.client_id", _text, env="MDCLOUD_CLIENT_ID", doc="OAuth client id"
    )
    client_secret: str = setting(
        "oauth.client_secret",
        _secret,
        env="MDCLOUD_CLIENT_SECRET",
        secret=True,
        doc="OAuth client secret",
    )
    api_key: str | None = setting(
        "api_key", _secret, None, env="MDCLOUD_API_KEY", secret=True, doc="apikey sent upstream"
    )
    host: str = setting(
        "listen.host", _host, "127.0.0.1", flag="--host", doc="address to listen on"
    )
    port: int = setting("listen.port", _port, 8080, flag="--port", doc="port to listen on")
    upstream_url: str = setting(
        "upstream.url", _http_url, DEFAULT_UPSTREAM, doc="MetaDefender Cloud base URL"
    )
    allow_insecure_upstream: bool = setting(
        "upstream.allow_insecure", _boolean, False, doc="allow plain http:// off loopback"
    )
    ca_file: str | None = setting(
        "upstream.ca_file", _ca_bundle, None, doc="PEM CA bundle to trust"
    )
    connect_timeout: float = setting(
        "upstream.connect_timeout", _positive_seconds, 10.0, doc="seconds to connect upstream"
    )
    read_timeout: float = setting(
        "upstream.read_timeout", _positive_seconds, 300.0, doc="seconds between two reads"
    )
    token_url: str = setting(
        "oauth.token_url", _http_url, token_url_for(DEFAULT_UPSTREAM), doc="token endpoint"
    )
    refresh_margin: float = setting(
        "oauth.refresh_margin", _seconds, 60.0, doc="seconds before expiry to refresh"
    )
    max_body_size: int = setting(
        "limits.max_body_size", parse_size, 256 * MiB, doc="larger request bodies get 413"
    )
    replay_memory_limit: int = setting(
        "replay.memory_limit", parse_size, 1 * MiB, doc="in memory per body for a replay"
    )
    shutdown_timeout: float = setting(
        "shutdown_timeout", _seconds, 30.0, doc="seconds to drain at SIGTERM"
    )
    admin_host: str = setting("admin.host", _host, "127.0.0.1", doc="admin listener address")
    admin_port: int | None = setting("admin.port", _port, None, doc="admin listener port")
    log_level: str = setting(
        "log.level", _log_level, "INFO", flag="--log-level", on_subcommands=True, doc="log level"
    )
    log_format: str = setting(
        "log.format",
        _log_format,
        "text",
        flag="--log-format",
        on_subcommands=True,
        doc="text for people, json for machines",
    )
    allowed_networks: tuple[Network, ...] = setting(
        "inbound.allowed_networks", _networks, (), doc="callers' networks; others get 403"
    )
    inbound_keys: tuple[str, ...] = setting(
        "inbound.keys", _keys, (), secret=True, doc="keys callers must present"
    )
    allow_unauthenticated: bool = setting(
        "inbound.allow_unauthenticated", _boolean, False, doc="no inbound protection off loopback"
    )
    loop: str = setting(
        "loop", _loop, "auto", flag="--loop", doc="event loop; auto: uvloop if installed"
    )
    workers: int = setting(
        "workers", _workers, 1, flag="--workers", doc="processes sharing the port"
    )
    header_timeout: float = setting(
        "listen.header_timeout", _seconds, 10.0, doc="seconds to send a request head"
    )
    body_timeout: float = setting(
        "listen.body_timeout", _seconds, 60.0, doc="seconds between body reads"
    )
    idle_timeout: float = setting(
        "listen.idle_timeout", _seconds, 75.0, doc="seconds a connection may idle"
    )
    max_connections: int | None = setting(
        "listen.max_connections", _connections, None, doc="connections at once"
    )
    upstream_max_connections: int = setting(
        "upstream.max_connections", _connections, 256, doc="connections to the upstream at once"
    )
    replay_memory_total: int = setting(
        "replay.memory_total", parse_size, 64 * MiB, doc="in memory for all bodies"
    )
    proxy: str | None = setting(
        "upstream.proxy",
        _proxy_url,
        None,
        secret=True,
        doc="outbound HTTP proxy http://[user:password@]host:port, or none; unset: HTTPS_PROXY",
    )
    tls_cert_file: str | None = setting(
        "listen.tls_cert_file", _text, None, doc="PEM certificate (and chain): serve HTTPS"
    )
    tls_key_file: str | None = setting(
        "listen.tls_key_file", _text, None, doc="PEM private key of listen.tls_cert_file"
    )
    tls_client_ca_file: str | None = setting(
        "listen.tls_client_ca_file", _text, None, doc="PEM CA that client certificates need"
    )
    tls_reload_interval: float = setting(
        "listen.tls_reload_interval",
        _positive_seconds,
        60.0,
        doc="seconds between checks of the TLS files for a new certificate",
    )
    admin_tls_cert_file: str | None = setting(
        "admin.tls_cert_file", _text, None, doc="PEM certificate for the admin listener"
    )
    admin_tls_key_file: str | None = setting(
        "admin.tls_key_file", _text, None, doc="PEM private key of admin.tls_cert_file"
    )
    throttle_max_wait: float = setting(
        "throttle.max_wait", _seconds, 60.0, doc="how long to wait out throttles (0: never)"
    )
    cache_enabled: bool = setting(
        "cache.enabled", _boolean, True, doc="the quota guard's lookup cache (--no-cache: off)"
    )
    cache_ttl: float = setting("cache.ttl", _seconds, 900.0, doc="lifetime of a lookup answer")
    cache_miss_ttl: float = setting(
        "cache.miss_ttl", _seconds, 120.0, doc='lifetime of a "not found" (404003)'
    )
    cache_stale_ttl: float = setting(
        "cache.stale_ttl", _seconds, 86400.0, doc="how long past its lifetime an answer is served"
    )
    cache_max_size: int = setting(
        "cache.max_size", parse_size, 64 * MiB, doc="all cached answers together"
    )
    cache_max_entry_size: int = setting(
        "cache.max_entry_size", parse_size, 1 * MiB, doc="larger answers and bulk bodies pass"
    )
    cache_uploads: bool = setting(
        "cache.uploads", _boolean, False, doc="answer a repeated upload with its earlier answer"
    )
    cache_upload_ttl: float = setting(
        "cache.upload_ttl", _seconds, 86400.0, doc="how long an upload's answer is remembered"
    )
    redis_url: str | None = setting(
        "cache.redis_url",
        _redis_url,
        None,
        secret=True,
        doc="Redis shared by replicas: redis://[user:password@]host:port/db, rediss://, unix://",
    )
    redis_prefix: str = setting(
        "cache.redis_prefix", _redis_prefix, "mdcloud-proxy:", doc="the start of every Redis key"
    )
    redis_timeout: float = setting(
        "cache.redis_timeout",
        _positive_seconds,
        0.05,
        doc="the most Redis may add to a request (its calls share it)",
    )
    lock_timeout: float = setting(
        "cache.lock_timeout",
        _positive_seconds,
        10.0,
        doc="how long replicas wait for the one asking the upstream",
    )
    # Not settings: where the outbound proxy may come from besides upstream.proxy, read by
    # load_config, so that the route depends on what it was given, never on os.environ later.
    proxy_environment: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    proxy_from_file: bool = field(default=False, repr=False)


def _declared() -> dict[str, Setting]:
    table: dict[str, Setting] = {}
    for each in fields(Config):
        if "setting" not in each.metadata:
            continue
        declared: Setting = replace(each.metadata["setting"], attr=each.name)
        table[declared.key] = declared
        if declared.secret:
            # Docker and Kubernetes secrets are files.
            file_key = declared.key + "_file"
            doc = f"file holding {declared.key}"
            env = declared.env + "_FILE"
            table[file_key] = Setting(file_key, _text, env, doc, None, fills=declared.key)
    return table


# Every accepted key, derived from the fields of Config.
KEYS: dict[str, Setting] = _declared()


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
    raw = _read_yaml(path) if path else {}
    raw.update({key: environ[spec.env] for key, spec in KEYS.items() if environ.get(spec.env)})
    for key in overrides or {}:
        if key not in KEYS:
            raise ConfigError(f"{key}: unknown key")
    raw.update({key: value for key, value in (overrides or {}).items() if value is not None})
    values = {key: _parse(key, value) for key, value in raw.items() if value is not None}
    proxy_from_file = "upstream.proxy_file" in values
    for spec in KEYS.values():
        if spec.fills is not None and spec.key in values:
            _read_into(values, spec.key, spec.fills)
    for spec in KEYS.values():
        if spec.required and spec.key not in values:
            raise ConfigError(f"{spec.key}: missing (set it in the config file or {spec.env})")
    upstream = values.get("upstream.url", DEFAULT_UPSTREAM)
    values.setdefault("oauth.token_url", token_url_for(upstream))
    config = Config(
        **{spec.attr: values[key] for key, spec in KEYS.items() if spec.attr and key in values},
        proxy_environment=_proxy_environment(environ),
        proxy_from_file=proxy_from_file,
    )
    if not config.allow_insecure_upstream:
        _refuse_plain_http(config)
    _refuse_unprotected_host(config)
    _check_tls_files(config)
    return config


def _proxy_environment(environ: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The proxy variables of ``environ`` (HTTPS_PROXY, NO_PROXY, ...), checked."""
    found = tuple((name, environ[name]) for name in PROXY_VARIABLES if environ.get(name))
    for name, value in found:
        if not name.lower().startswith("no_"):
            try:
                proxy_url(value)
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from None
    return found


def _check_tls_files(config: Config) -> None:
    """Both halves of each certificate pair, and pairs that load; before anything listens."""
    # Imported here: tls.py uses ConfigError, and config.py is imported first.
    from .tls import server_context

    pairs = [
        ("listen", config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file),
        ("admin", config.admin_tls_cert_file, config.admin_tls_key_file, None),
    ]
    for section, cert, key, client_ca in pairs:
        if (cert is None) != (key is None):
            missing = "tls_key_file" if key is None else "tls_cert_file"
            raise ConfigError(
                f"{section}.{missing}: missing (set both tls_cert_file and tls_key_file)"
            )
        if cert is None or key is None:
            if client_ca is not None:
                raise ConfigError(
                    "listen.tls_client_ca_file: needs listen.tls_cert_file and listen.tls_key_file"
                )
            continue
        try:
            server_context(cert, key, client_ca)
        except ValueError as exc:
            raise ConfigError(f"{section}.tls_cert_file: {exc}") from None


def _parse(key: str, value: object) -> Any:
    try:
        return KEYS[key].parse(value)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _read_into(values: dict[str, Any], file_key: str, key: str) -> None:
    """Replace ``values[file_key]``, a path, by ``values[key]``, the secret in that file."""
    path = values.pop(file_key)
    if key in values:
        raise ConfigError(f"{file_key}: set either {key} or {file_key}, not both")
    text = _read_secret_file(file_key, path)
    try:
        values[key] = KEYS[key].parse(text)
    except ValueError as exc:
        raise ConfigError(f"{file_key}: {path}: {exc}") from None


def _refuse_unprotected_host(config: Config) -> None:
    protected = (
        config.allowed_networks
        or config.inbound_keys
        or config.tls_client_ca_file  # mutual TLS: only holders of a signed certificate
        or config.allow_unauthenticated
    )
    if not is_loopback(config.host) and not protected:
        raise ConfigError(
            f"listen.host: {config.host} is not a loopback address, and anyone who can reach "
            "the proxy acts as your MetaDefender account; set inbound.allowed_networks, "
            "inbound.keys or listen.tls_client_ca_file, or inbound.allow_unauthenticated: true "
            "to accept that"
        )


# What crosses the network with each URL; a plain http:// URL to another machine shows it
# to anyone on the path.
_CARRIES = {
    "upstream.url": "access tokens and the apikey",
    "oauth.token_url": "the client secret and access tokens",
}


def _refuse_plain_http(config: Config) -> None:
    for key, url in (("upstream.url", config.upstream_url), ("oauth.token_url", config.token_url)):
        parsed = URL(url)
        if parsed.scheme == "http" and not is_loopback(parsed.host or ""):
            raise ConfigError(
                f"{key}: {url} is plain http:// to a host that is not loopback, so "
                f"{_CARRIES[key]} would cross the network unencrypted; use https://, or set "
                "upstream.allow_insecure: true to accept that"
            )


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine only (``localhost`` or a loopback address)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve to anything
