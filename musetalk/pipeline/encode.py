"""Clip encoder: frames go straight into libx264 (PyAV, no PNG round trip), audio into AAC.

Every clip uses the same codec parameters (fps, time base, GOP, no B-frames, audio rate), starts on a
keyframe, and has its audio trimmed or padded to exactly n_frames / fps, so that any sequence of clips
concatenates with `-c copy` and appended clips can never drift. A PCM WAV of the same audio is written
next to the mp4 for drift-free session stitching (each AAC stream starts with 1024 priming samples).
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import soundfile as sf
import soxr
from numpy.typing import NDArray

from musetalk.config import EncodeConfig
from musetalk.errors import FfmpegFailed, InputError
from musetalk.types import Audio, Clip
from musetalk.utils.yuv import i420_video_frame

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import av


def fit_audio(audio: Audio, n_frames: int, fps: int, rate: int) -> NDArray[np.float32]:
    """Resample to `rate` and trim/zero-pad to exactly n_frames / fps seconds → (n,) float32."""
    samples = audio.samples.astype(np.float32, copy=False)
    if audio.sample_rate != rate and len(samples):
        samples = soxr.resample(samples, audio.sample_rate, rate).astype(np.float32)
    n_target = n_frames * rate // fps
    if n_frames * rate % fps:
        raise InputError(f"audio rate {rate} Hz is not a whole number of samples per frame at {fps} fps")
    out = np.zeros(n_target, dtype=np.float32)
    n = min(n_target, len(samples))
    out[:n] = samples[:n]
    return np.clip(out, -1.0, 1.0, out=out)  # in place: a long clip's audio is tens of MB


def pcm16(pcm: NDArray[np.float32]) -> NDArray[np.int16]:
    """Float samples in [-1, 1] (n,) → the 16-bit PCM (n,) that a clip's WAV holds (x · 32767, rounded)."""
    return np.rint(pcm * 32767).astype(np.int16)


def read_back(samples: NDArray[np.int16]) -> NDArray[np.float32]:
    """16-bit PCM (n,) → float32 (n,) exactly as soundfile reads it from a PCM_16 WAV (x / 32768)."""
    return samples.astype(np.float32) / np.float32(32768)


