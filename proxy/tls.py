"""TLS: on the listeners, a certificate that can be replaced while the proxy serves; towards
the upstream, sessions resumed.

An asyncio server keeps the SSLContext it was started with. So the listening context only
picks, in its ``sni_callback`` (called for every handshake, with or without SNI), the
context that holds the current certificate; a rotation builds a new context and swaps it in
for the connections that come after. Connections already open keep theirs.
"""

from __future__ import annotations

import logging
import os
import ssl

__all__ = ["ResumingContext", "ServerTLS", "client_context", "server_context"]

log = logging.getLogger("mdcloud_proxy.tls")

_Signature = tuple[tuple[int, int, int], ...]
# Hosts whose latest session is kept: the upstream, the token endpoint, an outbound proxy.
_SESSION_HOSTS = 16


class ResumingContext(ssl.SSLContext):
    """Client TLS settings that resume, on a new connection to a host, the session of the
    latest connection to it (an abbreviated handshake: no certificate chain to send and
    verify, no key exchange signature).

    Neither asyncio's nor uvloop's TLS transport passes a session to ``wrap_bio``, which both
    call for each connection: this is where one is given. The latest connection's session
    is read when the next one starts, so that a TLS 1.3 ticket, which comes after the
    handshake, is in it. A session the server no longer knows costs a full handshake, as
    without this.
    """

    def __new__(cls, protocol: int = ssl.PROTOCOL_TLS_CLIENT) -> ResumingContext:
        # The protocol is taken here, not in __init__: TLS_CLIENT checks certificates and
        # host names; SSLContext's own default would check nothing.
        return super().__new__(cls, protocol)

    def __init__(self, protocol: int = ssl.PROTOCOL_TLS_CLIENT) -> None:
        super().__init__()
        self._latest: dict[str | None, ssl.SSLObject] = {}
        self._sessions: dict[str | None, ssl.SSLSession] = {}

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        host = server_hostname.decode() if isinstance(server_hostname, bytes) else server_hostname
        if server_side or session is not None:
            return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        previous = self._latest.get(host)
        # Only a finished handshake has a session to give (OpenSSL cannot copy one it is
        # still building: connections opened together start during each other's).
        if previous is not None and previous.version() is not None:
            latest = previous.session
            if latest is not None and (latest.has_ticket or latest.id):
                self._sessions[host] = latest
        ssl_object = super().wrap_bio(
            incoming, outgoing, server_side, server_hostname, self._sessions.get(host)
        )
        if host in self._latest or len(self._latest) < _SESSION_HOSTS:
            self._latest[host] = ssl_object
        return ssl_object


def client_context(ca_file: str | None) -> ResumingContext:
    """What ``ssl.create_default_context(cafile=ca_file)`` and aiohttp's default give (the
    system's or ``ca_file``'s CAs, host names checked, ALPN http/1.1), resuming sessions."""
    context = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
    # The same checks as Python's default, whatever the version sets there (3.13 adds
    # VERIFY_X509_STRICT and VERIFY_X509_PARTIAL_CHAIN).
    default = ssl.create_default_context()
    context.options, context.verify_flags = default.options, default.verify_flags
    context.minimum_version = default.minimum_version
    context.maximum_version = default.maximum_version
    if ca_file:
        context.load_verify_locations(ca_file)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    context.set_alpn_protocols(["http/1.1"])
    return context


def server_context(cert_file: str, key_file: str, client_ca_file: str | None) -> ssl.SSLContext:
    """A server context: TLS 1.2 and newer, Python's defaults otherwise; with
    ``client_ca_file``, only clients with a certificate it signed get through.

    Raises ValueError saying which file is wrong and how.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise ValueError(f"{key_file} is not the private key of {cert_file}") from None
        raise ValueError(f"{cert_file} / {key_file}: not a PEM certificate and key") from None
    except OSError as exc:
        raise ValueError(f"cannot read {exc.filename or cert_file}: {exc.strerror}") from None
    if client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=client_ca_file)
        except (OSError, ssl.SSLError):
            raise ValueError(f"{client_ca_file}: not a readable PEM CA bundle") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _signature(paths: tuple[str, ...]) -> _Signature:
    """What changes when a file is replaced: in place (size, time) or by a rename or a
    symlink swap, as Kubernetes does with a Secret (inode)."""
    stats = (os.stat(path) for path in paths)
    return tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in stats)


class ServerTLS:
    """The TLS settings of one listener, reloadable: ``context`` goes to the server once;
    ``reload()`` (on SIGHUP) and ``reload_if_changed()`` (every interval) change what new
    connections get. A broken or mismatched new pair is refused with one log line, and the
    certificate in use stays."""

    def __init__(
        self, cert_file: str, key_file: str, client_ca_file: str | None = None, *, name: str = ""
    ) -> None:
        self._files = (cert_file, key_file)
        self._client_ca = client_ca_file
        self._name = name  # "listen" or "admin", for the log lines
        self._signature = self._stat()
        self._refused: _Signature | None = None
        self._current = server_context(cert_file, key_file, client_ca_file)
        self.context = server_context(cert_file, key_file, client_ca_file)
        self.context.sni_callback = self._pick

    def _pick(self, ssl_object: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        # The chosen context's certificate and key are used from here on in this handshake.
        ssl_object.context = self._current

    def _stat(self) -> _Signature | None:
        try:
            return _signature(self._files)
        except OSError:
            return None  # being replaced: looked at again next time

    def reload_if_changed(self) -> bool:
        """Reload if the files changed since the last look; whether a new pair is in use."""
        signature = self._stat()
        if signature is None or signature == self._signature:
            return False
        return self.reload(signature)

    def reload(self, signature: _Signature | None = None) -> bool:
        """Load the files as they are now for new connections; whether that worked."""
        signature = signature or self._stat()
        self._signature = signature
        try:
            context = server_context(*self._files, self._client_ca)
        except ValueError as exc:
            if signature is None or signature != self._refused:
                log.error(
                    "%s: new TLS certificate refused, the previous one stays in use: %s",
                    self._name + ".tls_cert_file",
                    exc,
                )
            self._refused = signature
            return False
        self._current, self._refused = context, None
        log.info("%s: TLS certificate reloaded from %s", self._name, self._files[0])
        return True
