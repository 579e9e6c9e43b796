"""Append clips to one continuous session video, atomically, with no audio drift and bounded encode work.

The seed joined clips with the ffmpeg concat demuxer and `-c copy`. That keeps the video exact, but
every AAC clip starts with 1024 priming samples, so audio decoded in order drifts ~21-27 ms per join
(deps.md §7). Here the video packets are still stream-copied (no re-encode), but the session's audio
is one continuous AAC stream encoded from the clips' PCM: on each append only the last few AAC
frames of the old audio plus the new clip are encoded again, starting WARMUP_S earlier on the real
signal so the encoder's MDCT overlap and rate control continue as if it had never stopped, and the
new packets replace the old ones from a frame boundary on. Decoded in order, the audio has one
priming at the very start (removed by the mp4 edit list) and stays sample-aligned with the video
after any number of appends.

Each append writes a new file next to the session video and renames it into place, so readers see
either the old or the new session, both complete and playable. The session's own bookkeeping
(clip list, frame cursor, avatar) is stored inside that file's metadata, so the file is the single
source of truth and a crash can never leave the two out of step.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from numpy.typing import NDArray

from musetalk.config import EncodeConfig
from musetalk.errors import FfmpegFailed, InputError, SessionConflict
from musetalk.types import Clip

SESSION_FORMAT = "musetalk-session/1"
VIDEO_NAME = "full_session.mp4"
CONCAT_LIST_NAME = "concat_list.txt"
CLIPS_DIR_NAME = "clips"
AAC_FRAME_SAMPLES = 1024
# AAC frames before the old end that are encoded again: their MDCT windows and the encoder's look-ahead
# saw the zero padding after the old end, not the next clip (3 frames covers window + look-ahead).
SPLICE_MARGIN_FRAMES = 3
# Audio re-fed to the encoder before the splice point. The native AAC encoder's rate control needs about
# a second to settle: with 1 s the spliced region decodes as cleanly as an uninterrupted encode
# (measured: SNR within 1 dB of a one-pass encode; with 40 ms it was ~4 dB worse for the next second).
WARMUP_S = 1.0
# Test-only fault injection: when this env var equals the clip count being written, the process
# SIGKILLs itself after the temp file is complete and before the rename (tests/test_server_process.py).
KILL_BEFORE_RENAME_ENV = "MUSETALK_TEST_KILL_BEFORE_RENAME"


@dataclass(frozen=True)
class ClipEntry:
    """One clip of a session: its mp4 file name in the clips folder (PCM .wav beside it) and length."""

    name: str
    n_frames: int


@dataclass(frozen=True)
class SessionState:
    """What a session video holds; stored as JSON in the video's metadata."""

    fps: int
    audio_rate: int
    avatar_id: str | None = None
    cursor: int = 0  # renderer frame cursor after the last clip
    clips: tuple[ClipEntry, ...] = ()
    next_seq: int = 1  # number of the next clip file (never reused within a session)

    @property
    def total_frames(self) -> int:
        """Video frames in the session."""
        return sum(c.n_frames for c in self.clips)

    @property
    def duration_s(self) -> float:
        """Session length in seconds."""
        return self.total_frames / self.fps

    @property
    def total_samples(self) -> int:
        """Audio samples in the session (whole frames of audio_rate / fps samples each)."""
        return self.total_frames * self.audio_rate // self.fps

    def to_json(self) -> str:
        """Serialise for the video's metadata."""
        return json.dumps(
            {
                "format": SESSION_FORMAT,
                "fps": self.fps,
                "audio_rate": self.audio_rate,
                "avatar_id": self.avatar_id,
                "cursor": self.cursor,
                "next_seq": self.next_seq,
                "clips": [[c.name, c.n_frames] for c in self.clips],
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> SessionState:
        """Parse what to_json wrote; ValueError if it is not a session record."""
        data: dict[str, Any] = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != SESSION_FORMAT:
            raise ValueError("not a session record")
        return cls(
            fps=int(data["fps"]),
            audio_rate=int(data["audio_rate"]),
            avatar_id=data.get("avatar_id"),
            cursor=int(data["cursor"]),
            next_seq=int(data["next_seq"]),
            clips=tuple(ClipEntry(str(n), int(f)) for n, f in data["clips"]),
        )


@dataclass(frozen=True)
class SessionPaths:
    """Where one session lives on disk."""

    video: Path  # the session video (results/full_session.mp4 for the default session)
    workdir: Path  # results/sessions/<id>/
    clips_dir: Path = field(init=False)
    concat_list: Path = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "clips_dir", self.workdir / CLIPS_DIR_NAME)
        object.__setattr__(self, "concat_list", self.workdir / CONCAT_LIST_NAME)

    def temp_video(self) -> Path:
        """The temp file an append writes before renaming it onto `video`."""
        return self.video.with_name(f".{self.video.stem}.{os.getpid()}.tmp{self.video.suffix}")

    def stale_temp_videos(self) -> list[Path]:
        """Temp files left by a process that died mid-append."""
        return sorted(self.video.parent.glob(f".{self.video.stem}.*.tmp{self.video.suffix}"))


@dataclass(frozen=True)
class AppendResult:
    """The session after an append, where the new clip starts in it, and what the append cost."""

    state: SessionState
    clip_index: int
    clip_start_s: float
    timings_ms: dict[str, float]


def read_state(video: Path) -> SessionState | None:
    """The state stored in a session video; None if there is no video; SessionConflict if foreign."""
    import av

    if not video.is_file():
        return None
    try:
        with av.open(str(video)) as container:
            record = container.metadata.get("comment", "")
    except (av.FFmpegError, OSError) as exc:
        raise SessionConflict(f"{video} is not readable ({exc}); reset the session to start over") from exc
    try:
        return SessionState.from_json(record)
    except (ValueError, KeyError, TypeError) as exc:
        raise SessionConflict(f"{video} was not written by this server; reset the session to start over") from exc


def clip_pcm(clip: Clip, rate: int) -> NDArray[np.float32]:
    """The clip's audio as float32 mono of exactly n_frames x rate / fps samples, from its PCM WAV."""
    n_expected = clip.n_frames * rate // clip.fps
    if clip.audio_path is None or not clip.audio_path.is_file():
        raise InputError(f"clip {clip.path.name} has no PCM .wav beside it (write_clip makes one)")
    pcm, wav_rate = sf.read(str(clip.audio_path), dtype="float32", always_2d=True)  # (n, channels)
    if wav_rate != rate:
        raise SessionConflict(f"clip audio is {wav_rate} Hz, the session uses {rate} Hz (encode.audio_rate)")
    mono = pcm.mean(axis=1).astype(np.float32)  # (n,) float32
    if len(mono) != n_expected:
        raise InputError(f"clip {clip.path.name}: {len(mono)} audio samples, expected {n_expected}")
    return mono


def _tail_pcm(paths: SessionPaths, state: SessionState, n_samples: int) -> NDArray[np.float32]:
    """The last `n_samples` of the session's audio, read from the PCM WAVs of its last clips."""
    parts: list[NDArray[np.float32]] = []
    need = n_samples
    for entry in reversed(state.clips):
        if need <= 0:
            break
        wav = paths.clips_dir / Path(entry.name).with_suffix(".wav").name
        try:
            info = sf.info(str(wav))
            start = max(0, info.frames - need)
            pcm, _ = sf.read(str(wav), start=start, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, OSError) as exc:
            raise SessionConflict(f"session audio {wav.name} is missing or unreadable; reset the session") from exc
        parts.append(pcm.mean(axis=1).astype(np.float32))
        need -= len(pcm)
    if need > 0:
        raise SessionConflict("session audio is shorter than its video; reset the session")
    return np.concatenate(parts[::-1]) if parts else np.zeros(0, np.float32)  # (n_samples,) float32


def _encode_audio(stream: Any, pcm: NDArray[np.float32], rate: int) -> list[Any]:
    """AAC-encode `pcm` (n,) float32 through an output stream's encoder → packets, pts from -priming."""
    import av

    frame = av.AudioFrame.from_ndarray(pcm[np.newaxis, :], format="fltp", layout="mono")
    frame.sample_rate, frame.pts = rate, 0
    return [*stream.encode(frame), *stream.encode(None)]


def _check_compatible(old_stream: Any, clip_stream: Any, clip: Clip) -> None:
    """Stream copy needs identical codec parameters; a session cannot change size or codec mid-way."""
    old_cc, new_cc = old_stream.codec_context, clip_stream.codec_context
    old_sig = (old_cc.name, old_cc.width, old_cc.height, old_cc.pix_fmt, bytes(old_cc.extradata or b""))
    new_sig = (new_cc.name, new_cc.width, new_cc.height, new_cc.pix_fmt, bytes(new_cc.extradata or b""))
    if old_sig != new_sig:
        raise SessionConflict(
            f"clip {clip.path.name} ({new_cc.width}x{new_cc.height} {new_cc.name}) cannot be stream-copied onto "
            f"the session ({old_cc.width}x{old_cc.height} {old_cc.name}); reset the session or use another one"
        )


def _write_session(
    out_path: Path,
    old_video: Path | None,
    old_state: SessionState,
    clip: Clip,
    audio_src: NDArray[np.float32],
    audio_src_start: int,
    splice_at: int,
    new_state: SessionState,
    cfg: EncodeConfig,
) -> None:
    """Write old video packets + the clip's video packets, and the old audio up to `splice_at` + new audio."""
    import av

    rate, fps = new_state.audio_rate, new_state.fps
    old_frames, new_total = old_state.total_frames, new_state.total_samples
    with av.open(str(clip.path)) as clip_in:
        if not clip_in.streams.video:
            raise InputError(f"clip {clip.path.name} has no video stream")
        clip_v = clip_in.streams.video[0]
        old_in = av.open(str(old_video)) if old_video is not None else None
        try:
            template = clip_v
            if old_in is not None:
                template = old_in.streams.video[0]
                _check_compatible(template, clip_v, clip)
            with av.open(str(out_path), mode="w", format="mp4", options={"movflags": "+faststart"}) as out:
                out.metadata["comment"] = new_state.to_json()
                out_v = out.add_stream_from_template(template)
                out_a = out.add_stream("aac", rate=rate, layout="mono")
                out_a.bit_rate = cfg.audio_bitrate_kbps * 1000
                # splice_at == 0: the old audio (if any) is too short to keep; all of it is encoded again,
                # priming packet included.
                keep_old_audio = splice_at > 0
                sample_tb = Fraction(1, rate)
                new_audio = []
                for packet in _encode_audio(out_a, audio_src, rate):
                    pts = audio_src_start + _ticks(packet.pts, packet.time_base, rate)
                    packet.pts = packet.dts = pts  # audio: decode order is presentation order
                    packet.time_base = sample_tb
                    if (pts >= splice_at or not keep_old_audio) and pts < new_total:
                        new_audio.append((pts, packet))
                if new_audio and new_audio[-1][0] + AAC_FRAME_SAMPLES > new_total:
                    new_audio[-1][1].duration = new_total - new_audio[-1][0]  # end the track with the video
                if old_in is not None:
                    for packet in old_in.demux():
                        if packet.dts is None or packet.pts is None:
                            continue  # demuxer flush packet
                        if packet.stream.type == "audio":
                            if not keep_old_audio or _ticks(packet.pts, packet.time_base, rate) >= splice_at:
                                continue
                            packet.stream = out_a
                        elif packet.stream.type == "video":
                            packet.stream = out_v
                        else:
                            continue
                        out.mux(packet)
                # Interleave the clip's video with the new audio by time (the muxer expects ~ascending dts).
                frame_tb = Fraction(1, fps)
                new_video = []
                for packet in clip_in.demux(clip_v):
                    if packet.dts is None or packet.pts is None:
                        continue
                    dts = old_frames + _ticks(packet.dts, packet.time_base, fps)
                    packet.pts = old_frames + _ticks(packet.pts, packet.time_base, fps)
                    packet.dts = dts
                    packet.duration = 1
                    packet.time_base = frame_tb
                    packet.stream = out_v
                    new_video.append((dts, packet))
                if len(new_video) != clip.n_frames:
                    raise InputError(f"clip {clip.path.name}: {len(new_video)} video frames, expected {clip.n_frames}")
                merged = [(Fraction(d, fps), 1, i, p) for i, (d, p) in enumerate(new_video)]
                merged += [(Fraction(d, rate), 0, i, p) for i, (d, p) in enumerate(new_audio)]
                for _, _, _, packet in sorted(merged, key=lambda m: m[:3]):
                    out.mux(packet)
        finally:
            if old_in is not None:
                old_in.close()


def _ticks(timestamp: int | None, time_base: Fraction | None, units_per_s: int) -> int:
    """A packet timestamp converted to units of 1/units_per_s s (samples or frames)."""
    if timestamp is None or time_base is None:
        raise FfmpegFailed("a packet without timestamp or time base")
    return round(timestamp * time_base * units_per_s)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def concat_list_text(paths: SessionPaths, state: SessionState) -> str:
    """The seed's concat_list.txt: one `file '<absolute path>'` line per clip, for `ffmpeg -f concat`."""
    lines = []
    for entry in state.clips:
        quoted = str((paths.clips_dir / entry.name).resolve()).replace("'", "'\\''")
        lines.append(f"file '{quoted}'\n")
    return "".join(lines)


def append_clip(
    paths: SessionPaths,
    state: SessionState,
    clip: Clip,
    cursor: int,
    avatar_id: str | None,
    cfg: EncodeConfig,
) -> AppendResult:
    """Append `clip` (its files inside paths.clips_dir) to the session video; returns the new state.

    The session video is replaced atomically; on any error it is left exactly as it was.
    """
    t0 = time.perf_counter()
    if clip.path.parent.resolve() != paths.clips_dir.resolve():
        raise ValueError(f"clip {clip.path} must be written inside {paths.clips_dir}")
    if clip.fps != state.fps:
        raise SessionConflict(f"clip is {clip.fps} fps, the session is {state.fps} fps")
    if clip.n_frames < 1:
        raise InputError("clip has no frames")
    if state.clips and state.avatar_id != avatar_id:
        raise SessionConflict(
            f"session uses avatar {state.avatar_id!r}, not {avatar_id!r}; reset it or use another session_id"
        )
    rate = state.audio_rate
    new_pcm = clip_pcm(clip, rate)  # (n_frames * rate / fps,) float32
    old_total = state.total_samples
    # Splice on an AAC frame boundary far enough before the old end that the kept packets never saw it.
    splice_at = max(0, (old_total // AAC_FRAME_SAMPLES - SPLICE_MARGIN_FRAMES) * AAC_FRAME_SAMPLES)
    warmup = int(WARMUP_S * rate) // AAC_FRAME_SAMPLES * AAC_FRAME_SAMPLES
    audio_src_start = max(0, splice_at - warmup)  # also a multiple of AAC_FRAME_SAMPLES
    tail = _tail_pcm(paths, state, old_total - audio_src_start)
    audio_src = np.concatenate([tail, new_pcm])  # (n,) float32, from audio_src_start to the new end
    t_read = time.perf_counter()

    new_state = replace(
        state,
        avatar_id=avatar_id,
        cursor=cursor,
        clips=(*state.clips, ClipEntry(clip.path.name, clip.n_frames)),
        next_seq=max(state.next_seq, _clip_seq(clip.path.name) + 1),
    )
    tmp = paths.temp_video()
    old_video = paths.video if state.clips else None
    try:
        _write_session(tmp, old_video, state, clip, audio_src, audio_src_start, splice_at, new_state, cfg)
        _fsync(tmp)
        t_write = time.perf_counter()
        if os.environ.get(KILL_BEFORE_RENAME_ENV) == str(len(new_state.clips)):
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace(tmp, paths.video)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        if _is_ffmpeg_error(exc):
            raise FfmpegFailed(f"appending {clip.path.name} to {paths.video.name} failed", str(exc)) from exc
        raise
    _write_text_atomic(paths.concat_list, concat_list_text(paths, new_state))
    t_end = time.perf_counter()
    return AppendResult(
        state=new_state,
        clip_index=len(state.clips),
        clip_start_s=state.duration_s,
        timings_ms={
            "append_read": (t_read - t0) * 1000,
            "append_write": (t_write - t_read) * 1000,
            "append_total": (t_end - t0) * 1000,
        },
    )


def _is_ffmpeg_error(exc: BaseException) -> bool:
    import av

    return isinstance(exc, av.FFmpegError)


def _clip_seq(name: str) -> int:
    """The number in a clip file name `clip_000042.mp4` (0 if it has none)."""
    digits = "".join(ch for ch in Path(name).stem if ch.isdigit())
    return int(digits) if digits else 0
