"""The live stream: a real aiortc viewer (musetalk/server/viewer.py) against the real server on 127.0.0.1.

The server is server_fast's app under uvicorn with the weight-free preview renderer on the synthetic
avatar; media stays on loopback (the server offers 127.0.0.1 alone, the viewer too). Lips are measured
as the mean pixel change inside the mask box against the avatar's own frame (`MouthMeter`); audio/video
offsets on the server's clock, through the RTCP sender reports (what a browser synchronises with).
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient
from numpy.typing import NDArray
from webapp_scaffold import serve, wait_for

from musetalk.avatar import PrepResult, load_avatar
from musetalk.config import PROJECT_ROOT, AppConfig, with_overrides
from musetalk.server.app import create_app
from musetalk.server.viewer import LiveViewer, MouthMeter, Received, rms
from musetalk.server.webrtc import AUDIO_MAX_LATE_S, AUDIO_PACKET_SAMPLES, LiveAudioTrack, host_addresses
from musetalk.session.live import AUDIO_RATE_HZ, Tick, Viewer
from musetalk.utils.ffmpeg import probe

RATE_HZ = 16_000
NTP_UNIX_OFFSET_S = 2_208_988_800  # NTP counts from 1900, the host clock from 1970
LOUD_RMS = 500  # int16 RMS of a voiced 20 ms packet (the test voices are ~2000-5000; silence is 0)


@dataclass
class Live:
    url: str
    cfg: AppConfig
    meter: MouthMeter
    results: Path


def _cfg(prepared: tuple[AppConfig, PrepResult], tmp: Path, *extra: str) -> AppConfig:
    return with_overrides(
        prepared[0],
        [f"models.dir={tmp / 'no-models'}", f"server.results_dir={tmp / 'results'}", "encode.preset=ultrafast",
         *extra],
    )  # fmt: skip


@pytest.fixture(scope="module")
def live(prepared_avatar: tuple[AppConfig, PrepResult], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """The server (preview renderer, real espeak-ng) with a short viewer timeout, and a mouth meter."""
    tmp = tmp_path_factory.mktemp("live")
    cfg = _cfg(prepared_avatar, tmp, "server.webrtc.viewer_timeout_s=3")
    cache = load_avatar(cfg, cfg.avatar_id)
    meter = MouthMeter([cache.frames[i] for i in range(cache.n_frames)], cache.mask_boxes)
    with serve(create_app(cfg), lifespan="on", start_timeout_s=120) as url:
        yield Live(url, cfg, meter, tmp / "results")


def _voice(seconds: float) -> NDArray[np.float32]:
    t = np.arange(round(seconds * RATE_HZ)) / RATE_HZ
    return (0.3 * np.sin(2 * np.pi * 140 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)


def _wav(parts: list[tuple[str, float]]) -> bytes:
    """("voice" | "silence", seconds) parts → a 16 kHz wav."""
    x = np.concatenate(
        [_voice(s) if kind == "voice" else np.zeros(round(s * RATE_HZ), np.float32) for kind, s in parts]
    )
    buf = io.BytesIO()
    sf.write(buf, x, RATE_HZ, format="WAV", subtype="PCM_16")
    return buf.getvalue()


async def _post_audio(url: str, wav: bytes, session: str, **form: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=120) as client:
        return await client.post(
            f"{url}/speak_audio", files={"file": ("a.wav", wav, "audio/wav")}, data={"session_id": session, **form}
        )


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """(start, end-exclusive) index runs of True."""
    runs, start = [], None
    for i, f in enumerate([*flags, False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _video_on_server_clock(r: Received) -> list[tuple[float, int, float]]:
    """(server time s, source frame id, mouth change) of every received frame."""
    return [(r.sender_time_s("video", pts), i, m) for _, pts, (i, m) in r.video]


def _audio_on_server_clock(r: Received) -> list[tuple[float, float]]:
    return [(r.sender_time_s("audio", pts), rms(a)) for _, pts, a in r.audio]


@pytest.mark.slow
def test_idle_stream_has_both_tracks_at_fps_and_keeps_moving(live: Live) -> None:
    async def watch() -> tuple[Received, dict[str, float]]:
        async with LiveViewer(live.url, "idle", reduce_frame=live.meter) as viewer:
            await asyncio.sleep(4.0)
            async with httpx.AsyncClient() as client:
                figures = (await client.get(f"{live.url}/health")).json()["live"]
            return viewer.received, figures

    r, figures = asyncio.run(watch())
    # /health's stream figures: one stream, one viewer, and an idle stream that keeps up with its clock.
    assert figures["sessions"] == 1 and figures["viewers"] == 1
    assert all(0 <= figures[k] < 1000 for k in ("tick_late_p95_ms", "video_age_p95_ms", "audio_late_p95_ms"))
    assert figures["held_frames"] == 0  # idle: nothing to hold
    fps = live.cfg.fps
    arrivals = [t for t, _, _ in r.video]
    last_2s = [t for t in arrivals if t > arrivals[-1] - 2.0]
    assert abs((len(last_2s) - 1) / (last_2s[-1] - last_2s[0]) - fps) <= 2
    pts = [p for _, p, _ in r.video]
    assert all(b - a == 90_000 // fps for a, b in zip(pts, pts[1:], strict=False))  # one frame per tick
    # Each decoded frame's last packet was seen, before aiortc's decoder let the frame out.
    complete = [(r.video_complete_s(p), t) for t, p, _ in r.video]
    assert all(c is not None and c <= t for c, t in complete)
    assert r.audio and max(rms(a) for _, _, a in r.audio) == 0  # silence
    ids = [i for _, _, (i, _) in r.video]
    mouths = [m for _, _, (_, m) in r.video]
    assert max(mouths) < 5.0  # the avatar's own frames (codec noise only): mouth closed
    assert len(set(ids)) >= min(20, live.meter.frames.__len__())  # the head moves along its cycle: never frozen


@pytest.mark.slow
def test_speech_is_heard_and_lips_move_only_while_voiced_in_sync(live: Live) -> None:
    async def session() -> tuple[Received, float, float, dict[str, Any]]:
        async with LiveViewer(live.url, "lips", reduce_frame=live.meter) as viewer:
            loop = asyncio.get_running_loop()
            await asyncio.sleep(0.5)
            t_text = loop.time()
            async with httpx.AsyncClient(timeout=60) as client:
                r = await client.post(f"{live.url}/speak", json={"text": "Hello there!", "session_id": "lips"})
            assert r.status_code == 200, r.text
            heard = [t for t, _, a in viewer.received.audio if t > t_text and rms(a) > LOUD_RMS]
            t_heard = heard[0] if heard else float("nan")
            await asyncio.sleep(0.5)
            wav = _wav([("silence", 0.6), ("voice", 0.6), ("silence", 0.6), ("voice", 0.6), ("silence", 0.6),
                        ("voice", 0.6), ("silence", 0.6)])  # fmt: skip
            t_bursts = loop.time()
            r = await _post_audio(live.url, wav, "lips")
            assert r.status_code == 200, r.text
            await asyncio.sleep(0.5)
            return viewer.received, t_text, t_heard - t_text, {"t": t_bursts, **r.json()}

    r, _, heard_after_s, bursts = asyncio.run(session())
    assert heard_after_s < 5.0  # the /speak text was audible on the stream (before /speak returned)
    assert bursts["clip_duration_s"] == pytest.approx(4.2, abs=0.05) and not bursts["interrupted"]

    video = [(t, m) for t, _, m in _video_on_server_clock(r)]
    audio = _audio_on_server_clock(r)
    t_start = r.sender_time_s("video", next(p for t, p, _ in r.video if t > bursts["t"]))
    video = [(t, m) for t, m in video if t >= t_start]
    audio = [(t, a) for t, a in audio if t >= t_start]
    voiced_runs = [(audio[a][0], audio[b - 1][0] + 0.02) for a, b in _runs([a > LOUD_RMS for _, a in audio])]
    moving_runs = [(video[a][0], video[b - 1][0] + 0.04) for a, b in _runs([m > 6.0 for _, m in video])]
    assert len(voiced_runs) == 3, voiced_runs
    assert len(moving_runs) == 3, moving_runs  # the lips move in the three bursts and nowhere else
    frame_s = 1 / live.cfg.fps
    for (v0, v1), (m0, m1) in zip(voiced_runs, moving_runs, strict=True):
        assert abs(m0 - v0) <= frame_s + 1e-3  # A/V offset at the onset: at most one frame
        # the mouth closes with the voice (silence frames fade the face out over a few frames)
        assert v1 - frame_s - 1e-3 <= m1 <= v1 + live.cfg.audio.crossfade_frames * frame_s + 1e-3
    quiet = [m for t, m in video if not any(v0 - frame_s <= t <= v1 + 4 * frame_s for v0, v1 in voiced_runs)]
    assert quiet and max(quiet) < 5.0


@pytest.mark.slow
def test_interrupt_returns_to_idle_quickly_and_the_record_keeps_the_cut_utterance(live: Live) -> None:
    async def session() -> tuple[Received, float, float, httpx.Response, httpx.Response, dict[str, Any]]:
        async with LiveViewer(live.url, "barge", reduce_frame=live.meter) as viewer:
            loop = asyncio.get_running_loop()
            long = asyncio.ensure_future(_post_audio(live.url, _wav([("voice", 6.0)]), "barge"))
            wait_until = loop.time() + 20
            while not any(e["type"] == "speaking" for _, e in viewer.received.events) and loop.time() < wait_until:
                await asyncio.sleep(0.02)
            queued = asyncio.ensure_future(_post_audio(live.url, _wav([("voice", 1.0)]), "barge"))
            await asyncio.sleep(1.5)
            t_interrupt, wall_interrupt = loop.time(), time.time()
            async with httpx.AsyncClient(timeout=10) as client:
                stop = (await client.post(f"{live.url}/sessions/barge/interrupt")).json()
            cut, dropped = await long, await queued
            await asyncio.sleep(1.0)
            return viewer.received, t_interrupt, wall_interrupt, cut, dropped, stop

    r, t_interrupt, wall_interrupt, cut, dropped, stop = asyncio.run(session())
    assert stop == {"session_id": "barge", "cut": 1, "dropped": 1}
    assert dropped.status_code == 409 and dropped.json()["error"] == "Interrupted"
    # On the stream's own clock (the server's, through the sender reports; the same host clock as the
    # test's): the last audible 20 ms end within 200 ms of sending the interrupt.
    loud = [r.sender_time_s("audio", pts) - NTP_UNIX_OFFSET_S for _, pts, a in r.audio if rms(a) > LOUD_RMS]
    assert 0 <= max(loud) + 0.02 - wall_interrupt <= 0.2
    # At the viewer, after its jitter buffer and decoding (on a busy machine this adds a little).
    loud_after = [t for t, _, a in r.audio if t > t_interrupt and rms(a) > LOUD_RMS]
    assert (max(loud_after) + 0.02 - t_interrupt if loud_after else 0.0) <= 0.3
    assert r.events[-1][1]["type"] == "idle"
    assert max(m for t, _, (_, m) in r.video if t > t_interrupt + 0.3) < 5.0  # mouth closed again

    assert cut.status_code == 200 and cut.json()["interrupted"], cut.text
    body = cut.json()
    assert 1.0 < body["clip_duration_s"] < 6.0
    clip = sorted((live.results / "sessions" / "barge" / "clips").glob("clip_*.mp4"))[-1]
    info = probe(clip)
    n = info.n_video_frames
    assert n == round(body["clip_duration_s"] * live.cfg.fps)
    pcm, rate = sf.read(clip.with_suffix(".wav"))
    assert n is not None and len(pcm) == n * rate // live.cfg.fps  # audio and video of the cut clip: the same length
    assert info.audio_duration_s is not None and abs(info.audio_duration_s - n / live.cfg.fps) < 0.05
    record = probe(live.results / "sessions" / "barge" / "full_session.mp4")
    assert record.n_video_frames == n


@pytest.mark.slow
def test_two_viewers_see_the_same_frames_and_queued_utterances_play_back_to_back(live: Live) -> None:
    async def session() -> tuple[Received, Received]:
        async with LiveViewer(live.url, "pair", reduce_frame=live.meter) as a:
            await asyncio.sleep(0.5)
            async with LiveViewer(live.url, "pair", reduce_frame=live.meter) as b:
                first = asyncio.ensure_future(_post_audio(live.url, _wav([("voice", 1.0), ("silence", 0.2)]), "pair"))
                second = asyncio.ensure_future(_post_audio(live.url, _wav([("voice", 1.0)]), "pair"))
                assert (await first).status_code == 200 and (await second).status_code == 200
                await asyncio.sleep(0.5)
                return a.received, b.received

    a, b = asyncio.run(session())
    for r in (a, b):
        kinds = [e["type"] for _, e in r.events]
        # the second utterance follows the first on air with no idle frame between them
        assert kinds[-3:] == ["speaking", "speaking", "idle"], r.events
    # The same instant on the server's clock (within half a frame: each viewer's sender reports its own
    # send times) carries the same frame in both: the same source frame and the same mouth.
    seen_a = _video_on_server_clock(a)
    times_a = np.array([t for t, _, _ in seen_a])
    pairs = []
    for t, i, m in _video_on_server_clock(b):
        k = int(np.argmin(np.abs(times_a - t)))
        if abs(times_a[k] - t) < 0.5 / live.cfg.fps:
            pairs.append((seen_a[k][1:], (i, m)))
    assert len(pairs) > 50
    assert all(ia == ib for (ia, _), (ib, _) in pairs)
    assert max(abs(ma - mb) for (_, ma), (_, mb) in pairs) < 2.0
    assert max(ma for (_, ma), _ in pairs) > 6.0  # and they include the speaking frames


VIEWER_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from musetalk.server.viewer import LiveViewer

    async def main():
        viewer = LiveViewer(sys.argv[1], "gone")
        await viewer.connect()
        print("connected", flush=True)
        await asyncio.sleep(600)

    asyncio.run(main())
    """
)


