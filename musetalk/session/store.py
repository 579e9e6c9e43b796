"""Sessions by id: where each lives on disk, its state (loaded from its video), append and reset.

Layout (one server process per results folder):
    <results>/full_session.mp4                 the default session's video (seed path)
    <results>/sessions/<id>/full_session.mp4   any other session's video
    <results>/sessions/<id>/clips/clip_NNNNNN.{mp4,wav}   the clips, in order
    <results>/sessions/<id>/concat_list.txt    the seed's ffmpeg concat list of those clips
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

from musetalk.config import EncodeConfig, is_valid_id
from musetalk.errors import InputError, SessionNotFound
from musetalk.session.stitcher import (
    VIDEO_NAME,
    AppendResult,
    SessionPaths,
    SessionState,
    append_clip,
    read_state,
)
from musetalk.types import Clip

log = logging.getLogger(__name__)

SESSIONS_DIR_NAME = "sessions"


class SessionStore:
    """Session id → paths and state. Thread-safe; each session's operations are serialised by its lock."""

    def __init__(self, results_dir: Path, default_session: str, fps: int, encode: EncodeConfig) -> None:
        self.results_dir = results_dir
        self.default_session = default_session
        self._fps = fps
        self._encode = encode
        self._states: dict[str, SessionState] = {}
        self._reserved: dict[str, int] = {}  # next clip number handed out, per session
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, session_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(session_id, threading.Lock())

    def paths(self, session_id: str) -> SessionPaths:
        """Where `session_id` lives; InputError for ids outside ^[A-Za-z0-9_-]{1,64}$ (no path tricks)."""
        if not is_valid_id(session_id):
            raise InputError("session_id must match ^[A-Za-z0-9_-]{1,64}$")
        workdir = self.results_dir / SESSIONS_DIR_NAME / session_id
        video = self.results_dir / VIDEO_NAME if session_id == self.default_session else workdir / VIDEO_NAME
        return SessionPaths(video=video, workdir=workdir)

    def _empty(self) -> SessionState:
        return SessionState(fps=self._fps, audio_rate=self._encode.audio_rate)

    def _load(self, session_id: str) -> SessionState:
        """Cached state, or read it from the video and remove what a crashed append left (lock held)."""
        if session_id in self._states:
            return self._states[session_id]
        paths = self.paths(session_id)
        state = read_state(paths.video) or self._empty()
        for stale in paths.stale_temp_videos():
            log.warning("removing %s left by an interrupted append", stale)
            stale.unlink(missing_ok=True)
        if paths.clips_dir.is_dir():
            keep = {c.name for c in state.clips} | {Path(c.name).with_suffix(".wav").name for c in state.clips}
            for orphan in paths.clips_dir.iterdir():
                if orphan.name not in keep:
                    log.info("removing %s (not part of session %s)", orphan, session_id)
                    orphan.unlink(missing_ok=True)
        self._states[session_id] = state
        return state

    def state(self, session_id: str) -> SessionState:
        """The session as its video holds it (empty if nothing has been spoken)."""
        with self._lock(session_id):
            return self._load(session_id)

    def new_clip_path(self, session_id: str) -> Path:
        """A fresh path (never handed out before) for the session's next clip; the folder is created."""
        with self._lock(session_id):
            state = self._load(session_id)
            seq = max(state.next_seq, self._reserved.get(session_id, 0))
            self._reserved[session_id] = seq + 1
            paths = self.paths(session_id)
            paths.clips_dir.mkdir(parents=True, exist_ok=True)
            return paths.clips_dir / f"clip_{seq:06d}.mp4"

    def append(self, session_id: str, clip: Clip, cursor: int, avatar_id: str | None) -> AppendResult:
        """Append a rendered clip; on error the session (file and state) is unchanged."""
        with self._lock(session_id):
            state = self._load(session_id)
            paths = self.paths(session_id)
            paths.video.parent.mkdir(parents=True, exist_ok=True)
            result = append_clip(paths, state, clip, cursor, avatar_id, self._encode)
            self._states[session_id] = result.state
            return result

    def reset(self, session_id: str) -> bool:
        """Delete the session's video, clips and concat list; True if there was anything to delete."""
        with self._lock(session_id):
            paths = self.paths(session_id)
            existed = paths.video.exists() or paths.workdir.exists()
            paths.video.unlink(missing_ok=True)
            for stale in paths.stale_temp_videos():
                stale.unlink(missing_ok=True)
            shutil.rmtree(paths.workdir, ignore_errors=True)
            self._states[session_id] = self._empty()
            self._reserved.pop(session_id, None)
            return existed

    def video_path(self, session_id: str) -> Path:
        """The session video; SessionNotFound if nothing has been spoken on it yet."""
        paths = self.paths(session_id)
        if not paths.video.is_file():
            raise SessionNotFound(f"session {session_id!r} has no video yet: POST /speak first")
        return paths.video
