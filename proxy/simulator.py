"""A local MetaDefender Cloud and OAuth tenant, for the tests, the demo and offline integration.

It answers like the real service where that matters to a client: the client-credentials token
endpoint with HTTP Basic authentication, bearer tokens that expire (401009) or are unknown
(401010), the ``apikey`` header (401006), MetaDefender's error shape, rate-limit headers, and
the file, hash and apikey calls. It keeps the newest requests it saw in ``requests`` so tests
can check what arrived, byte for byte.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["SeenRequest", "Simulator"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class SeenRequest:
    """One request as it reached the simulator."""

    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body_sha256: str | None = None
    body_size: int = 0
    peer: Any = None  # the client's (host, port): which connection it came on

    def header(self, name: str) -> list[str]:
        """Every value of header ``name``, in order."""
        return [v for k, v in self.headers if k.lower() == name.lower()]


_SEEN = web.RequestKey("seen", SeenRequest)


def md_error(status: int, code: int, message: str) -> web.Response:
    """An error in MetaDefender Cloud's shape."""
    return web.json_response({"error": {"code": code, "messages": [message]}}, status=status)


@dataclass
class _Upload:
    data_id: str
    name: str
    size: int
    sha256: str
    sha1: str
    md5: str


@dataclass
class Simulator:
    """MetaDefender Cloud on loopback. Build its app with ``app()``.

    ``token_lifetime`` is the ``expires_in`` it announces; ``revoke_after``, if set, is when it
    really stops accepting a token (a token revoked early, or clocks that disagree).
    ``early_reject`` makes ``POST /v4/file`` refuse a bad token at once, without reading the
    upload, and drop the connection. ``token_failure`` = (status, body[, headers]) makes the
    token endpoint answer that instead of a token. ``requests`` holds the newest
    ``max_requests`` requests, oldest first, so a simulator left running stays small.
    """

    client_id: str = "demo-client"
    client_secret: str = field(default="demo-secret", repr=False)
    api_key: str | None = field(default=None, repr=False)
    token_lifetime: float = 3600.0
    revoke_after: float | None = None
    early_reject: bool = False
    token_failure: tuple[int, bytes] | tuple[int, bytes, dict[str, str]] | None = None
    clock: Callable[[], float] = time.monotonic
    token_requests: int = 0
    max_requests: int = 10_000
    requests: list[SeenRequest] = field(default_factory=list, repr=False)
    seen_requests: int = 0  # all of them, kept or not: what the rate-limit headers count
    issued_tokens: list[str] = field(default_factory=list, repr=False)
    expired_tokens: set[str] = field(default_factory=set, repr=False)  # answered with 401009
    _tokens: dict[str, float] = field(default_factory=dict, repr=False)
    _uploads: dict[str, _Upload] = field(default_factory=dict, repr=False)

    def expire_tokens(self) -> None:
        """From now on, every token issued so far is answered with 401009."""
        for token in self._tokens:
            self._tokens[token] = float("-inf")

    def app(self) -> web.Application:
        """The simulator as an aiohttp application."""
        app = web.Application(middlewares=[self._record])
        app.router.add_post("/v4/oauth2/token", self._token)
        app.router.add_post("/v4/file", self._upload)
        app.router.add_get("/v4/file/{data_id}", self._file_report)
        app.router.add_get("/v4/hash/{hash}", self._hash_report)
        app.router.add_get("/v4/apikey/", self._apikey_info)
        app.router.add_get("/v4/apikey/limits/status", self._limits)
        app.router.add_route("*", r"/{tail:[\s\S]*}", self._not_found)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        seen = SeenRequest(
            request.method,
            request.raw_path,
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
            peer=request.transport.get_extra_info("peername") if request.transport else None,
        )
        # A list, not a deque: tests slice it. Dropping its head costs about 2 us at 10,000.
        self.requests.append(seen)
        if len(self.requests) > self.max_requests:
            del self.requests[: len(self.requests) - self.max_requests]
        self.seen_requests += 1
        request[_SEEN] = seen
        return await handler(request)

    # -- OAuth ----------------------------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        if self.token_failure is not None:
            status, body, *headers = self.token_failure
            return web.Response(
                status=status,
                body=body,
                content_type="application/json",
                headers=headers[0] if headers else None,
            )
        if not self._client_authenticated(request.headers.get("Authorization", "")):
            return web.json_response(
                {"error": "invalid_client", "error_description": "Client authentication failed"},
                status=401,
                headers={"WWW-Authenticate": 'Basic realm="oauth2"'},
            )
        form = await request.post()
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        token = secrets.token_urlsafe(32)
        now = self.clock()
        valid_for = self.token_lifetime if self.revoke_after is None else self.revoke_after
        self._tokens = {t: exp for t, exp in self._tokens.items() if exp > now}
        self._tokens[token] = now + valid_for
        self.issued_tokens.append(token)
        return web.json_response(
            {"access_token": token, "expires_in": int(self.token_lifetime), "token_type": "Bearer"}
        )

    def _client_authenticated(self, authorization: str) -> bool:
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            client_id, _, client_secret = (
                base64.b64decode(encoded, validate=True).decode().partition(":")
            )
        except (binascii.Error, UnicodeDecodeError):
            return False
        return hmac.compare_digest(
            client_id.encode(), self.client_id.encode()
        ) and hmac.compare_digest(client_secret.encode(), self.client_secret.encode())

    def _refusal(self, request: web.Request) -> web.Response | None:
        """The 401 a real API would give, or None when the caller is authenticated."""
        if self.api_key is not None and not hmac.compare_digest(
            request.headers.get("apikey", "").encode(), self.api_key.encode()
        ):
            return md_error(401, 401006, "Invalid apikey")
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            if self.api_key is not None:
                return None  # authenticated by apikey alone
            return md_error(401, 401010, "OAuth token is invalid")
        expires = self._tokens.get(token)
        if expires is None:
            return md_error(401, 401010, "OAuth token is invalid")
        if self.clock() >= expires:
            self.expired_tokens.add(token)
            return md_error(401, 401009, "OAuth token has expired")
        return None

    def _counted(self, response: web.Response, kind: str) -> web.Response:
        """``response`` with the rate-limit headers MetaDefender puts on answers it counts."""
        used = self.seen_requests
        response.headers.update(
            {
                "X-RateLimit-For": kind,
                "X-RateLimit-Interval": "daily",
                "X-RateLimit-Limit": "4000",
                "X-RateLimit-Used": str(used),
                "X-RateLimit-Remaining": str(max(0, 4000 - used)),
                "X-RateLimit-Reset-In": "3294s",
            }
        )
        return response

    # -- API ------------------------------------------------------------------------------------

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        refusal = self._refusal(request)
        if refusal is not None:
            if self.early_reject:
                # Answer before the upload is read, then hang up, as a busy gateway does.
                refusal.force_close()
                await refusal.prepare(request)
                await refusal.write_eof()
                if request.transport is not None:
                    request.transport.close()
                return refusal
            await self._consume(request)  # read it all, then refuse (keeps the connection)
            return refusal
        sha256, sha1, md5, size = await self._consume(request)
        upload = _Upload(
            uuid.uuid4().hex, request.headers.get("filename", "unnamed"), size, sha256, sha1, md5
        )
        self._uploads[upload.data_id] = upload
        answer = {
            "data_id": upload.data_id,
            "status": "inqueue",
            "in_queue": 0,
            "queue_priority": "normal",
            "sha1": upload.sha1.upper(),
            "sha256": upload.sha256.upper(),
        }
        return self._counted(web.json_response(answer), "prevention_api")

    async def _consume(self, request: web.Request) -> tuple[str, str, str, int]:
        """Read the body as it streams in; record its size and digest on the SeenRequest."""
        sha256, sha1, md5, size = hashlib.sha256(), hashlib.sha1(), hashlib.md5(), 0  # noqa: S324
        async for chunk in request.content.iter_any():
            size += len(chunk)
            sha256.update(chunk)
            sha1.update(chunk)
            md5.update(chunk)
        seen = request[_SEEN]
        seen.body_sha256, seen.body_size = sha256.hexdigest(), size
        return sha256.hexdigest(), sha1.hexdigest(), md5.hexdigest(), size

    def _report(self, upload: _Upload) -> dict[str, Any]:
        return {
            "data_id": upload.data_id,
            "file_info": {
                "display_name": upload.name,
                "file_size": upload.size,
                "md5": upload.md5.upper(),
                "sha1": upload.sha1.upper(),
                "sha256": upload.sha256.upper(),
            },
            "scan_results": {
                "progress_percentage": 100,
                "scan_all_result_a": "No Threat Detected",
                "scan_all_result_i": 0,
                "total_avs": 0,
            },
        }

    async def _file_report(self, request: web.Request) -> web.Response:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        upload = self._uploads.get(request.match_info["data_id"])
        if upload is None:
            return md_error(404, 404008, "The data_id was not found")
        return self._counted(web.json_response(self._report(upload)), "prevention_api")

    async def _hash_report(self, request: web.Request) -> web.Response:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        wanted = request.match_info["hash"].lower()
        for upload in self._uploads.values():
            if wanted in (upload.md5, upload.sha1, upload.sha256):
                return self._counted(web.json_response(self._report(upload)), "reputation_api")
        response = md_error(404, 404003, f"The hash was not found: {wanted}")
        return self._counted(response, "reputation_api")

    async def _apikey_info(self, request: web.Request) -> web.Response:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        info = {
            "paid_user": 0,
            "limit_interval": "daily",
            "limit_prevention": 4000,
            "limit_reputation": 4000,
            "max_upload_file_size": 140,
            "qos_scan": "normal",
        }
        return self._counted(web.json_response(info), "reputation_api")

    async def _limits(self, request: web.Request) -> web.Response:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        status = {"prevention_api": 4000, "reputation_api": 4000 - self.seen_requests}
        return self._counted(web.json_response(status), "reputation_api")

    async def _not_found(self, request: web.Request) -> web.Response:
        await self._consume(request)
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        return self._counted(md_error(404, 404000, "Endpoint not found"), "reputation_api")
