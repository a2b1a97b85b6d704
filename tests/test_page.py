"""``/-/`` as a person sees it: rendered by a real headless Chromium (Debian's ``chromium``),
read back from the DOM it builds and from the pixels it draws."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import struct
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest
from aiohttp import web

from scripts.screenshot import CHROMIUM_FLAGS

CHROMIUM = Path("/usr/bin/chromium")
# The bar's colours in the page's style, and the page's background.
GREEN, GREY, WHITE = (0x22, 0xAA, 0x77), (0xEE, 0xEE, 0xEE), (0xFF, 0xFF, 0xFF)


def installed_chromium() -> Path:
    """Chromium, or a failure saying how to install it: CI installs it, so no skip."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium` (.ci/run installs it)")
    return CHROMIUM


async def render(chromium: Path, url: str, profile: Path, screenshot: Path) -> str:
    """The DOM Chromium builds from ``url``, and its picture of the page into ``screenshot``."""
    proc = await asyncio.create_subprocess_exec(
        chromium,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        "--dump-dom",
        f"--screenshot={screenshot}",
        "--window-size=1000,700",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its helper processes go with it on a timeout
    )
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    except TimeoutError:
        os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        pytest.fail("chromium did not finish within 60 s")
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


class Elements(HTMLParser):
    """Every element of a page as (tag, attributes, its own text)."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str], list[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}, []))

    def handle_data(self, data: str) -> None:
        if self.elements:
            self.elements[-1][2].append(data)


def png_rows(data: bytes) -> list[list[tuple[int, int, int]]]:
    """The pixels of an 8-bit RGB or RGBA, non-interlaced PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    width = height = channels = 0
    while pos < len(data):
        (size,) = struct.unpack(">I", data[pos : pos + 4])
        kind, chunk = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + size]
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
            assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + size
    raw, stride = zlib.decompress(idat), width * channels
    rows, previous = [], bytearray(stride)
    for y in range(height):
        kind, line = (
            raw[y * (stride + 1)],
            bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]),
        )
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up, corner = previous[i], previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                guess = left + up - corner
                pa, pb, pc = abs(guess - left), abs(guess - up), abs(guess - corner)
                nearest = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[i] = (line[i] + nearest) & 0xFF
        rows.append([tuple(line[x : x + 3]) for x in range(0, stride, channels)])  # type: ignore[misc]
        previous = line
    return rows


def near(pixel: tuple[int, int, int], colour: tuple[int, int, int]) -> bool:
    return all(abs(a - b) <= 4 for a, b in zip(pixel, colour, strict=True))


def bar_share(rows: list[list[tuple[int, int, int]]]) -> float:
    """The green part of the widest bar drawn: its green pixels over its whole track (green,
    then grey, up to the white page), on the row with the most green."""
    best = max(rows, key=lambda row: sum(near(p, GREEN) for p in row))
    green = [x for x, p in enumerate(best) if near(p, GREEN)]
    assert green, "no bar drawn"
    end = green[0]
    while end < len(best) and not near(best[end], WHITE):
        end += 1
    assert all(near(p, GREY) for p in best[green[-1] + 2 : end]), "the track is not grey"
    return len(green) / (end - green[0])


async def test_the_page_shows_the_quota_left_as_chromium_renders_it(
    proxy_before, handler_upstream, client, tmp_path
):
    chromium = installed_chromium()
    remaining = 880

    async def upstream(request: web.Request) -> web.Response:
        nonlocal remaining
        if not request.path.startswith("/v4/hash/"):
            return web.json_response({"error": {"code": 404000, "messages": ["no"]}}, status=404)
        remaining -= 1
        headers = {
            "X-RateLimit-For": "reputation_api",
            "X-RateLimit-Interval": "daily",
            "X-RateLimit-Limit": "1000",
            "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Reset-In": "3294s",
        }
        return web.json_response({"hash": request.path[9:]}, headers=headers)

    proxy = await proxy_before(await handler_upstream(upstream))
    for i in range(7):
        async with client.get(f"{proxy.url}/v4/hash/{i:064x}") as resp:
            assert resp.status == 200
    async with client.get(f"{proxy.url}/v4/hash/{0:064x}") as resp:  # a hit: costs nothing
        assert resp.status == 200
    assert remaining == 873

    dom = await render(chromium, proxy.url + "/-/", tmp_path / "profile", tmp_path / "page.png")
    parser = Elements()
    parser.feed(dom)
    elements = parser.elements
    assert [texts for tag, _, texts in elements if tag == "th"] == [["reputation_api"]]
    cells = ["".join(texts) for tag, attrs, texts in elements if attrs.get("class") == "n"]
    assert cells == ["873 of 1000 left"]
    bars = [attrs["style"] for tag, attrs, _ in elements if tag == "div" and "style" in attrs]
    (width,) = [re.fullmatch(r"\s*width:\s*([\d.]+)%;?\s*", style) for style in bars]
    assert width and float(width.group(1)) == pytest.approx(87.3)
    assert re.search(r"\b1 hits?, 7 misses\b", dom)

    links = [v for _, attrs, _ in elements for k, v in attrs.items() if k in ("src", "href")]
    assert links == ["/-/status"]
    assert not [tag for tag, _, _ in elements if tag in ("script", "link", "img", "iframe")]
    assert not re.search(r"https?:|url\(|@import", dom)

    share = bar_share(png_rows((tmp_path / "page.png").read_bytes()))
    assert share == pytest.approx(0.873, abs=0.01)
