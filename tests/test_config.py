"""Configuration: file, then environment, then flags; every mistake named by its key."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy import Config, ConfigError, load_config
from proxy.config import KEYS, parse_size

from .conftest import CLIENT_SECRET

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_UPSTREAM = "https://api.metadefender.com"
ENV = {"MDCLOUD_CLIENT_ID": "id", "MDCLOUD_CLIENT_SECRET": CLIENT_SECRET}


def test_environment_alone_is_enough():
    config = load_config(environ=ENV)
    assert config == Config(client_id="id", client_secret=CLIENT_SECRET)
    assert config.host == "127.0.0.1" and config.port == 8080
    assert config.token_url == "https://api.metadefender.com/v4/oauth2/token"
    assert config.max_body_size == 256 * 1024 * 1024
    assert config.replay_memory_limit == 1024 * 1024
    assert config.refresh_margin == 60 and config.connect_timeout == 10
    assert config.read_timeout == 300 and config.api_key is None


def _flat(data: dict[str, object], prefix: str = "") -> set[str]:
    keys = set()
    for name, value in data.items():
        if isinstance(value, dict):
            keys |= _flat(value, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


def test_example_file_documents_the_defaults():
    """config.example.yaml, with the credentials filled in, gives exactly the defaults."""
    path = ROOT / "config.example.yaml"
    config = load_config(str(path), environ=ENV)
    assert config == load_config(environ=ENV)
    # Every declared key is in it, set or commented out (`# key: example`).
    uncommented = re.sub(r"^(\s*)# ([a-z_]+:)", r"\1\2", path.read_text(), flags=re.MULTILINE)
    assert _flat(yaml.safe_load(uncommented)) == set(KEYS)


def _readme_configuration_rows() -> dict[str, list[str]]:
    """The rows `| `key` | `ENV` | flag | default |` of README's configuration table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Configuration\n")[1].split("\n## ")[0]
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            assert cells[0].strip("`") not in rows, line
            rows[cells[0].strip("`")] = cells
    return rows


def test_readme_lists_every_key_with_its_environment_variable_flag_and_default():
    rows = _readme_configuration_rows()
    assert set(rows) == set(KEYS)
    for key, setting in KEYS.items():
        _, env, flag, default = rows[key]
        assert env == f"`{setting.env}`", key
        assert flag == (f"`{setting.flag}`" if setting.flag else ""), key
        shown = re.match(r"`([^`]*)`", default)
        if shown is None:  # prose such as "required" or "unset: no admin listener"
            assert setting.required or setting.default in (None, ()), key
        else:
            value = shown.group(1).replace("<upstream.url>", DEFAULT_UPSTREAM)
            assert setting.parse(value) == setting.default, key


def test_environment_names_follow_the_rule_but_for_the_account():
    exceptions = {
        "oauth.client_id": "MDCLOUD_CLIENT_ID",
        "oauth.client_secret": "MDCLOUD_CLIENT_SECRET",
        "oauth.client_secret_file": "MDCLOUD_CLIENT_SECRET_FILE",
        "api_key": "MDCLOUD_API_KEY",
        "api_key_file": "MDCLOUD_API_KEY_FILE",
    }
    for key, setting in KEYS.items():
        rule = "MDCLOUD_PROXY_" + key.upper().replace(".", "_")
        assert setting.env == exceptions.get(key, rule)


def test_file_then_environment_then_flags(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        "listen:\n  port: 9001\n  host: 0.0.0.0\n"
        "upstream:\n  url: http://127.0.0.1:9000/\n  read_timeout: 30\n"
        "oauth:\n  client_id: from-file\n  client_secret: file-secret\n"
        "limits:\n  max_body_size: 512MiB\n"
        "replay:\n  memory_limit: 64KiB\n"
        "api_key: file-key\n"
        "inbound:\n  allowed_networks: [10.0.0.0/8, '::1']\n"
    )
    env = {"MDCLOUD_CLIENT_ID": "from-env", "MDCLOUD_PROXY_LISTEN_PORT": "9002"}
    config = load_config(
        str(path), environ=env, overrides={"listen.port": 9003, "listen.host": None}
    )
    assert config.client_id == "from-env"
    assert config.client_secret == "file-secret"
    assert config.port == 9003
    assert config.host == "0.0.0.0"
    assert config.upstream_url == "http://127.0.0.1:9000"
    assert config.token_url == "http://127.0.0.1:9000/v4/oauth2/token"
    assert config.read_timeout == 30
    assert config.max_body_size == 512 * 1024 * 1024
    assert config.replay_memory_limit == 64 * 1024
    assert config.api_key == "file-key"