def _viewers(url: str) -> tuple[int, int]:
    """(sessions with a live stream, viewers) from /health."""
    figures = httpx.get(f"{url}/health").json()["live"]
    return figures["sessions"], figures["viewers"]


@pytest.mark.slow
def test_a_viewer_that_vanishes_without_closing_is_dropped(live: Live) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", VIEWER_SCRIPT, live.url], cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"connected"
        assert _viewers(live.url) == (1, 1)
        os.kill(proc.pid, signal.SIGKILL)  # no BYE, no DTLS close: the viewer just disappears
        proc.wait()
        t0 = time.monotonic()
        wait_for(lambda: _viewers(live.url) == (0, 0), 15.0, 0.2)
        assert time.monotonic() - t0 < live.cfg.server.webrtc.viewer_timeout_s + 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def api(
    prepared_avatar: tuple[AppConfig, PrepResult], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TestClient, Path]]:
    """The app in-process (TestClient) with the tone voice; and its results folder."""
    tmp = tmp_path_factory.mktemp("live-api")
    with TestClient(create_app(_cfg(prepared_avatar, tmp, "tts.engine=tone")), base_url="http://127.0.0.1") as c:
        yield c, tmp / "results"


def test_a_bad_offer_is_400_with_a_json_error(api: tuple[TestClient, Path]) -> None:
    client, _ = api
    r = client.post("/sessions/s1/offer", json={"sdp": "this is not sdp", "type": "offer"})
    assert r.status_code == 400 and r.json()["error"] == "BadOffer", r.text
    r = client.post("/sessions/s1/offer", json={"sdp": "v=0\r\n", "type": "answer"})
    assert r.status_code == 400 and r.json()["error"] == "BadOffer"
    assert client.post("/sessions/s1/offer", json={"sdp": "v=0"}).status_code == 422
    assert client.post("/sessions/bad%20id/offer", json={"sdp": "v=0", "type": "offer"}).status_code == 422
    evil = {"Origin": "https://evil.example"}
    assert client.post("/sessions/s1/offer", json={"sdp": "v=0", "type": "offer"}, headers=evil).status_code == 403
    assert client.post("/sessions/s1/interrupt", headers=evil).status_code == 403
    figures = client.get("/health").json()["live"]
    assert (figures["sessions"], figures["viewers"]) == (0, 0)


