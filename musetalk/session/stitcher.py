"""Append clips to one continuous session video: atomic, drift-free, and with bounded work per append.

The seed joined clips with the ffmpeg concat demuxer and `-c copy`. That keeps the video exact, but
every AAC clip starts with 1024 priming samples, so audio decoded in order drifts ~21-27 ms per join
(measured; tests/test_session.py reproduces it), and every append re-reads the whole session. Here:

* Video packets are stream-copied from the clip (never re-encoded).
* The session's audio is one continuous AAC stream encoded from the clips' PCM. On each append the
  audio from the last committed AAC frame boundary on is encoded again, starting WARMUP_S earlier on
  the real signal so the encoder's MDCT overlap and rate control continue as if it had never stopped;
  decoded in order, it has one priming (hidden by the edit list) and stays on the video clock forever.
* The file is a fragmented MP4 (session/fmp4.py): each append adds `moof`+`mdat` fragments at the end.
  Audio after the last boundary that a later append will re-encode sits in a provisional fragment
  after the committed ones. A new version = the committed bytes of the previous version (a kernel
  copy, `copy_file_range`, which copy-on-write filesystems turn into a clone) + the new fragments +
  the state; Python touches only the new clip's packets, whatever the session's length.
* Each version is written to a temp file and renamed into place, so readers see the old or the new
  session, both complete and playable; a crash in between leaves the old one intact.
* The session's bookkeeping (clips, frame cursor, avatar, layout) is stored in the file itself, in a
  trailing `free` box that players skip, so the file is the single source of truth.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import soundfile as sf
from numpy.typing import NDArray

from musetalk.config import EncodeConfig
from musetalk.errors import FfmpegFailed, InputError, SessionConflict
from musetalk.session import fmp4
from musetalk.types import Clip

log = logging.getLogger(__name__)

SESSION_FORMAT = "musetalk-session/2"
STATE_MAGIC = b"musetalk-session-state\n"  # start of the trailing `free` box's payload
VIDEO_NAME = "full_session.mp4"
CONCAT_LIST_NAME = "concat_list.txt"
CLIPS_DIR_NAME = "clips"
AAC_FRAME_SAMPLES = 1024
# AAC frames before the session's end that the next append encodes again: their MDCT windows and the
# encoder's look-ahead saw the zero padding after the end, not the next clip (window + look-ahead).
SPLICE_MARGIN_FRAMES = 3
# Audio re-fed to the encoder before the splice point. The native AAC encoder's rate control needs about
# a second to settle: with 1 s the spliced region decodes as cleanly as an uninterrupted encode
# (measured: SNR within 1 dB of a one-pass encode; with 40 ms it was ~4 dB worse for the next second).
WARMUP_S = 1.0
VIDEO_TICKS_PER_FRAME = 1000  # video track timescale = fps x 1000: whole ticks per frame at any fps
# Test-only fault injection: when this env var equals the clip count being written, the process
# SIGKILLs itself after the temp file is complete and before the rename (tests/test_server_process.py).
KILL_BEFORE_RENAME_ENV = "MUSETALK_TEST_KILL_BEFORE_RENAME"


@dataclass(frozen=True)
class ClipEntry:
    """One clip of a session: its mp4 file name in the clips folder (PCM .wav beside it) and length."""

    name: str
    n_frames: int


@dataclass(frozen=True)
class FileLayout:
    """Where things are in the session file, so an append can reuse the committed bytes."""

    committed_bytes: int  # file prefix that later appends keep: init + committed fragments
    audio_committed: int  # audio samples (from the session start) held by committed fragments
    next_fragment: int  # sequence number of the next fragment
    priming: int  # AAC encoder delay: audio media time = session sample + priming
    duration_offsets: tuple[int, ...]  # 64-bit duration fields in the init segment
    video_signature: str  # codec, size and decoder config every appended clip must match


@dataclass(frozen=True)
class SessionState:
    """What a session video holds; stored as JSON at the end of the video itself."""

    fps: int
    audio_rate: int
    avatar_id: str | None = None
    cursor: int = 0  # renderer frame cursor after the last clip
    clips: tuple[ClipEntry, ...] = ()
    next_seq: int = 1  # number of the next clip file (never reused within a session)
    layout: FileLayout | None = None  # None until the first clip

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
        """Serialise for the session file."""
        layout = self.layout
        return json.dumps(
            {
                "format": SESSION_FORMAT,
                "fps": self.fps,
                "audio_rate": self.audio_rate,
                "avatar_id": self.avatar_id,
                "cursor": self.cursor,
                "next_seq": self.next_seq,
                "clips": [[c.name, c.n_frames] for c in self.clips],
                "layout": None
                if layout is None
                else {
                    "committed_bytes": layout.committed_bytes,
                    "audio_committed": layout.audio_committed,
                    "next_fragment": layout.next_fragment,
                    "priming": layout.priming,
                    "duration_offsets": list(layout.duration_offsets),
                    "video_signature": layout.video_signature,
                },
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> SessionState:
        """Parse what to_json wrote; ValueError if it is not a session record."""
        data: dict[str, Any] = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != SESSION_FORMAT:
            raise ValueError("not a session record")
        lay = data.get("layout")
        return cls(
            fps=int(data["fps"]),
            audio_rate=int(data["audio_rate"]),
            avatar_id=data.get("avatar_id"),
            cursor=int(data["cursor"]),
            next_seq=int(data["next_seq"]),
            clips=tuple(ClipEntry(str(n), int(f)) for n, f in data["clips"]),
            layout=None
            if lay is None
            else FileLayout(
                committed_bytes=int(lay["committed_bytes"]),
                audio_committed=int(lay["audio_committed"]),
                next_fragment=int(lay["next_fragment"]),
                priming=int(lay["priming"]),
                duration_offsets=tuple(int(o) for o in lay["duration_offsets"]),
                video_signature=str(lay["video_signature"]),
            ),
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
    if not video.is_file():
        return None
    try:
        with video.open("rb") as f:
            boxes = fmp4.top_level_boxes(f)
            kind, offset, size = boxes[-1]
            f.seek(offset + 8)
            payload = f.read(size - 8) if kind == b"free" else b""
        if not payload.startswith(STATE_MAGIC):
            raise ValueError("no session record at the end of the file")
        state = SessionState.from_json(payload[len(STATE_MAGIC) :].decode("utf-8"))
        if state.layout is None or state.layout.committed_bytes > offset:
            raise ValueError("session record does not match the file")
        return state
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise SessionConflict(
            f"{video} was not written by this server or is damaged ({exc}); reset the session to start over"
        ) from exc


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


@dataclass(frozen=True)
class _AacPacket:
    pts: int  # in samples from the session start; the priming packet has pts -priming
    data: bytes
    duration: int


def _encode_aac(pcm: NDArray[np.float32], start: int, rate: int, cfg: EncodeConfig) -> tuple[list[_AacPacket], bytes]:
    """AAC-encode `pcm` (n,) float32 that begins `start` samples into the session → (packets, config)."""
    import av

    encoder = av.CodecContext.create("aac", "w")
    encoder.sample_rate, encoder.layout, encoder.format = rate, "mono", "fltp"
    encoder.bit_rate = cfg.audio_bitrate_kbps * 1000
    encoder.time_base = Fraction(1, rate)
    frame = av.AudioFrame.from_ndarray(pcm[np.newaxis, :], format="fltp", layout="mono")
    frame.sample_rate, frame.pts = rate, 0
    packets = []
    for packet in [*encoder.encode(frame), *encoder.encode(None)]:
        pts = start + _ticks(packet.pts, packet.time_base, rate)
        packets.append(_AacPacket(pts=pts, data=bytes(packet), duration=int(packet.duration or AAC_FRAME_SAMPLES)))
    return packets, bytes(encoder.extradata or b"")


@dataclass(frozen=True)
class _ClipVideo:
    samples: list[fmp4.Sample]
    width: int
    height: int
    avcc: bytes

    @property
    def signature(self) -> str:
        """What must match for stream copy: codec, size and the decoder configuration (SPS/PPS)."""
        return f"h264 {self.width}x{self.height} {self.avcc.hex()}"


def _read_clip_video(clip: Clip, fps: int) -> _ClipVideo:
    """The clip's H.264 packets as fragment samples (timing in video ticks)."""
    import av

    with av.open(str(clip.path)) as container:
        if not container.streams.video:
            raise InputError(f"clip {clip.path.name} has no video stream")
        stream = container.streams.video[0]
        cc = stream.codec_context
        if cc.name != "h264" or not cc.extradata:
            raise SessionConflict(f"clip {clip.path.name} is {cc.name}; sessions hold H.264 from write_clip")
        timed = []
        for packet in container.demux(stream):
            if packet.pts is None or packet.dts is None:
                continue  # demuxer flush packet
            dts = _ticks(packet.dts, packet.time_base, fps)
            pts = _ticks(packet.pts, packet.time_base, fps)
            timed.append((dts, pts, bool(packet.is_keyframe), bytes(packet)))
        width, height, avcc = int(cc.width), int(cc.height), bytes(cc.extradata)
    timed.sort(key=lambda t: t[0])
    if len(timed) != clip.n_frames:
        raise InputError(f"clip {clip.path.name}: {len(timed)} video frames, expected {clip.n_frames}")
    if not timed[0][2]:
        raise InputError(f"clip {clip.path.name} does not start with a key frame")
    samples = [
        fmp4.Sample(data, VIDEO_TICKS_PER_FRAME, is_key, (pts - dts) * VIDEO_TICKS_PER_FRAME)
        for dts, pts, is_key, data in timed
    ]
    return _ClipVideo(samples=samples, width=width, height=height, avcc=avcc)


