"""TEST SCAFFOLDING for the web app — not the product.

`ScaffoldSpeaker` stands in for the server's speak function (TTS → MuseTalk render → append): it really
encodes a clip per sentence (a drawn cartoon face whose mouth follows a synthetic voice-like tone, through
musetalk.pipeline.encode.write_clip, H.264/AAC with the fixed codec params) and really appends it to the
session video with the ffmpeg concat demuxer (`-c copy`). `create_scaffold_app` mounts the chat router
next to the two server routes the page needs (GET /sessions/{id}/video with HTTP Range, GET|POST /reset).
The real server (server_fast.py) replaces all of this at merge time.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse
from numpy.typing import NDArray

from musetalk.config import EncodeConfig, WebappConfig, is_valid_id
from musetalk.errors import TTSFailed
from musetalk.pipeline.encode import write_clip
from musetalk.types import Audio
from musetalk.utils.ffmpeg import probe, run_ffmpeg
from webapp.backend import LLM, BuiltinResponder, JobStore, SpeakOutcome, create_chat_router

SAMPLE_RATE = 16000


def _voice(duration_s: float, seed: int) -> tuple[Audio, NDArray[np.float32]]:
    """A voice-like tone: a gliding pitch chopped into ~4 syllables/s; also its envelope per sample."""
    t = np.arange(int(duration_s * SAMPLE_RATE), dtype=np.float32) / SAMPLE_RATE  # (n,) float32
    syllable = np.clip(np.sin(2 * np.pi * (3.7 + seed % 3 * 0.3) * t), 0, None) ** 0.7
    pitch_hz = 170 + 40 * np.sin(2 * np.pi * 0.8 * t + seed)
    phase = 2 * np.pi * np.cumsum(pitch_hz) / SAMPLE_RATE
    wave = 0.25 * syllable * (np.sin(phase) + 0.3 * np.sin(2 * phase))
    return Audio(wave.astype(np.float32), SAMPLE_RATE), syllable.astype(np.float32)


def _face(size_px: int, mouth_open: float, blink: bool, hue_shift: int) -> NDArray[np.uint8]:
    """One BGR frame (size_px, size_px, 3) uint8 of a cartoon face; `mouth_open` in 0..1."""
    s = size_px
    y = np.linspace(0, 1, s, dtype=np.float32)[:, None]
    img = np.empty((s, s, 3), dtype=np.uint8)
    img[..., 0] = (90 + 80 * y).astype(np.uint8)  # blue-ish backdrop, lighter at the bottom
    img[..., 1] = (40 + 30 * y).astype(np.uint8)
    img[..., 2] = (30 + 20 * y + hue_shift).clip(0, 255).astype(np.uint8)
    c = (s // 2, int(s * 0.52))
    cv2.ellipse(img, (c[0], s), (int(s * 0.36), int(s * 0.2)), 0, 180, 360, (120, 80, 60), -1, cv2.LINE_AA)
    cv2.ellipse(img, (c[0], int(s * 0.45)), (int(s * 0.3), int(s * 0.3)), 0, 0, 360, (40, 50, 70), -1, cv2.LINE_AA)
    cv2.ellipse(img, c, (int(s * 0.26), int(s * 0.32)), 0, 0, 360, (150, 185, 235), -1, cv2.LINE_AA)
    cv2.ellipse(img, (c[0], int(s * 0.31)), (int(s * 0.27), int(s * 0.13)), 0, 180, 360, (40, 50, 70), -1, cv2.LINE_AA)
    for dx in (-1, 1):
        eye = (c[0] + dx * int(s * 0.1), int(s * 0.46))
        if blink:
            cv2.line(img, (eye[0] - s // 30, eye[1]), (eye[0] + s // 30, eye[1]), (40, 40, 40), 2, cv2.LINE_AA)
        else:
            cv2.circle(img, eye, max(2, s // 32), (40, 40, 40), -1, cv2.LINE_AA)
    mouth = (c[0], int(s * 0.68))
    height = max(1, int(s * 0.07 * mouth_open))
    cv2.ellipse(img, mouth, (int(s * 0.08), height), 0, 0, 360, (50, 40, 140), -1, cv2.LINE_AA)
    return img


class ScaffoldSpeaker:
    """Test double of the server's SpeakFn: really encodes one clip per call and appends it (concat, -c copy)."""

    def __init__(
        self,
        root: Path,
        size_px: int = 192,
        fps: int = 25,
        fail_on: str | None = None,
        gate: threading.Semaphore | None = None,
        min_call_s: float = 0.0,
    ) -> None:
        """Sessions live in root/<session_id>/; text containing `fail_on` raises TTSFailed; each call takes a
        permit from `gate` first (tests release permits to let sentences through one by one); `min_call_s`
        pads each call like a real render would, so the page's progress display has something to show."""
        self.root = root
        self.size_px = size_px
        self.fps = fps
        self.fail_on = fail_on
        self.gate = gate
        self.min_call_s = min_call_s
        self.encode = EncodeConfig(preset="ultrafast")
        self.calls: list[tuple[str, str]] = []  # (session_id, text) in call order
        self._lock = threading.Lock()

    def video_path(self, session_id: str) -> Path:
        """The session video file."""
        return self.root / session_id / "full_session.mp4"

    def reset(self, session_id: str) -> None:
        """Delete a session's video and clips."""
        with self._lock:
            shutil.rmtree(self.root / session_id, ignore_errors=True)

    def __call__(self, text: str, session_id: str) -> SpeakOutcome:
        """Render `text` as a clip and append it to the session video."""
        if self.gate is not None and not self.gate.acquire(timeout=60):
            raise TTSFailed("scaffold gate was never opened")
        if self.fail_on is not None and self.fail_on in text:
            raise TTSFailed(f"scaffold TTS refuses text containing {self.fail_on!r}")
        t0 = time.monotonic()
        with self._lock:  # one append at a time, like the server's session stitcher
            self.calls.append((session_id, text))
            outcome = self._append(text, session_id)
        time.sleep(max(0.0, self.min_call_s - (time.monotonic() - t0)))
        return outcome

    def _append(self, text: str, session_id: str) -> SpeakOutcome:
        sdir = self.root / session_id
        clips = sdir / "clips"
        clips.mkdir(parents=True, exist_ok=True)
        index = len(list(clips.glob("clip_*.mp4")))
        n_frames = max(10, min(int(self.fps * 2.4), round(0.045 * len(text) * self.fps)))
        audio, envelope = _voice(n_frames / self.fps, seed=index)
        per_frame = SAMPLE_RATE // self.fps
        frames = (
            _face(
                self.size_px,
                float(envelope[i * per_frame : (i + 1) * per_frame].mean()) if len(envelope) else 0.0,
                blink=(i % 40) in (38, 39),
                hue_shift=20 * (index % 4),
            )
            for i in range(n_frames)
        )
        clip = write_clip(frames, audio, clips / f"clip_{index:04d}.mp4", n_frames, self.fps, self.encode)
        listing = sdir / "concat_list.txt"
        entries = sorted(clips.glob("clip_*.mp4"))
        listing.write_text("".join(f"file '{p}'\n" for p in entries), encoding="utf-8")
        out, tmp = self.video_path(session_id), sdir / ".full_session.tmp.mp4"
        concat = ["-f", "concat", "-safe", "0", "-i", str(listing), "-c", "copy", "-movflags", "+faststart"]
        run_ffmpeg([*concat, str(tmp)])
        os.replace(tmp, out)  # readers (the video route) never see a half-written file
        start_s = sum(probe(p).n_video_frames or 0 for p in entries[:-1]) / self.fps
        info = probe(out)
        return SpeakOutcome(
            session_video_url=f"/sessions/{session_id}/video",
            clip_start_s=start_s,
            clip_duration_s=clip.duration_s,
            session_duration_s=info.video_duration_s or info.duration_s,
        )