def test_wait_false_is_202_with_the_clip_index_and_the_clip_lands_there(api: tuple[TestClient, Path]) -> None:
    client, results = api
    r = client.post("/speak", json={"text": "One.", "session_id": "nowait", "wait": False})
    assert r.status_code == 202, r.text
    assert r.json()["clip_index"] == 0 and r.json()["session_id"] == "nowait"
    r2 = client.post("/speak", json={"text": "Two, and more.", "session_id": "nowait", "wait": False})
    assert r2.status_code == 202 and r2.json()["clip_index"] == 1
    assert r2.json()["utterance"] != r.json()["utterance"]
    concat = results / "sessions" / "nowait" / "concat_list.txt"
    wait_for(lambda: concat.is_file() and len(concat.read_text().splitlines()) == 2, 60, 0.1)
    r3 = client.post("/speak", json={"text": "Three.", "session_id": "nowait"})
    assert r3.status_code == 200 and r3.json()["clip_index"] == 2 and not r3.json()["interrupted"]
    assert client.post("/speak", json={"text": "x", "session_id": "nowait", "wait": "no"}).status_code == 422


def test_interrupt_without_viewers_cuts_the_render_and_drops_the_queue(api: tuple[TestClient, Path]) -> None:
    client, results = api
    long = client.post("/speak", json={"text": "A long sentence. " * 30, "session_id": "cut", "wait": False})
    queued = client.post("/speak", json={"text": "Never said.", "session_id": "cut", "wait": False})
    assert long.status_code == queued.status_code == 202
    r = client.post("/sessions/cut/interrupt")
    assert r.status_code == 200 and r.json()["dropped"] + r.json()["cut"] == 2, r.json()
    r = client.post("/speak", json={"text": "After.", "session_id": "cut"})
    assert r.status_code == 200, r.text
    # The interrupted render kept the frames it had encoded (or none); the queued request never rendered.
    lines = (results / "sessions" / "cut" / "concat_list.txt").read_text().splitlines()
    assert len(lines) == r.json()["clip_index"] + 1 <= 2