def _ticks(timestamp: int | None, time_base: Fraction | None, units_per_s: int) -> int:
    """A packet timestamp converted to units of 1/units_per_s s (samples or frames)."""
    if timestamp is None or time_base is None:
        raise FfmpegFailed("a packet without timestamp or time base")
    return round(timestamp * time_base * units_per_s)


def _copy_prefix(src: Path, dst: BinaryIO, n_bytes: int) -> None:
    """Copy the first `n_bytes` of `src` to `dst` in the kernel (a clone on copy-on-write filesystems)."""
    with src.open("rb") as f:
        copied = 0
        try:
            while copied < n_bytes:
                n = os.copy_file_range(f.fileno(), dst.fileno(), n_bytes - copied, copied, copied)
                if n == 0:
                    raise SessionConflict(f"{src} is shorter than its session record says; reset the session")
                copied += n
        except (AttributeError, OSError):  # no copy_file_range here (or across filesystems): plain copy
            f.seek(copied)
            dst.seek(copied)
            remaining = n_bytes - copied
            while remaining > 0:
                chunk = f.read(min(remaining, 1 << 20))
                if not chunk:
                    raise SessionConflict(f"{src} is shorter than its session record says; reset the session") from None
                dst.write(chunk)
                remaining -= len(chunk)
    dst.seek(n_bytes)


