"""enhance.py's engine: restore the face in every frame of a video with GFPGAN, audio copied untouched.

Per batch of frames: find the face (`find_faces`, 68 landmarks) → align it to the 512² template
(5-point similarity) → GFPGAN on the device → optional temporal smoothing → paste back with the
inverse transform and a soft mask. Frames without a face are passed through unchanged. Video is
re-encoded with libx264 at the source's frame rate, frame for frame; the audio packets are remuxed
bit-exact. The output is written to a temp file and renamed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm import tqdm

from musetalk.config import AppConfig
from musetalk.enhance.align import FACE_SIZE_PX, face_to_template, paste_back, template_mask, warp_to_template
from musetalk.enhance.restore import DetailSmoother, FaceRestorer, FlickerMeter, mouth_box, to_bgr_uint8
from musetalk.errors import FfmpegFailed, InputError
from musetalk.faces.base import FaceDetector

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
    seconds: dict[str, float] = field(default_factory=dict)
    flicker: dict[str, float] = field(default_factory=dict)


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
    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] += now - self._t
        self._t = now


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
) -> EnhanceResult:
    """Restore every face of `src` into `dst` (same frames, fps, duration; audio packets copied)."""
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
    clock = _Clock()
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
        with av.open(str(tmp), mode="w", format="mp4", options={"movflags": "+faststart"}) as out:
            vout = out.add_stream(
                "libx264", rate=rate, options={"crf": str(cfg.encode.crf), "preset": cfg.encode.preset}
            )
            vout.width, vout.height, vout.pix_fmt = width - width % 2, height - height % 2, "yuv420p"
            vout.codec_context.time_base = 1 / rate
            aout = out.add_stream_from_template(ain) if ain is not None else None
            audio_packets = audio_reader.demux(ain) if ain is not None else iter(())

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

            even = width % 2 == 0 and height % 2 == 0
            bar = tqdm(total=total, desc="enhance", unit="frame", disable=not progress, dynamic_ncols=True)
            clock.lap("decode")
            for vframes in _batched(reader.decode(vin), opts.batch_size):
                batch = [f.to_ndarray(format="bgr24") for f in vframes]
                clock.lap("decode")
                landmarks = find_faces(detector, batch)
                clock.lap("detect")
                idx = [i for i, lm in enumerate(landmarks) if lm is not None] if weight > 0 else []
                matrices = [face_to_template(landmarks[i]) for i in idx]  # type: ignore[arg-type]
                clock.lap("align")
                results: list[NDArray[np.uint8] | None] = [None] * len(batch)
                if idx:
                    crops = np.stack([warp_to_template(batch[i], m) for i, m in zip(idx, matrices, strict=True)])
                    clock.lap("align")
                    restored = restorer.restore(crops)
                    if smoother is not None:
                        source_t = torch.from_numpy(crops).to(restored.device).flip(-1).permute(0, 3, 1, 2) / 255.0
                        # A frame without a face breaks the track: the next face starts afresh.
                        has = [prev_face] + [lm is not None for lm in landmarks]
                        clock.lap("restore")
                        restored = smoother.run(source_t, restored, [has[i] for i in idx])
                        clock.lap("temporal")
                    faces = to_bgr_uint8(restored)
                    clock.lap("restore")
                    for k, i in enumerate(idx):
                        results[i] = paste_back(batch[i], faces[k], matrices[k], mask, weight)
                    clock.lap("paste")
                elif smoother is not None:
                    smoother.reset()
                for i, (frame, vframe) in enumerate(zip(results, vframes, strict=True)):
                    if frame is None and even:
                        # Untouched frames skip the RGB round trip: their YUV planes are encoded as decoded.
                        vf = vframe.reformat(format="yuv420p")
                    else:
                        img = batch[i] if frame is None else frame
                        vf = av.VideoFrame.from_ndarray(
                            np.ascontiguousarray(img[: vout.height, : vout.width]), format="bgr24"
                        )
                    vf.pts, vf.time_base = n_frames + i, 1 / rate
                    out.mux(vout.encode(vf))
                    if measure_flicker:
                        lm = landmarks[i]
                        box = mouth_box(lm, (height, width)) if lm is not None else None
                        meter.add(batch[i], batch[i] if frame is None else frame, box)
                n_frames += len(batch)
                n_faces += len(idx)
                prev_face = landmarks[-1] is not None
                clock.lap("encode")
                mux_audio_until(float(n_frames / rate))
                bar.update(len(batch))
            bar.close()
            if n_frames == 0:
                raise InputError(f"{EMPTY_INPUT}: {src} (no video frames)")
            out.mux(vout.encode(None))
            mux_audio_until(float("inf"))
            clock.lap("encode")
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
    )
