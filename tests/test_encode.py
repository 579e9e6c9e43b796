"""Clip encoder: exact frame count, audio length matched to video, stream-copy concatenation."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from musetalk.config import EncodeConfig
from musetalk.errors import InputError
from musetalk.pipeline import encode
from musetalk.pipeline.encode import fit_audio, write_clip, x264_threads
from musetalk.types import Audio
from musetalk.utils.ffmpeg import probe, run_ffmpeg

FPS = 25


def _frames(n: int, h: int = 64, w: int = 96) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def _tone(seconds: float, rate: int = 16000) -> Audio:
    t = np.arange(int(seconds * rate)) / rate
    return Audio((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate)


def _decoded_audio_samples(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(f.samples for f in c.decode(audio=0))


def test_fit_audio_trims_and_pads() -> None:
    assert len(fit_audio(_tone(1.0), 10, FPS, 48000)) == 10 * 1920
    assert len(fit_audio(_tone(0.1), 10, FPS, 48000)) == 10 * 1920
    with pytest.raises(InputError):
        fit_audio(_tone(0.1), 10, FPS, 44100 + 1)


@pytest.mark.parametrize("audio_s", [0.5, 1.3])
def test_clip_has_exact_frames_and_matching_audio(tmp_path: Path, audio_s: float) -> None:
    n = 25
    clip = write_clip(iter(_frames(n)), _tone(audio_s), tmp_path / "c.mp4", n, FPS, EncodeConfig())
    info = probe(clip.path)
    assert info.n_video_frames == n and info.width == 96 and info.height == 64
    # Decode, don't trust counters: AAC output within one 1024-sample frame of n / fps seconds.
    decoded = _decoded_audio_samples(clip.path)
    assert abs(decoded - n * 48000 // FPS) <= 1024
    assert clip.audio_path is not None
    pcm, rate = sf.read(str(clip.audio_path))
    assert rate == 48000 and len(pcm) == n * 1920
    assert not list(tmp_path.glob(".*tmp*"))


def test_a_clip_cut_short_holds_the_audio_of_its_frames_only(tmp_path: Path) -> None:
    # The full clip's audio is encoded beside the video; a clip that ends early must not keep it.
    n, got = 50, 30
    clip = write_clip(iter(_frames(got)), _tone(2.0), tmp_path / "c.mp4", n, FPS, EncodeConfig(), allow_fewer=True)
    assert clip.n_frames == got and probe(clip.path).n_video_frames == got
    assert abs(_decoded_audio_samples(clip.path) - got * 1920) <= 1024
    pcm, _ = sf.read(str(clip.audio_path))
    assert len(pcm) == got * 1920


def test_wrong_frame_count_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="expected 10 frames"):
        write_clip(iter(_frames(7)), _tone(0.4), tmp_path / "c.mp4", 10, FPS, EncodeConfig())
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="even"):
        write_clip(iter(_frames(3, 63, 96)), _tone(0.4), tmp_path / "c.mp4", 3, FPS, EncodeConfig())


def test_clips_concatenate_with_stream_copy(tmp_path: Path) -> None:
    cfg = EncodeConfig()
    clips = [write_clip(iter(_frames(n)), _tone(1.0), tmp_path / f"c{n}.mp4", n, FPS, cfg) for n in (20, 33)]
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"file '{c.path}'\n" for c in clips))
    out = tmp_path / "joined.mp4"
    run_ffmpeg(["-f", "concat", "-safe", "0", "-i", str(listing), "-c", "copy", str(out)])
    info = probe(out)
    assert info.n_video_frames == 53
    assert info.video_duration_s == pytest.approx(53 / FPS, abs=1 / FPS)


def _x264_settings(path: Path) -> str:
    """The settings x264 wrote into the clip's stream (its SEI: "... options: cabac=1 ref=1 ...")."""
    data = path.read_bytes()
    start = data.index(b"options: ") + len(b"options: ")
    return data[start : data.index(b"\0", start)].decode("ascii")


def test_fast_analysis_searches_less_and_clips_still_join_with_clips_made_without(tmp_path: Path) -> None:
    fast = write_clip(iter(_frames(20)), _tone(1.0), tmp_path / "f.mp4", 20, FPS, EncodeConfig())
    full = write_clip(iter(_frames(20)), _tone(1.0), tmp_path / "p.mp4", 20, FPS, EncodeConfig(fast_analysis=False))
    fast_opts, full_opts = _x264_settings(fast.path).split(), _x264_settings(full.path).split()
    assert "me=dia" in fast_opts and "me=hex" in full_opts
    assert "analyse=0x3:0x3" in fast_opts and "analyse=0x3:0x113" in full_opts  # no P 8x8 partitions
    superfast = write_clip(iter(_frames(5)), _tone(0.2), tmp_path / "s.mp4", 5, FPS, EncodeConfig(preset="superfast"))
    assert "subme=1" in _x264_settings(superfast.path).split()  # a preset that searches little is left as it is
    with av.open(str(fast.path)) as a, av.open(str(full.path)) as b:
        assert a.streams.video[0].codec_context.extradata == b.streams.video[0].codec_context.extradata  # SPS/PPS
    listing = tmp_path / "list.txt"
    listing.write_text(f"file '{fast.path}'\nfile '{full.path}'\n")
    run_ffmpeg(["-f", "concat", "-safe", "0", "-i", str(listing), "-c", "copy", str(tmp_path / "j.mp4")])
    run_ffmpeg(["-xerror", "-i", str(tmp_path / "j.mp4"), "-f", "null", "-"])
    assert probe(tmp_path / "j.mp4").n_video_frames == 40