def _aac_samples(packets: list[_AacPacket], end: int) -> list[fmp4.Sample]:
    """Fragment samples for AAC packets; the last one is cut to end at `end` (the video's end)."""
    samples = []
    for i, p in enumerate(packets):
        duration = p.duration if i + 1 < len(packets) else min(p.duration, end - p.pts)
        samples.append(fmp4.Sample(p.data, max(duration, 1)))
    return samples


def _write_version(
    f: BinaryIO,
    paths: SessionPaths,
    state: SessionState,
    new_state: SessionState,
    video: _ClipVideo,
    audio: list[_AacPacket],
    audio_config: bytes,
    cfg: EncodeConfig,
) -> FileLayout:
    """Write the new session version into `f` (empty, at offset 0); returns its layout."""
    rate, fps = state.audio_rate, state.fps
    old = state.layout
    if old is None:
        init = fmp4.init_segment(
            fmp4.VideoTrack(video.width, video.height, fps * VIDEO_TICKS_PER_FRAME, video.avcc),
            fmp4.AudioTrack(rate, 1, audio_config, priming=-audio[0].pts, bitrate=cfg.audio_bitrate_kbps * 1000),
        )
        f.write(init.data)
        duration_offsets, seq, priming = init.duration_offsets, 1, -audio[0].pts
    else:
        if not paths.video.is_file():
            raise SessionConflict(f"{paths.video} disappeared while the session was in use; reset the session")
        _copy_prefix(paths.video, f, old.committed_bytes)
        duration_offsets, seq, priming = old.duration_offsets, old.next_fragment, old.priming
    new_total = new_state.total_samples
    # Commit audio up to an AAC frame boundary that the next append will not need to encode again.
    commit_to = (new_total // AAC_FRAME_SAMPLES - SPLICE_MARGIN_FRAMES) * AAC_FRAME_SAMPLES
    commit_to = max(commit_to, old.audio_committed if old else 0)
    samples = _aac_samples(audio, new_total)
    n_committed = sum(1 for p in audio if p.pts < commit_to)
    f.write(fmp4.fragment(seq, fmp4.VIDEO_TRACK_ID, state.total_frames * VIDEO_TICKS_PER_FRAME, video.samples))
    seq += 1
    if n_committed:
        f.write(fmp4.fragment(seq, fmp4.AUDIO_TRACK_ID, audio[0].pts + priming, samples[:n_committed]))
        seq += 1
    committed_bytes = f.tell()
    if n_committed < len(audio):
        tail_start = audio[n_committed].pts + priming
        f.write(fmp4.fragment(seq, fmp4.AUDIO_TRACK_ID, tail_start, samples[n_committed:]))
    layout = FileLayout(
        committed_bytes=committed_bytes,
        audio_committed=commit_to,
        next_fragment=seq,
        priming=priming,
        duration_offsets=duration_offsets,
        video_signature=video.signature,
    )
    record = replace(new_state, layout=layout)
    f.write(fmp4.box(b"free", STATE_MAGIC + record.to_json().encode("utf-8")))
    fmp4.patch_durations(f, duration_offsets, round(new_state.total_frames * fmp4.MOVIE_TIMESCALE / fps))
    return layout


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
    import av

    rate = state.audio_rate
    try:
        video = _read_clip_video(clip, state.fps)
    except av.FFmpegError as exc:
        raise FfmpegFailed(f"reading clip {clip.path.name} failed", str(exc)) from exc
    if state.layout is not None and video.signature != state.layout.video_signature:
        raise SessionConflict(
            f"clip {clip.path.name} ({video.width}x{video.height}) cannot be stream-copied onto this session "
            "(other size or encoder settings); reset the session or use another one"
        )
    new_pcm = clip_pcm(clip, rate)  # (n_frames * rate / fps,) float32
    old_total = state.total_samples
    splice_at = state.layout.audio_committed if state.layout else 0
    warmup = int(WARMUP_S * rate) // AAC_FRAME_SAMPLES * AAC_FRAME_SAMPLES
    source_start = max(0, splice_at - warmup)  # a multiple of AAC_FRAME_SAMPLES, like splice_at
    source = np.concatenate([_tail_pcm(paths, state, old_total - source_start), new_pcm])  # (n,) float32
    t_read = time.perf_counter()
    try:
        packets, audio_config = _encode_aac(source, source_start, rate, cfg)
    except av.FFmpegError as exc:
        raise FfmpegFailed("encoding the session audio failed", str(exc)) from exc
    new_total = old_total + len(new_pcm)
    if state.layout is None:
        audio = [p for p in packets if p.pts < new_total]  # a new session keeps the priming packet
    else:
        audio = [p for p in packets if splice_at <= p.pts < new_total]
    t_encode = time.perf_counter()

    new_state = replace(
        state,
        avatar_id=avatar_id,
        cursor=cursor,
        clips=(*state.clips, ClipEntry(clip.path.name, clip.n_frames)),
        next_seq=max(state.next_seq, _clip_seq(clip.path.name) + 1),
    )
    tmp = paths.temp_video()
    try:
        with tmp.open("wb") as f:
            layout = _write_version(f, paths, state, new_state, video, audio, audio_config, cfg)
            f.flush()
            os.fsync(f.fileno())
        t_write = time.perf_counter()
        if os.environ.get(KILL_BEFORE_RENAME_ENV) == str(len(new_state.clips)):
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace(tmp, paths.video)  # frees the previous version's blocks (if no reader holds it)
        t_rename = time.perf_counter()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    new_state = replace(new_state, layout=layout)
    try:
        _write_text_atomic(paths.concat_list, concat_list_text(paths, new_state))
    except OSError as exc:  # the session (video + its record) is committed; the list is a convenience copy
        log.warning("could not write %s: %s", paths.concat_list, exc)
    t_end = time.perf_counter()
    return AppendResult(
        state=new_state,
        clip_index=len(state.clips),
        clip_start_s=state.duration_s,
        timings_ms={
            "append_read": (t_read - t0) * 1000,
            "append_encode": (t_encode - t_read) * 1000,
            "append_write": (t_write - t_encode) * 1000,
            "append_rename": (t_rename - t_write) * 1000,
            "append_total": (t_end - t0) * 1000,
        },
    )


def _clip_seq(name: str) -> int:
    """The number in a clip file name `clip_000042.mp4` (0 if it has none)."""
    digits = "".join(ch for ch in Path(name).stem if ch.isdigit())
    return int(digits) if digits else 0