def test_config_path_from_environment(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("listen:\n  port: 1234\n")
    config = load_config(environ={**ENV, "MDCLOUD_PROXY_CONFIG": str(path)})
    assert config.port == 1234


def test_secret_file_trailing_newline_is_stripped(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text(CLIENT_SECRET + "\n")
    config = load_config(
        environ={"MDCLOUD_CLIENT_ID": "id", "MDCLOUD_CLIENT_SECRET_FILE": str(secret)}
    )
    assert config.client_secret == CLIENT_SECRET


def test_secrets_stay_out_of_repr():
    config = load_config(environ={**ENV, "MDCLOUD_API_KEY": "the-api-key-value"})
    assert CLIENT_SECRET not in repr(config)
    assert "the-api-key-value" not in repr(config)


@pytest.mark.parametrize(
    ("yaml_text", "env", "expected"),
    [
        ("listen:\n  prot: 80\n", ENV, "listen.prot: unknown key"),
        (
            "oauth:\n  client_id: x\n",
            {},
            "oauth.client_secret: missing (set it in the config file or MDCLOUD_CLIENT_SECRET)",
        ),
        ("", {"MDCLOUD_CLIENT_SECRET": CLIENT_SECRET}, "oauth.client_id: missing"),
        ("listen:\n  port: eighty\n", ENV, "listen.port: 'eighty' is not a port number"),
        ("listen:\n  port: 70000\n", ENV, "listen.port: 70000 is not a port number"),
        (
            "upstream:\n  url: ftp://x\n",
            ENV,
            "upstream.url: 'ftp://x' is not an http:// or https:// URL",
        ),
        (
            "upstream:\n  read_timeout: -1\n",
            ENV,
            "upstream.read_timeout: -1 is not a non-negative number",
        ),
        (
            "upstream:\n  connect_timeout: 0\n",
            ENV,
            "upstream.connect_timeout: must be greater than 0",
        ),
        (
            "upstream:\n  ca_file: /nonexistent/ca.pem\n",
            ENV,
            "upstream.ca_file: cannot use /nonexistent/ca.pem: No such file or directory",
        ),
        (
            "upstream:\n  ca_file: /etc/hostname\n",
            ENV,
            "upstream.ca_file: cannot use /etc/hostname: not a PEM CA bundle",
        ),
        ("limits:\n  max_body_size: lots\n", ENV, "limits.max_body_size: 'lots' is not a size"),
        (
            "oauth:\n  client_secret_file: /nonexistent/secret\n",
            {"MDCLOUD_CLIENT_ID": "x"},
            "oauth.client_secret_file: cannot read /nonexistent/secret: No such file or directory",
        ),
        (
            "oauth:\n  client_secret_file: /etc/hostname\n",
            ENV,
            "oauth.client_secret_file: set either oauth.client_secret or oauth.client_secret_file",
        ),
        ("log:\n  format: xml\n", ENV, "log.format: 'xml' is not one of text, json"),
        ("log:\n  level: loud\n", ENV, "log.level: 'loud' is not one of DEBUG, INFO"),
        ("admin:\n  port: 70000\n", ENV, "admin.port: 70000 is not a port number"),
        ("shutdown_timeout: soon\n", ENV, "shutdown_timeout: 'soon' is not a number of seconds"),
        (
            "api_key: k\napi_key_file: /etc/hostname\n",
            ENV,
            "api_key_file: set either api_key or api_key_file, not both",
        ),
        (
            "inbound:\n  allowed_networks: [10.0.0.0/8, nowhere]\n",
            ENV,
            "inbound.allowed_networks: 'nowhere' is not a network such as 10.0.0.0/8",
        ),
        (
            "inbound:\n  allow_unauthenticated: maybe\n",
            ENV,
            "inbound.allow_unauthenticated: 'maybe' is not true or false",
        ),
        ("[1, 2]\n", ENV, "the top level must be a mapping"),
        ("listen: [\n", ENV, "not valid YAML at line"),
    ],
)
def test_errors_name_the_key_and_the_problem(tmp_path, yaml_text, env, expected):
    path = tmp_path / "config.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), environ=env)
    assert expected in str(info.value)
    assert CLIENT_SECRET not in str(info.value)


@pytest.mark.parametrize("url", ["https://me:hunter2-pass@api.example", "ftp://me:hunter2-pass@x"])
def test_url_errors_do_not_quote_credentials(url):
    with pytest.raises(ConfigError) as info:
        load_config(environ={**ENV, "MDCLOUD_PROXY_UPSTREAM_URL": url})
    assert str(info.value).startswith("upstream.url: ")
    assert "hunter2-pass" not in str(info.value)


def test_operations_keys(tmp_path):
    key_file = tmp_path / "apikey"
    key_file.write_text("the-api-key\n")
    path = tmp_path / "config.yaml"
    path.write_text(
        "admin:\n  host: 0.0.0.0\n  port: 9901\nshutdown_timeout: 5s\n"
        f"log:\n  level: warning\n  format: JSON\napi_key_file: {key_file}\n"
    )
    config = load_config(str(path), environ=ENV)
    assert (config.admin_host, config.admin_port) == ("0.0.0.0", 9901)
    assert config.shutdown_timeout == 5
    assert (config.log_level, config.log_format) == ("WARNING", "json")
    assert config.api_key == "the-api-key"
    assert "the-api-key" not in repr(config)
    defaults = load_config(environ=ENV)
    assert (defaults.admin_port, defaults.shutdown_timeout, defaults.log_format) == (
        None,
        30,
        "text",
    )
    env = {**ENV, "MDCLOUD_API_KEY_FILE": str(key_file), "MDCLOUD_PROXY_ADMIN_PORT": "9902"}
    from_env = load_config(environ=env)
    assert (from_env.api_key, from_env.admin_port) == ("the-api-key", 9902)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "proxy.example"])