@pytest.mark.parametrize("workers", [1, 3])
def test_parallel_gop_segments_make_one_clean_stream(tmp_path: Path, workers: int) -> None:
    import cv2

    cfg = EncodeConfig(gop_frames=8, segment_workers=workers, crf=12)
    rng = np.random.default_rng(5)
    base = cv2.resize(rng.integers(0, 255, (8, 12, 3), dtype=np.uint8), (96, 64), interpolation=cv2.INTER_CUBIC)
    bgr = [np.roll(base, 2 * i, axis=1) for i in range(27)]  # 4 segments: 8 + 8 + 8 + 3
    yuv = [np.asarray(cv2.cvtColor(f, cv2.COLOR_BGR2YUV_I420), dtype=np.uint8) for f in bgr]
    clip = write_clip(iter(yuv), _tone(1.0), tmp_path / "c.mp4", 27, FPS, cfg, pix_fmt="yuv420p")
    with av.open(str(clip.path)) as c:
        decoded = [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]
    assert len(decoded) == 27
    for i, out in enumerate(decoded):  # every decoded frame is closest to its own source frame
        errors = [np.abs(src.astype(int) - out.astype(int)).mean() for src in bgr]
        assert int(np.argmin(errors)) == i and errors[i] < 12
    run_ffmpeg(["-xerror", "-i", str(clip.path), "-f", "null", "-"])  # decodes without a single error
    other = write_clip(iter(_frames(10)), _tone(0.4), tmp_path / "d.mp4", 10, FPS, cfg)
    listing = tmp_path / "list.txt"
    listing.write_text(f"file '{clip.path}'\nfile '{other.path}'\n")
    run_ffmpeg(["-f", "concat", "-safe", "0", "-i", str(listing), "-c", "copy", str(tmp_path / "j.mp4")])
    assert probe(tmp_path / "j.mp4").n_video_frames == 37
    run_ffmpeg(["-xerror", "-i", str(tmp_path / "j.mp4"), "-f", "null", "-"])


