"""ffmpeg as a subprocess (argument lists only) and probing with PyAV (imageio-ffmpeg ships no ffprobe)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from musetalk.errors import FfmpegFailed

STDERR_TAIL_CHARS = 2000


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary bundled with imageio-ffmpeg (GPL build with libx264 and aac)."""
    import imageio_ffmpeg

    return str(imageio_ffmpeg.get_ffmpeg_exe())


def run_ffmpeg(args: list[str], timeout_s: float = 600.0) -> None:
    """Run `ffmpeg -hide_banner -nostdin -y <args>`; raise FfmpegFailed with the stderr tail on failure."""
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise FfmpegFailed(f"ffmpeg timed out after {timeout_s:.0f} s") from exc
    if proc.returncode != 0:
        raise FfmpegFailed(f"ffmpeg exited with {proc.returncode}", proc.stderr[-STDERR_TAIL_CHARS:])


@dataclass(frozen=True)
class MediaInfo:
    """What a container holds, read from the streams themselves."""

    duration_s: float  # container duration
    video_duration_s: float | None
    audio_duration_s: float | None
    n_video_frames: int | None
    fps: float | None
    width: int | None
    height: int | None
    audio_rate: int | None


def probe(path: Path) -> MediaInfo:
    """Stream durations, frame count and sizes of a media file (no decoding; fragmented files are scanned)."""
    import av

    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as exc:
        raise FfmpegFailed(f"cannot open {path}: {exc}") from exc
    with container:
        v = next(iter(container.streams.video), None)
        a = next(iter(container.streams.audio), None)

        def _dur(stream: av.stream.Stream | None) -> float | None:
            if stream is None or stream.duration is None or stream.time_base is None:
                return None
            return float(stream.duration * stream.time_base)

        n_frames = int(v.frames) if v is not None and v.frames else None
        if v is not None and n_frames is None:
            # Fragmented MP4 (session videos) has no global sample table: count the packets instead.
            n_frames = sum(1 for packet in container.demux(v) if packet.size) or None
        return MediaInfo(
            duration_s=float(container.duration or 0) / 1_000_000,
            video_duration_s=_dur(v),
            audio_duration_s=_dur(a),
            n_video_frames=n_frames,
            fps=float(v.average_rate) if v is not None and v.average_rate else None,
            width=v.codec_context.width if v is not None else None,
            height=v.codec_context.height if v is not None else None,
            audio_rate=a.codec_context.sample_rate if a is not None else None,
        )
