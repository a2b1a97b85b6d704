"""Exceptions of the proxy and the MetaDefender-shaped JSON error answer.

Exception tree, with the HTTP status and MetaDefender-style code of each answer::

    Exception
    ├── ProxyError          a failure the proxy explains to its caller as JSON (500 500000);
    │   │                   raised as itself when the upstream fails (502 5020xx, 504 504001)
    │   │                   or a header cannot be passed on unaltered (400 400004, 502 502005)
    │   │                   or the outbound proxy failed (502 502006) or refused its
    │   │                   credentials (502 502007)
    │   ├── ConfigError     bad configuration, the message names the key; found before the
    │   │                   proxy listens, so never an answer: the command exits with 2
    │   ├── TokenError      no bearer token could be had: 503 503010 when the token endpoint
    │   │                   is out of reach (unreachable, timed out, broke off, 429, 5xx),
    │   │                   502 502010 when it gave nothing usable (credentials rejected,
    │   │                   request refused, TLS failed, an answer that is no token)
    │   └── BodyError       the caller's request body could not be taken: 400 400001 (it broke
    │                       off), 413 413001 (over limits.max_body_size), 507 507001 (no copy
    │                       could be kept for a replay: the temporary directory)
    └── ListenError         a listening socket could not be opened; no caller to answer yet:
                            the command exits with 1

No message ever contains a secret: not the client secret, the api key, nor a token.
"""

from __future__ import annotations

import os
import ssl

import aiohttp
from aiohttp import web

__all__ = [
    "SERVER",
    "SERVER_NAME",
    "BodyError",
    "ConfigError",
    "ListenError",
    "ProxyError",
    "TokenError",
    "describe",
    "error_response",
]


SERVER = "Server"
# What the proxy's own answers say in Server: no versions of Python or aiohttp to look up.
SERVER_NAME = "mdcloud-proxy"


class ProxyError(Exception):
    """A failure with an HTTP status and a MetaDefender-style error code (status * 1000 + n)."""

    status = 500
    code = 500000
    retry_after: float | None = None  # seconds the caller should wait, sent as Retry-After

    def __init__(self, message: str, *, status: int | None = None, code: int | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code

    def response(self, headers: dict[str, str] | None = None) -> web.Response:
        """The JSON answer that tells the caller what went wrong."""
        return error_response(self.status, self.code, self.message, headers)


class ConfigError(ProxyError):
    """The configuration is unusable; raised before the proxy listens."""


class TokenError(ProxyError):
    """The token endpoint could not give a usable token.

    ``permanent`` is true for a configuration problem that retrying cannot fix (rejected
    credentials, a certificate that cannot be verified). ``retry_after`` (seconds) is set when
    the caller should wait. ``error_code`` and ``error_description`` are the RFC 6749 5.2
    ``error`` and ``error_description`` of the endpoint's refusal, when it sent them.
    """

    status = 503
    code = 503010

    def __init__(
        self,
        message: str,
        *,
        status: int = 503,
        permanent: bool = False,
        retry_after: float | None = None,
        error_code: str | None = None,
        error_description: str | None = None,
    ):
        super().__init__(message, status=status, code=status * 1000 + 10)
        self.permanent = permanent
        self.retry_after = retry_after
        self.error_code = error_code
        self.error_description = error_description


class BodyError(ProxyError):
    """The caller's request body was too large or broke off."""

    status = 400
    code = 400001


class ListenError(Exception):
    """A listening socket could not be opened; the message says which and why.

    Not a ProxyError: it happens before there is any caller to answer.
    """


def describe(exc: BaseException) -> str:
    """A short reason for a network error, such as "Connection refused".

    Built from the OS error number or the exception's type only: the text and repr of
    aiohttp's errors can carry the request, and with it the headers and the bearer token.
    """
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        reason = getattr(exc.certificate_error, "verify_message", None) or "invalid certificate"
        return f"certificate verify failed: {reason}; if it uses a private CA, set upstream.ca_file"
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        cause = getattr(exc, "os_error", exc)
        return f"TLS error: {getattr(cause, 'reason', None) or type(cause).__name__}"
    errno = getattr(exc, "errno", None)
    if isinstance(errno, int) and errno > 0:
        return os.strerror(errno)
    return type(exc).__name__


def error_response(
    status: int, code: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON error in MetaDefender's shape: ``{"error": {"code": N, "messages": [...]}}``."""
    return web.json_response(
        {"error": {"code": code, "messages": [f"mdcloud-proxy: {message}"]}},
        status=status,
        headers=headers,
    )
