"""Sessions by id: where each lives on disk, its state (loaded from its video), append and reset.

Layout:
    <results>/full_session.mp4                 the default session's video (seed path)
    <results>/sessions/<id>/full_session.mp4   any other session's video
    <results>/sessions/<id>/clips/clip_NNNNNN.{mp4,wav}   the clips, in order
    <results>/sessions/<id>/concat_list.txt    the seed's ffmpeg concat list of those clips
    <results>/sessions/<id>/session.commit     the commit record (committed length + state)
    <results>/sessions/<id>/session.lock       the inter-process lock (holder's pid and host inside)

Who may write a session: the one process that holds `session.lock` (an exclusive `flock`). A store
takes it the first time it touches a session (state, new clip path, append, reset) and keeps it until
the session is reset, `close()`, or the process ends — also by `kill -9`: the kernel drops a dead
process's locks. A second
process is refused with SessionLocked (HTTP 409) instead of corrupting the file. Holding the lock for
as long as the process uses the session (rather than per operation) is what makes it safe: the clip
numbers a process hands out, the frame cursor and the clean-up of unappended clips on open all assume
no other writer. Within the process, a per-session thread lock serialises the operations.

Readers need no lock: `open_video` serves the committed length from the commit record, so any process
(another replica on the same host, or on another host sharing the results folder) can serve a session
that a different process writes. `flock` holds across processes of one host on any local filesystem,
and across hosts on NFSv4 (Linux maps it to NFS byte-range locks; a crashed host's locks go when its
lease expires); it does not hold on filesystems without lock support.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import socket
import threading
from pathlib import Path
from typing import BinaryIO

import numpy as np
from numpy.typing import NDArray

from musetalk.config import EncodeConfig, is_valid_id
from musetalk.errors import InputError, SessionLocked, SessionNotFound
from musetalk.session.stitcher import (
    VIDEO_NAME,
    AppendResult,
    SessionAudio,
    SessionPaths,
    SessionState,
    append_clip,
    committed_length,
    encode_session_audio,
    open_session,
    write_concat_list,
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
        self._owned: dict[str, int] = {}  # session id → fd of its flocked session.lock
        # Guards what readers look at: the published state and the video's existence (append's
        # publication, reset's unlink); held only for those, never during an append's work.
        self._publish = threading.Lock()

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

    def _own(self, session_id: str, paths: SessionPaths) -> None:
        """Take the session's inter-process lock (kept until close); SessionLocked if another process has it."""
        if session_id in self._owned:
            return
        while True:
            paths.workdir.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes
            except FileNotFoundError:  # the folder was removed by a reset in another process just now
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
                os.close(fd)
                raise SessionLocked(
                    f"session {session_id!r} is in use by another process ({holder}); "
                    "stop that process or use another session_id"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(paths.lock).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the file was replaced between open and flock: lock the one at the path
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._owned[session_id] = fd

    def _load(self, session_id: str) -> SessionState:
        """Cached state, or own the session, read it and remove what a crashed append left (lock held)."""
        if session_id in self._states:
            return self._states[session_id]
        paths = self.paths(session_id)
        self._own(session_id, paths)
        for stale in paths.stale_temp_videos():
            log.warning("removing %s left by an interrupted append", stale)
            stale.unlink(missing_ok=True)
        state = open_session(paths, self._empty())
        if paths.clips_dir.is_dir():
            keep = {c.name for c in state.clips} | {os.path.splitext(c.name)[0] + ".wav" for c in state.clips}
            for orphan in paths.clips_dir.iterdir():
                if orphan.name not in keep:
                    log.info("removing %s (not part of session %s)", orphan, session_id)
                    orphan.unlink(missing_ok=True)
        if state.clips:
            write_concat_list(paths, state)  # appends add lines to it; a crash may have lost the last one
        with self._publish:
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

    def encode_audio_ahead(self, session_id: str, pcm: NDArray[np.float32]) -> SessionAudio:
        """The session's audio for a next clip whose audio is `pcm` (n,) float32 (as its WAV will hold it),
        encoded now, while the clip renders, against the session as it is now; `append` uses it if the session
        has not changed meanwhile (raises as the append would, e.g. SessionConflict on a converted session)."""
        with self._lock(session_id):
            state = self._load(session_id)
        # Outside the lock: the committed clips' audio it reads never changes (a reset meanwhile makes it fail).
        return encode_session_audio(self.paths(session_id), state, pcm, self._encode)

    def append(
        self,
        session_id: str,
        clip: Clip,
        cursor: int,
        avatar_id: str | None,
        audio_ahead: SessionAudio | None = None,
    ) -> AppendResult:
        """Append a rendered clip; on error the session (committed file and state) is unchanged.
        `audio_ahead` (from encode_audio_ahead) saves encoding the session audio now if it still fits."""
        with self._lock(session_id):
            state = self._load(session_id)
            paths = self.paths(session_id)
            paths.video.parent.mkdir(parents=True, exist_ok=True)
            result = append_clip(paths, state, clip, cursor, avatar_id, self._encode, audio_ahead)
            with self._publish:
                self._states[session_id] = result.state
            return result

    def reset(self, session_id: str) -> bool:
        """Delete the session's folder (clips, concat list, commit record) and video, and give up its lock;
        True if there was anything to delete.

        Deleting the commit record first means a crash half-way leaves either the whole session or none
        of it. The lock file goes last, while still held: another process that opened it meanwhile sees
        that it is no longer the one at its path and takes a fresh one."""
        with self._lock(session_id):
            paths = self.paths(session_id)
            self._own(session_id, paths)
            existed = paths.video.exists() or any(p.name != paths.lock.name for p in paths.workdir.iterdir())
            with self._publish:
                paths.commit_record.unlink(missing_ok=True)
                paths.video.unlink(missing_ok=True)
                self._states.pop(session_id, None)
            for stale in paths.stale_temp_videos():
                stale.unlink(missing_ok=True)
            for child in paths.workdir.iterdir():
                if child.name == paths.lock.name:
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
            self._reserved.pop(session_id, None)
            paths.lock.unlink(missing_ok=True)
            os.close(self._owned.pop(session_id))
            with contextlib.suppress(OSError):  # not empty: another process has just taken the session again
                paths.workdir.rmdir()
            return existed

    def video_path(self, session_id: str) -> Path:
        """The session video; SessionNotFound if nothing has been spoken on it yet."""
        paths = self.paths(session_id)
        if not paths.video.is_file():
            raise SessionNotFound(f"session {session_id!r} has no video yet: POST /speak first")
        return paths.video

    def open_video(self, session_id: str) -> tuple[BinaryIO, int]:
        """The session video opened for reading and its committed length in bytes (never changes later).

        Works for sessions another process writes (read from the commit record); SessionNotFound if
        nothing is committed. The caller closes the file."""
        paths = self.paths(session_id)
        missing = SessionNotFound(f"session {session_id!r} has no video yet: POST /speak first")
        with self._publish:
            state = self._states.get(session_id)
            if state is not None:
                if state.layout is None:
                    raise missing
                try:
                    f = paths.video.open("rb")
                except FileNotFoundError:
                    raise missing from None
                # A musetalk-session/2 file is replaced whole by rename: all of the opened file is committed.
                n_bytes = os.fstat(f.fileno()).st_size if state.is_legacy else state.layout.committed_bytes
                return f, n_bytes
        n_bytes = committed_length(paths)  # written by another process (or not loaded here yet)
        if n_bytes == 0:
            raise missing
        try:
            f = paths.video.open("rb")
        except FileNotFoundError:
            raise missing from None
        if os.fstat(f.fileno()).st_size < n_bytes:  # reset and started again between the two reads
            f.close()
            raise SessionNotFound(f"session {session_id!r} was just reset; retry")
        return f, n_bytes

    def owned_sessions(self) -> list[str]:
        """Ids of the sessions whose inter-process lock this store holds (the sessions this process writes)."""
        with self._publish:
            return list(self._owned)

    def close(self) -> None:
        """Give up every session lock this store holds (the process may still read them)."""
        with self._publish:
            for fd in self._owned.values():
                os.close(fd)
            self._owned.clear()
            self._states.clear()
            self._reserved.clear()
