"""Session stitching: exact durations, no audio drift, committed bytes that never change, crash leftovers,
the upgrade of musetalk-session/2 files, and one writer per session."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest
from session_child import CLICK_AT_S, FPS, make_clip

from musetalk.config import EncodeConfig
from musetalk.errors import FfmpegFailed, SessionConflict, SessionLocked
from musetalk.pipeline.encode import write_clip
from musetalk.session.stitcher import SESSION_FORMAT, clip_pcm, read_state
from musetalk.session.store import SessionStore
from musetalk.types import Audio, Clip
from musetalk.utils.ffmpeg import probe, run_ffmpeg

RATE = 48000
LEGACY_FIXTURE = Path(__file__).parent / "data" / "session_v2"  # written by the musetalk-session/2 stitcher


def _clip(store: SessionStore, session: str, n_frames: int, size_px: int = 64, seed: int = 0) -> Clip:
    if size_px == 64:
        return make_clip(store, session, n_frames, seed)
    frames = [np.full((size_px, size_px, 3), seed, np.uint8) for _ in range(n_frames)]
    audio = Audio(np.zeros(n_frames * 16000 // FPS, np.float32), 16000)
    return write_clip(
        iter(frames), audio, store.new_clip_path(session), n_frames, FPS, EncodeConfig(preset="ultrafast")
    )


def _decoded_audio(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])


def _decoded_frames(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def _click_onsets(audio: np.ndarray) -> list[int]:
    loud = np.flatnonzero(np.abs(audio) > 0.3)
    return [int(loud[0])] + [int(b) for a, b in zip(loud[:-1], loud[1:], strict=True) if b - a > 2000]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _committed(store: SessionStore, session: str) -> bytes:
    f, n_bytes = store.open_video(session)
    with f:
        return f.read(n_bytes)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SessionStore]:
    s = SessionStore(tmp_path / "results", "default", FPS, EncodeConfig())
    yield s
    s.close()


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
    # Bookkeeping lives in the files: a new store (a restarted server) reads the same session.
    store.close()
    restarted = SessionStore(store.results_dir, "default", FPS, EncodeConfig())
    state = restarted.state("default")
    restarted.close()
    assert [c.n_frames for c in state.clips] == lengths and state.cursor == 19 and state.avatar_id == "demo"
    listing = (store.results_dir / "sessions" / "default" / "concat_list.txt").read_text().splitlines()
    assert listing == [f"file '{store.results_dir.resolve()}/sessions/default/clips/{c.name}'" for c in state.clips]


def test_seed_concat_of_aac_clips_drifts(store: SessionStore, tmp_path: Path) -> None:
    """Why the stitcher does not simply concat the clips with -c copy: that drifts ~21 ms per join."""
    clips = [_clip(store, "default", 13, seed=i) for i in range(10)]
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"file '{c.path}'\n" for c in clips))
    naive = tmp_path / "naive.mp4"
    run_ffmpeg(["-f", "concat", "-safe", "0", "-i", str(listing), "-c", "copy", str(naive)])
    onsets = np.array(_click_onsets(_decoded_audio(naive)))
    starts = np.arange(10) * 13 * RATE // FPS + int(CLICK_AT_S * RATE)
    assert (onsets - starts)[-1] > 0.15 * RATE  # ~21 ms per join


def test_committed_bytes_never_change_and_every_committed_length_decodes(store: SessionStore, tmp_path: Path) -> None:
    """Each append only adds bytes after the committed ones; each committed prefix is a whole session."""
    lengths = [12, 9, 30, 5, 17]
    prefixes: list[bytes] = []
    for i, n in enumerate(lengths):
        store.append("default", _clip(store, "default", n, seed=i), cursor=0, avatar_id="demo")
        committed = _committed(store, "default")
        for earlier in prefixes:
            assert committed[: len(earlier)] == earlier
        prefixes.append(committed)
        on_disk = store.paths("default").video.read_bytes()
        assert on_disk.startswith(committed) and 0 < len(on_disk) - len(committed) < 8192  # the audio tail
    for k, prefix in enumerate(prefixes, start=1):
        path = tmp_path / f"committed_{k}.mp4"
        path.write_bytes(prefix)
        assert _decoded_frames(path) == sum(lengths[:k])
        samples = len(_decoded_audio(path))
        expected = sum(lengths[:k]) * RATE // FPS
        assert expected - 4096 <= samples <= expected  # the provisional 3-4 AAC frames are not committed yet
        onsets = _click_onsets(_decoded_audio(path))
        assert len(onsets) == k


def test_audio_at_the_joins_is_as_clean_as_one_encode(store: SessionStore) -> None:
    """One continuous signal (a gliding tone with a wobble and noise) cut into clips: around each join the
    session's audio is as close to the source PCM as one AAC encode of the whole signal (the splice
    with warm-up continues the encoder as if it had never stopped)."""
    from bench.bench_session import join_snr_db

    lengths = [31, 44, 27, 38, 50, 23, 41]
    t = np.arange(sum(lengths) * 16000 // FPS) / 16000
    glide = 2 * np.pi * (180 * t + 15 * t**2)  # 180 Hz rising 30 Hz per second
    signal = 0.3 * np.sin(glide) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    pcm = (signal + 0.02 * np.random.default_rng(0).standard_normal(len(t))).astype(np.float32)
    start = 0
    for i, n in enumerate(lengths):
        part = pcm[start : start + n * 16000 // FPS]
        start += len(part)
        frames = [np.full((64, 64, 3), i * 30, np.uint8)] * n
        clip = store.new_clip_path("default")
        written = write_clip(iter(frames), Audio(part, 16000), clip, n, FPS, EncodeConfig(preset="ultrafast"))
        store.append("default", written, cursor=0, avatar_id="demo")
    snr = join_snr_db(store.paths("default"), store.state("default"), EncodeConfig())
    assert len(snr["join"]) == len(lengths) - 1 and len(snr["mid"]) == len(lengths)
    # A broken splice costs 15-25 dB in its window; two encodes of one signal differ by a few dB per
    # window anyway (bit reservoir and rate control take other paths), on average by none.
    assert min(snr["join"]) > 35 and min(snr["join"]) > min(snr["join_one_pass"]) - 3, snr
    assert np.mean(np.array(snr["join"]) - np.array(snr["join_one_pass"])) > -1.0, snr


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
    committed = _committed(store, "default")
    orphan = _clip(store, "default", 10)  # rendered, never appended (process died)
    stale = paths.video.with_name(".full_session.99999.tmp.mp4")
    stale.write_bytes(b"partial")
    with paths.video.open("ab") as f:
        f.write(b"\x00\x00\x10\x00moof" + bytes(100))  # a torn fragment after the committed end
    store.close()
    restarted = SessionStore(store.results_dir, "default", FPS, EncodeConfig())
    state = restarted.state("default")
    assert len(state.clips) == 1 and state.cursor == 5
    assert paths.video.read_bytes() == committed  # cut back to the committed length
    assert not stale.exists() and not orphan.path.exists() and not orphan.path.with_suffix(".wav").exists()
    result = restarted.append("default", _clip(restarted, "default", 4), cursor=9, avatar_id="demo")
    assert result.clip_index == 1 and probe(paths.video).n_video_frames == 14
    restarted.close()


def test_foreign_video_is_not_overwritten_and_errors_name_no_path(store: SessionStore) -> None:
    other = _clip(store, "x", 5)
    paths = store.paths("default")
    paths.video.parent.mkdir(parents=True, exist_ok=True)
    paths.video.write_bytes(other.path.read_bytes())  # e.g. a seed-era full_session.mp4
    with pytest.raises(SessionConflict, match="reset") as info:
        read_state(paths)
    assert str(store.results_dir) not in str(info.value) and "'default'" in str(info.value)
    with pytest.raises(SessionConflict) as info:
        store.append("default", _clip(store, "default", 5), cursor=0, avatar_id="demo")
    assert str(store.results_dir) not in str(info.value)
    assert paths.video.read_bytes() == other.path.read_bytes()


def test_damaged_commit_record_is_a_conflict(store: SessionStore) -> None:
    store.append("default", _clip(store, "default", 5), cursor=0, avatar_id="demo")
    paths = store.paths("default")
    store.close()
    record = paths.commit_record.read_bytes()  # slot 0: the empty session (seq 0), slot 1: one clip (seq 1)

    def refused(match: str) -> None:
        other = SessionStore(store.results_dir, "default", FPS, EncodeConfig())
        with pytest.raises(SessionConflict, match=match) as info:
            other.state("default")
        other.close()
        assert str(store.results_dir) not in str(info.value)

    paths.video.rename(paths.video.with_name("elsewhere.mp4"))  # the video is gone, the record remains
    refused("No such file or directory: full_session.mp4")
    foreign = bytes(range(256)) * 400  # another (longer) file put in its place: refused, not cut
    paths.video.write_bytes(foreign)
    refused("reset")
    assert paths.video.read_bytes() == foreign
    paths.video.with_name("elsewhere.mp4").rename(paths.video)
    paths.commit_record.write_bytes(bytes(8192))  # both slots unreadable
    refused("no valid commit record")
    # A torn slot fails its CRC and the other one counts: torn older slot → still the last commit;
    # torn newest slot → the commit before it (here: the empty session).
    paths.commit_record.write_bytes(record[:2000] + bytes(2096) + record[4096:])
    state = read_state(paths)
    assert state is not None and len(state.clips) == 1
    paths.commit_record.write_bytes(record[:4196] + bytes(8192 - 4196))
    assert read_state(paths) is None


def test_a_musetalk_session_2_file_is_read_and_converted_on_append(store: SessionStore) -> None:
    results = store.results_dir
    shutil.copytree(LEGACY_FIXTURE, results)
    paths = store.paths("default")
    legacy_bytes = paths.video.read_bytes()
    state = store.state("default")
    assert [c.n_frames for c in state.clips] == [13, 9, 21] and state.cursor == 12 and state.is_legacy
    served = _committed(store, "default")
    assert served == legacy_bytes  # until converted, the old file is served whole, as before
    store.append("default", _clip(store, "default", 17, seed=3), cursor=13, avatar_id="demo")
    converted = read_state(paths)
    assert converted is not None and not converted.is_legacy
    assert [c.n_frames for c in converted.clips] == [13, 9, 21, 17]
    assert SESSION_FORMAT.encode() in paths.video.read_bytes()
    assert _decoded_frames(paths.video) == 60
    starts = np.cumsum([0, 13, 9, 21]) * RATE // FPS + int(CLICK_AT_S * RATE)
    assert np.abs(np.array(_click_onsets(_decoded_audio(paths.video))) - starts).max() < 0.002 * RATE
    # Appends after the conversion are ordinary ones.
    store.append("default", _clip(store, "default", 11, seed=4), cursor=14, avatar_id="demo")
    assert probe(paths.video).n_video_frames == 71
    # The file describes itself: without its commit record (as after a crash between the conversion's
    # rename and its first commit) the session is recovered from the record boxes.
    store.close()
    paths.commit_record.unlink()
    recovered = SessionStore(results, "default", FPS, EncodeConfig())
    assert [c.n_frames for c in recovered.state("default").clips] == [13, 9, 21, 17, 11]
    assert recovered.state("default").cursor == 14 and paths.commit_record.is_file()
    recovered.close()


def test_a_second_store_on_the_same_session_is_refused(store: SessionStore) -> None:
    store.append("default", _clip(store, "default", 5), cursor=0, avatar_id="demo")
    other = SessionStore(store.results_dir, "default", FPS, EncodeConfig())
    with pytest.raises(SessionLocked, match="in use by another process") as info:
        other.state("default")
    assert str(store.results_dir) not in str(info.value)
    with pytest.raises(SessionLocked):
        other.reset("default")
    # Readers need no lock: the other store serves the committed bytes.
    assert _committed(other, "default") == _committed(store, "default")
    assert other.state("mine").clips == ()  # other sessions are free
    store.close()
    assert len(other.state("default").clips) == 1
    other.close()


def _clip_with_audio_ahead(
    store: SessionStore, session: str, n_frames: int, seed: int, ahead: list[np.ndarray]
) -> Clip:
    """make_clip's clip, handing its audio to `ahead` as write_clip's on_audio does before the frames."""
    t = np.arange(int(n_frames / FPS * 16000)) / 16000
    audio = Audio((0.3 * np.sin(2 * np.pi * (300 + 50 * seed) * t)).astype(np.float32), 16000)
    frames = [np.full((64, 64, 3), (seed * 37 + i) % 256, np.uint8) for i in range(n_frames)]
    path = store.new_clip_path(session)
    return write_clip(iter(frames), audio, path, n_frames, FPS, EncodeConfig(preset="ultrafast"), on_audio=ahead.append)


def test_session_audio_encoded_ahead_gives_the_same_session_and_is_used_only_while_it_fits(
    store: SessionStore,
) -> None:
    for target in ("ahead", "plain"):
        for seed, n in enumerate((13, 21, 8)):
            pcm: list[np.ndarray] = []
            clip = _clip_with_audio_ahead(store, target, n, seed, pcm)
            assert len(pcm) == 1 and np.array_equal(pcm[0], clip_pcm(clip, RATE))  # exactly its WAV's audio
            audio_ahead = store.encode_audio_ahead(target, pcm[0]) if target == "ahead" else None
            result = store.append(target, clip, seed, "demo", audio_ahead)
            assert result.audio_ahead is (target == "ahead")
    # The same clips, the same session, to the byte.
    assert _committed(store, "ahead") == _committed(store, "plain")

    # Encoded against a state the session has since left (another clip appended first): not used.
    pcm = []
    late = _clip_with_audio_ahead(store, "ahead", 10, 7, pcm)
    stale = store.encode_audio_ahead("ahead", pcm[0])
    store.append("ahead", _clip(store, "ahead", 6, seed=3), 3, "demo")
    assert not store.append("ahead", late, 4, "demo", stale).audio_ahead
    # ...nor for other audio than the clip's own (a clip cut short holds less).
    pcm = []
    clip = _clip_with_audio_ahead(store, "ahead", 10, 8, pcm)
    wrong = store.encode_audio_ahead("ahead", pcm[0][: len(pcm[0]) // 2])
    assert not store.append("ahead", clip, 5, "demo", wrong).audio_ahead
    run_ffmpeg(["-xerror", "-i", str(store.video_path("ahead")), "-f", "null", "-"])