def test_x264_threads_share_the_cores_among_the_clips_encoding() -> None:
    cores = os.cpu_count() or 1
    assert x264_threads(EncodeConfig(threads=3), 10) == 3  # a fixed count is kept
    assert x264_threads(EncodeConfig(), 1) == cores  # a lone clip gets every core
    assert x264_threads(EncodeConfig(), 2) == max(1, cores // 2)
    assert x264_threads(EncodeConfig(), cores * 4) == 1


def test_segments_with_different_thread_counts_make_one_clean_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counts, clips_seen = iter([1, 4, 2, 3, 2]), []

    def threads(cfg: EncodeConfig, clips_at_once: int) -> int:
        clips_seen.append(clips_at_once)
        return next(counts)

    monkeypatch.setattr(encode, "x264_threads", threads)
    cfg = EncodeConfig(gop_frames=8, segment_workers=2)
    clip = write_clip(iter(_frames(25)), _tone(1.0), tmp_path / "c.mp4", 25, FPS, cfg)  # segments 8 + 8 + 8 + 1
    assert clips_seen == [1, 1, 1, 1]  # each segment sized while this clip (alone) was encoding
    clips_seen.clear()
    assert probe(clip.path).n_video_frames == 25
    run_ffmpeg(["-xerror", "-i", str(clip.path), "-f", "null", "-"])  # one stream whatever the slices per frame
    with pytest.raises(InputError):
        write_clip(iter(_frames(5)), _tone(0.4), tmp_path / "d.mp4", 9, FPS, cfg)
    assert encode.clips_encoding() == 0  # none counts once its encoders are done, a failed clip neither


def test_a_segment_encoder_is_sized_by_the_clips_at_work_when_its_frames_come(tmp_path: Path) -> None:
    # Clip A gets its first frame, then waits (an utterance whose first batch came early); clip B is encoded
    # meanwhile: B's encoders see one clip at work (B), since A has no encoder until its second frame.
    import threading
    import time

    cfg = EncodeConfig(gop_frames=50, segment_workers=1)
    gate, seen = threading.Event(), []

    def a_frames() -> Iterator[np.ndarray]:
        frames = _frames(6)
        yield frames[0]
        assert gate.wait(20)
        seen.append(encode.clips_encoding())  # B is done
        yield from frames[1:]

    def b_frames() -> Iterator[np.ndarray]:
        for i, frame in enumerate(_frames(6)):
            if i == 3:  # B's encoder has its first frames: wait until it is at work, then count
                deadline = time.monotonic() + 10
                while encode.clips_encoding() == 0 and time.monotonic() < deadline:
                    time.sleep(0.005)
                seen.append(encode.clips_encoding())  # B alone: A has had one frame and no encoder yet
            yield frame

    a = threading.Thread(target=write_clip, args=(a_frames(), _tone(0.24), tmp_path / "a.mp4", 6, FPS, cfg))
    a.start()
    write_clip(b_frames(), _tone(0.24), tmp_path / "b.mp4", 6, FPS, cfg)
    gate.set()
    a.join(20)
    assert seen == [1, 0]
    assert probe(tmp_path / "a.mp4").n_video_frames == 6 and probe(tmp_path / "b.mp4").n_video_frames == 6


def test_an_i420_view_reads_the_array_in_place() -> None:
    from musetalk.utils.yuv import i420_frame_view, i420_video_frame

    i420 = np.random.default_rng(1).integers(0, 255, (96 * 3 // 2, 64), dtype=np.uint8)
    view = i420_frame_view(i420)
    assert np.array_equal(view.to_ndarray(format="yuv420p"), i420)
    assert np.array_equal(view.to_ndarray(format="yuv420p"), i420_video_frame(i420).to_ndarray(format="yuv420p"))
    i420[0, 0] ^= 0xFF  # in place: the frame sees the change (which is why tick frames are never modified)
    assert view.to_ndarray(format="yuv420p")[0, 0] == i420[0, 0]
    strided = np.zeros((96 * 3 // 2, 128), np.uint8)[:, ::2]  # not contiguous: copied instead
    assert np.array_equal(i420_frame_view(strided).to_ndarray(format="yuv420p"), strided)


def test_i420_video_frame_matches_pyav_conversion() -> None:
    import av

    from musetalk.utils.yuv import i420_video_frame

    rng = np.random.default_rng(3)
    for h, w in ((36, 64), (1080, 1920), (10, 6)):
        i420 = rng.integers(0, 256, (h * 3 // 2, w), dtype=np.uint8)
        ours = i420_video_frame(i420)
        assert (ours.width, ours.height, ours.format.name) == (w, h, "yuv420p")
        theirs = av.VideoFrame.from_ndarray(i420, format="yuv420p")
        np.testing.assert_array_equal(ours.to_ndarray(), theirs.to_ndarray())


def _nice_of(tid: int) -> int:
    """The nice value of one thread of this process (field 19 of /proc/self/task/<tid>/stat)."""
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="per-thread nice values are read from Linux's /proc")
def test_the_clip_is_encoded_on_threads_at_the_configured_nice_value(tmp_path: Path) -> None:
    import threading

    cfg = EncodeConfig(nice=7)
    seen: dict[str, list[int]] = {}

    def frames() -> Iterator[np.ndarray]:
        for i, frame in enumerate(_frames(30)):
            if i == 20:  # the encoder has been running for a while: look at its threads
                x264 = [t.native_id for t in threading.enumerate() if t.name.startswith("musetalk-x264")]
                seen["x264"] = [_nice_of(tid) for tid in x264 if tid is not None]
                seen["caller"] = [_nice_of(threading.get_native_id())]
                seen["all"] = [_nice_of(int(tid)) for tid in os.listdir("/proc/self/task")]
            yield frame

    clip = write_clip(frames(), _tone(1.2), tmp_path / "c.mp4", 30, FPS, cfg)
    assert clip.n_frames == 30 and probe(clip.path).n_video_frames == 30
    assert seen["x264"] and set(seen["x264"]) == {7}  # the encoding thread
    assert seen["caller"] == [0]  # the caller (a live stream's render thread) keeps its priority
    assert seen["all"].count(7) >= len(seen["x264"])  # (x264's own threads, where it starts any, inherit it)


def test_a_producer_faster_than_the_encoders_waits_for_them() -> None:
    import threading
    import time

    from musetalk.pipeline.encode import _SegmentEncoders

    lock, state = threading.Lock(), {"added": 0, "encoded": 0, "most_waiting": 0}

    class SlowEncoder:
        def encode(self, frame: object) -> list[object]:
            if frame is not None:
                time.sleep(0.002)
                with lock:
                    state["encoded"] += 1
            return []

    segments = _SegmentEncoders(2, 4, lambda clips_at_once: SlowEncoder())
    try:
        for i in range(60):
            segments.add(av.VideoFrame(16, 16, "yuv420p"), i)
            with lock:
                state["added"] += 1
                state["most_waiting"] = max(state["most_waiting"], state["added"] - state["encoded"])
        assert list(segments.packets()) == []
    finally:
        segments.close()
    assert state["encoded"] == 60 and state["most_waiting"] <= 2 * 4 + 1  # at most two GOPs wait (+ the one added)