def test_non_loopback_needs_inbound_protection(host):
    env = {**ENV, "MDCLOUD_PROXY_LISTEN_HOST": host}
    with pytest.raises(ConfigError) as info:
        load_config(environ=env)
    assert str(info.value) == (
        f"listen.host: {host} is not a loopback address, and anyone who can reach the proxy "
        "acts as your MetaDefender account; set inbound.allowed_networks, inbound.keys or "
        "listen.tls_client_ca_file, or inbound.allow_unauthenticated: true to accept that"
    )
    key = "k" * 16
    for protection in [
        {"MDCLOUD_PROXY_INBOUND_ALLOWED_NETWORKS": "10.0.0.0/8, 192.168.0.0/16"},
        {"MDCLOUD_PROXY_INBOUND_KEYS": key},
        {"MDCLOUD_PROXY_INBOUND_ALLOW_UNAUTHENTICATED": "true"},
    ]:
        assert load_config(environ={**env, **protection}).host == host


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_needs_no_inbound_protection(host):
    assert load_config(environ={**ENV, "MDCLOUD_PROXY_LISTEN_HOST": host}).host == host


@pytest.mark.parametrize(
    ("given", "host"),
    [("[::1]", "::1"), (" [::1] ", "::1"), ("[0:0:0:0:0:0:0:1]", "::1")],
)
def test_bracketed_ipv6_hosts_lose_their_brackets(tmp_path, given, host):
    """`[::1]` is how IPv6 addresses are written in URLs, so people write it here too."""
    path = tmp_path / "config.yaml"
    path.write_text(f"listen:\n  host: '{given}'\nadmin:\n  host: '{given}'\n")
    from_file = load_config(str(path), environ=ENV)
    env = {**ENV, "MDCLOUD_PROXY_LISTEN_HOST": given, "MDCLOUD_PROXY_ADMIN_HOST": given}
    from_env = load_config(environ=env)
    from_flag = load_config(environ=ENV, overrides={"listen.host": given})
    assert (from_file.host, from_file.admin_host) == (host, host)
    assert (from_env.host, from_env.admin_host) == (host, host)
    assert from_flag.host == host


