"""HTTPS on the listeners: curl and Python clients, mutual TLS, rotation, the Server header."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import ssl
import subprocess
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web
from cryptography import x509

from proxy import ConfigError, create_app
from proxy.tls import ServerTLS

from .conftest import account_env, eventually, proxy_config, raw_exchange, spawn, wait_for_line

CURL = shutil.which("curl")


class Certificates:
    """A throwaway CA and the PEM files of a listener's current certificate."""

    def __init__(self, folder: Path) -> None:
        self.ca = trustme.CA()
        self.folder = folder
        self.cert_file = str(folder / "tls.crt")
        self.key_file = str(folder / "tls.key")
        self.ca_file = str(folder / "ca.crt")
        self.ca.cert_pem.write_to_path(self.ca_file)
        self.serial = self.rotate()

    def rotate(self) -> int:
        """A new certificate in place of the old, as cert-manager writes one: each file
        replaced by a rename. Returns its serial number."""
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self._replace(self.cert_file, b"".join(p.bytes() for p in cert.cert_chain_pems))
        self._replace(self.key_file, cert.private_key_pem.bytes())
        self.serial = _serial(cert.cert_chain_pems[0].bytes())
        return self.serial

    def break_key(self) -> None:
        """Replace the key with something that is none."""
        self._replace(self.key_file, b"not a key\n")

    def _replace(self, path: str, data: bytes) -> None:
        Path(path + ".new").write_bytes(data)
        os.replace(path + ".new", path)

    def client_context(self, *, client_cert: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        if client_cert:
            self.ca.issue_cert("scanner@example").configure_cert(context)
        return context


def _serial(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


async def served_serial(port: int, context: ssl.SSLContext) -> int:
    """The serial of the certificate a new connection to the listener gets."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.write(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    return x509.load_der_x509_certificate(der).serial_number


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return Certificates(tmp_path)


async def test_python_and_curl_over_tls(certs, upstream, clock, start):
    config = proxy_config(
        upstream, **{"listen.tls_cert_file": certs.cert_file, "listen.tls_key_file": certs.key_file}
    )
    tls = ServerTLS(certs.cert_file, certs.key_file)
    assert tls.context.minimum_version == ssl.TLSVersion.TLSv1_2
    port = await start(create_app(config, clock=clock), ssl_context=tls.context)
    base = f"https://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as client:
        async with client.get(base + "/v4/apikey/", ssl=certs.client_context()) as resp:
            assert resp.status == 200
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await client.get(base + "/v4/apikey/")  # the system CAs do not know it
    assert await served_serial(port, certs.client_context()) == certs.serial
    if CURL is None:
        pytest.skip("no curl here; the Python client part passed")
    done = await asyncio.create_subprocess_exec(
        CURL, "-sS", "--cacert", certs.ca_file, "-o", "/dev/null", "-w", "%{http_code}",
        base + "/v4/apikey/", stdout=subprocess.PIPE,
    )  # fmt: skip
    out, _ = await done.communicate()
    assert out == b"200"


async def test_mutual_tls_refuses_a_caller_without_a_certificate(certs, upstream, clock, start):
    config = proxy_config(upstream)
    tls = ServerTLS(certs.cert_file, certs.key_file, certs.ca_file)
    port = await start(create_app(config, clock=clock), ssl_context=tls.context)
    url = f"https://127.0.0.1:{port}/v4/apikey/"
    async with aiohttp.ClientSession() as client:
        # Refused in the handshake (or right after it, in TLS 1.3): no HTTP answer at all.
        with pytest.raises(aiohttp.ClientError) as refused:
            async with client.get(url, ssl=certs.client_context()) as resp:
                await resp.read()
        assert not isinstance(refused.value, aiohttp.ClientResponseError)
        async with client.get(url, ssl=certs.client_context(client_cert=True)) as resp:
            assert resp.status == 200
    # A certificate from another CA is refused too.
    stranger = certs.client_context()
    trustme.CA().issue_cert("stranger@example").configure_cert(stranger)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=stranger)
        try:
            writer.write(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await reader.read() == b""  # TLS 1.3: refused after the handshake
            raise ConnectionError("closed without an answer")
        finally:
            writer.close()


def test_mutual_tls_counts_as_inbound_protection(certs):
    tls = {"listen.tls_cert_file": certs.cert_file, "listen.tls_key_file": certs.key_file}
    with pytest.raises(ConfigError, match=r"listen\.tls_client_ca_file"):
        proxy_config("http://127.0.0.1:1", **{"listen.host": "0.0.0.0"}, **tls)
    config = proxy_config(
        "http://127.0.0.1:1",
        **{"listen.host": "0.0.0.0", "listen.tls_client_ca_file": certs.ca_file},
        **tls,
    )
    assert config.tls_client_ca_file == certs.ca_file


def test_tls_files_are_checked_before_listening(certs, tmp_path):
    with pytest.raises(ConfigError, match=r"^listen\.tls_key_file: missing"):
        proxy_config("http://127.0.0.1:1", **{"listen.tls_cert_file": certs.cert_file})
    with pytest.raises(ConfigError, match=r"^listen\.tls_client_ca_file: needs"):
        proxy_config("http://127.0.0.1:1", **{"listen.tls_client_ca_file": certs.ca_file})
    other = trustme.CA().issue_cert("127.0.0.1")
    wrong_key = tmp_path / "wrong.key"
    other.private_key_pem.write_to_path(str(wrong_key))
    with pytest.raises(ConfigError, match=f"is not the private key of {certs.cert_file}"):
        proxy_config(
            "http://127.0.0.1:1",
            **{"admin.tls_cert_file": certs.cert_file, "admin.tls_key_file": str(wrong_key)},
        )


async def test_a_broken_rotation_keeps_the_old_certificate_and_says_so_once(
    certs, upstream, clock, start, caplog
):
    tls = ServerTLS(certs.cert_file, certs.key_file, name="listen")
    port = await start(create_app(proxy_config(upstream), clock=clock), ssl_context=tls.context)
    context = certs.client_context()
    first = certs.serial
    certs.break_key()
    with caplog.at_level(logging.INFO, logger="mdcloud_proxy.tls"):
        for _ in range(5):  # five checks, one log line: the pair did not change in between
            assert not tls.reload_if_changed()
        assert not tls.reload()  # SIGHUP with the same broken pair: no new line either
        refused = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(refused) == 1
        assert "listen.tls_cert_file: new TLS certificate refused" in refused[0].getMessage()
        assert await served_serial(port, context) == first
        second = certs.rotate()
        assert tls.reload_if_changed()
        assert await served_serial(port, context) == second != first


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_rotation_on_sighup_under_load(certs, upstream, loop):
    env = {
        **account_env(upstream),
        "MDCLOUD_PROXY_LISTEN_TLS_CERT_FILE": certs.cert_file,
        "MDCLOUD_PROXY_LISTEN_TLS_KEY_FILE": certs.key_file,
        "MDCLOUD_PROXY_LISTEN_TLS_RELOAD_INTERVAL": "1h",  # only SIGHUP reloads here
    }
    proc = await spawn("--port", "0", "--loop", loop, env=env)
    try:
        started = await wait_for_line(proc, r"listening on https://127.0.0.1:(\d+).*\((\w+) event")
        port = int(started.group(1))
        assert started.group(2) == loop
        context = certs.client_context()
        first = certs.serial
        outcomes: list[int | str] = []
        stop = asyncio.Event()

        async def load(client: aiohttp.ClientSession) -> None:
            for _ in range(10_000):
                if stop.is_set():
                    return
                try:
                    async with client.get(f"https://127.0.0.1:{port}/v4/apikey/") as resp:
                        await resp.read()
                        outcomes.append(resp.status)
                except aiohttp.ClientError as exc:
                    outcomes.append(type(exc).__name__)

        # Kept-alive connections (opened before the rotation, they stay) and new ones.
        kept = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, limit=4))
        fresh = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, force_close=True))
        async with kept, fresh:
            workers = [asyncio.create_task(load(s)) for s in (kept, kept, fresh, fresh)]
            await eventually(lambda: len(outcomes) >= 20, within=10)
            second = certs.rotate()
            proc.send_signal(signal.SIGHUP)
            await wait_for_line(proc, "TLS certificate reloaded")
            assert await served_serial(port, context) == second != first
            before = len(outcomes)
            await eventually(lambda: len(outcomes) >= before + 20, within=10)
            stop.set()
            await asyncio.gather(*workers)
        assert set(outcomes) == {200}, [o for o in outcomes if o != 200][:5]
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)


async def test_files_checked_every_interval_and_a_broken_pair_logged_once(certs, upstream):
    env = {
        **account_env(upstream),
        "MDCLOUD_PROXY_LISTEN_TLS_CERT_FILE": certs.cert_file,
        "MDCLOUD_PROXY_LISTEN_TLS_KEY_FILE": certs.key_file,
        "MDCLOUD_PROXY_LISTEN_TLS_RELOAD_INTERVAL": "0.1s",
    }
    proc = await spawn("--port", "0", env=env)
    try:
        port = int((await wait_for_line(proc, r"listening on https://127.0.0.1:(\d+)")).group(1))
        context = certs.client_context()
        first = certs.serial
        certs.break_key()
        await wait_for_line(proc, "new TLS certificate refused, the previous one stays in use")
        await asyncio.sleep(1)  # ten more checks of the same broken pair: no more lines
        assert await served_serial(port, context) == first
        second = certs.rotate()
        await wait_for_line(proc, "TLS certificate reloaded")
        assert await served_serial(port, context) == second
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)
    assert proc.stdout is not None
    rest = (await proc.stdout.read()).decode()
    assert "refused" not in rest, "more than one line for the same broken pair"


async def test_plain_http_with_inbound_keys_off_loopback_warns(upstream):
    env = {**account_env(upstream), "MDCLOUD_PROXY_INBOUND_KEYS": "k" * 16}
    proc = await spawn("--port", "0", "--host", "0.0.0.0", env=env)
    try:
        await wait_for_line(proc, "inbound keys and answers travel in clear")
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)


async def test_the_proxys_own_answers_name_no_versions(
    proxy, client, handler_upstream, raw_upstream, proxy_before
):
    for path in ("/-/healthy", "/-/ready", "/-/metrics", "/-/nothing"):
        async with client.get(proxy.url + path) as resp:
            assert resp.headers.getall("Server") == ["mdcloud-proxy"], path
    malformed = await raw_exchange(proxy.port, b"GET /x HTTP/1.1\r\nHost: x\r\nBad\x01: y\r\n\r\n")
    assert malformed.status == 400 and malformed.header("Server") == ["mdcloud-proxy"]

    async def answer(_request: web.Request) -> web.Response:
        return web.Response(text="ok", headers={"Server": "MetaDefender/4"})

    forwarded = await proxy_before(await handler_upstream(answer))
    async with client.get(forwarded.url + "/v4/x") as resp:
        assert resp.headers.getall("Server") == ["MetaDefender/4"]
    _, bare = await raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    unnamed = await proxy_before(bare)
    async with client.get(unnamed.url + "/v4/x") as resp:
        assert resp.headers.getall("Server") == ["mdcloud-proxy"]
    dead = await proxy_before("http://127.0.0.1:1")
    async with client.get(dead.url + "/v4/x") as resp:
        assert resp.status == 502
        assert resp.headers.getall("Server") == ["mdcloud-proxy"]
