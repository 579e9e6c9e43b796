"""What a hostile caller tries, against a real server_fast.py process on 127.0.0.1: cross-site writes,
rebinding hosts, unspeakable text and voices, slow bodies, uploads past admission, path leaks, /docs offline."""

from __future__ import annotations

import asyncio
import io
import json
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
from test_server_process import _server

from musetalk.server.uploads import UploadGate

READ_TIMEOUT_S = 1.0
BODY_DEADLINE_S = 3.0
HEADER_TIMEOUT_S = 2.0
OVERRIDES = (
    f"server.read_timeout_s={READ_TIMEOUT_S}",
    f"server.body_deadline_s={BODY_DEADLINE_S}",
    "server.max_concurrent_uploads=2",
    "server.upload_wait_s=0",
    f"server.header_timeout_s={HEADER_TIMEOUT_S}",
    "server.cors_origins=[http://app.example:3000]",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    tmp_path = tmp_path_factory.mktemp("hardening")
    with _server(tmp_path, "hardening", OVERRIDES) as (proc, base, _):
        yield proc, base, tmp_path


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def test_cross_site_writes_and_foreign_hosts_are_refused(server: tuple[object, str, Path]) -> None:
    _, base, _ = server
    evil = {"Origin": "http://evil.example"}
    refused = [
        httpx.post(f"{base}/speak", json={"text": "hi"}, headers=evil),
        httpx.get(f"{base}/reset", headers=evil),
        httpx.get(f"{base}/reset", headers={"Sec-Fetch-Site": "cross-site"}),  # an <img src=...> from a page
        httpx.post(f"{base}/speak_audio", files={"file": ("a.wav", b"RIFF")}, headers={"Origin": "null"}),
        httpx.post(f"{base}/chat", json={"message": "hi"}, headers=evil),
        httpx.get(f"{base}/health", headers={"Host": "rebound.example:8000"}),  # DNS rebinding
    ]
    assert [r.status_code for r in refused] == [403] * len(refused)
    assert all(r.headers["content-type"] == "application/json" and r.json()["error"] == "Forbidden" for r in refused)
    # curl (no Origin), the same origin, a configured origin, and plain reads still work.
    same = {"Origin": f"http://127.0.0.1:{_port(base)}", "Sec-Fetch-Site": "same-origin"}
    allowed = [
        httpx.get(f"{base}/reset"),
        httpx.get(f"{base}/reset", headers=same),
        httpx.post(f"{base}/reset", headers={"Origin": "http://app.example:3000"}),
        httpx.get(f"{base}/health", headers={"Host": f"localhost:{_port(base)}", "Origin": "http://evil.example"}),
        httpx.get(f"{base}/reset", headers={"Host": f"[::1]:{_port(base)}"}),
    ]
    assert [r.status_code for r in allowed] == [200] * len(allowed)


def test_unspeakable_text_and_voices_are_422(server: tuple[object, str, Path]) -> None:
    _, base, _ = server
    for voice in (".", "..", ".hidden"):
        r = httpx.post(f"{base}/speak", json={"text": "hello", "voice": voice})
        assert r.status_code == 422 and "voice" in r.json()["detail"]
    raw = {"Content-Type": "application/json"}
    bodies = {
        "/speak": ['{"text": "hello\\u0000world"}', '{"text": "a\\udfffb"}', '{"text": "bell\\u0007"}'],
        "/chat": ['{"message": "\\udfff"}', '{"message": "hello\\u0000world"}'],
    }
    for path, items in bodies.items():
        for body in items:
            r = httpx.post(f"{base}{path}", content=body, headers=raw)
            assert r.status_code == 422, (path, body, r.text)
            assert re.search(r"control character|lone surrogate|unicode string", r.json()["detail"])


def _raw_request(base: str, head: bytes, body_parts: list[bytes], gap_s: float) -> tuple[bytes, float]:
    """Send a request's head and then its body parts `gap_s` apart; return what came back and when."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", _port(base)), timeout=10) as s:
        s.sendall(head)
        for part in body_parts:
            time.sleep(gap_s)
            try:
                s.sendall(part)
            except OSError:
                break
        got = b""
        while chunk := s.recv(65536):  # ends when the server closes the connection
            got += chunk
    return got, time.monotonic() - t0


def test_slow_bodies_are_cut_off(server: tuple[object, str, Path]) -> None:
    _, base, _ = server
    head = b"POST /speak HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    # Part of the body, then nothing: 408 after the read timeout, and the connection is closed.
    got, took_s = _raw_request(base, head, [b'{"text": "'], 0)
    assert got.startswith(b"HTTP/1.1 408") and b"no request body data" in got
    assert READ_TIMEOUT_S <= took_s < READ_TIMEOUT_S + 2
    # A trickle that never idles long enough: cut off at the whole-body deadline.
    got, took_s = _raw_request(base, head, [b" "] * 20, READ_TIMEOUT_S / 3)
    assert got.startswith(b"HTTP/1.1 408") and b"not complete within" in got
    assert BODY_DEADLINE_S <= took_s < BODY_DEADLINE_S + 2


def test_slow_request_heads_are_cut_off(server: tuple[object, str, Path]) -> None:
    _, base, _ = server
    # Headers trickled a piece every 0.4 s never complete: the connection is closed at the head deadline.
    trickle = [b"Host: 127.0.0.1\r\n", b"X-A: 1\r\n", b"X-B: 2\r\n", b"X-C: 3\r\n"] * 5
    got, took_s = _raw_request(base, b"GET /health HTTP/1.1\r\n", trickle, 0.4)
    assert got == b"" and HEADER_TIMEOUT_S <= took_s < HEADER_TIMEOUT_S + 2
    # A normal request and a keep-alive second one are unaffected.
    with httpx.Client() as client:
        assert client.get(f"{base}/health").status_code == 200
        assert client.get(f"{base}/health").status_code == 200


def _wav(seconds: float, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(seconds * rate), np.int16), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _peak_rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]


def test_uploads_are_admitted_before_their_body_is_read(server: tuple[subprocess.Popen[bytes], str, Path]) -> None:
    proc, base, _ = server
    # A FLAC at 655,350 Hz is refused from its header: no decoding, no memory.
    flac = io.BytesIO()
    sf.write(flac, np.zeros(655_350 // 10, np.int16), 655_350, format="FLAC", subtype="PCM_16")
    before_kb = _peak_rss_kb(proc.pid)
    r = httpx.post(f"{base}/speak_audio", files={"file": ("x.flac", flac.getvalue())})
    assert r.status_code == 422 and "sample rate" in r.json()["detail"]
    # A 10-minute WAV (19.2 MB, under the size limit) is refused from its header's duration.
    r = httpx.post(f"{base}/speak_audio", files={"file": ("long.wav", _wav(600, 16000))}, timeout=30)
    assert r.status_code == 422 and "longer than the limit" in r.json()["detail"]
    assert _peak_rss_kb(proc.pid) - before_kb < 60_000
    # Two uploads hold both slots (their bodies arrive slowly); a third is refused before it is read.
    head = (
        b"POST /speak_audio HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    holders = [socket.create_connection(("127.0.0.1", _port(base)), timeout=10) for _ in range(2)]
    try:
        for s in holders:
            s.sendall(head + b"--b\r\n")
        time.sleep(0.2)
        r = httpx.post(f"{base}/speak_audio", files={"file": ("a.wav", _wav(1, 16000))})
        assert r.status_code == 503 and r.headers["retry-after"] == "2"
        assert "max_concurrent_uploads" in r.json()["detail"]
    finally:
        for s in holders:
            s.close()
    time.sleep(0.2)  # the gate frees the slots once those requests end
    r = httpx.post(f"{base}/speak_audio", files={"file": ("a.wav", _wav(1, 16000))}, timeout=30)
    assert r.status_code == 200 and r.json()["clip_duration_s"] == pytest.approx(1.0, abs=0.05)


def test_errors_name_files_not_server_paths(server: tuple[object, str, Path]) -> None:
    _, base, tmp_path = server
    damaged = tmp_path / "results" / "sessions" / "leak" / "full_session.mp4"
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"not an mp4")
    r = httpx.post(f"{base}/speak", json={"text": "hello", "session_id": "leak"}, timeout=30)
    assert r.status_code == 409 and "'leak'" in r.json()["detail"]
    assert str(tmp_path) not in r.text and "/tmp" not in r.text
    job = httpx.post(f"{base}/chat", json={"message": "hello", "session_id": "leak"}).json()
    deadline = time.monotonic() + 30
    while (status := httpx.get(f"{base}{job['status_url']}").json())["status"] not in ("done", "error"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert status["status"] == "error" and "'leak'" in status["error"]
    assert str(tmp_path) not in json.dumps(status) and "/tmp" not in json.dumps(status)


def test_docs_load_without_internet(server: tuple[object, str, Path]) -> None:
    _, base, _ = server
    for page in ("/docs", "/redoc"):
        html = httpx.get(f"{base}{page}").text
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']|url: ?["']([^"']+)["']""", html)
        urls = [a or b for a, b in urls]
        assert urls and not [u for u in urls if not u.startswith("/")], urls  # nothing from another host
        assert "://" not in re.sub(r"https?://(www\.)?(w3\.org|swagger\.io)\S*", "", html)
        for url in urls:
            r = httpx.get(f"{base}{url}")
            assert r.status_code == 200 and len(r.content) > 10, url
    bundle = httpx.get(f"{base}/docs-assets/swagger-ui-bundle.js")
    assert "SwaggerUIBundle" in bundle.text and bundle.headers["content-type"].startswith("text/javascript")


def test_an_upload_over_the_limit_waits_for_a_slot_then_gets_503() -> None:
    async def run(wait_s: float) -> list[int]:
        release = asyncio.Event()

        async def app(scope: Any, receive: Any, send: Any) -> None:  # holds its slot until `release` is set
            await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        gate = UploadGate(app, frozenset({"/speak_audio"}), max_uploads=1, retry_after_s=2, wait_s=wait_s)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gate), base_url="http://127.0.0.1") as c:
            first = asyncio.create_task(c.post("/speak_audio", content=b"a"))
            await asyncio.sleep(0.05)
            second = asyncio.create_task(c.post("/speak_audio", content=b"b"))  # waits for the first's slot
            await asyncio.sleep(0.3)
            release.set()
            return [(await first).status_code, (await second).status_code]

    assert asyncio.run(run(wait_s=2.0)) == [200, 200]  # the slot came free within the wait: served
    assert asyncio.run(run(wait_s=0.1)) == [200, 503]  # it did not: refused, its body never read

