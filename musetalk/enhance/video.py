"""enhance.py's engine: restore the face in every frame of a video with GFPGAN, audio copied untouched.

Per batch of frames: find the face (`find_faces`, 68 landmarks) → align it to the 512² template
(5-point similarity) → GFPGAN on the device → optional temporal smoothing → paste back with the
inverse transform and a soft mask. Reading+detection, the device and paste+encoding run in three
threads, one batch each, so the CPU stages overlap with the GPU (and detection and paste-back are
spread over `enhance.workers` threads). Frames without a face are passed through unchanged. Video is
re-encoded with libx264 at the source's frame rate, frame for frame; the audio packets are remuxed
bit-exact. The output is written to a temp file and renamed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from numpy.typing import NDArray
from tqdm import tqdm

from musetalk.config import AppConfig
from musetalk.enhance.align import FACE_SIZE_PX, face_to_template, paste_back, template_mask, warp_to_template
from musetalk.enhance.restore import DetailSmoother, FaceRestorer, FlickerMeter, mouth_box, to_bgr_uint8
from musetalk.errors import FfmpegFailed, InputError
from musetalk.faces.base import FaceDetector
from musetalk.utils.yuv import i420_video_frame

EMPTY_INPUT = "Input video not found or empty"  # the seed's message
STAGES = ("decode", "detect", "align", "restore", "temporal", "paste", "encode")
Landmarks = NDArray[np.float32]  # (68, 2) frame px


def find_faces(detector: FaceDetector, frames_bgr: Sequence[NDArray[np.uint8]]) -> list[Landmarks | None]:
    """The one place enhance.py finds faces: (68, 2) landmarks of the main face per frame, or None."""
    return detector.detect_batch(frames_bgr)


@dataclass
class EnhanceResult:
    """What enhance_video did: counts, per-stage seconds, and the mouth-box flicker figures."""

    output: Path
    n_frames: int
    n_faces: int
    fps: float
    size_wh: tuple[int, int]
    audio_packets: int
    seconds: dict[str, float] = field(default_factory=dict)  # busy time per stage (stages overlap)
    flicker: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0


def _open_input(path: Path) -> Any:
    import av

    if not path.is_file() or path.stat().st_size == 0:
        raise InputError(f"{EMPTY_INPUT}: {path}")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError):
        raise InputError(f"{EMPTY_INPUT}: {path}") from None
    if not container.streams.video:
        container.close()
        raise InputError(f"{EMPTY_INPUT}: {path} (no video stream)")
    return container


def check_input(path: Path) -> None:
    """Raise InputError with the seed's message unless `path` holds at least one decodable video frame."""
    container = _open_input(path)
    try:
        if next(iter(container.decode(video=0)), None) is None:
            raise InputError(f"{EMPTY_INPUT}: {path} (no video frames)")
    except InputError:
        raise
    except Exception:
        raise InputError(f"{EMPTY_INPUT}: {path} (undecodable)") from None
    finally:
        container.close()


def _frame_rate(stream: Any) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        raise InputError(f"cannot tell the frame rate of {stream.container.name}")
    return Fraction(rate).limit_denominator(1001 * 1000)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