def test_bracketed_hosts_are_checked():
    with pytest.raises(ConfigError) as info:
        load_config(environ={**ENV, "MDCLOUD_PROXY_LISTEN_HOST": "[::]"})
    assert str(info.value).startswith("listen.host: :: is not a loopback address")
    for bad in ("[localhost]", "[127.0.0.1]", "[::1"):
        with pytest.raises(ConfigError) as info:
            load_config(environ={**ENV, "MDCLOUD_PROXY_ADMIN_HOST": bad})
        assert str(info.value) == (
            f"admin.host: {bad!r} is not an IPv6 address in brackets such as [::1]"
        )


INSECURE = "MDCLOUD_PROXY_UPSTREAM_ALLOW_INSECURE"
WHAT_LEAKS = {
    "upstream.url": "access tokens and the apikey",
    "oauth.token_url": "the client secret and access tokens",
}


@pytest.mark.parametrize(
    ("env", "key", "url"),
    [
        ({"MDCLOUD_PROXY_UPSTREAM_URL": "http://md.example:8080/"}, "upstream.url",
         "http://md.example:8080"),
        ({"MDCLOUD_PROXY_UPSTREAM_URL": "http://[2001:db8::1]"}, "upstream.url",
         "http://[2001:db8::1]"),
        ({"MDCLOUD_PROXY_UPSTREAM_URL": "http://10.1.2.3"}, "upstream.url", "http://10.1.2.3"),
        ({"MDCLOUD_PROXY_OAUTH_TOKEN_URL": "http://auth.example/token"}, "oauth.token_url",
         "http://auth.example/token"),
        ({"MDCLOUD_PROXY_UPSTREAM_URL": "http://127.0.0.1:9000",
          "MDCLOUD_PROXY_OAUTH_TOKEN_URL": "http://192.168.1.9/t"}, "oauth.token_url",
         "http://192.168.1.9/t"),
    ],
)  # fmt: skip
def test_plain_http_to_a_remote_host_needs_allow_insecure(env, key, url):
    """Over http:// to another machine the secret and the tokens cross the network in clear."""
    with pytest.raises(ConfigError) as info:
        load_config(environ={**ENV, **env})
    assert str(info.value) == (
        f"{key}: {url} is plain http:// to a host that is not loopback, so {WHAT_LEAKS[key]} "
        "would cross the network unencrypted; use https://, or set "
        "upstream.allow_insecure: true to accept that"
    )
    config = load_config(environ={**ENV, **env, INSECURE: "true"})
    assert config.allow_insecure_upstream is True
    assert url in (config.upstream_url, config.token_url)


def test_allow_insecure_from_the_file_covers_both_urls(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        "upstream:\n  url: http://md.example\n  allow_insecure: true\n"
        "oauth:\n  token_url: http://auth.example/token\n"
    )
    config = load_config(str(path), environ=ENV)
    assert (config.upstream_url, config.token_url) == (
        "http://md.example",
        "http://auth.example/token",
    )
    with pytest.raises(ConfigError, match=r"^upstream.allow_insecure: 'sure' is not true or"):
        load_config(str(path), environ={**ENV, INSECURE: "sure"})
    with pytest.raises(ConfigError, match=r"^upstream.url: http://md.example is plain http://"):
        load_config(str(path), environ={**ENV, INSECURE: "false"})


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9000",
        "http://127.9.9.9",
        "http://[::1]:9000",
        "http://localhost:9000",
        "http://LocalHost",
        "https://md.example",
        "https://10.1.2.3:8443",
    ],
)
def test_https_or_loopback_needs_no_switch(url):
    for name in ("MDCLOUD_PROXY_UPSTREAM_URL", "MDCLOUD_PROXY_OAUTH_TOKEN_URL"):
        config = load_config(environ={**ENV, name: url})
        assert url.rstrip("/") in (config.upstream_url, config.token_url)
        assert config.allow_insecure_upstream is False


def test_inbound_keys(tmp_path):
    keys = ["first-key-0123456789", "second-key-0123456789"]
    path = tmp_path / "keys"
    path.write_text("\n".join(keys) + "\n\n")
    from_file = load_config(environ={**ENV, "MDCLOUD_PROXY_INBOUND_KEYS_FILE": str(path)})
    from_env = load_config(environ={**ENV, "MDCLOUD_PROXY_INBOUND_KEYS": ",".join(keys)})
    assert from_file.inbound_keys == from_env.inbound_keys == tuple(keys)
    assert keys[0] not in repr(from_file)
    with pytest.raises(ConfigError) as info:
        load_config(environ={**ENV, "MDCLOUD_PROXY_INBOUND_KEYS": "short-secret"})
    assert str(info.value) == "inbound.keys: every key must be at least 16 characters long"
    path.write_text("short-secret\n")
    with pytest.raises(ConfigError) as info:
        load_config(environ={**ENV, "MDCLOUD_PROXY_INBOUND_KEYS_FILE": str(path)})
    assert str(info.value) == (
        f"inbound.keys_file: {path}: every key must be at least 16 characters long"
    )


