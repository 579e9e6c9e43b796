"""Session stitching: exact durations, no audio drift over many appends, atomic replace, crash leftovers."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import av
import numpy as np
import pytest

from musetalk.config import EncodeConfig
from musetalk.errors import FfmpegFailed, SessionConflict
from musetalk.pipeline.encode import write_clip
from musetalk.session.stitcher import read_state
from musetalk.session.store import SessionStore
from musetalk.types import Audio, Clip
from musetalk.utils.ffmpeg import probe, run_ffmpeg

FPS = 25
RATE = 48000
CLICK_AT_S = 0.1  # every test clip has a 1 kHz click 100 ms after its start


def _clip(store: SessionStore, session: str, n_frames: int, size_px: int = 64, seed: int = 0) -> Clip:
    t = np.arange(int(n_frames / FPS * 16000)) / 16000
    audio = np.zeros_like(t)
    start = int(CLICK_AT_S * 16000)
    audio[start : start + 160] = 0.6 * np.sin(2 * np.pi * 1000 * t[: 160])
    frames = [np.full((size_px, size_px, 3), (seed * 37 + i) % 256, np.uint8) for i in range(n_frames)]
    path = store.new_clip_path(session)
    return write_clip(iter(frames), Audio(audio.astype(np.float32), 16000), path, n_frames, FPS, EncodeConfig())


def _decoded_audio(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])


def _click_onsets(audio: np.ndarray) -> list[int]:
    loud = np.flatnonzero(np.abs(audio) > 0.3)
    return [int(loud[0])] + [int(b) for a, b in zip(loud[:-1], loud[1:], strict=True) if b - a > 2000]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> SessionStore:
    return SessionStore(tmp_path / "results", "default", FPS, EncodeConfig())


def test_twenty_appends_keep_audio_on_the_video_clock(store: SessionStore) -> None:
    lengths = [3 + (7 * i) % 23 for i in range(20)]  # 3..25 frames: many non-multiples of an AAC frame
    for i, n in enumerate(lengths):
        result = store.append("default", _clip(store, "default", n, seed=i), cursor=i, avatar_id="demo")
        assert result.clip_index == i and result.clip_start_s == pytest.approx(sum(lengths[:i]) / FPS)
    video = store.results_dir / "full_session.mp4"
    info = probe(video)
    total_s = sum(lengths) / FPS
    assert info.n_video_frames == sum(lengths)
    assert abs(info.duration_s - total_s) <= len(lengths) / FPS
    assert info.video_duration_s is not None and info.audio_duration_s is not None
    assert abs(info.audio_duration_s - info.video_duration_s) < 0.040
    # Decoded in order, each click sits where its clip starts on the video clock (+100 ms): no drift.
    starts = np.cumsum([0, *lengths[:-1]]) * RATE // FPS + int(CLICK_AT_S * RATE)
    onsets = _click_onsets(_decoded_audio(video))
    assert len(onsets) == len(lengths)
    assert np.abs(np.array(onsets) - starts).max() < 0.002 * RATE
    # Bookkeeping lives in the file: a new store (a restarted server) reads the same session.
    state = SessionStore(store.results_dir, "default", FPS, EncodeConfig()).state("default")
    assert [c.n_frames for c in state.clips] == lengths and state.cursor == 19 and state.avatar_id == "demo"
    listing = (store.results_dir / "sessions" / "default" / "concat_list.txt").read_text().splitlines()
    assert listing == [f"file '{store.results_dir.resolve()}/sessions/default/clips/{c.name}'" for c in state.clips]


def test_seed_concat_of_aac_clips_drifts(store: SessionStore, tmp_path: Path) -> None:
    """Why the stitcher does not simply concat the clips with -c copy: that drifts."""
    clips = [_clip(store, "default", 13, seed=i) for i in range(10)]
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"file '{c.path}'\n" for c in clips))
    naive = tmp_path / "naive.mp4"
    run_ffmpeg(["-f", "concat", "-safe", "0", "-i", str(listing), "-c", "copy", str(naive)])
    onsets = np.array(_click_onsets(_decoded_audio(naive)))
    starts = np.arange(10) * 13 * RATE // FPS + int(CLICK_AT_S * RATE)
    assert (onsets - starts)[-1] > 0.15 * RATE  # ~21 ms per join


def test_reset_then_fresh_session(store: SessionStore) -> None:
    for i in range(2):
        store.append("s1", _clip(store, "s1", 10, seed=i), cursor=0, avatar_id="demo")
    paths = store.paths("s1")
    assert paths.video == store.results_dir / "sessions" / "s1" / "full_session.mp4" and paths.video.is_file()
    assert store.reset("s1") is True
    assert not paths.video.exists() and not paths.workdir.exists()
    assert store.reset("s1") is False
    result = store.append("s1", _clip(store, "s1", 7), cursor=0, avatar_id="demo")
    assert result.clip_index == 0 and probe(paths.video).n_video_frames == 7


def test_failed_appends_leave_the_session_unchanged(store: SessionStore) -> None:
    store.append("default", _clip(store, "default", 10), cursor=0, avatar_id="demo")
    video = store.paths("default").video
    before = _sha(video)
    # Another frame size cannot be stream-copied onto this session.
    with pytest.raises(SessionConflict, match="cannot be stream-copied"):
        store.append("default", _clip(store, "default", 10, size_px=32), cursor=0, avatar_id="demo")
    # Another avatar on the same session.
    with pytest.raises(SessionConflict, match="avatar"):
        store.append("default", _clip(store, "default", 10), cursor=0, avatar_id="other")
    # A clip FFmpeg cannot read.
    bad = _clip(store, "default", 10)
    bad.path.write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 4)
    with pytest.raises(FfmpegFailed) as info:
        store.append("default", bad, cursor=0, avatar_id="demo")
    assert info.value.stderr_tail
    assert _sha(video) == before
    assert not list(video.parent.glob(".full_session.*"))
    assert len(store.state("default").clips) == 1


def test_leftovers_of_a_crash_are_cleaned_on_load(store: SessionStore) -> None:
    store.append("default", _clip(store, "default", 10), cursor=5, avatar_id="demo")
    paths = store.paths("default")
    orphan = _clip(store, "default", 10)  # rendered, never appended (process died)
    stale = paths.video.with_name(".full_session.99999.tmp.mp4")
    stale.write_bytes(b"partial")
    restarted = SessionStore(store.results_dir, "default", FPS, EncodeConfig())
    state = restarted.state("default")
    assert len(state.clips) == 1 and state.cursor == 5
    assert not stale.exists() and not orphan.path.exists() and not orphan.path.with_suffix(".wav").exists()
    result = restarted.append("default", _clip(restarted, "default", 4), cursor=9, avatar_id="demo")
    assert result.clip_index == 1 and probe(paths.video).n_video_frames == 14


def test_foreign_video_is_not_overwritten(store: SessionStore, tmp_path: Path) -> None:
    other = _clip(store, "x", 5)
    video = store.paths("default").video
    video.parent.mkdir(parents=True, exist_ok=True)
    video.write_bytes(other.path.read_bytes())  # e.g. a seed-era full_session.mp4
    with pytest.raises(SessionConflict, match="reset"):
        read_state(video)
    with pytest.raises(SessionConflict):
        store.append("default", _clip(store, "default", 5), cursor=0, avatar_id="demo")
    assert video.read_bytes() == other.path.read_bytes()


def test_a_new_version_reuses_the_committed_bytes(store: SessionStore) -> None:
    """Appends add fragments after the committed bytes of the last version; only the init's durations change."""
    video = store.paths("default").video
    store.append("default", _clip(store, "default", 12), cursor=0, avatar_id="demo")
    first = video.read_bytes()
    layout = store.state("default").layout
    assert layout is not None
    store.append("default", _clip(store, "default", 9, seed=1), cursor=0, avatar_id="demo")
    second = video.read_bytes()
    masked = bytearray(second[: layout.committed_bytes])
    for offset in layout.duration_offsets:  # the 64-bit duration fields are patched per version
        masked[offset : offset + 8] = first[offset : offset + 8]
    assert bytes(masked) == first[: layout.committed_bytes]
    assert len(second) > len(first)


def test_plain_copy_when_the_kernel_cannot_copy(store: SessionStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_copy_file_range(*args: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", no_copy_file_range)
    lengths = [11, 6, 17]
    for i, n in enumerate(lengths):
        store.append("default", _clip(store, "default", n, seed=i), cursor=0, avatar_id="demo")
    video = store.paths("default").video
    assert probe(video).n_video_frames == sum(lengths)
    onsets = _click_onsets(_decoded_audio(video))
    starts = np.cumsum([0, *lengths[:-1]]) * RATE // FPS + int(CLICK_AT_S * RATE)
    assert np.abs(np.array(onsets) - starts).max() < 0.002 * RATE
