"""What the routes (ours and mounted routers, e.g. the web app's) get from the running app."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from musetalk.config import AppConfig
from musetalk.errors import Busy
from musetalk.server.service import SpeakService
from musetalk.server.webrtc import LiveHub
from musetalk.server.worker import RenderPool
from musetalk.session.store import SessionStore
from musetalk.tts.base import VoiceEngine
from musetalk.types import Renderer
from musetalk.utils.gil_probe import GilProbe


@dataclass
class Services:
    """Everything the lifespan built; lives in app.state.services while the server runs."""

    cfg: AppConfig
    renderer: Renderer
    voice: VoiceEngine
    store: SessionStore
    worker: RenderPool
    speaker: SpeakService
    hub: LiveHub
    gil: GilProbe  # how long threads wait for the GIL (/health)
    ready: bool = False


def get_services(request: Request) -> Services:
    """The running services; 503 while starting or stopping."""
    services: Services | None = getattr(request.app.state, "services", None)
    if services is None or not services.ready:
        raise Busy("the server is not ready")
    return services


def get_speak_service(request: Request) -> SpeakService:
    """The speak path (TTS → render → append) for routes such as the web app's chat jobs."""
    return get_services(request).speaker


ServicesDep = Annotated[Services, Depends(get_services)]
SpeakServiceDep = Annotated[SpeakService, Depends(get_speak_service)]