def test_bad_secret_type_does_not_quote_it(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("oauth:\n  client_id: x\n  client_secret: ''\n")
    with pytest.raises(ConfigError, match=r"^oauth.client_secret: expected a non-empty string$"):
        load_config(str(path), environ={})


@pytest.mark.parametrize(
    ("text", "size"),
    [(1024, 1024), ("512MiB", 512 * 2**20), ("1GB", 10**9), ("64k", 65536), ("2 GiB", 2 * 2**30)],
)
def test_sizes(text, size):
    assert parse_size(text) == size


def test_command_exits_before_listening_with_one_line(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        "oauth:\n  client_id: x\n  client_secret: " + CLIENT_SECRET + "\nlisten:\n  port: -5\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MDCLOUD")}
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        "mdcloud-proxy: configuration error: listen.port: -5 is not a port number (0-65535)\n"
    )


SECRET_FILES = [
    ("MDCLOUD_CLIENT_SECRET_FILE", "client_secret"),
    ("MDCLOUD_API_KEY_FILE", "api_key"),
    ("MDCLOUD_PROXY_INBOUND_KEYS_FILE", "inbound_keys"),
]
# What editors, Windows tools, `echo` and here-documents add around a secret.
DIRTY = [
    "\ufeff{}",
    "{}\r\n",
    "{}\n\n",
    "{} ",
    "{}\t\n",
    "\ufeff{}\r\n\r\n",
]


def _secret_of(config: Config, attr: str) -> object:
    value = getattr(config, attr)
    return value[0] if attr == "inbound_keys" else value


@pytest.mark.parametrize("dirty", DIRTY)
@pytest.mark.parametrize(("name", "attr"), SECRET_FILES)
def test_secret_files_lose_a_bom_and_trailing_whitespace(tmp_path, name, attr, dirty):
    path = tmp_path / "secret"
    path.write_bytes(dirty.format(CLIENT_SECRET).encode())
    env = {**ENV, name: str(path)}
    if name == "MDCLOUD_CLIENT_SECRET_FILE":
        del env["MDCLOUD_CLIENT_SECRET"]
    assert _secret_of(load_config(environ=env), attr) == CLIENT_SECRET


@pytest.mark.parametrize("dirty", DIRTY)
@pytest.mark.parametrize(
    ("name", "attr"),
    [
        ("MDCLOUD_CLIENT_SECRET", "client_secret"),
        ("MDCLOUD_API_KEY", "api_key"),
        ("MDCLOUD_PROXY_INBOUND_KEYS", "inbound_keys"),
    ],
)
def test_secrets_from_the_environment_are_cleaned_alike(name, attr, dirty):
    """`MDCLOUD_CLIENT_SECRET=$(cat file)` keeps a BOM, and `\r` from a CRLF file."""
    config = load_config(environ={**ENV, name: dirty.format(CLIENT_SECRET)})
    assert _secret_of(config, attr) == CLIENT_SECRET


def test_inbound_keys_file_with_bom_and_crlf(tmp_path):
    keys = ["first-key-0123456789", "second-key-0123456789"]
    path = tmp_path / "keys"
    path.write_bytes(("\ufeff" + "\r\n".join(keys) + "\r\n").encode())
    config = load_config(environ={**ENV, "MDCLOUD_PROXY_INBOUND_KEYS_FILE": str(path)})
    assert config.inbound_keys == tuple(keys)