def _batched(frames: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _Clock:
    """Busy seconds per stage; each stage runs in one thread (the stages overlap, so they add up to more
    than the wall time)."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)

    def since(self, stage: str, t0: float) -> float:
        now = time.perf_counter()
        self.seconds[stage] += now - t0
        return now


def auto_workers(workers: int) -> int:
    """enhance.workers: 0 = the host's cores, at most 8."""
    return workers or max(1, min(8, os.cpu_count() or 1))


@dataclass
class _Batch:
    """One batch on its way through the pipeline (decode+detect → restore → paste+encode)."""

    first: int  # index of its first frame in the video
    vframes: list[Any]  # decoded av.VideoFrames
    frames: list[NDArray[np.uint8]]  # (H, W, 3) BGR
    landmarks: list[Landmarks | None]
    idx: list[int] = field(default_factory=list)  # frames with a face to restore
    matrices: list[NDArray[np.float64]] = field(default_factory=list)  # (2, 3) frame → template, per idx
    faces: NDArray[np.uint8] | None = None  # (len(idx), 512, 512, 3) restored BGR


def enhance_video(
    cfg: AppConfig,
    restorer: FaceRestorer,
    detector: FaceDetector,
    src: Path,
    dst: Path,
    weight: float | None = None,
    temporal: str | None = None,
    progress: bool = True,
    measure_flicker: bool = True,
    more_detectors: Callable[[], FaceDetector] | None = None,
) -> EnhanceResult:
    """Restore every face of `src` into `dst` (same frames, fps, duration; audio packets copied).

    Three stages overlap: decoding and face detection (split over `enhance.workers` threads, each with a
    detector of its own from `more_detectors`; without it `detector` does all), GFPGAN on the device, and
    paste-back (over the same threads) with encoding."""
    import av

    opts = cfg.enhance
    weight = opts.weight if weight is None else weight
    temporal = opts.temporal if temporal is None else temporal
    if not 0.0 <= weight <= 1.0:
        raise InputError(f"weight must be within [0, 1], got {weight}")
    if temporal not in ("off", "motion"):
        raise InputError(f"temporal must be 'off' or 'motion', got {temporal!r}")
    smoother = DetailSmoother(opts.temporal_tau, opts.temporal_min_follow) if temporal == "motion" else None
    mask = template_mask(FACE_SIZE_PX)
    workers = auto_workers(opts.workers)
    detectors = [detector]  # detectors[k] finds the faces of the k-th slice of every batch
    clock = _Clock()
    t_start = time.perf_counter()
    reader = _open_input(src)
    audio_reader = _open_input(src)
    tmp = _tmp_path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    n_frames = n_faces = n_audio = 0
    meter = FlickerMeter()
    prev_face = False  # did the frame before the current batch have a face (temporal track continues)
    try:
        vin = reader.streams.video[0]
        vin.thread_type = "AUTO"
        rate = _frame_rate(vin)
        width, height = vin.codec_context.width, vin.codec_context.height
        total = vin.frames or None
        ain = audio_reader.streams.audio[0] if audio_reader.streams.audio else None
        with (
            av.open(str(tmp), mode="w", format="mp4", options={"movflags": "+faststart"}) as out,
            ThreadPoolExecutor(workers, thread_name_prefix="enhance") as pool,
            ThreadPoolExecutor(1, thread_name_prefix="enhance-read") as read_stage,
            ThreadPoolExecutor(1, thread_name_prefix="enhance-write") as write_stage,
        ):
            vout = out.add_stream(
                "libx264", rate=rate, options={"crf": str(cfg.encode.crf), "preset": cfg.encode.preset}
            )
            vout.width, vout.height, vout.pix_fmt = width - width % 2, height - height % 2, "yuv420p"
            vout.codec_context.time_base = 1 / rate
            aout = out.add_stream_from_template(ain) if ain is not None else None
            audio_packets = audio_reader.demux(ain) if ain is not None else iter(())
            batches = _batched(reader.decode(vin), opts.batch_size)
            even = width % 2 == 0 and height % 2 == 0
            bar = tqdm(total=total, desc="enhance", unit="frame", disable=not progress, dynamic_ncols=True)

            def mux_audio_until(t_s: float) -> None:
                nonlocal n_audio
                # Interleave: audio up to the video time written so far keeps the muxer's buffer small.
                for packet in audio_packets:
                    if packet.dts is None or packet.size == 0:
                        continue
                    packet.stream = aout
                    out.mux(packet)
                    n_audio += 1
                    if packet.time_base is not None and float(packet.dts * packet.time_base) > t_s:
                        return

            def read(first: int) -> _Batch | None:
                """Stage 1 (its own thread): decode the next batch and find its faces."""
                t0 = time.perf_counter()
                vframes = next(batches, None)
                if vframes is None:
                    return None
                frames = [f.to_ndarray(format="bgr24") for f in vframes]
                t0 = clock.since("decode", t0)
                if more_detectors is not None:
                    while len(detectors) < min(workers, len(frames)):
                        detectors.append(more_detectors())
                # Contiguous slices, one per detector, each used by one thread at a time (dlib's are not
                # thread-safe; they release the GIL, so the slices run in parallel).
                slices = np.array_split(np.arange(len(frames)), len(detectors))
                found = pool.map(lambda k: find_faces(detectors[k], [frames[i] for i in slices[k]]), range(len(slices)))
                landmarks = [lm for part in found for lm in part]
                clock.since("detect", t0)
                return _Batch(first, vframes, frames, landmarks)

            def finish(b: _Batch, i: int, k: int | None) -> tuple[NDArray[np.uint8] | None, NDArray[np.uint8] | None]:
                """(pasted BGR frame or None, the encoder's I420 planes or None) of frame i, whose restored face
                is b.faces[k] (None: no face); runs in the pool."""
                if k is None and even:
                    return None, None  # untouched: its decoded YUV planes are encoded as they are
                frame = b.frames[i]
                if k is not None:
                    assert b.faces is not None
                    frame = paste_back(frame, b.faces[k], b.matrices[k], mask, weight)
                crop = np.ascontiguousarray(frame[: vout.height, : vout.width])
                planes = np.asarray(cv2.cvtColor(crop, cv2.COLOR_BGR2YUV_I420), dtype=np.uint8)
                return (None if k is None else frame), planes

            def write(b: _Batch) -> None:
                """Stage 3 (its own thread): paste the faces back, encode, and mux audio up to here."""
                t0 = time.perf_counter()
                # Paste-back and the conversion to I420 (the encoder's input) over the pool's threads.
                slot = {i: k for k, i in enumerate(b.idx)}  # frame → its restored face (b.faces is set with idx)
                done = list(pool.map(lambda i: finish(b, i, slot.get(i)), range(len(b.frames))))
                t0 = clock.since("paste", t0)
                for i, ((frame, planes), vframe) in enumerate(zip(done, b.vframes, strict=True)):
                    vf = vframe.reformat(format="yuv420p") if planes is None else i420_video_frame(planes)
                    vf.pts, vf.time_base = b.first + i, 1 / rate
                    out.mux(vout.encode(vf))
                    if measure_flicker:
                        lm = b.landmarks[i]
                        box = mouth_box(lm, (height, width)) if lm is not None else None
                        meter.add(b.frames[i], b.frames[i] if frame is None else frame, box)
                mux_audio_until(float((b.first + len(b.frames)) / rate))
                clock.since("encode", t0)
                bar.update(len(b.frames))

            # Stage 2 (this thread): the device. The next batch is read while this one restores, and the
            # one before is written meanwhile; one batch in flight per stage keeps the order and the memory.
            reading: Future[_Batch | None] = read_stage.submit(read, 0)
            writing: Future[None] | None = None
            while (b := reading.result()) is not None:
                reading = read_stage.submit(read, b.first + len(b.frames))
                t0 = time.perf_counter()
                b.idx = [i for i, lm in enumerate(b.landmarks) if lm is not None] if weight > 0 else []
                b.matrices = [face_to_template(b.landmarks[i]) for i in b.idx]  # type: ignore[arg-type]
                if b.idx:
                    crops = np.stack([warp_to_template(b.frames[i], m) for i, m in zip(b.idx, b.matrices, strict=True)])
                    t0 = clock.since("align", t0)
                    restored = restorer.restore(crops)
                    if smoother is not None:
                        source_t = torch.from_numpy(crops).to(restored.device).flip(-1).permute(0, 3, 1, 2) / 255.0
                        # A frame without a face breaks the track: the next face starts afresh.
                        has = [prev_face] + [lm is not None for lm in b.landmarks]
                        t0 = clock.since("restore", t0)
                        restored = smoother.run(source_t, restored, [has[i] for i in b.idx])
                        t0 = clock.since("temporal", t0)
                    b.faces = to_bgr_uint8(restored)
                    clock.since("restore", t0)
                elif smoother is not None:
                    smoother.reset()
                prev_face = b.landmarks[-1] is not None
                n_frames += len(b.frames)
                n_faces += len(b.idx)
                if writing is not None:
                    writing.result()  # in order; a failed write stops here
                writing = write_stage.submit(write, b)
            if writing is not None:
                writing.result()
            bar.close()
            if n_frames == 0:
                raise InputError(f"{EMPTY_INPUT}: {src} (no video frames)")
            t0 = time.perf_counter()
            out.mux(vout.encode(None))
            mux_audio_until(float("inf"))
            clock.since("encode", t0)
        os.replace(tmp, dst)
    except av.FFmpegError as exc:
        raise FfmpegFailed(f"enhancing {src.name} failed: {exc}") from exc
    finally:
        reader.close()
        audio_reader.close()
        tmp.unlink(missing_ok=True)
    flicker = meter.result() if measure_flicker else {}
    return EnhanceResult(
        output=dst,
        n_frames=n_frames,
        n_faces=n_faces,
        fps=float(rate),
        size_wh=(width, height),
        audio_packets=n_audio,
        seconds=clock.seconds,
        flicker=flicker,
        wall_s=time.perf_counter() - t_start,
    )