def audio_frames(parts: Sequence[NDArray[np.float32]], rate: int, chunk: int = 48_000) -> Iterator[av.AudioFrame]:
    """Mono float32 arrays, one after the other, as AudioFrames of at most `chunk` samples with running pts.

    The encoder re-chunks to its own frame size, so this gives the same packets as one frame of everything,
    without a second full-length copy of the audio in memory.
    """
    import av

    pts = 0
    for part in parts:
        for start in range(0, len(part), chunk):
            piece = np.ascontiguousarray(part[start : start + chunk], dtype=np.float32)
            frame = av.AudioFrame.from_ndarray(piece[np.newaxis, :], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, pts
            pts += len(piece)
            yield frame


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


# Clips of this process with an x264 encoder at work right now (one clip may have several, one per segment).
_clips_lock = threading.Lock()
_clips_encoding = 0


def x264_threads(cfg: EncodeConfig, clips_at_once: int) -> int:
    """libx264 threads of one segment encoder: cfg.threads, or (0 = auto) the host's cores shared by the
    `clips_at_once` clips being encoded (at least 1).

    PyAV's libx264 threads split each frame into slices, one per thread, and meet after every frame: a lone
    clip needs them all to keep up with the GPU, while many clips at once keep the cores busy with few
    threads each and little waiting — twelve 1080p clips at once, each with x264's own count, finished 898 ms
    after their last frame against 377 ms with the cores shared (docs/BENCHMARKS.md, "Concurrent sessions").
    """
    if cfg.threads:
        return cfg.threads
    return max(1, (os.cpu_count() or 1) // max(1, clips_at_once))


def clips_encoding() -> int:
    """Clips of this process with an x264 encoder at work right now."""
    with _clips_lock:
        return _clips_encoding


def segment_workers(cfg: EncodeConfig) -> int:
    """Parallel x264 instances for one clip: cfg.segment_workers, or (0 = auto) one per 4 cores, at most 4."""
    if cfg.segment_workers:
        return cfg.segment_workers
    return max(1, min(4, (os.cpu_count() or 1) // 4))


# Presets whose analysis fast_analysis replaces (ultrafast and superfast already search this little).
_HEX_PRESETS = ("veryfast", "faster", "fast", "medium")


def video_options(cfg: EncodeConfig) -> dict[str, str]:
    """libx264 options of every clip: CRF, preset, no B-frames, a fixed GOP with no scene cuts."""
    params = f"keyint={cfg.gop_frames}:min-keyint={cfg.gop_frames}:scenecut=0"
    if cfg.fast_analysis and cfg.preset in _HEX_PRESETS:
        # Neither changes the SPS/PPS (tested), so clips made with and without it still join with -c copy.
        params += ":me=dia:partitions=i8x8,i4x4"
    return {
        "crf": str(cfg.crf),
        "preset": cfg.preset,
        "bf": "0",  # no B-frames: no edit lists, clean joins with -c copy
        "x264-params": params,
    }


class _SegmentEncoders:
    """GOP-aligned segments of one clip encoded by libx264 instances on threads of their own.

    Every segment starts on a keyframe anyway (fixed GOP, no scene cuts), and identical settings give
    byte-identical SPS/PPS (the stream's extradata), so the segments' packets form one valid stream —
    the same property that lets whole clips concatenate with -c copy. One x264 instance reaches
    ~120 fps on 1080p; several in parallel use more cores (design §7). The threads run at `nice` (x264's
    own threads inherit it), and at most `workers` GOPs of frames wait for them: a producer faster than
    the encoders waits instead of piling up frames (3 MB each at 1080p).
    """

    def __init__(self, workers: int, gop_frames: int, make_context: Callable[[int], Any], nice: int = 0) -> None:
        self._gop = gop_frames
        self._make_context = make_context  # (clips encoding, this one included) → a libx264 context
        self._working = 0  # this clip's segment encoders at work
        self._pool = ThreadPoolExecutor(
            workers, thread_name_prefix="musetalk-x264", initializer=_lower_priority, initargs=(nice,)
        )
        self._room = threading.BoundedSemaphore(workers * gop_frames)  # frames added and not yet encoded
        self._queues: list[queue.SimpleQueue[av.VideoFrame | None]] = []
        self._futures: list[Future[list[av.Packet]]] = []

    def _encode(self, frames: queue.SimpleQueue[av.VideoFrame | None]) -> list[av.Packet]:
        # The encoder is made, and its threads sized, once the segment's second frame is here: a clip's first
        # frame often comes long before the rest (its utterance's first batch), and the clips whose encoders
        # are at work by then are the ones sharing the cores with it.
        first = frames.get()
        if first is None:
            return []
        second = frames.get()
        # A None second means the segment ended after one frame; otherwise the rest follow up to its None.
        segment = [first] if second is None else itertools.chain([first, second], iter(frames.get, None))
        packets: list[av.Packet] = []
        clips_at_once = self._count(+1)
        try:
            ctx = self._make_context(clips_at_once)
            for frame in segment:
                packets.extend(ctx.encode(frame))
                self._room.release()
            packets.extend(ctx.encode(None))
        finally:
            self._count(-1)
        return packets

    def _count(self, delta: int) -> int:
        """One of this clip's encoders starts (+1) or ends (-1) → the clips with an encoder at work now."""
        global _clips_encoding
        with _clips_lock:
            before = self._working
            self._working += delta
            if (before == 0) != (self._working == 0):  # the clip's first encoder started, or its last ended
                _clips_encoding += 1 if delta > 0 else -1
            return _clips_encoding

    def add(self, frame: av.VideoFrame, index: int) -> None:
        """Route frame `index` to its segment's encoder (started with the segment's first frame); waits while
        `workers` GOPs of frames are already waiting to be encoded."""
        while not self._room.acquire(timeout=1.0):
            for future in self._futures:  # an encoder that failed will never make room: say why
                if future.done() and future.exception() is not None:
                    future.result()
        if index // self._gop == len(self._queues):
            if self._queues:
                self._queues[-1].put(None)
            frames: queue.SimpleQueue[av.VideoFrame | None] = queue.SimpleQueue()
            self._queues.append(frames)
            self._futures.append(self._pool.submit(self._encode, frames))
        self._queues[-1].put(frame)

    def packets(self) -> Iterator[av.Packet]:
        """All packets in order, once every segment is encoded."""
        if self._queues:
            self._queues[-1].put(None)
        for future in self._futures:
            yield from future.result()

    def close(self) -> None:
        """Stop all encoders (also after an error)."""
        for frames in self._queues:
            frames.put(None)
        self._pool.shutdown(wait=True)


def encode_aac(parts: Sequence[NDArray[np.float32]], rate: int, cfg: EncodeConfig) -> tuple[list[av.Packet], bytes]:
    """AAC-encode float32 mono `parts` (n,) each, played one after the other, with the settings of every clip
    and session → (packets, the encoder's AudioSpecificConfig). A fresh encoder per call: a stream's own
    encoder can be used only once, and a clip cut short encodes its audio a second time."""
    import av

    encoder = av.CodecContext.create("aac", "w")
    encoder.sample_rate, encoder.layout, encoder.format = rate, "mono", "fltp"
    encoder.bit_rate = cfg.audio_bitrate_kbps * 1000
    encoder.time_base = Fraction(1, rate)
    encoder.options = {"aac_coder": cfg.aac_coder}
    packets = [p for frame in audio_frames(parts, rate) for p in encoder.encode(frame)]
    return [*packets, *encoder.encode(None)], bytes(encoder.extradata or b"")


def _lower_priority(nice: int) -> None:
    """Run the calling thread (and the threads it starts) at `nice` on Linux, where nice values are per thread.

    Elsewhere nothing changes: setpriority's id is a process id there, and a thread id must not be taken for one.
    """
    if nice > 0 and sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except OSError as exc:
            log.warning("could not lower the encoder thread's priority (nice %d): %s", nice, exc)


def write_clip(
    frames: Iterable[NDArray[np.uint8]],
    audio: Audio,
    path: Path,
    n_frames: int,
    fps: int,
    cfg: EncodeConfig,
    pix_fmt: Literal["bgr24", "yuv420p"] = "bgr24",
    *,
    allow_fewer: bool = False,
    on_audio: Callable[[NDArray[np.float32]], None] | None = None,
) -> Clip:
    """Encode `n_frames` frames + audio to `path` (and `path`.wav).

    With `allow_fewer`, frames may end early (an utterance cut off by an interrupt): the clip then holds
    the frames that came, with the audio cut at the same instant; at least one frame is needed.

    `on_audio` is called once the first frame is here, before any is encoded, with the clip's audio (n_frames ·
    rate / fps,) float32 exactly as its WAV will hold it (a clip cut short holds less): the session append can
    encode it meanwhile. Not sooner: work that starts with a clip competes with the first frames of every
    clip that arrives with it (measured: N = 6 sessions at once on a 2-core CPU, first frame p50 ~790 → 610-700 ms).

    Frames are BGR (H, W, 3) uint8, or with pix_fmt="yuv420p" planar I420 (H·3/2, W) uint8 as made by
    cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV_I420) — converting in the producer's threads takes that work
    off the encoder thread. H and W must be even. Frames are consumed as they arrive, so encoding
    overlaps whatever produces them. Files are written to temp names and renamed into place when complete.
    """
    import av

    t0 = time.perf_counter()
    wait_s = 0.0  # time spent waiting for the producer (not encoding)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, wav_path = _tmp_path(path), path.with_suffix(".wav")
    wav_tmp = _tmp_path(wav_path)
    count = 0
    frame_iter = iter(frames)
    try:
        first = next(frame_iter, None)
        wait_s += time.perf_counter() - t0
        if first is None:
            raise InputError(f"expected {n_frames} frames, got 0")
        # The audio is needed by the end of the clip, the first frame now: resample it once the frame is here.
        pcm = fit_audio(audio, n_frames, fps, cfg.audio_rate)  # (n_frames * rate / fps,)
        wav_pcm = pcm16(pcm)  # (n_frames * rate / fps,) int16: the WAV's samples (its first ones if cut short)
        if on_audio is not None:
            on_audio(read_back(wav_pcm))
        height, width = first.shape[:2]
        if pix_fmt == "yuv420p":
            if first.ndim != 2 or height % 3:
                raise InputError(f"yuv420p frames must be (H*3/2, W) planar arrays, got {first.shape}")
            height = height * 2 // 3
        if height % 2 or width % 2:
            raise InputError(f"frame size {width}x{height} must be even for yuv420p")
        with av.open(str(tmp), mode="w", options={"movflags": "+faststart"}) as container:
            # All streams must exist before the first packet is muxed (the header is written then).
            vstream = container.add_stream("libx264", rate=fps, options=video_options(cfg))
            vstream.width, vstream.height, vstream.pix_fmt = width, height, "yuv420p"
            vstream.codec_context.time_base = Fraction(1, fps)
            vstream.thread_count = 1  # this context only writes the header; the segment encoders below encode

            def make_context(clips_at_once: int) -> Any:
                """A standalone libx264 encoder with exactly the stream's settings (same SPS/PPS, whatever the
                thread count: tested), its threads sized to the clips being encoded when its segment starts."""
                ctx = av.CodecContext.create("libx264", "w")
                ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuv420p"
                ctx.time_base, ctx.framerate = Fraction(1, fps), Fraction(fps, 1)
                ctx.options = video_options(cfg)
                ctx.thread_count = x264_threads(cfg, clips_at_once)
                ctx.flags |= vstream.codec_context.flags & av.codec.context.Flags.global_header
                return ctx

            # Encoding runs on the segment encoders' threads (a single one for a clip of one GOP), never on
            # the caller's: they run at encode.nice while the caller may be feeding a live stream.
            workers = max(1, min(segment_workers(cfg), -(-n_frames // cfg.gop_frames)))
            segments = _SegmentEncoders(workers, cfg.gop_frames, make_context, cfg.nice)
            astream = container.add_stream("aac", rate=cfg.audio_rate, layout="mono")
            astream.bit_rate = cfg.audio_bitrate_kbps * 1000

            # The clip's audio is known before its frames: encode it beside the video, off the critical path.
            audio_pool = ThreadPoolExecutor(1, thread_name_prefix="musetalk-aac")
            full_audio = audio_pool.submit(encode_aac, [pcm], cfg.audio_rate, cfg)
            frames_in = itertools.chain([first], frame_iter)
            try:
                while True:
                    t_wait = time.perf_counter()
                    frame = next(frames_in, None)
                    wait_s += time.perf_counter() - t_wait
                    if frame is None:
                        break
                    if count >= n_frames:
                        raise InputError(f"more than the expected {n_frames} frames")
                    if pix_fmt == "yuv420p":
                        vf = i420_video_frame(frame)
                    else:
                        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format=pix_fmt)
                    vf.pts = count
                    segments.add(vf, count)
                    count += 1
                if count != n_frames and not (allow_fewer and count < n_frames):
                    raise InputError(f"expected {n_frames} frames, got {count}")
                for packet in segments.packets():
                    packet.stream = vstream
                    container.mux(packet)
            finally:
                segments.close()
                audio_pool.shutdown(wait=True)
            # Audio after the video; a clip cut short gets exactly its frames' audio, encoded again.
            if count == n_frames:
                audio_packets, _ = full_audio.result()
            else:
                pcm = pcm[: count * cfg.audio_rate // fps]
                audio_packets, _ = encode_aac([pcm], cfg.audio_rate, cfg)
            for packet in audio_packets:
                packet.stream = astream
                container.mux(packet)
        sf.write(str(wav_tmp), wav_pcm[: len(pcm)], cfg.audio_rate, subtype="PCM_16", format="WAV")
        os.replace(wav_tmp, wav_path)
        os.replace(tmp, path)
    except av.FFmpegError as exc:
        raise FfmpegFailed(f"encoding {path.name} failed: {exc}") from exc
    finally:
        for leftover in (tmp, wav_tmp):
            leftover.unlink(missing_ok=True)
    total_ms = (time.perf_counter() - t0) * 1000
    return Clip(
        path=path,
        n_frames=count,
        fps=fps,
        audio_path=wav_path,
        timings_ms={
            "encode_total": total_ms,  # wall time of the whole call
            "encode_wait_ms": wait_s * 1000,  # of which: waiting for frames from the producer
            "encode_ms": total_ms - wait_s * 1000,  # of which: conversion, encoding, muxing, writing
        },
    )
