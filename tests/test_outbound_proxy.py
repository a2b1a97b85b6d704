"""Through a corporate HTTP proxy: a real tinyproxy in front of an HTTPS simulator."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from yarl import URL

from proxy import ConfigError, create_app, load_config
from proxy.app import TOKENS, outbound_route
from proxy.check import check

from .conftest import (
    TOKEN_PATH,
    Proxy,
    chunks,
    eventually,
    free_port,
    md_error,
    proxy_settings,
    quick_sleep,
    random_payload,
)

TINYPROXY = Path("/usr/bin/tinyproxy")
PROXY_USER, PROXY_PASSWORD = "scanner", "pr0xy-passw0rd-value"


@dataclass
class Tinyproxy:
    """A running tinyproxy: its URL (with credentials when it asks for them) and its log."""

    url: str
    address: str  # host:port, without credentials
    log: Path

    def connects(self, port: int) -> int:
        """How many CONNECTs to 127.0.0.1:port it was asked for."""
        text = self.log.read_text() if self.log.exists() else ""
        return len(re.findall(rf"CONNECT 127\.0\.0\.1:{port} HTTP", text))


@pytest.fixture
def tinyproxy_installed() -> None:
    """CI installs it (.ci/run): a missing tinyproxy fails these tests, it does not skip them."""
    assert TINYPROXY.exists(), "tinyproxy is not installed: apt-get install tinyproxy"


@pytest.fixture
async def tinyproxy(
    tmp_path: Path, tinyproxy_installed: None
) -> AsyncIterator[Callable[..., Awaitable[Tinyproxy]]]:
    """Start tinyproxy on a free loopback port, allowed to CONNECT to ``connect_port``;
    ``auth``: it asks for PROXY_USER / PROXY_PASSWORD. All stop at the end."""
    procs: list[asyncio.subprocess.Process] = []

    async def _start(connect_port: int, *, auth: bool = False) -> Tinyproxy:
        port = free_port()
        folder = tmp_path / f"tinyproxy-{port}"
        folder.mkdir()
        log = folder / "tinyproxy.log"
        lines = [
            f"Port {port}",
            "Listen 127.0.0.1",
            "Timeout 30",
            "Allow 127.0.0.1",
            f"ConnectPort {connect_port}",
            "MaxClients 64",
            f'LogFile "{log}"',
            "LogLevel Info",
        ]
        if auth:
            lines.append(f"BasicAuth {PROXY_USER} {PROXY_PASSWORD}")
        (folder / "tinyproxy.conf").write_text("\n".join(lines) + "\n")
        proc = await asyncio.create_subprocess_exec(
            str(TINYPROXY),
            "-d",
            "-c",
            str(folder / "tinyproxy.conf"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        procs.append(proc)
        async with asyncio.timeout(5):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.02)
                    continue
                writer.close()
                break
        address = f"127.0.0.1:{port}"
        credentials = f"{PROXY_USER}:{PROXY_PASSWORD}@" if auth else ""
        return Tinyproxy(f"http://{credentials}{address}", address, log)

    yield _start
    for proc in procs:
        proc.terminate()
        await proc.wait()


@dataclass
class HttpsUpstream:
    url: str
    port: int
    ca_file: str


@pytest.fixture
async def https_upstream(sim, start, tmp_path: Path) -> HttpsUpstream:
    """The simulator over HTTPS, with a certificate from a throwaway CA."""
    ca = trustme.CA()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca_file = tmp_path / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    port = await start(sim.app(), ssl_context=context)
    return HttpsUpstream(f"https://127.0.0.1:{port}", port, str(ca_file))


@pytest.fixture
def proxy_with(https_upstream: HttpsUpstream, clock, start) -> Callable[..., Awaitable[Proxy]]:
    """A proxy in front of the HTTPS simulator, with ``environ`` as its environment."""

    async def _make(environ: dict[str, str] | None = None, **overrides: Any) -> Proxy:
        settings = proxy_settings(
            https_upstream.url, **{"upstream.ca_file": https_upstream.ca_file, **overrides}
        )
        config = load_config(environ=environ or {}, overrides=settings)
        app = create_app(config, clock=clock, sleep=quick_sleep)
        port = await start(app)
        return Proxy(f"http://127.0.0.1:{port}", port, app)

    return _make


async def test_tokens_and_api_calls_go_through_the_proxy(
    tinyproxy, https_upstream, proxy_with, client
):
    outbound = await tinyproxy(https_upstream.port)
    proxy = await proxy_with({"HTTPS_PROXY": outbound.url})
    async with client.get(proxy.url + "/v4/apikey/") as resp:
        assert resp.status == 200
    # One tunnel for the token endpoint's pool, one for the API's: TLS inside each.
    await eventually(lambda: outbound.connects(https_upstream.port) >= 2)


async def test_a_20_mib_upload_replayed_through_a_proxy_with_a_password(
    sim, tinyproxy, https_upstream, proxy_with, client
):
    outbound = await tinyproxy(https_upstream.port, auth=True)
    proxy = await proxy_with(**{"upstream.proxy": outbound.url})
    async with client.get(proxy.url + "/v4/apikey/") as resp:
        assert resp.status == 200
    sim.expire_tokens()
    data, digest = random_payload(20 * 1024 * 1024)
    async with client.post(proxy.url + "/v4/file", data=chunks(data)) as resp:
        assert resp.status == 200
        assert (await resp.json())["sha256"] == digest.upper()
    uploads = [r for r in sim.requests if r.raw_path == "/v4/file"]
    assert len(uploads) == 2  # refused, then replayed with a new token
    assert sim.requests[-1].body_sha256 == digest
    await eventually(lambda: outbound.connects(https_upstream.port) >= 2)


@pytest.mark.parametrize(
    ("no_proxy", "through"),
    [("10.0.0.0/8,internal.example", True), ("127.0.0.0/8", False), ("*", False)],
)
async def test_no_proxy_with_a_cidr_range_bypasses_the_proxy(
    tinyproxy, https_upstream, proxy_with, client, no_proxy, through
):
    outbound = await tinyproxy(https_upstream.port)
    proxy = await proxy_with({"HTTPS_PROXY": outbound.url, "NO_PROXY": no_proxy})
    for _ in range(2):
        async with client.get(proxy.url + "/v4/apikey/") as resp:
            assert resp.status == 200
    if through:
        await eventually(lambda: outbound.connects(https_upstream.port) >= 2)
    else:
        assert outbound.connects(https_upstream.port) == 0


@pytest.mark.parametrize("source", ["upstream.proxy", "upstream.proxy_file", "HTTPS_PROXY"])
async def test_a_wrong_proxy_password_is_a_clear_configuration_error(
    sim, tinyproxy, https_upstream, proxy_with, client, caplog, tmp_path, source
):
    caplog.set_level(logging.DEBUG)
    outbound = await tinyproxy(https_upstream.port, auth=True)
    wrong = outbound.url.replace(PROXY_PASSWORD, "wr0ng-" + PROXY_PASSWORD)
    environ, overrides = {}, {}
    if source == "HTTPS_PROXY":
        environ["HTTPS_PROXY"] = wrong
    elif source == "upstream.proxy_file":
        (tmp_path / "proxy-url").write_text(wrong + "\n")
        overrides["upstream.proxy_file"] = str(tmp_path / "proxy-url")
    else:
        overrides["upstream.proxy"] = wrong
    proxy = await proxy_with(environ, **overrides)
    bodies = []
    for path in ("/v4/apikey/", "/v4/apikey/", "/-/ready", "/-/metrics"):
        async with client.get(proxy.url + path) as resp:
            bodies.append(await resp.text())
            if path == "/v4/apikey/":
                status, code, message = await md_error(resp)
                assert (status, code) == (502, 502010)
                assert f"outbound proxy {outbound.address} (from {source}) refused its " in message
                assert f"check {source}" in message
    assert "not ready: no access token: token endpoint" in bodies[2]
    assert "refused its credentials (HTTP 401)" in bodies[2]  # tinyproxy answers 401
    # A configuration error: asked once, then the long backoff, as for rejected credentials.
    assert outbound.connects(https_upstream.port) == 1
    assert sim.issued_tokens == []
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "refused its credentials" in logged
    everything = logged + "\n".join(bodies) + repr(proxy.app[TOKENS]) + repr(proxy.app)
    assert PROXY_PASSWORD not in everything


async def test_an_unreachable_proxy_or_a_refused_connect_is_a_502_saying_so(
    sim, tinyproxy, https_upstream, proxy_with, start, client
):
    # Tokens come straight from the simulator over plain http (HTTP_PROXY is not set), the
    # API goes to the HTTPS one through HTTPS_PROXY: the API's hop fails alone.
    plain = f"http://127.0.0.1:{await start(sim.app())}"
    dead = free_port()
    forbidding = await tinyproxy(1)  # CONNECT to port 1 only
    cases = [
        (f"http://127.0.0.1:{dead}", f"outbound proxy 127.0.0.1:{dead} (from HTTPS_PROXY) "
         "unreachable: Connection refused"),
        (forbidding.url, f"outbound proxy {forbidding.address} (from HTTPS_PROXY) refused the "
         f"CONNECT to 127.0.0.1:{https_upstream.port} (HTTP 403)"),
    ]  # fmt: skip
    for outbound, expected in cases:
        proxy = await proxy_with(
            {"HTTPS_PROXY": outbound}, **{"oauth.token_url": plain + TOKEN_PATH}
        )
        async with client.get(proxy.url + "/v4/apikey/") as resp:
            status, code, message = await md_error(resp)
        assert (status, code) == (502, 502006)
        assert message == "mdcloud-proxy: " + expected


async def test_check_says_which_hop_failed(tinyproxy, https_upstream):
    outbound = await tinyproxy(https_upstream.port, auth=True)
    wrong = outbound.url.replace(PROXY_PASSWORD, "wr0ng")
    settings = proxy_settings(https_upstream.url, **{"upstream.ca_file": https_upstream.ca_file})
    config = load_config(environ={"https_proxy": wrong}, overrides=settings)
    out = io.StringIO()
    assert not await check(config, out)
    text = out.getvalue()
    assert f"through outbound proxy {outbound.address} from https_proxy" in text
    assert "token    FAILED: token endpoint" in text
    assert "refused its credentials (HTTP 401); check https_proxy" in text
    assert "wr0ng" not in text
    config = load_config(environ={"https_proxy": outbound.url}, overrides=settings)
    out = io.StringIO()
    assert await check(config, out), out.getvalue()


@pytest.mark.parametrize(
    ("url", "env", "expected"),
    [
        ("https://api.example", {"HTTPS_PROXY": "http://p:3128"}, "HTTPS_PROXY"),
        ("https://api.example", {"https_proxy": "p:3128", "HTTPS_PROXY": "http://q:1"},
         "https_proxy"),
        ("http://api.example", {"HTTPS_PROXY": "http://p:3128"}, None),
        ("http://api.example", {"HTTP_PROXY": "http://p:3128"}, "HTTP_PROXY"),
        ("https://api.example", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "api.example"}, None),
        ("https://a.api.example", {"HTTPS_PROXY": "http://p:1", "no_proxy": ".api.example"}, None),
        ("https://a.api.example", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "api.example"}, None),
        ("https://xapi.example", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "api.example"},
         "HTTPS_PROXY"),
        ("https://10.1.2.3", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "x, 10.0.0.0/8"}, None),
        ("https://10.1.2.3", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "10.1.2.3"}, None),
        ("https://11.1.2.3", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "10.0.0.0/8"},
         "HTTPS_PROXY"),
        ("https://[::1]:8443", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "::1/128"}, None),
        ("https://api.example", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "*"}, None),
    ],
)  # fmt: skip
def test_the_route_follows_curl_conventions(url, env, expected):
    config = load_config(environ={"MDCLOUD_CLIENT_ID": "i", "MDCLOUD_CLIENT_SECRET": "s", **env})
    hop = outbound_route(config)(URL(url))
    assert (hop.source if hop is not None else None) == expected


def test_upstream_proxy_none_is_direct_whatever_the_environment():
    env = {"MDCLOUD_CLIENT_ID": "i", "MDCLOUD_CLIENT_SECRET": "s", "HTTPS_PROXY": "http://p:1"}
    config = load_config(environ={**env, "MDCLOUD_PROXY_UPSTREAM_PROXY": "none"})
    assert outbound_route(config)(URL("https://api.metadefender.com")) is None


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"MDCLOUD_PROXY_UPSTREAM_PROXY": "socks5://me:hunter2-pass@p:1080"}, "upstream.proxy"),
        ({"HTTPS_PROXY": "ftp://me:hunter2-pass@p:21"}, "HTTPS_PROXY"),
        ({"MDCLOUD_PROXY_UPSTREAM_PROXY": "http://me:hunter2-pass@p:1/path"}, "upstream.proxy"),
    ],
)
def test_a_bad_proxy_url_is_named_without_its_password(env, key):
    with pytest.raises(ConfigError, match=f"^{key}: ") as caught:
        load_config(environ={"MDCLOUD_CLIENT_ID": "i", "MDCLOUD_CLIENT_SECRET": "s", **env})
    assert "hunter2" not in str(caught.value)


def test_the_proxy_url_stays_out_of_repr():
    env = {"MDCLOUD_CLIENT_ID": "i", "MDCLOUD_CLIENT_SECRET": "s"}
    config = load_config(
        environ={**env, "HTTPS_PROXY": "http://u:hunter2-pass@p:1"},
        overrides={"upstream.proxy": "http://u:hunter2-pass@q:1"},
    )
    route = outbound_route(config)
    shown = repr(config) + repr(route) + repr(route(URL("https://api.metadefender.com")))
    assert "hunter2" not in shown
