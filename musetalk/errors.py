"""Typed errors raised by the library; the HTTP edge maps them to status codes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class MuseTalkError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(MuseTalkError):
    """A configuration file or override is invalid; the message names the dotted key."""


class WeightsMissing(MuseTalkError):
    """One or more model files are absent; lists all of them and the command that fetches them."""

    def __init__(self, missing: Sequence[Path], hint: str = "make weights") -> None:
        self.missing = list(missing)
        self.hint = hint
        lines = "\n".join(f"  - {p}" for p in self.missing)
        super().__init__(
            f"{len(self.missing)} model file(s) missing:\n{lines}\nFetch them with: {hint}"
        )


class WeightsInvalid(MuseTalkError):
    """A model file exists but does not match the architecture (wrong keys or shapes)."""


class PluginUnavailable(MuseTalkError):
    """An optional plugin's package is not installed; the message has the install recipe."""


class InputError(MuseTalkError):
    """Caller input (audio, video, image, text) is unusable; message says why."""


class NoFaceDetected(InputError):
    """No face was found in any frame of an avatar source."""


class AvatarNotFound(MuseTalkError):
    """The avatar id names no configured avatar and no cache."""


class AvatarNotPrepared(MuseTalkError):
    """The avatar has no usable cache; the message names the command that builds it."""


class AvatarCacheStale(AvatarNotPrepared):
    """The avatar cache was built with other settings or models; it must be rebuilt."""


class TTSFailed(MuseTalkError):
    """The text-to-speech engine failed."""


class FfmpegFailed(MuseTalkError):
    """An ffmpeg/encoder run failed; carries the tail of its stderr."""

    def __init__(self, message: str, stderr_tail: str = "") -> None:
        self.stderr_tail = stderr_tail
        super().__init__(f"{message}\n{stderr_tail}" if stderr_tail else message)


class Busy(MuseTalkError):
    """The work queue is full; retry later."""

    def __init__(self, message: str = "server busy", retry_after_s: int = 2) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class Interrupted(MuseTalkError):
    """An utterance was stopped by an interrupt (POST /sessions/{id}/interrupt) before any of it was shown."""


class BadOffer(MuseTalkError):
    """A WebRTC offer that cannot be answered (not SDP, or asking for neither video nor audio)."""


class LiveUnavailable(MuseTalkError):
    """The configured renderer cannot feed a live stream (it renders whole clips only)."""


class GpuOutOfMemory(Busy):
    """The GPU ran out of memory for this request; the server keeps serving."""


class PayloadTooLarge(InputError):
    """A request body or upload exceeds its configured size limit."""


class SessionNotFound(MuseTalkError):
    """The session has no video yet (nothing spoken since the last reset)."""


class SessionConflict(MuseTalkError):
    """The request cannot apply to this session as it is (other avatar, other format); reset it first."""


class SessionLocked(SessionConflict):
    """Another process holds the session (its inter-process lock); this one must not write it."""


class RangeNotSatisfiable(InputError):
    """An HTTP Range that lies wholly outside the resource; carries the resource's length."""

    def __init__(self, message: str, size_bytes: int) -> None:
        self.size_bytes = size_bytes
        super().__init__(message)
