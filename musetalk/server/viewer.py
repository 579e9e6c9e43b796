"""A Python viewer of a session's live stream (aiortc): what a browser does, recorded for tests and benchmarks.

It offers to receive one video and one audio track and opens an events channel, posts the offer to
`/sessions/{id}/offer`, and records every decoded video frame and 20 ms audio packet with the event-loop
time at which it came out of the decoder, plus the server's events (utterance on air / idle).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from numpy.typing import NDArray

from musetalk.server.webrtc import host_addresses

log = logging.getLogger(__name__)


@dataclass
class Received:
    """Everything a viewer received, each item with the loop time (s) it arrived at."""

    video: list[tuple[float, Any]] = field(default_factory=list)  # (t, frame (H, W, 3) BGR uint8, or reduced)
    audio: list[tuple[float, NDArray[np.int16]]] = field(default_factory=list)  # (t, (n,) mono int16 48 kHz)
    events: list[tuple[float, dict[str, Any]]] = field(default_factory=list)  # (t, {"type": ..., ...})


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
    ) -> None:
        """addresses: the host candidates this viewer offers (loopback by default, like the tests);
        reduce_frame: keep f(frame) instead of each decoded BGR frame (saves memory in long runs)."""
        self.base_url, self.session_id = base_url.rstrip("/"), session_id
        self.headers = headers or {}
        self.addresses = addresses
        self.reduce_frame = reduce_frame
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
        deadline = loop.time() + timeout_s
        while not (self.received.video and self.received.audio):
            if loop.time() > deadline:
                raise TimeoutError(f"no media within {timeout_s} s (ICE state {self.pc.iceConnectionState})")
            await asyncio.sleep(0.02)
        self.connected.set()

    async def _pull(self, track: MediaStreamTrack) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            t = loop.time()
            if track.kind == "video":
                bgr = frame.to_ndarray(format="bgr24")
                self.received.video.append((t, self.reduce_frame(bgr) if self.reduce_frame else bgr))
            else:
                samples = frame.to_ndarray().reshape(-1, len(frame.layout.channels))  # packed s16
                self.received.audio.append((t, samples.mean(axis=1).astype(np.int16)))

    async def close(self) -> None:
        """Close the peer connection (the server sees the viewer leave)."""
        await self.pc.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