def create_scaffold_app(
    speaker: ScaffoldSpeaker,
    llm: LLM | None = None,
    jobs: JobStore | None = None,
    settings: WebappConfig | None = None,
) -> FastAPI:
    """A FastAPI app: the chat router + stand-ins for the server's session video and reset routes."""
    app = FastAPI(title="webapp test scaffold")
    app.include_router(
        create_chat_router(
            speaker,
            llm if llm is not None else BuiltinResponder(),
            jobs if jobs is not None else JobStore(),
            settings=settings,
        )
    )

    @app.get("/sessions/{session_id}/video")
    def session_video(session_id: str) -> FileResponse:
        """The session video; Starlette's FileResponse answers Range requests (206)."""
        path = speaker.video_path(session_id) if is_valid_id(session_id) else None
        if path is None or not path.is_file():
            raise HTTPException(404, f"no video for session {session_id!r}")
        return FileResponse(path, media_type="video/mp4")

    @app.api_route("/reset", methods=["GET", "POST"])
    def reset(session_id: str = "default") -> dict[str, object]:
        """Forget a session's video."""
        if not is_valid_id(session_id):
            raise HTTPException(422, "bad session id")
        speaker.reset(session_id)
        return {"ok": True, "session_id": session_id}

    return app


@contextmanager
def serve(app: FastAPI, lifespan: Literal["on", "off"] = "off", start_timeout_s: float = 20.0) -> Iterator[str]:
    """Run `app` with uvicorn on 127.0.0.1 (a free port) in a thread; yield its base URL; stop it after."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan=lifespan))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="scaffold-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("scaffold server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def wait_for(predicate: Callable[[], bool], timeout_s: float = 30.0, interval_s: float = 0.02) -> None:
    """Poll `predicate()` until true; fail the test (AssertionError) after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)

