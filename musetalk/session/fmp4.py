"""A minimal fragmented-MP4 (ISO/IEC 14496-12) writer for session videos: H.264 video + AAC audio.

Why fragmented: in a fragmented file every clip is a self-contained `moof`+`mdat` pair added at the end,
so an append writes only the new clip's bytes after the ones already there, which never change again.
A regular MP4 keeps one sample table for the whole file and must be remuxed on every append.

Layout written here:
    ftyp
    moov   mvhd, trak(video), trak(audio with an edit list that hides the AAC priming), mvex(trex x2)
    moof+mdat ...          one fragment per track per append
All durations in the init segment are 0 ("as long as the fragments say"): players (FFmpeg, Chromium)
take the length from the fragments, so nothing written once ever needs patching.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

MOVIE_TIMESCALE = 1000  # mvhd/tkhd/elst/mehd durations in ms
VIDEO_TRACK_ID = 1
AUDIO_TRACK_ID = 2
_UNITY_MATRIX = struct.pack(">9I", 0x00010000, 0, 0, 0, 0x00010000, 0, 0, 0, 0x40000000)
_SYNC_FLAGS = 0x02000000  # sample_depends_on = 2: an independent (key) sample
_NON_SYNC_FLAGS = 0x01010000  # sample_depends_on = 1, sample_is_non_sync_sample = 1


def box(kind: bytes, *payload: bytes) -> bytes:
    """An ISO BMFF box: 32-bit size, 4-character type, payload."""
    body = b"".join(payload)
    return struct.pack(">I4s", 8 + len(body), kind) + body


def full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    """A full box: version and 24-bit flags before the payload."""
    return box(kind, struct.pack(">I", (version << 24) | flags), *payload)


@dataclass(frozen=True)
class VideoTrack:
    """H.264 track parameters; `avcc` is the AVCDecoderConfigurationRecord (extradata of an MP4 stream)."""

    width: int
    height: int
    timescale: int  # ticks per second of sample durations
    avcc: bytes


@dataclass(frozen=True)
class AudioTrack:
    """AAC track parameters; `config` is the AudioSpecificConfig (extradata), `priming` the encoder delay."""

    sample_rate: int
    channels: int
    config: bytes
    priming: int
    bitrate: int


@dataclass(frozen=True)
class Sample:
    """One coded frame: its bytes, duration (track timescale), key flag and pts - dts."""

    data: bytes
    duration: int
    is_sync: bool = True
    cts_offset: int = 0


def _descriptor(tag: int, payload: bytes) -> bytes:
    """An MPEG-4 descriptor with the 4-byte size form (as most muxers write it)."""
    n = len(payload)
    size = bytes([0x80 | (n >> 21) & 0x7F, 0x80 | (n >> 14) & 0x7F, 0x80 | (n >> 7) & 0x7F, n & 0x7F])
    return bytes([tag]) + size + payload


def _esds(audio: AudioTrack) -> bytes:
    decoder_specific = _descriptor(0x05, audio.config)
    decoder_config = _descriptor(
        0x04,
        struct.pack(">BBBHII", 0x40, (0x05 << 2) | 1, 0, 0, audio.bitrate, audio.bitrate) + decoder_specific,
    )  # object type 0x40 = MPEG-4 audio, stream type 5 = audio; 24-bit buffer size written as 0
    es = _descriptor(0x03, struct.pack(">HB", AUDIO_TRACK_ID, 0) + decoder_config + _descriptor(0x06, b"\x02"))
    return full_box(b"esds", 0, 0, es)


def _tkhd(track_id: int, width: int, height: int, volume: int) -> bytes:
    return full_box(
        b"tkhd",
        1,
        0x3,  # enabled, in movie
        struct.pack(">QQIIQ", 0, 0, track_id, 0, 0),  # creation, modification, id, reserved, duration
        struct.pack(">IIhhhH", 0, 0, 0, 0, volume, 0),
        _UNITY_MATRIX,
        struct.pack(">II", width << 16, height << 16),
    )


def _mdhd(timescale: int) -> bytes:
    return full_box(b"mdhd", 1, 0, struct.pack(">QQIQHH", 0, 0, timescale, 0, 0x55C4, 0))  # language "und"


def _hdlr(handler: bytes, name: bytes) -> bytes:
    return full_box(b"hdlr", 0, 0, struct.pack(">I4s12x", 0, handler), name + b"\x00")


def _dinf() -> bytes:
    return box(b"dinf", full_box(b"dref", 0, 0, struct.pack(">I", 1), full_box(b"url ", 0, 1)))


def _empty_tables() -> bytes:
    return (
        full_box(b"stts", 0, 0, struct.pack(">I", 0))
        + full_box(b"stsc", 0, 0, struct.pack(">I", 0))
        + full_box(b"stsz", 0, 0, struct.pack(">II", 0, 0))
        + full_box(b"stco", 0, 0, struct.pack(">I", 0))
    )


def init_segment(video: VideoTrack, audio: AudioTrack) -> bytes:
    """ftyp + moov for one H.264 and one AAC track, all durations 0 (the fragments carry the timing)."""
    ftyp = box(b"ftyp", b"isom", struct.pack(">I", 0x200), b"isom", b"iso6", b"avc1", b"mp41")
    avc1 = box(
        b"avc1",
        struct.pack(">6xH16xHHIIIH32sHh", 1, video.width, video.height, 0x00480000, 0x00480000, 0, 1, b"", 0x18, -1),
        box(b"avcC", video.avcc),
    )
    video_trak = box(
        b"trak",
        _tkhd(VIDEO_TRACK_ID, video.width, video.height, 0),
        box(
            b"mdia",
            _mdhd(video.timescale),
            _hdlr(b"vide", b"VideoHandler"),
            box(
                b"minf",
                full_box(b"vmhd", 0, 1, struct.pack(">HHHH", 0, 0, 0, 0)),
                _dinf(),
                box(b"stbl", full_box(b"stsd", 0, 0, struct.pack(">I", 1), avc1), _empty_tables()),
            ),
        ),
    )
    mp4a = box(
        b"mp4a",
        struct.pack(">6xH8xHHHHI", 1, audio.channels, 16, 0, 0, audio.sample_rate << 16),
        _esds(audio),
    )
    # The edit list starts presentation after the encoder's priming samples (media_time), so decoders
    # drop them and the audio starts exactly with the video; segment_duration 0 = to the end of the media.
    elst = full_box(b"elst", 1, 0, struct.pack(">IQqhh", 1, 0, audio.priming, 1, 0))
    audio_trak = box(
        b"trak",
        _tkhd(AUDIO_TRACK_ID, 0, 0, 0x0100),
        box(b"edts", elst),
        box(
            b"mdia",
            _mdhd(audio.sample_rate),
            _hdlr(b"soun", b"SoundHandler"),
            box(
                b"minf",
                full_box(b"smhd", 0, 0, struct.pack(">hH", 0, 0)),
                _dinf(),
                box(b"stbl", full_box(b"stsd", 0, 0, struct.pack(">I", 1), mp4a), _empty_tables()),
            ),
        ),
    )
    trex = [full_box(b"trex", 0, 0, struct.pack(">IIIII", tid, 1, 0, 0, 0)) for tid in (VIDEO_TRACK_ID, AUDIO_TRACK_ID)]
    mvex = box(b"mvex", *trex)
    mvhd = full_box(
        b"mvhd",
        1,
        0,
        struct.pack(">QQIQ", 0, 0, MOVIE_TIMESCALE, 0),
        struct.pack(">IH10x", 0x00010000, 0x0100),
        _UNITY_MATRIX,
        bytes(24),
        struct.pack(">I", AUDIO_TRACK_ID + 1),
    )
    return ftyp + box(b"moov", mvhd, video_trak, audio_trak, mvex)


def fragment(sequence: int, track_id: int, base_decode_time: int, samples: list[Sample]) -> bytes:
    """moof + mdat holding `samples` of one track, decode times starting at `base_decode_time`."""
    if not samples:
        return b""
    entries = b"".join(
        struct.pack(
            ">IIIi",
            s.duration,
            len(s.data),
            _SYNC_FLAGS if s.is_sync else _NON_SYNC_FLAGS,
            s.cts_offset,
        )
        for s in samples
    )
    trun_flags = 0x001 | 0x100 | 0x200 | 0x400 | 0x800  # data offset, duration, size, flags, cts per sample

    def moof(data_offset: int) -> bytes:
        return box(
            b"moof",
            full_box(b"mfhd", 0, 0, struct.pack(">I", sequence)),
            box(
                b"traf",
                full_box(b"tfhd", 0, 0x020000, struct.pack(">I", track_id)),  # default-base-is-moof
                full_box(b"tfdt", 1, 0, struct.pack(">Q", base_decode_time)),
                full_box(b"trun", 1, trun_flags, struct.pack(">Ii", len(samples), data_offset), entries),
            ),
        )

    header_size = len(moof(0))
    return moof(header_size + 8) + box(b"mdat", *(s.data for s in samples))


def top_level_boxes(f: BinaryIO, end: int | None = None) -> list[tuple[bytes, int, int]]:
    """(type, offset, size) of every top-level box of a file (of its first `end` bytes if given)."""
    if end is None:
        f.seek(0, 2)
        end = f.tell()
    boxes = []
    pos = 0
    while pos + 8 <= end:
        f.seek(pos)
        size, kind = struct.unpack(">I4s", f.read(8))
        if size == 1:
            size = struct.unpack(">Q", f.read(8))[0]
        elif size == 0:
            size = end - pos
        if size < 8 or pos + size > end:
            raise ValueError(f"truncated or corrupt box {kind!r} at offset {pos}")
        boxes.append((kind, pos, size))
        pos += size
    return boxes