def test_audio_too_late_to_send_is_skipped_and_the_rest_keeps_its_place_on_the_timeline() -> None:
    async def run() -> list[tuple[int, NDArray[np.int16]]]:
        loop = asyncio.get_running_loop()
        viewer = Viewer()
        spf = AUDIO_RATE_HZ // 25
        now = loop.time()
        tone = (3000 * np.sin(2 * np.pi * 440 * np.arange(50 * spf) / AUDIO_RATE_HZ)).astype(np.int16)
        for k in range(50):  # two seconds of a stream that went on air long ago (the server fell behind)
            pcm = tone[k * spf : (k + 1) * spf]
            viewer.audio.put_nowait(Tick(k, np.zeros((6, 4), np.uint8), pcm, now - 2.0 + k * 0.04, None))
        track = LiveAudioTrack(viewer)
        decoder = av.CodecContext.create("libopus", "r")
        out = []
        for _ in range(4):
            packet = await track.recv()
            assert isinstance(packet, av.Packet)
            decoded = np.concatenate([f.to_ndarray().reshape(-1) for f in decoder.decode(packet)])
            out.append((int(packet.pts or 0), decoded))
        return out

    packets = asyncio.run(run())
    positions = [pts for pts, _ in packets]
    # Only audio due within the last AUDIO_MAX_LATE_S is sent, each packet at its own place, 20 ms apart.
    assert positions[0] >= (50 - round(AUDIO_MAX_LATE_S * 25) - 1) * (AUDIO_RATE_HZ // 25)
    assert all(b - a == AUDIO_PACKET_SAMPLES for a, b in zip(positions, positions[1:], strict=False))
    assert all(len(samples) >= AUDIO_PACKET_SAMPLES for _, samples in packets)  # real 20 ms Opus packets
    assert all(rms(samples[-480:]) > 1000 for _, samples in packets[1:])  # the tone (the first is the warm-up)


@pytest.mark.slow
def test_a_viewer_without_opus_still_gets_the_audio(live: Live) -> None:
    from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription

    async def watch() -> list[Any]:
        pc = RTCPeerConnection()
        transceiver = pc.addTransceiver("audio", direction="recvonly")
        pcmu = [c for c in RTCRtpSender.getCapabilities("audio").codecs if c.mimeType == "audio/PCMU"]
        transceiver.setCodecPreferences(pcmu)  # a viewer that offers G.711 only: aiortc encodes for it
        frames: list[Any] = []

        @pc.on("track")
        def _track(track: Any) -> None:
            async def pull() -> None:
                while len(frames) < 25:
                    frames.append(await track.recv())

            asyncio.ensure_future(pull())

        with host_addresses(("127.0.0.1",)):
            await pc.setLocalDescription(await pc.createOffer())
        async with httpx.AsyncClient() as client:
            r = await client.post(f"{live.url}/sessions/pcmu/offer",
                                  json={"sdp": pc.localDescription.sdp, "type": "offer"})  # fmt: skip
        assert r.status_code == 200, r.text
        assert "PCMU" in r.json()["sdp"] and "opus" not in r.json()["sdp"].lower()
        await pc.setRemoteDescription(RTCSessionDescription(**r.json()))
        for _ in range(100):
            if len(frames) >= 25:
                break
            await asyncio.sleep(0.1)
        await pc.close()
        return frames

    frames = asyncio.run(watch())
    assert len(frames) >= 25 and all(f.sample_rate == 8000 for f in frames)  # half a second of G.711 audio
    assert max(int(np.abs(f.to_ndarray()).max()) for f in frames) < 50  # the idle stream's silence, decoded
