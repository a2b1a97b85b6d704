"""Expired or invalid token: the proxy refreshes it and replays the request, invisibly."""

from __future__ import annotations

import asyncio
import io
import os
import resource
import signal
import tempfile
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from yarl import URL

from .conftest import (
    account_env,
    chunks,
    eventually,
    open_deleted_files,
    random_payload,
    scrape,
    spawn,
    wait_for_line,
)

MiB = 1024 * 1024


async def warm_up(client, proxy) -> None:
    async with client.get(proxy.url + "/v4/apikey/") as resp:
        assert resp.status == 200


@pytest.mark.parametrize("early", [False, True], ids=["late-401", "early-401-and-close"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_upload_replayed_byte_identical(sim, make_proxy, client, early, framing):
    sim.early_reject = early
    proxy = await make_proxy()
    await warm_up(client, proxy)
    sim.expire_tokens()
    data, digest = random_payload(20 * MiB)
    tmp_before = set(os.listdir(tempfile.gettempdir()))
    baseline = open_deleted_files()
    body = chunks(data)
    headers = {"filename": "big.bin", "Content-Type": "application/octet-stream"}
    if framing == "content-length":
        headers["Content-Length"] = str(len(data))
    async with client.post(proxy.url + "/v4/file", data=body, headers=headers) as resp:
        answer = await resp.json()
        assert resp.status == 200, answer
    assert answer["sha256"] == digest.upper()
    uploads = [r for r in sim.requests if r.raw_path == "/v4/file"]
    assert len(uploads) == 2  # the refused attempt, then the replay
    assert uploads[-1].body_sha256 == digest
    assert uploads[-1].body_size == len(data)
    if framing == "content-length":
        assert uploads[-1].header("Content-Length") == [str(len(data))]
        assert uploads[-1].header("Transfer-Encoding") == []
    assert sim.token_requests == 2
    # The spill file goes when the request ends, once a worker thread has written the last
    # batch (early-401: the replay reads the rest of the upload, and the answer can come
    # back before that thread is done).
    await eventually(lambda: open_deleted_files() == baseline)
    assert set(os.listdir(tempfile.gettempdir())) == tmp_before, "the spill file has no name"


async def test_chunked_upload_read_at_chunk_ends_is_whole(sim, make_proxy, client):
    # While another upload holds the whole memory total, this one is read 64 KiB at a time;
    # its HTTP chunks are 64 KiB too, so reads end exactly at their ends. Once the other
    # upload is done, it is read a piece at a time, and the reader reports the end of a
    # chunk, empty: that end is not the body's, and the upload must arrive whole.
    proxy = await make_proxy(**{"replay.memory_limit": "64KiB", "replay.memory_total": "64KiB"})
    await warm_up(client, proxy)
    release = asyncio.Event()

    async def held() -> AsyncIterator[bytes]:
        yield bytes(64 * 1024)
        await release.wait()
        yield bytes(1024)

    async def memory_used() -> float:
        async with client.get(proxy.url + "/-/metrics") as resp:
            text = await resp.text()
        return next(
            float(line.split()[1])
            for line in text.splitlines()
            if line.startswith("mdcloud_proxy_body_memory_bytes ")
        )

    async def post(body: AsyncIterator[bytes]) -> None:
        async with client.post(proxy.url + "/v4/file", data=body) as resp:
            assert resp.status == 200, await resp.text()

    other = asyncio.create_task(post(held()))
    async with asyncio.timeout(10):
        while await memory_used() < 64 * 1024:
            await asyncio.sleep(0.01)
    data, digest = random_payload(8 * MiB)
    half = len(data) // 2

    async def releasing() -> AsyncIterator[bytes]:
        async for piece in chunks(data[:half], 64 * 1024):
            yield piece
        release.set()  # the other upload ends, and gives its memory back
        async with asyncio.timeout(10):
            while await memory_used() >= 64 * 1024:
                await asyncio.sleep(0.01)
        async for piece in chunks(data[half:], 64 * 1024):
            yield piece

    await post(releasing())
    await other
    uploads = [r for r in sim.requests if r.raw_path == "/v4/file"]
    assert (uploads[-1].body_size, uploads[-1].body_sha256) == (len(data), digest)


async def test_a_read_upload_holds_only_its_copy(handler_upstream, proxy_before, client):
    """Once the caller's body is read, the tail of its spill copy goes to the file: while the
    upstream takes its time to answer, only the in-memory part of the copy is held (once the
    worker thread has written that tail: on a slow disk it is still held for a moment)."""
    arrived, answer = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        while await request.content.read(1 << 16):  # all of it (request.read() stops at 1 MiB)
            pass
        arrived.set()
        await answer.wait()
        return web.json_response({"data_id": "x"})

    proxy = await proxy_before(await handler_upstream(slow), **{"replay.memory_limit": "64KiB"})
    data = os.urandom(3 * MiB + 100)
    upload = asyncio.create_task(client.post(proxy.url + "/v4/file", data=io.BytesIO(data)))
    try:
        async with asyncio.timeout(10):
            await arrived.wait()

        async def only_memory_held() -> bool:
            metrics = await scrape(client, proxy.url + "/-/metrics")
            return metrics[("mdcloud_proxy_body_memory_bytes", ())] <= 64 * 1024

        await eventually(only_memory_held)
    finally:
        answer.set()
    async with await upload as resp:
        assert resp.status == 200


async def test_replay_uses_new_token_and_same_request(sim, proxy, client):
    await warm_up(client, proxy)
    first_token = sim.issued_tokens[-1]
    sim.expire_tokens()
    async with client.post(
        URL(proxy.url + "/v4/hash?x=1&y=%2F", encoded=True),
        data=b'{"hash":["abc"]}',
        headers={"X-Trace": "t1"},
    ) as resp:
        assert resp.status == 200  # the replayed answer, to the body sent again
        assert [item["hash"] for item in (await resp.json())["data"]] == ["abc"]
    refused, replayed = sim.requests[-3], sim.requests[-1]
    assert refused.raw_path == replayed.raw_path == "/v4/hash?x=1&y=%2F"
    assert refused.header("Authorization") == [f"Bearer {first_token}"]
    assert replayed.header("Authorization") == [f"Bearer {sim.issued_tokens[-1]}"]
    assert sim.issued_tokens[-1] != first_token
    assert replayed.header("X-Trace") == ["t1"]
    assert replayed.body_sha256 == refused.body_sha256 is not None


async def test_second_refusal_is_passed_through(sim, proxy, client):
    await warm_up(client, proxy)
    sim.revoke_after = 0  # every new token is refused at once as well
    sim.expire_tokens()
    async with client.get(proxy.url + "/v4/apikey/") as resp:
        assert resp.status == 401
        assert (await resp.json()) == {
            "error": {"code": 401009, "messages": ["OAuth token has expired"]}
        }
    assert [r.raw_path for r in sim.requests[-3:]] == [
        "/v4/apikey/",
        "/v4/oauth2/token",
        "/v4/apikey/",
    ]


async def test_invalid_apikey_is_not_retried(sim, make_proxy, client):
    sim.api_key = "the-real-key"
    proxy = await make_proxy(api_key="a-wrong-key")
    async with client.get(proxy.url + "/v4/apikey/") as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == 401006
    assert sim.token_requests == 1
    assert [r.raw_path for r in sim.requests].count("/v4/apikey/") == 1


async def test_invalid_token_code_401010_is_replayed(sim, proxy, client):
    await warm_up(client, proxy)
    sim._tokens.clear()  # the server forgot the token: 401010, not 401009
    async with client.get(proxy.url + "/v4/apikey/") as resp:
        assert resp.status == 200
    assert sim.token_requests == 2


async def test_www_authenticate_invalid_token_is_replayed(handler_upstream, proxy_before, client):
    """A gateway in front of the API may say it only in the header, RFC 6750 style."""
    from aiohttp import web

    seen = []

    async def gateway(request):
        seen.append(request.headers["Authorization"])
        if len(seen) == 1:
            return web.Response(
                status=401,
                text="expired",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return web.json_response({"ok": True})

    proxy = await proxy_before(await handler_upstream(gateway))
    async with client.get(proxy.url + "/v4/x") as resp:
        assert resp.status == 200
    assert len(seen) == 2 and seen[0] != seen[1]


async def test_concurrent_refusals_cause_one_fetch(sim, proxy, client):
    await warm_up(client, proxy)
    sim.expire_tokens()

    async def call():
        async with client.get(proxy.url + "/v4/apikey/") as resp:
            return resp.status

    statuses = await asyncio.gather(*(call() for _ in range(100)))
    assert statuses == [200] * 100
    assert sim.token_requests == 2


async def test_body_over_limit_is_refused_before_upstream(sim, make_proxy, client):
    proxy = await make_proxy(**{"limits.max_body_size": "1MiB"})
    async with client.post(proxy.url + "/v4/file", data=io.BytesIO(b"x" * (MiB + 1))) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"]["code"] == 413001
    assert not any(r.raw_path == "/v4/file" for r in sim.requests)


async def test_chunked_body_over_limit_is_cut_off(sim, make_proxy, client):
    proxy = await make_proxy(**{"limits.max_body_size": "2MiB"})
    data, _ = random_payload(3 * MiB)
    baseline = open_deleted_files()
    async with client.post(proxy.url + "/v4/file", data=chunks(data)) as resp:
        assert resp.status == 413
    assert not any(r.body_sha256 for r in sim.requests if r.raw_path == "/v4/file")
    # The spill file closes once the writes already queued to worker threads are done.
    await eventually(lambda: open_deleted_files() == baseline)


async def test_caller_hanging_up_mid_upload_cancels_upstream_and_cleans_up(sim, proxy, client):
    await warm_up(client, proxy)
    baseline = open_deleted_files()
    _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(
            f"POST /v4/file HTTP/1.1\r\nHost: x\r\nContent-Length: {10 * MiB}\r\n\r\n".encode()
        )
        writer.write(os.urandom(3 * MiB))
        await writer.drain()
        for _ in range(250):  # until the proxy has spilled the part past 1 MiB to its file
            if open_deleted_files() - baseline:
                break
            await asyncio.sleep(0.02)
        assert open_deleted_files() - baseline, "the upload was under way"
        assert any(r.raw_path == "/v4/file" for r in sim.requests), "and streaming upstream"
    finally:
        writer.close()
    for _ in range(100):
        if open_deleted_files() == baseline:
            break
        await asyncio.sleep(0.02)
    assert open_deleted_files() == baseline
    assert not any(r.body_sha256 for r in sim.requests if r.raw_path == "/v4/file")
    async with client.get(proxy.url + "/v4/apikey/") as resp:
        assert resp.status == 200, "the proxy serves on"


@pytest.mark.parametrize(
    ("file_size_limit", "size", "reason"),
    # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG.
    [
        (1 * MiB, 20 * MiB, "File too large"),
        (1 * MiB, 3 * MiB, "File too large"),
        (0, 20 * MiB, "No usable temporary directory found"),
    ],
    ids=["spill-file-fills-up", "unnoticed-until-the-replay", "no-spill-file-at-all"],
)
async def test_a_spill_file_that_cannot_be_written_fails_only_the_replay(
    sim, upstream, client, file_size_limit, size, reason
):
    """Only a replay needs the copy: with no room for it (here the proxy process may not
    write files past a size, as on a full disk; at 0 not even tempfile's probe file), a first
    attempt streams on and arrives whole. 20 MiB: more than the writes that may be queued;
    3 MiB: few enough that no write was waited for before the replay."""

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    env = {**account_env(upstream), "MDCLOUD_PROXY_REPLAY_MEMORY_LIMIT": "64KiB"}
    proxy = await spawn("--port", "0", env=env, preexec_fn=limit_files)
    try:
        base = (await wait_for_line(proxy, r"listening on (http://127\.0\.0\.1:\d+)")).group(1)
        data, digest = random_payload(size)
        async with client.post(base + "/v4/file", data=chunks(data)) as resp:
            assert resp.status == 200, await resp.text()
        assert sim.requests[-1].body_sha256 == digest
        assert sim.requests[-1].body_size == len(data)

        sim.expire_tokens()  # now the upload must be replayed, and its copy is not whole
        async with client.post(base + "/v4/file", data=chunks(data)) as resp:
            assert resp.status == 507
            body = await resp.json()
        assert body["error"]["code"] == 507001
        assert body["error"]["messages"][0].startswith(
            "mdcloud-proxy: cannot keep a copy of the body for a replay: " + reason
        )
        uploads = sum(r.raw_path == "/v4/file" for r in sim.requests)
        assert uploads == 2, "the replay is not sent: it could not send the whole body"
        async with client.get(base + "/v4/apikey/") as resp:
            assert resp.status == 200
    finally:
        proxy.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            out, _ = await proxy.communicate()
    assert proxy.returncode == 0
    assert b"Traceback" not in out and b"never retrieved" not in out, out.decode()
