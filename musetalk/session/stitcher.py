"""Append clips to one continuous session video: crash-safe, drift-free, and each append costs only its clip.

The seed joined clips with the ffmpeg concat demuxer and `-c copy`. That keeps the video exact, but
every AAC clip starts with 1024 priming samples, so audio decoded in order drifts ~21 ms per join, and
every append re-reads the whole session. Here:

* Video packets are stream-copied from the clip (never re-encoded).
* The session's audio is one continuous AAC stream encoded from the clips' PCM. On each append the
  audio from the last committed AAC frame boundary on is encoded again, starting WARMUP_S earlier on
  the real signal so the encoder's MDCT overlap and rate control continue as if it had never stopped;
  decoded in order, it has one priming (hidden by the edit list) and stays on the video clock forever.
* The file is a fragmented MP4 (session/fmp4.py). An append writes only new bytes after the committed
  ones: the clip's video fragment, the audio fragment up to SPLICE_MARGIN_FRAMES AAC frames before the
  new end, and a record box (`free`, skipped by players) naming the clip and the session's state, so the
  file describes itself. Then it fsyncs and commits (see "Commit record" below). The last few AAC
  frames saw the zero padding after the end, not the next clip, so they are *provisional*: written after
  the committed bytes, for a player opening the file on disk, and cut off and encoded again by the next
  append. Committed bytes never change, so a reader that knows the committed length (the HTTP route
  serves exactly that) always sees a complete, playable session, and a download that started before an
  append stays byte-exact. The served session's audio ends 3-4 AAC frames (64-85 ms at 48 kHz) before
  its video until the next append supplies them.
* Commit record: `session.commit` in the session folder holds the committed length and the session's
  state (everything but the clip list, which the record boxes in the video hold), in two fixed-size
  slots written alternately, each with a sequence number and a CRC-32. A commit is one pwrite of the
  older slot and one fsync: no rename, no directory fsync, no temp file to leave behind. A torn slot
  write fails its CRC and the other slot still holds the previous commit, so a reader always finds the
  last complete commit. (A sidecar replaced by rename works too but costs a temp file, a rename and an
  fsync of the directory on every append.)
* On open (under the session's lock, session/store.py) anything past the committed length — a torn
  fragment, the provisional tail — is cut off.
* Upgrade: a `musetalk-session/2` file (one version per append, renamed into place, state in a trailing
  box) is read as it is and converted on its first append: its committed prefix is copied once into a
  new file (temp + rename), with its init durations zeroed, plus a record of all its clips.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import struct
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import soundfile as sf
from numpy.typing import NDArray

from musetalk.config import EncodeConfig
from musetalk.errors import FfmpegFailed, InputError, SessionConflict
from musetalk.pipeline.encode import encode_aac
from musetalk.session import fmp4
from musetalk.types import Clip

log = logging.getLogger(__name__)

SESSION_FORMAT = "musetalk-session/3"
LEGACY_FORMAT = "musetalk-session/2"
RECORD_MAGIC = b"musetalk-session-record\n"  # start of a record box's payload
LEGACY_STATE_MAGIC = b"musetalk-session-state\n"  # start of a musetalk-session/2 file's trailing box
VIDEO_NAME = "full_session.mp4"
CONCAT_LIST_NAME = "concat_list.txt"
CLIPS_DIR_NAME = "clips"
COMMIT_NAME = "session.commit"
LOCK_NAME = "session.lock"
AAC_FRAME_SAMPLES = 1024
# AAC frames before the session's end that the next append encodes again: their MDCT windows and the
# encoder's look-ahead saw the zero padding after the end, not the next clip (window + look-ahead).
SPLICE_MARGIN_FRAMES = 3
# Audio re-fed to the encoder before the splice point. The native AAC encoder's rate control needs about
# a second to settle: with 1 s the spliced region decodes as cleanly as an uninterrupted encode
# (measured in bench/bench_session.py --snr; with 40 ms it was ~4 dB worse for the next second).
WARMUP_S = 1.0
VIDEO_TICKS_PER_FRAME = 1000  # video track timescale = fps x 1000: whole ticks per frame at any fps
SLOT_BYTES = 4096  # one commit slot; the state JSON is a few hundred bytes whatever the session's length
_SLOT_HEADER = struct.Struct(">8sQII")  # magic, sequence number, CRC-32 of the payload, payload length
_SLOT_MAGIC = b"MTSCOMIT"
# Test-only fault injection: "<step>:<n>" SIGKILLs the process at that step of the append that makes
# the session n clips long (tests/test_session_process.py). Steps, in order:
FAULT_ENV = "MUSETALK_TEST_FAULT"
APPEND_STEPS = ("before_write", "during_write", "after_write", "before_commit", "during_commit", "after_commit")


def _fault(step: str, n_clips: int) -> None:
    """Die here if the test fault hook names this step of this append."""
    if os.environ.get(FAULT_ENV) == f"{step}:{n_clips}":
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class ClipEntry:
    """One clip of a session: its mp4 file name in the clips folder (PCM .wav beside it) and length."""

    name: str
    n_frames: int


@dataclass(frozen=True)
class FileLayout:
    """Where things are in the session file."""

    committed_bytes: int  # file prefix that is final: init + committed fragments + records
    audio_committed: int  # audio samples (from the session start) held by committed fragments
    next_fragment: int  # sequence number of the next fragment
    priming: int  # AAC encoder delay: audio media time = session sample + priming
    video_signature: str  # codec, size and decoder config every appended clip must match
    # Set only for a musetalk-session/2 file: its init's 64-bit duration fields, zeroed on conversion.
    legacy_duration_offsets: tuple[int, ...] | None = None


@dataclass(frozen=True)
class SessionState:
    """What a session video holds: its clips (from the record boxes) and the last commit's state."""

    fps: int
    audio_rate: int
    avatar_id: str | None = None
    cursor: int = 0  # renderer frame cursor after the last clip
    clips: tuple[ClipEntry, ...] = ()
    next_seq: int = 1  # number of the next clip file (never reused within a session)
    layout: FileLayout | None = None  # None until the first clip
    total_frames: int = 0  # video frames in the session (the clips' sum, kept so it costs O(1))
    commit_seq: int = 0  # sequence number of the commit record's newest slot

    @property
    def duration_s(self) -> float:
        """Session length in seconds."""
        return self.total_frames / self.fps

    @property
    def total_samples(self) -> int:
        """Audio samples in the session (whole frames of audio_rate / fps samples each)."""
        return self.total_frames * self.audio_rate // self.fps

    @property
    def is_legacy(self) -> bool:
        """True for a musetalk-session/2 file that its next append converts."""
        return self.layout is not None and self.layout.legacy_duration_offsets is not None

    def to_json(self, clips: tuple[ClipEntry, ...] = ()) -> str:
        """The state without its clip list (O(1) in the session's length), plus `clips` if given."""
        layout = self.layout
        data: dict[str, Any] = {
            "format": SESSION_FORMAT,
            "fps": self.fps,
            "audio_rate": self.audio_rate,
            "avatar_id": self.avatar_id,
            "cursor": self.cursor,
            "next_seq": self.next_seq,
            "n_clips": len(self.clips),
            "total_frames": self.total_frames,
            "layout": None
            if layout is None
            else {
                "committed_bytes": layout.committed_bytes,
                "audio_committed": layout.audio_committed,
                "next_fragment": layout.next_fragment,
                "priming": layout.priming,
                "video_signature": layout.video_signature,
            },
        }
        if clips:
            data["clips"] = [[c.name, c.n_frames] for c in clips]
        return json.dumps(data, separators=(",", ":"))


