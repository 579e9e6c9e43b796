"""A Python viewer of a session's live stream (aiortc): what a browser does, recorded for tests and benchmarks.

It offers to receive one video and one audio track and opens an events channel, posts the offer to
`/sessions/{id}/offer`, and records every decoded video frame and 20 ms audio packet with the event-loop
time at which it came out of the decoder and its RTP timestamp, plus the server's events (utterance on
air / idle). The server's RTCP sender reports map each track's RTP timestamps to the server's wall clock
(`sender_time_s`): what a browser uses to play audio and video in sync, so A/V offsets measured on it
are the ones a browser shows (arrival times include the receiver's jitter buffers, which differ by kind).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import av
import cv2
import httpx
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtp import RtcpSrPacket
from numpy.typing import NDArray

from musetalk.server.webrtc import AUDIO_RATE_HZ, VIDEO_CLOCK_HZ, host_addresses

log = logging.getLogger(__name__)


@dataclass
class Received:
    """Everything a viewer received, each item with the loop time (s) it arrived at."""

    video: list[tuple[float, int, Any]] = field(default_factory=list)  # (t, RTP ts, frame (H, W, 3) BGR or reduced)
    audio: list[tuple[float, int, NDArray[np.int16]]] = field(default_factory=list)  # (t, RTP ts, (n,) mono 48 kHz)
    events: list[tuple[float, dict[str, Any]]] = field(default_factory=list)  # (t, {"type": ..., ...})
    # kind → (NTP seconds, RTP timestamp) from the RTCP sender reports: of all reports, the pair whose packet
    # was sent the least late (each report maps the last packet sent; a busy sender sends some late)
    sender_reports: dict[str, tuple[float, int]] = field(default_factory=dict)

    # kind → the RTP timestamp aiortc's receiver subtracts from every frame's pts (its first frame's)
    rtp_origins: dict[str, int] = field(default_factory=dict)
    # RTP timestamp → loop time (s) its video frame's last packet (RTP marker bit) arrived: when a browser can
    # decode it. aiortc's own jitter buffer releases a frame only when the next frame's first packet arrives.
    video_complete: dict[int, float] = field(default_factory=dict)

    def sender_time_s(self, kind: str, pts: int) -> float:
        """The server's wall-clock time (NTP seconds) of a received frame's pts on track `kind`."""
        ntp_s, rtp = self.sender_reports[kind]
        clock_hz = VIDEO_CLOCK_HZ if kind == "video" else AUDIO_RATE_HZ
        return ntp_s + _rtp_delta(pts + self.rtp_origins[kind], rtp) / clock_hz

    def video_complete_s(self, pts: int) -> float | None:
        """Loop time (s) the last packet of the video frame with this pts arrived (None if not seen)."""
        origin = self.rtp_origins.get("video")
        return None if origin is None else self.video_complete.get((pts + origin) % 2**32)


def _rtp_delta(a: int, b: int) -> int:
    """a - b for RTP timestamps (they wrap at 2^32)."""
    return (a - b + 2**31) % 2**32 - 2**31


class LiveViewer:
    """One viewer of `session_id` on the server at `base_url`; `async with` connects and closes it."""

    def __init__(
        self,
        base_url: str,
        session_id: str,
        *,
        headers: dict[str, str] | None = None,
        addresses: tuple[str, ...] | None = ("127.0.0.1",),
        reduce_frame: Callable[[NDArray[np.uint8]], Any] | None = None,
        frame_width_px: int | None = None,
    ) -> None:
        """addresses: the host candidates this viewer offers (loopback by default, like the tests);
        reduce_frame: keep f(frame) instead of each decoded BGR frame (saves memory in long runs);
        frame_width_px: scale decoded frames to this width first (cheaper for large frames)."""
        self.base_url, self.session_id = base_url.rstrip("/"), session_id
        self.headers = headers or {}
        self.addresses = addresses
        self.reduce_frame = reduce_frame
        self.frame_width_px = frame_width_px
        self.received = Received()
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self._tasks: list[asyncio.Task[None]] = []
        self.connected = asyncio.Event()

    async def __aenter__(self) -> LiveViewer:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self, timeout_s: float = 20.0) -> None:
        """Offer, post, apply the answer, and wait until both tracks deliver their first item."""
        loop = asyncio.get_running_loop()
        self.pc.addTransceiver("video", direction="recvonly")
        self.pc.addTransceiver("audio", direction="recvonly")
        channel = self.pc.createDataChannel("events")

        @channel.on("message")
        def _event(message: str | bytes) -> None:
            self.received.events.append((loop.time(), json.loads(message)))

        @self.pc.on("track")
        def _track(track: MediaStreamTrack) -> None:
            self._tasks.append(loop.create_task(self._pull(track)))

        with host_addresses(self.addresses):
            await self.pc.setLocalDescription(await self.pc.createOffer())
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.post(
                f"{self.base_url}/sessions/{self.session_id}/offer",
                json={"sdp": self.pc.localDescription.sdp, "type": self.pc.localDescription.type},
                headers=self.headers,
            )
        if r.status_code != 200:
            await self.pc.close()
            raise RuntimeError(f"offer refused: {r.status_code} {r.text}")
        answer = r.json()
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        for receiver in self.pc.getReceivers():
            self._watch_sender_reports(receiver)
            if receiver.track.kind == "video":
                self._watch_frame_ends(receiver)
        deadline = loop.time() + timeout_s
        while not (self.received.video and self.received.audio):
            if loop.time() > deadline:
                raise TimeoutError(f"no media within {timeout_s} s (ICE state {self.pc.iceConnectionState})")
            await asyncio.sleep(0.02)
        self.connected.set()

    def _watch_sender_reports(self, receiver: Any) -> None:
        """Keep each RTCP sender report's (NTP, RTP) pair; aiortc keeps only parts of it, so its receiver's
        RTCP handler (looked up per packet) is wrapped."""
        handle = receiver._handle_rtcp_packet
        kind = receiver.track.kind

        async def handle_rtcp(packet: Any) -> None:
            mapper = getattr(receiver, "_RTCRtpReceiver__timestamp_mapper", None)
            if kind not in self.received.rtp_origins and getattr(mapper, "_origin", None) is not None:
                self.received.rtp_origins[kind] = mapper._origin  # type: ignore[union-attr]
            if isinstance(packet, RtcpSrPacket):
                ntp = packet.sender_info.ntp_timestamp
                ntp_s, rtp = (ntp >> 32) + (ntp & 0xFFFFFFFF) / 2**32, packet.sender_info.rtp_timestamp
                known = self.received.sender_reports.get(kind)
                clock_hz = VIDEO_CLOCK_HZ if kind == "video" else AUDIO_RATE_HZ
                if known is None or ntp_s - _rtp_delta(rtp, known[1]) / clock_hz < known[0]:
                    self.received.sender_reports[kind] = (ntp_s, rtp)
            await handle(packet)

        receiver._handle_rtcp_packet = handle_rtcp

    def _watch_frame_ends(self, receiver: Any) -> None:
        """Note when each video frame's last packet arrives; the receiver's RTP handler (looked up per packet by
        the transport) is wrapped."""
        handle = receiver._handle_rtp_packet
        loop = asyncio.get_running_loop()

        async def handle_rtp(packet: Any, arrival_time_ms: int) -> None:
            if packet.marker:
                self.received.video_complete.setdefault(packet.timestamp, loop.time())
            await handle(packet, arrival_time_ms)

        receiver._handle_rtp_packet = handle_rtp

    async def _pull(self, track: MediaStreamTrack) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            t = loop.time()
            if isinstance(frame, av.VideoFrame):
                if self.frame_width_px and frame.width != self.frame_width_px:
                    height = round(frame.height * self.frame_width_px / frame.width / 2) * 2
                    frame = frame.reformat(width=self.frame_width_px, height=height)
                bgr = np.asarray(frame.to_ndarray(format="bgr24"), dtype=np.uint8)
                self.received.video.append((t, frame.pts or 0, self.reduce_frame(bgr) if self.reduce_frame else bgr))
            elif isinstance(frame, av.AudioFrame):
                samples = frame.to_ndarray().reshape(-1, len(frame.layout.channels))  # packed s16
                self.received.audio.append((t, frame.pts or 0, samples.mean(axis=1).astype(np.int16)))

    async def close(self) -> None:
        """Close the peer connection (the server sees the viewer leave)."""
        await self.pc.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def rms(samples: NDArray[np.int16]) -> float:
    """Root mean square of int16 samples (full scale 32767)."""
    return float(np.sqrt(np.mean(np.square(samples.astype(np.float64))))) if len(samples) else 0.0


class MouthMeter:
    """How far a received frame's mouth is from the avatar's own: (source frame id, mean |Δ| in its mask box).

    The source frame is found by comparing everything outside the mask boxes (the idle cycle moves the head),
    so a frame of the idle avatar scores codec noise only, and a speaking one scores its changed mouth.
    """

    def __init__(self, frames: Sequence[NDArray[np.uint8]], mask_boxes: NDArray[np.int32], size_px: int = 64) -> None:
        """frames: the avatar's N source frames (H, W, 3) BGR; mask_boxes: (N, 4) x1, y1, x2, y2."""
        self.frames = [f[: f.shape[0] - f.shape[0] % 2, : f.shape[1] - f.shape[1] % 2] for f in frames]
        self.boxes = mask_boxes
        self.union = (int(mask_boxes[:, 0].min()), int(mask_boxes[:, 1].min()),
                      int(mask_boxes[:, 2].max()), int(mask_boxes[:, 3].max()))
        self.size_px = size_px
        self._small = np.stack([self._outside(f) for f in self.frames])  # (N, s, s)

    def _outside(self, frame: NDArray[np.uint8]) -> NDArray[np.float32]:
        grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY).astype(np.float32)
        x1, y1, x2, y2 = self.union
        grey[y1:y2, x1:x2] = 0
        return np.asarray(cv2.resize(grey, (self.size_px, self.size_px), interpolation=cv2.INTER_AREA))

    def __call__(self, frame: NDArray[np.uint8]) -> tuple[int, float]:
        """(source frame id, mean absolute difference inside its mask box, 0-255)."""
        if frame.shape != self.frames[0].shape:
            return -1, float("nan")
        i = int(np.argmin(np.abs(self._small - self._outside(frame)).mean(axis=(1, 2))))
        x1, y1, x2, y2 = (int(v) for v in self.boxes[i])
        diff = np.abs(frame[y1:y2, x1:x2].astype(np.int16) - self.frames[i][y1:y2, x1:x2].astype(np.int16))
        return i, float(diff.mean())
