"""WebRTC viewers of a session's live stream (aiortc): POST /sessions/{id}/offer → answer.

Each viewer is one RTCPeerConnection sending a video track (the session's ticks, VP8 or H.264 as the
viewer prefers) and an audio track (Opus, 48 kHz, 20 ms packets), fed from the session's `LiveSession`
(musetalk/session/live.py): all viewers of a session see the same frames. A data channel the viewer
opens (any label) receives `{"type": "speaking", "utterance": id, "frame": n}` when an utterance goes on
air and `{"type": "idle", "frame": n}` when the stream returns to idle (n: the viewer's video frame number,
from 0). A viewer that closes, fails ICE, or sends no RTCP for `server.webrtc.viewer_timeout_s` is dropped;
the last one gone stops the session's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime
import ipaddress
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from typing import Any

import av
import numpy as np
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamTrack
from numpy.typing import NDArray

from musetalk.avatar.cache import FrameStore
from musetalk.config import AppConfig, WebRTCConfig
from musetalk.errors import BadOffer, Busy, LiveUnavailable
from musetalk.session.live import AUDIO_RATE_HZ, LiveSession, Tick, Viewer
from musetalk.utils.logs import kv
from musetalk.utils.recent import quantile
from musetalk.utils.yuv import i420_frame_view

log = logging.getLogger(__name__)

VIDEO_CLOCK_HZ = 90_000
AUDIO_PACKET_SAMPLES = AUDIO_RATE_HZ // 50  # 20 ms
AUDIO_MAX_LATE_S = 0.2  # audio this late is skipped, not sent (a server that fell behind catches up at once)
WATCH_INTERVAL_S = 1.0
BEHIND_WARN_MS = 100.0  # stream clocks this late (p95 over 10 s) are logged as a warning ...
BEHIND_WARN_EVERY_S = 60.0  # ... at most this often

_host_addresses: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "musetalk_ice_host_addresses", default=None
)


def _install_host_address_filter() -> None:
    """Let `host_addresses()` choose aioice's host candidates for the peer connections created under it.

    aioice gathers from every interface except loopback and has no option for it; its gathering looks the
    function up at call time, so one wrapper (installed once) consults a context variable and otherwise
    leaves aioice's own choice alone.
    """
    import aioice.ice

    original = aioice.ice.get_host_addresses
    if getattr(original, "musetalk_filter", False):
        return

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        chosen = _host_addresses.get()
        return list(chosen) if chosen is not None else original(use_ipv4, use_ipv6)

    get_host_addresses.musetalk_filter = True  # type: ignore[attr-defined]
    aioice.ice.get_host_addresses = get_host_addresses


@contextlib.contextmanager
def host_addresses(addresses: Sequence[str] | None) -> Iterator[None]:
    """Peer connections gathering ICE candidates inside this block offer exactly `addresses` as host
    candidates (None = every interface but loopback, aioice's default)."""
    _install_host_address_filter()
    token = _host_addresses.set(tuple(addresses) if addresses is not None else None)
    try:
        yield
    finally:
        _host_addresses.reset(token)


def is_loopback(host: str) -> bool:
    """Whether a bind address is a loopback one (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def offered_host_addresses(cfg: WebRTCConfig, bind_host: str) -> tuple[str, ...] | None:
    """server.webrtc.host_addresses, or 127.0.0.1 alone for a loopback server, or None (every interface)."""
    if cfg.host_addresses:
        return cfg.host_addresses
    return ("127.0.0.1",) if is_loopback(bind_host) else None


def rtc_configuration(cfg: WebRTCConfig) -> RTCConfiguration:
    """The peer connections' ICE servers: exactly the configured ones (aiortc would add a public STUN)."""
    return RTCConfiguration(
        iceServers=[RTCIceServer(urls=list(s.urls), username=s.username, credential=s.credential)
                    for s in cfg.ice_servers]
    )


class LiveVideoTrack(MediaStreamTrack):
    """A viewer's video: one frame per tick of the session's clock."""

    kind = "video"

    def __init__(self, viewer: Viewer, fps: int, on_tick: Callable[[Tick], None]) -> None:
        super().__init__()
        self._viewer, self._fps, self._on_tick = viewer, fps, on_tick

    async def recv(self) -> av.VideoFrame:
        """The newest tick's frame (older ones queued behind a slow sender are skipped), stamped with its place
        on the stream's timeline."""
        tick = await self._viewer.newest_video()
        self._viewer.video_age_ms.add((asyncio.get_running_loop().time() - tick.t_loop_s) * 1000)
        self._on_tick(tick)
        # No copy: a tick's frame is never modified (every viewer of the session shares it). Each viewer still
        # gets a VideoFrame of its own, because aiortc reads pts on its encoder thread.
        frame = i420_frame_view(tick.frame)
        frame.pts = round(tick.index * VIDEO_CLOCK_HZ / self._fps)
        frame.time_base = Fraction(1, VIDEO_CLOCK_HZ)
        return frame


class LiveAudioTrack(MediaStreamTrack):
    """A viewer's audio: each tick's samples as 20 ms packets, each sent when its time comes.

    With `opus` (the codec the viewer chose is Opus, as every browser offers) the track encodes the packets
    itself, on the event loop (~0.1 ms each), and hands aiortc finished packets: aiortc would otherwise send
    every 20 ms frame through the loop's thread pool to be encoded, and on a busy server that round trip can
    take longer than 20 ms, so the audio falls further behind for good. Each packet's timestamp is its place
    on the stream's timeline (tick index × samples per tick), so audio that is more than AUDIO_MAX_LATE_S late
    is skipped — a short gap, the rest stays in sync with the video — instead of being sent late."""

    kind = "audio"

    def __init__(self, viewer: Viewer, opus: bool = True) -> None:
        super().__init__()
        self._viewer = viewer
        # (samples, their sample position on the stream's timeline, loop time of the first one)
        self._pending: list[tuple[NDArray[np.int16], int, float]] = []
        self._encoder = _opus_encoder() if opus else None
        self._positions: list[int] = []  # timeline positions of the frames inside the encoder, oldest first
        self._pts = 0  # without opus: aiortc encodes, and its timestamps count the samples sent

    async def recv(self) -> av.AudioFrame | av.Packet:
        """The next 20 ms of the stream's audio (an Opus packet, or samples for aiortc to encode), paced to the
        stream's clock."""
        loop = asyncio.get_running_loop()
        while True:
            samples, position, due = await self._next_packet_samples()
            late_s = loop.time() - due
            self._viewer.audio_late_ms.add(max(0.0, late_s) * 1000)
            if late_s > AUDIO_MAX_LATE_S and self._encoder is not None:
                continue  # skipped: a gap in the timeline rather than everything after it late
            if late_s < 0:
                await asyncio.sleep(-late_s)
            if self._encoder is None:
                return self._frame(samples)
            packet = self._encode(samples, position)
            if packet is not None:
                return packet

    async def _next_packet_samples(self) -> tuple[NDArray[np.int16], int, float]:
        """(AUDIO_PACKET_SAMPLES samples, timeline position of the first, loop time it is due)."""
        while sum(len(p) for p, _, _ in self._pending) < AUDIO_PACKET_SAMPLES:
            tick = await self._viewer.audio.get()
            self._pending.append((tick.pcm, tick.index * len(tick.pcm), tick.t_loop_s))
        _, position, due = self._pending[0]
        out = np.empty(AUDIO_PACKET_SAMPLES, np.int16)
        filled = 0
        while filled < AUDIO_PACKET_SAMPLES:
            samples, start, t = self._pending[0]
            n = min(len(samples), AUDIO_PACKET_SAMPLES - filled)
            out[filled : filled + n] = samples[:n]
            filled += n
            if n == len(samples):
                self._pending.pop(0)
            else:
                self._pending[0] = (samples[n:], start + n, t + n / AUDIO_RATE_HZ)
        return out, position, due

    def _encode(self, samples: NDArray[np.int16], position: int) -> av.Packet | None:
        """One Opus packet stamped with its timeline position (None while the encoder fills up)."""
        assert self._encoder is not None
        self._positions.append(position)
        packets = self._encoder.encode(_audio_frame(samples, position))
        if not packets:
            return None
        packet = packets[-1]  # libopus gives one packet per 20 ms frame
        packet.pts = self._positions[0]
        del self._positions[: len(packets)]
        packet.time_base = Fraction(1, AUDIO_RATE_HZ)
        return packet

    def _frame(self, samples: NDArray[np.int16]) -> av.AudioFrame:
        frame = _audio_frame(samples, self._pts)
        self._pts += AUDIO_PACKET_SAMPLES
        return frame


def _audio_frame(samples: NDArray[np.int16], pts: int) -> av.AudioFrame:
    """(n,) mono int16 samples at 48 kHz as an AudioFrame whose pts counts samples."""
    frame = av.AudioFrame.from_ndarray(samples[np.newaxis, :], format="s16", layout="mono")
    frame.sample_rate = AUDIO_RATE_HZ
    frame.pts = pts
    frame.time_base = Fraction(1, AUDIO_RATE_HZ)
    return frame


def _opus_encoder() -> av.AudioCodecContext:
    """libopus for 20 ms mono packets of speech at 48 kHz (a stereo Opus stream may carry mono packets)."""
    codec = av.CodecContext.create("libopus", "w")
    codec.sample_rate = AUDIO_RATE_HZ
    codec.layout = "mono"
    codec.format = "s16"
    codec.bit_rate = 64_000
    codec.time_base = Fraction(1, AUDIO_RATE_HZ)
    codec.options = {"application": "voip", "frame_duration": "20"}
    return codec


class _Peer:
    """One viewer: its peer connection, its queues, its events channel."""

    def __init__(self, session_id: str, pc: RTCPeerConnection, viewer: Viewer) -> None:
        self.session_id, self.pc, self.viewer = session_id, pc, viewer
        self.created_s = time.monotonic()
        self.channel: RTCDataChannel | None = None
        self.on_air: int | None = None
        self.first_index: int | None = None  # stream frame number of the first frame sent to this viewer
        self.closed = False

    def on_tick(self, tick: Tick) -> None:
        """Tell the viewer's events channel when an utterance goes on air and when the stream is idle again.

        Events name the frame where it happens, counted from the first frame this viewer was sent (its
        video's RTP timestamp relative to the first one, in frames)."""
        if self.first_index is None:
            self.first_index = tick.index
        if tick.utterance == self.on_air:
            return
        self.on_air = tick.utterance
        channel = self.channel
        if channel is not None and channel.readyState == "open":
            event: dict[str, Any] = {"type": "idle"} if tick.utterance is None else {
                "type": "speaking", "utterance": tick.utterance
            }  # fmt: skip
            event["frame"] = tick.index - self.first_index
            channel.send(json.dumps(event))


class LiveHub:
    """Every session's live stream and viewers in this process."""

    def __init__(
        self,
        cfg: AppConfig,
        avatar_frames: Callable[[str], FrameStore] | None,
        session_start: Callable[[str], tuple[str, int]],
    ) -> None:
        """avatar_frames: the renderer's source frames of an avatar (None: this renderer has no live stream);
        session_start: (avatar id, cycle cursor) a session's stream starts from."""
        self.cfg = cfg
        self._avatar_frames = avatar_frames
        self._session_start = session_start
        self._sessions: dict[str, LiveSession] = {}
        self._peers: dict[str, set[_Peer]] = {}
        self._host_addresses = offered_host_addresses(cfg.server.webrtc, cfg.server.host)
        self._watch: asyncio.Task[None] | None = None
        self._warned_s = -BEHIND_WARN_EVERY_S  # time.monotonic() of the last "falling behind" warning

    def live(self, session_id: str) -> LiveSession | None:
        """The session's stream if anyone is watching it."""
        return self._sessions.get(session_id)

    def stats(self) -> dict[str, float]:
        """For /health: sessions with a live stream, their viewers, and over the last 10 s the p95 of how late
        the streams' ticks went on air, how old a tick's frame was when taken for encoding, and how late
        audio packets were sent (all ms; these grow when the host's CPU cannot keep up); the video frames
        the current viewers' tracks skipped to catch up since they connected; and the ticks the current
        streams held an utterance's last frame because the render fell behind."""
        streams = list(self._sessions.values())
        viewers = [v for live in streams for v in live.viewers]
        return {
            "sessions": len(streams),
            "viewers": sum(len(p) for p in self._peers.values()),
            "tick_late_p95_ms": round(quantile((x for s in streams for x in s.late_ms.values()), 0.95), 1),
            "video_age_p95_ms": round(quantile((x for v in viewers for x in v.video_age_ms.values()), 0.95), 1),
            "audio_late_p95_ms": round(quantile((x for v in viewers for x in v.audio_late_ms.values()), 0.95), 1),
            "video_dropped": sum(v.video_dropped for v in viewers),
            "held_frames": sum(live.held_frames for live in streams),
        }

    async def offer(self, session_id: str, sdp: str, kind: str) -> RTCSessionDescription:
        """A new viewer of `session_id` from its SDP offer; returns the answer (all ICE candidates inside)."""
        if self._avatar_frames is None:
            raise LiveUnavailable("this renderer has no live stream (it renders whole clips only)")
        wcfg = self.cfg.server.webrtc
        if len(self._peers.get(session_id, ())) >= wcfg.max_viewers_per_session:
            raise Busy(
                f"session {session_id!r} has {wcfg.max_viewers_per_session} viewers "
                "(server.webrtc.max_viewers_per_session)",
                self.cfg.server.retry_after_s,
            )
        avatar_id, cursor = await asyncio.to_thread(self._session_start, session_id)
        pc = RTCPeerConnection(rtc_configuration(wcfg))
        try:
            with host_addresses(self._host_addresses):
                try:
                    await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
                except (ValueError, KeyError, IndexError, TypeError) as exc:
                    raise BadOffer(f"the offer is not usable SDP: {type(exc).__name__}: {exc}") from exc
                kinds = {t.kind for t in pc.getTransceivers()}
                if not kinds & {"audio", "video"}:
                    raise BadOffer("the offer asks for neither video nor audio")
                live = self._sessions.get(session_id)
                if live is None:
                    live = LiveSession(
                        session_id, self.cfg.fps, self._avatar_frames, avatar_id, cursor,
                        wcfg.buffer_frames, lead_frames(self.cfg), wcfg.start_frames, wcfg.max_height,
                        wcfg.idle_cache_mb * 2**20,
                    )
                viewer = live.add_viewer()
                self._sessions[session_id] = live
                peer = _Peer(session_id, pc, viewer)
                self._peers.setdefault(session_id, set()).add(peer)
                self._wire(peer)
                if "video" in kinds:
                    pc.addTrack(LiveVideoTrack(viewer, self.cfg.fps, peer.on_tick))
                if "audio" in kinds:
                    pc.addTrack(LiveAudioTrack(viewer, opus=_sends_opus(pc)))
                answer = await pc.createAnswer()
                await pc.setLocalDescription(answer)
        except BaseException:
            await self._drop_pc(session_id, pc)
            raise
        self._ensure_watch()
        log.info("viewer joined %s", kv(session=session_id, viewers=len(self._peers[session_id])))
        return pc.localDescription

    def _wire(self, peer: _Peer) -> None:
        @peer.pc.on("datachannel")
        def _channel(channel: RTCDataChannel) -> None:
            peer.channel = channel

        @peer.pc.on("connectionstatechange")
        async def _state() -> None:
            if peer.pc.connectionState in ("failed", "closed"):
                await self._close_peer(peer, peer.pc.connectionState)

    async def _drop_pc(self, session_id: str, pc: RTCPeerConnection) -> None:
        for peer in list(self._peers.get(session_id, ())):
            if peer.pc is pc:
                await self._close_peer(peer, "offer failed")
                return
        await pc.close()

    async def _close_peer(self, peer: _Peer, why: str) -> None:
        if peer.closed:
            return
        peer.closed = True
        peers = self._peers.get(peer.session_id, set())
        peers.discard(peer)
        live = self._sessions.get(peer.session_id)
        if live is not None and live.remove_viewer(peer.viewer):
            del self._sessions[peer.session_id]
        if not peers:
            self._peers.pop(peer.session_id, None)
        await peer.pc.close()
        log.info("viewer left %s", kv(session=peer.session_id, why=why, viewers=len(peers)))

    def _ensure_watch(self) -> None:
        if self._watch is None or self._watch.done():
            self._watch = asyncio.get_running_loop().create_task(self._watch_viewers(), name="live-viewers")

    async def _watch_viewers(self) -> None:
        """Drop viewers that vanished without closing: no RTCP report for viewer_timeout_s."""
        timeout_s = self.cfg.server.webrtc.viewer_timeout_s
        while self._peers:
            await asyncio.sleep(WATCH_INTERVAL_S)
            self.warn_if_behind(time.monotonic())
            for peers in list(self._peers.values()):
                for peer in list(peers):
                    silent_s = await _silent_for_s(peer)
                    if silent_s > timeout_s:
                        await self._close_peer(peer, f"no RTCP for {silent_s:.0f} s")

    def warn_if_behind(self, now_s: float) -> bool:
        """Log a warning (at most every BEHIND_WARN_EVERY_S) when the streams' clocks tick late: the server
        cannot keep up with its live streams (the host's cores, or this process's GIL). Returns whether it
        warned."""
        figures = self.stats()
        if figures["tick_late_p95_ms"] < BEHIND_WARN_MS or now_s - self._warned_s < BEHIND_WARN_EVERY_S:
            return False
        self._warned_s = now_s
        log.warning(
            "live streams are falling behind %s: the server cannot keep up (busy cores, or with cores free "
            "its threads waiting for the GIL: /health gil); fewer live sessions per process: "
            "server.max_live_sessions, serve_cluster --replicas-per-gpu; a smaller stream: server.webrtc.max_height",
            kv(**figures),
        )
        return True

    async def close(self) -> None:
        """Close every viewer (server shutdown)."""
        for peers in list(self._peers.values()):
            for peer in list(peers):
                await self._close_peer(peer, "server stopping")
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch


async def _silent_for_s(peer: _Peer) -> float:
    """Seconds since the viewer last sent a receiver report (or since it joined, before the first)."""
    newest: datetime.datetime | None = None
    for sender in peer.pc.getSenders():
        report = await sender.getStats()
        for stats in report.values():
            if stats.type == "remote-inbound-rtp" and (newest is None or stats.timestamp > newest):
                newest = stats.timestamp
    if newest is None:
        return time.monotonic() - peer.created_s
    return (datetime.datetime.now(datetime.timezone.utc) - newest).total_seconds()


def _sends_opus(pc: RTCPeerConnection) -> bool:
    """Whether the audio codec agreed with the viewer's offer is Opus (aiortc sends with the first common one)."""
    for transceiver in pc.getTransceivers():
        if transceiver.kind == "audio":
            codecs = getattr(transceiver, "_codecs", [])
            return bool(codecs) and codecs[0].mimeType.lower() == "audio/opus"
    return False


def lead_frames(cfg: AppConfig) -> int:
    """Frames an utterance's first frame takes to render (engine.start_budget_ms): the idle avatar moves on
    meanwhile, so the utterance starts that far ahead of it on the cycle."""
    return max(1, round(cfg.engine.start_budget_ms / 1000 * cfg.fps))