@dataclass(frozen=True)
class _Record:
    """A parsed state JSON: the state (without clips), the session's clip count, and the clips it lists."""

    state: SessionState
    n_clips: int
    clips: tuple[ClipEntry, ...]


def _parse_state(text: str, accept: tuple[str, ...] = (SESSION_FORMAT,)) -> _Record:
    """Parse what SessionState.to_json wrote; ValueError/KeyError/TypeError if it is not one."""
    data: dict[str, Any] = json.loads(text)
    if not isinstance(data, dict) or data.get("format") not in accept:
        raise ValueError("not a session record")
    lay = data.get("layout")
    clips = tuple(ClipEntry(str(n), int(f)) for n, f in data.get("clips", []))
    legacy = data["format"] == LEGACY_FORMAT
    state = SessionState(
        fps=int(data["fps"]),
        audio_rate=int(data["audio_rate"]),
        avatar_id=data.get("avatar_id"),
        cursor=int(data["cursor"]),
        next_seq=int(data["next_seq"]),
        total_frames=sum(c.n_frames for c in clips) if legacy else int(data["total_frames"]),
        layout=None
        if lay is None
        else FileLayout(
            committed_bytes=int(lay["committed_bytes"]),
            audio_committed=int(lay["audio_committed"]),
            next_fragment=int(lay["next_fragment"]),
            priming=int(lay["priming"]),
            video_signature=str(lay["video_signature"]),
            legacy_duration_offsets=tuple(int(o) for o in lay["duration_offsets"]) if legacy else None,
        ),
    )
    return _Record(state=state, n_clips=len(clips) if legacy else int(data["n_clips"]), clips=clips)