def test_a_secret_file_of_only_whitespace_is_empty(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(b"\xef\xbb\xbf \r\n\t\n")
    with pytest.raises(ConfigError) as info:
        load_config(environ={"MDCLOUD_CLIENT_ID": "x", "MDCLOUD_CLIENT_SECRET_FILE": str(path)})
    assert str(info.value) == f"oauth.client_secret_file: {path} is empty"


async def test_a_client_secret_file_from_windows_still_gets_a_token(
    tmp_path, make_proxy, sim, client
):
    path = tmp_path / "client_secret"
    path.write_bytes(b"\xef\xbb\xbf" + CLIENT_SECRET.encode() + b"\r\n")
    proxy = await make_proxy(**{"oauth.client_secret": None, "oauth.client_secret_file": str(path)})
    async with client.get(proxy.url + "/v4/apikey/") as resp:
        assert resp.status == 200
    assert sim.token_requests == 1


DURATIONS = [
    ("upstream.connect_timeout", "connect_timeout"),
    ("upstream.read_timeout", "read_timeout"),
    ("oauth.refresh_margin", "refresh_margin"),
    ("shutdown_timeout", "shutdown_timeout"),
    ("listen.header_timeout", "header_timeout"),
    ("listen.body_timeout", "body_timeout"),
    ("listen.idle_timeout", "idle_timeout"),
]


@pytest.mark.parametrize(
    ("given", "seconds"),
    [("90", 90), ("90s", 90), ("15m", 900), ("24h", 86400), ("1.5s", 1.5), (" 2 h ", 7200),
     ("0.5m", 30), (".25", 0.25), ("45", 45), (45, 45), (2.5, 2.5), ("1500ms", 1.5)],
)  # fmt: skip
def test_durations_take_a_unit(tmp_path, given, seconds):
    """Every duration, in the file or the environment; quotas will count in minutes and hours."""
    path = tmp_path / "config.yaml"
    value = f"'{given}'" if isinstance(given, str) else given
    for key, attr in DURATIONS:
        section, _, name = key.rpartition(".")
        path.write_text(f"{section}:\n  {name}: {value}\n" if section else f"{name}: {value}\n")
        assert getattr(load_config(str(path), environ=ENV), attr) == seconds, key
        env = {**ENV, KEYS[key].env: str(given)}
        assert getattr(load_config(environ=env), attr) == seconds, key


@pytest.mark.parametrize(
    "given", ["soon", "15 minutes", "1d", "15M", "m", "1e3", "inf", "nan", "1.5.0", "5 MS", "ms5"]
)
def test_anything_else_is_not_a_duration(given):
    for key, _ in DURATIONS:
        with pytest.raises(ConfigError) as info:
            load_config(environ={**ENV, KEYS[key].env: given})
        assert str(info.value) == (
            f"{key}: {given!r} is not a number of seconds or a duration such as 90s, 50ms, 15m "
            "or 24h"
        )


@pytest.mark.parametrize(
    ("yaml_value", "expected"),
    [
        ("-1", "-1 is not a non-negative number of seconds"),
        ("'-5m'", "'-5m' is not a non-negative number of seconds"),
        (".inf", "inf is not a finite number of seconds"),
        (".nan", "nan is not a finite number of seconds"),
        ("true", "True is not a non-negative number of seconds"),
    ],
)
def test_negative_or_infinite_durations_are_refused(tmp_path, yaml_value, expected):
    path = tmp_path / "config.yaml"
    path.write_text(f"shutdown_timeout: {yaml_value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), environ=ENV)
    assert str(info.value) == f"shutdown_timeout: {expected}"


def _command(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MDCLOUD")}
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True, text=True, timeout=30, env=env, cwd=ROOT,
    )  # fmt: skip


def test_flags_come_from_the_declarations():
    """Each declared flag is offered, with its key and default; log flags after check/token too."""
    main = " ".join(_command("--help").stdout.split())
    flagged = [setting for setting in KEYS.values() if setting.flag]
    assert {s.key for s in flagged} >= {"listen.host", "listen.port", "log.level", "workers"}
    for setting in flagged:
        assert setting.flag in main
        assert f"({setting.key}, default " in main, setting.key
    for command in ("check", "token"):
        sub = " ".join(_command(command, "--help").stdout.split())
        assert "--log-level {DEBUG,INFO,WARNING,ERROR}" in sub
        assert "--log-format {text,json}" in sub
        assert "--port" not in sub


def test_a_bad_flag_value_is_a_configuration_error_naming_the_key():
    result = _command("--port", "eighty", "--workers", "2")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "mdcloud-proxy: configuration error: listen.port: 'eighty' is not a port number (0-65535)\n"
    )