@dataclass(frozen=True)
class SessionPaths:
    """Where one session lives on disk."""

    video: Path  # the session video (results/full_session.mp4 for the default session)
    workdir: Path  # results/sessions/<id>/
    clips_dir: Path = field(init=False)
    concat_list: Path = field(init=False)
    commit_record: Path = field(init=False)
    lock: Path = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "clips_dir", self.workdir / CLIPS_DIR_NAME)
        object.__setattr__(self, "concat_list", self.workdir / CONCAT_LIST_NAME)
        object.__setattr__(self, "commit_record", self.workdir / COMMIT_NAME)
        object.__setattr__(self, "lock", self.workdir / LOCK_NAME)

    @property
    def session_id(self) -> str:
        """The session's id (its folder's name); messages name it instead of server paths."""
        return self.workdir.name

    def temp_video(self) -> Path:
        """The temp file a format conversion writes before renaming it onto `video`."""
        return self.video.with_name(f".{self.video.stem}.{os.getpid()}.tmp{self.video.suffix}")

    def stale_temp_videos(self) -> list[Path]:
        """Temp files left by a process that died mid-conversion (or by a musetalk-session/2 server)."""
        return sorted(self.video.parent.glob(f".{self.video.stem}.*.tmp{self.video.suffix}"))


@dataclass(frozen=True)
class AppendResult:
    """The session after an append, where the new clip starts in it, and what the append cost."""

    state: SessionState
    clip_index: int
    clip_start_s: float
    timings_ms: dict[str, float]
    audio_ahead: bool = False  # its session audio had been encoded while the clip rendered


def _why(exc: Exception) -> str:
    """An exception as a reason for a client: an OSError by its error and file name, never its path."""
    if isinstance(exc, OSError):
        name = Path(str(exc.filename)).name if exc.filename else ""
        return f"{exc.strerror or type(exc).__name__}{f': {name}' if name else ''}"
    return str(exc)


def _damaged(paths: SessionPaths, why: str) -> SessionConflict:
    return SessionConflict(
        f"session {paths.session_id!r}: its video was not written by this server or is damaged ({why}); "
        "/reset the session to start over"
    )


def _fsync_dir(path: Path) -> None:
    """Make a new or renamed directory entry durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- commit record ---------------------------------------------------------------------------------


def _read_commit(paths: SessionPaths) -> tuple[int, str] | None:
    """(sequence, state JSON) of the newest valid slot; None if there is no record file."""
    try:
        data = paths.commit_record.read_bytes()
    except FileNotFoundError:
        return None
    best: tuple[int, str] | None = None
    for slot in range(2):
        raw = data[slot * SLOT_BYTES : (slot + 1) * SLOT_BYTES]
        if len(raw) < _SLOT_HEADER.size:
            continue
        magic, seq, crc, length = _SLOT_HEADER.unpack_from(raw)
        payload = raw[_SLOT_HEADER.size : _SLOT_HEADER.size + length]
        if magic != _SLOT_MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
            continue  # never written, or torn by a crash mid-write
        if best is None or seq > best[0]:
            best = (seq, payload.decode("utf-8"))
    if best is None:
        raise _damaged(paths, "no valid commit record")
    return best


def _write_commit(paths: SessionPaths, seq: int, state_json: str, n_clips: int) -> None:
    """Commit: write `state_json` into slot seq % 2 (the older one) and fsync."""
    payload = state_json.encode("utf-8")
    slot = _SLOT_HEADER.pack(_SLOT_MAGIC, seq, zlib.crc32(payload), len(payload)) + payload
    if len(slot) > SLOT_BYTES:
        raise SessionConflict(f"session {paths.session_id!r}: state too large for a commit slot")
    created = not paths.commit_record.exists()
    fd = os.open(paths.commit_record, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        offset = (seq % 2) * SLOT_BYTES
        if os.environ.get(FAULT_ENV) == f"during_commit:{n_clips}":
            os.pwrite(fd, slot[: len(slot) // 2], offset)  # a torn slot, as a crash mid-write leaves it
            os.fsync(fd)
            _fault("during_commit", n_clips)
        os.pwrite(fd, slot.ljust(SLOT_BYTES, b"\0"), offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        _fsync_dir(paths.commit_record.parent)


# ---- reading a session -----------------------------------------------------------------------------


def _scan_records(f: BinaryIO, end: int) -> tuple[list[ClipEntry], _Record | None]:
    """All clips listed by the record boxes in the first `end` bytes, and the last record."""
    clips: list[ClipEntry] = []
    last_text: str | None = None
    for kind, offset, size in fmp4.top_level_boxes(f, end):
        if kind != b"free" or size < 8 + len(RECORD_MAGIC):
            continue
        f.seek(offset + 8)
        payload = f.read(size - 8)
        if payload.startswith(RECORD_MAGIC):
            last_text = payload[len(RECORD_MAGIC) :].decode("utf-8")
            clips.extend(ClipEntry(str(n), int(k)) for n, k in json.loads(last_text).get("clips", []))
    return clips, None if last_text is None else _parse_state(last_text)


def _read_legacy(video: Path) -> SessionState | None:
    """The state of a musetalk-session/2 file (trailing box), or None if the file is not one."""
    with video.open("rb") as f:
        kind, offset, size = fmp4.top_level_boxes(f)[-1]
        if kind != b"free":
            return None
        f.seek(offset + 8)
        payload = f.read(size - 8)
    if not payload.startswith(LEGACY_STATE_MAGIC):
        return None
    record = _parse_state(payload[len(LEGACY_STATE_MAGIC) :].decode("utf-8"), accept=(LEGACY_FORMAT,))
    if record.state.layout is None or record.state.layout.committed_bytes > offset:
        raise ValueError("session record does not match the file")
    return replace(record.state, clips=record.clips)


def _with_clips(paths: SessionPaths, video: BinaryIO, record: _Record, seq: int) -> SessionState:
    """The committed state with its clip list read from the record boxes; checks they agree."""
    layout = record.state.layout
    assert layout is not None
    clips, _ = _scan_records(video, layout.committed_bytes)
    if len(clips) != record.n_clips or sum(c.n_frames for c in clips) != record.state.total_frames:
        raise ValueError(f"{len(clips)} clips recorded in the video, the commit record says {record.n_clips}")
    return replace(record.state, clips=tuple(clips), commit_seq=seq)


def read_state(paths: SessionPaths) -> SessionState | None:
    """The committed session, read-only (no lock, nothing cut); None if nothing was committed.

    SessionConflict if the files are not a session this server wrote, or are damaged."""
    try:
        commit = _read_commit(paths)
        if commit is None:
            if not paths.video.is_file():
                return None
            legacy = _read_legacy(paths.video)
            if legacy is not None:
                return legacy
            with paths.video.open("rb") as f:
                f.seek(0, 2)
                clips, last = _scan_records(f, f.tell())
            if last is None:
                raise ValueError("no session record")
            return replace(last.state, clips=tuple(clips))
        seq, text = commit
        record = _parse_state(text)
        if record.state.layout is None:
            return None
        with paths.video.open("rb") as f:
            return _with_clips(paths, f, record, seq)
    except (OSError, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as exc:
        raise _damaged(paths, _why(exc)) from exc


def committed_length(paths: SessionPaths) -> int:
    """Bytes of the video that are committed (0 if none); read-only, for readers in any process."""
    try:
        commit = _read_commit(paths)
        if commit is None:  # a musetalk-session/2 file is replaced whole by rename: all of it is committed
            return paths.video.stat().st_size if paths.video.is_file() else 0
        layout = _parse_state(commit[1]).state.layout
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise _damaged(paths, _why(exc)) from exc
    return 0 if layout is None else layout.committed_bytes


def open_session(paths: SessionPaths, empty: SessionState) -> SessionState:
    """The committed session, with anything past the committed length cut off (caller holds the lock).

    A video left by a first append that never committed is removed; a musetalk-session/2 file is
    returned as it is (its next append converts it); a video whose commit record is missing (a crash
    right after a conversion's rename) is described by its own last record, which is committed again."""
    try:
        commit = _read_commit(paths)
        if commit is None:
            state = read_state(paths)
            if state is None:
                return empty
            if not state.is_legacy:
                log.warning("session %s: no commit record; recovered from the video's records", paths.session_id)
                _write_commit(paths, 1, state.to_json(), len(state.clips))
                state = replace(state, commit_seq=1)
            return state
        seq, text = commit
        record = _parse_state(text)
        layout = record.state.layout
        if layout is None:
            if paths.video.exists():
                log.warning("session %s: removing a video that was never committed", paths.session_id)
                paths.video.unlink()
            return replace(record.state, commit_seq=seq)
        with paths.video.open("r+b") as f:
            size = f.seek(0, 2)
            if size < layout.committed_bytes:
                raise ValueError(f"the video has {size} bytes, {layout.committed_bytes} were committed")
            state = _with_clips(paths, f, record, seq)  # checked before anything is cut: never cut a foreign file
            if size > layout.committed_bytes:
                log.info("session %s: cutting %d bytes after the committed end", paths.session_id,
                         size - layout.committed_bytes)  # fmt: skip
                f.truncate(layout.committed_bytes)
                os.fsync(f.fileno())
            return state
    except (OSError, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as exc:
        raise _damaged(paths, _why(exc)) from exc


# ---- appending -------------------------------------------------------------------------------------


def clip_pcm(clip: Clip, rate: int) -> NDArray[np.float32]:
    """The clip's audio as float32 mono of exactly n_frames x rate / fps samples, from its PCM WAV."""
    n_expected = clip.n_frames * rate // clip.fps
    if clip.audio_path is None or not clip.audio_path.is_file():
        raise InputError(f"clip {clip.path.name} has no PCM .wav beside it (write_clip makes one)")
    pcm, wav_rate = sf.read(str(clip.audio_path), dtype="float32")  # (n,) mono or (n, channels)
    if wav_rate != rate:
        raise SessionConflict(f"clip audio is {wav_rate} Hz, the session uses {rate} Hz (encode.audio_rate)")
    mono = pcm if pcm.ndim == 1 else pcm.mean(axis=1, dtype=np.float32)  # (n,) float32
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


def _encode_aac(
    parts: Sequence[NDArray[np.float32]], start: int, rate: int, cfg: EncodeConfig
) -> tuple[list[_AacPacket], bytes]:
    """AAC-encode float32 mono `parts`, played one after the other from `start` samples into the session →
    (packets, config); fed in chunks, so no joined copy of a long clip's audio is made."""
    packets = []
    encoded, config = encode_aac(parts, rate, cfg)
    for packet in encoded:
        pts = start + _ticks(packet.pts, packet.time_base, rate)
        packets.append(_AacPacket(pts=pts, data=bytes(packet), duration=int(packet.duration or AAC_FRAME_SAMPLES)))
    return packets, config


@dataclass(frozen=True, eq=False)
class SessionAudio:
    """A clip's share of the session's AAC stream, encoded against one state of the session.

    `encode_session_audio` makes it; an append uses it only if the session is still in exactly that state and
    the clip's audio is exactly `new_pcm` (otherwise it encodes again), so one made ahead of time, while the
    clip was rendering, can only save time, never change the session."""

    state: SessionState
    new_pcm: NDArray[np.float32]  # (n,) the clip's audio as its WAV holds it
    packets: list[_AacPacket]
    config: bytes  # the encoder's AudioSpecificConfig

    def fits(self, state: SessionState, new_pcm: NDArray[np.float32]) -> bool:
        """Encoded for this state of the session and this audio."""
        return self.state == state and np.array_equal(self.new_pcm, new_pcm)


def encode_session_audio(
    paths: SessionPaths, state: SessionState, new_pcm: NDArray[np.float32], cfg: EncodeConfig
) -> SessionAudio:
    """Encode the session's audio from WARMUP_S before its last committed AAC frame boundary through the
    end of `new_pcm` (the next clip's audio, (n,) float32), as the append of that clip needs it."""
    if state.is_legacy:
        raise SessionConflict("a musetalk-session/2 file is converted by its next append first")
    import av

    rate = state.audio_rate
    splice_at = state.layout.audio_committed if state.layout else 0
    warmup = int(WARMUP_S * rate) // AAC_FRAME_SAMPLES * AAC_FRAME_SAMPLES
    source_start = max(0, splice_at - warmup)  # a multiple of AAC_FRAME_SAMPLES, like splice_at
    source = [_tail_pcm(paths, state, state.total_samples - source_start), new_pcm]  # played one after the other
    try:
        packets, config = _encode_aac(source, source_start, rate, cfg)
    except av.FFmpegError as exc:
        raise FfmpegFailed("encoding the session audio failed", str(exc)) from exc
    return SessionAudio(state, new_pcm, packets, config)


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


_NO_DECODE = {"skip_frame": "all", "threads": "1"}  # decoder options of a clip opened only to copy its packets


def _read_clip_video(clip: Clip, fps: int) -> _ClipVideo:
    """The clip's H.264 packets as fragment samples (timing in video ticks)."""
    import av

    # Only packets are read, nothing is decoded: without skip_frame, opening decodes the first frame to fill
    # in stream info (a 1080p key frame). Measured: the open 22 ms on a 2-core CPU and 40 ms on a 16-core
    # GPU host, 3-5 ms without the decode; the server's whole read of a 5-s clip there fell from 179 to 11 ms.
    # (PyAV's stub types the parameter list[str]; it takes one dict per stream, as its Container attribute says.)
    with av.open(str(clip.path), stream_options=[_NO_DECODE, _NO_DECODE]) as container:  # type: ignore[list-item]
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


def _record_box(state: SessionState, clips: tuple[ClipEntry, ...], start: int) -> tuple[bytes, SessionState]:
    """The `free` box that makes an append's bytes self-describing (the clips it added and the state),
    to be written at offset `start`, and the state with committed_bytes = the end of that box."""
    assert state.layout is not None
    record = b""
    while True:  # the box holds its own end offset: its length settles after a digit or two
        state = replace(state, layout=replace(state.layout, committed_bytes=start + len(record)))
        candidate = fmp4.box(b"free", RECORD_MAGIC + state.to_json(clips).encode("utf-8"))
        if len(candidate) == len(record):
            return candidate, state
        record = candidate


def convert_legacy(paths: SessionPaths, state: SessionState) -> SessionState:
    """Turn a musetalk-session/2 file into this format (one copy of its committed prefix); returns the state.

    The new file is written beside it and renamed into place, so a crash leaves either the old file or
    the new one, which describes itself by its record box (open_session commits it again)."""
    layout = state.layout
    assert layout is not None and layout.legacy_duration_offsets is not None
    tmp = paths.temp_video()
    new_layout = replace(layout, legacy_duration_offsets=None)
    converted = state
    try:
        shutil.copyfile(paths.video, tmp)  # once per session: the kernel copies (or clones) it
        with tmp.open("r+b") as f:
            f.truncate(layout.committed_bytes)  # its provisional tail and trailing state box go
            for offset in layout.legacy_duration_offsets:  # durations come from the fragments from now on
                f.seek(offset)
                f.write(bytes(8))
            f.seek(layout.committed_bytes)
            record, converted = _record_box(replace(state, layout=new_layout), state.clips, layout.committed_bytes)
            f.write(record)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, paths.video)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(paths.video.parent)
    converted = replace(converted, commit_seq=state.commit_seq + 1)
    paths.workdir.mkdir(parents=True, exist_ok=True)
    _write_commit(paths, converted.commit_seq, converted.to_json(), len(converted.clips))
    log.info("session %s: converted from %s to %s", paths.session_id, LEGACY_FORMAT, SESSION_FORMAT)
    return converted


def _aac_samples(packets: list[_AacPacket], end: int) -> list[fmp4.Sample]:
    """Fragment samples for AAC packets; the last one is cut to end at `end` (the video's end)."""
    samples = []
    for i, p in enumerate(packets):
        duration = p.duration if i + 1 < len(packets) else min(p.duration, end - p.pts)
        samples.append(fmp4.Sample(p.data, max(duration, 1)))
    return samples


@dataclass(frozen=True)
class _NewBytes:
    committed: bytes  # [init +] video fragment + committed audio fragment + record box
    provisional: bytes  # the audio tail the next append encodes again
    layout: FileLayout


def _new_bytes(
    state: SessionState,
    new_state: SessionState,
    video: _ClipVideo,
    audio: list[_AacPacket],
    audio_config: bytes,
    cfg: EncodeConfig,
) -> _NewBytes:
    """What an append adds after the committed bytes."""
    rate, fps = state.audio_rate, state.fps
    old = state.layout
    parts: list[bytes] = []
    if old is None:
        priming = -audio[0].pts
        parts.append(
            fmp4.init_segment(
                fmp4.VideoTrack(video.width, video.height, fps * VIDEO_TICKS_PER_FRAME, video.avcc),
                fmp4.AudioTrack(rate, 1, audio_config, priming=priming, bitrate=cfg.audio_bitrate_kbps * 1000),
            )
        )
        start, seq = 0, 1
    else:
        priming, start, seq = old.priming, old.committed_bytes, old.next_fragment
    new_total = new_state.total_samples
    # Commit audio up to an AAC frame boundary that the next append will not need to encode again.
    commit_to = (new_total // AAC_FRAME_SAMPLES - SPLICE_MARGIN_FRAMES) * AAC_FRAME_SAMPLES
    commit_to = max(commit_to, old.audio_committed if old else 0)
    samples = _aac_samples(audio, new_total)
    n_committed = sum(1 for p in audio if p.pts < commit_to)
    parts.append(fmp4.fragment(seq, fmp4.VIDEO_TRACK_ID, state.total_frames * VIDEO_TICKS_PER_FRAME, video.samples))
    seq += 1
    if n_committed:
        parts.append(fmp4.fragment(seq, fmp4.AUDIO_TRACK_ID, audio[0].pts + priming, samples[:n_committed]))
        seq += 1
    provisional = b""
    if n_committed < len(audio):
        provisional = fmp4.fragment(seq, fmp4.AUDIO_TRACK_ID, audio[n_committed].pts + priming, samples[n_committed:])
    body = b"".join(parts)
    layout = FileLayout(
        committed_bytes=0,  # the end of the record box, set by _record_box
        audio_committed=commit_to,
        next_fragment=seq,
        priming=priming,
        video_signature=video.signature,
    )
    added = new_state.clips[len(state.clips) :]
    record, with_layout = _record_box(replace(new_state, layout=layout), added, start + len(body))
    assert with_layout.layout is not None
    layout = with_layout.layout
    return _NewBytes(committed=body + record, provisional=provisional, layout=layout)


def concat_list_text(paths: SessionPaths, state: SessionState) -> str:
    """The seed's concat_list.txt: one `file '<absolute path>'` line per clip, for `ffmpeg -f concat`."""
    clips_dir = paths.clips_dir.resolve()
    return "".join(_concat_line(clips_dir, entry) for entry in state.clips)


def _concat_line(clips_dir: Path, entry: ClipEntry) -> str:
    """One concat list line; `clips_dir` already resolved (absolute, no symlinks)."""
    quoted = str(clips_dir / entry.name).replace("'", "'\\''")
    return f"file '{quoted}'\n"


def write_concat_list(paths: SessionPaths, state: SessionState) -> None:
    """Rewrite concat_list.txt whole (temp + rename): on open, O(clips) once per process."""
    tmp = paths.concat_list.with_name(f".{paths.concat_list.name}.{os.getpid()}.tmp")
    tmp.write_text(concat_list_text(paths, state), encoding="utf-8")
    os.replace(tmp, paths.concat_list)


def append_clip(
    paths: SessionPaths,
    state: SessionState,
    clip: Clip,
    cursor: int,
    avatar_id: str | None,
    cfg: EncodeConfig,
    audio_ahead: SessionAudio | None = None,
) -> AppendResult:
    """Append `clip` (its files inside paths.clips_dir) to the session video; returns the new state.

    Writes only the new clip's bytes after the committed length, fsyncs, then commits. On any error
    the committed session is unchanged (bytes written past it are cut off again). `audio_ahead`: the
    session audio encoded while the clip rendered (`encode_session_audio`), used when it still fits."""
    t0 = time.perf_counter()
    sid = paths.session_id
    if clip.path.parent.resolve() != paths.clips_dir.resolve():
        raise ValueError(f"clip {clip.path.name} must be written inside the session's clips folder")
    if clip.fps != state.fps:
        raise SessionConflict(f"clip is {clip.fps} fps, session {sid!r} is {state.fps} fps")
    if clip.n_frames < 1:
        raise InputError("clip has no frames")
    if state.clips and state.avatar_id != avatar_id:
        raise SessionConflict(
            f"session {sid!r} uses avatar {state.avatar_id!r}, not {avatar_id!r}; reset it or use another session_id"
        )
    import av

    rate = state.audio_rate
    try:
        video = _read_clip_video(clip, state.fps)
    except av.FFmpegError as exc:
        raise FfmpegFailed(f"reading clip {clip.path.name} failed", str(exc)) from exc
    if state.layout is not None and video.signature != state.layout.video_signature:
        raise SessionConflict(
            f"clip {clip.path.name} ({video.width}x{video.height}) cannot be stream-copied onto session {sid!r} "
            "(other size or encoder settings); reset the session or use another one"
        )
    new_pcm = clip_pcm(clip, rate)  # (n_frames * rate / fps,) float32
    if state.is_legacy:
        state = convert_legacy(paths, state)
    old_total = state.total_samples
    splice_at = state.layout.audio_committed if state.layout else 0
    t_read = time.perf_counter()
    if audio_ahead is not None and audio_ahead.fits(state, new_pcm):
        session_audio, ahead = audio_ahead, True
    else:
        session_audio, ahead = encode_session_audio(paths, state, new_pcm, cfg), False
    packets, audio_config = session_audio.packets, session_audio.config
    new_total = old_total + len(new_pcm)
    if state.layout is None:
        audio = [p for p in packets if p.pts < new_total]  # a new session keeps the priming packet
    else:
        audio = [p for p in packets if splice_at <= p.pts < new_total]
    t_encode = time.perf_counter()

    entry = ClipEntry(clip.path.name, clip.n_frames)
    new_state = replace(
        state,
        avatar_id=avatar_id,
        cursor=cursor,
        clips=(*state.clips, entry),
        next_seq=max(state.next_seq, _clip_seq(clip.path.name) + 1),
        total_frames=state.total_frames + clip.n_frames,
        commit_seq=state.commit_seq + 1,
    )
    new = _new_bytes(state, new_state, video, audio, audio_config, cfg)
    new_state = replace(new_state, layout=new.layout)
    n = len(new_state.clips)
    committed = state.layout.committed_bytes if state.layout else 0
    if state.layout is None and not paths.commit_record.exists():
        # The record exists before the video does, so a video without one is never a crash leftover.
        _write_commit(paths, state.commit_seq, state.to_json(), 0)
    _fault("before_write", n)
    fd = os.open(paths.video, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, committed)  # the previous provisional tail (and any leftover) goes
        half = len(new.committed) // 2
        os.pwrite(fd, new.committed[:half], committed)
        _fault("during_write", n)
        os.pwrite(fd, new.committed[half:], committed + half)
        _fault("after_write", n)
        os.fsync(fd)
        if state.layout is None:
            _fsync_dir(paths.video.parent)
        t_write = time.perf_counter()
        _fault("before_commit", n)
        _write_commit(paths, new_state.commit_seq, new_state.to_json(), n)
    except BaseException:
        try:
            os.ftruncate(fd, committed)
        except OSError as exc:
            log.warning("session %s: could not cut an unfinished append (%s); it is cut on next open", sid, exc)
        raise
    finally:
        os.close(fd)
    t_commit = time.perf_counter()
    _fault("after_commit", n)
    # After the commit: the provisional audio tail (for players reading the file on disk) and the list.
    try:
        with paths.video.open("r+b") as f:
            f.seek(new.layout.committed_bytes)
            f.write(new.provisional)
        with paths.concat_list.open("a", encoding="utf-8") as f:
            f.write(_concat_line(paths.clips_dir.resolve(), entry))
    except OSError as exc:  # the session is committed; both are rebuilt on the next open
        log.warning("session %s: after the commit: %s", sid, exc)
    t_end = time.perf_counter()
    return AppendResult(
        state=new_state,
        clip_index=len(state.clips),
        clip_start_s=state.duration_s,
        audio_ahead=ahead,
        timings_ms={
            "append_read": (t_read - t0) * 1000,
            "append_encode": (t_encode - t_read) * 1000,
            "append_write": (t_write - t_encode) * 1000,
            "append_commit": (t_commit - t_write) * 1000,
            "append_total": (t_end - t0) * 1000,
        },
    )


def _clip_seq(name: str) -> int:
    """The number in a clip file name `clip_000042.mp4` (0 if it has none)."""
    digits = "".join(ch for ch in Path(name).stem if ch.isdigit())
    return int(digits) if digits else 0
