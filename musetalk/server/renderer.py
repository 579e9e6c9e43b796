"""Which renderer the server runs: the MuseTalk engine (`server.renderer: musetalk`) or a plugin factory."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from musetalk.config import AppConfig
from musetalk.errors import ConfigError, EngineUnavailable, WeightsMissing
from musetalk.types import Renderer

RendererFactory = Callable[[AppConfig], Renderer]


def build_renderer(cfg: AppConfig) -> Renderer:
    """The real MuseTalk engine, loaded and ready for cfg.avatar_id + cfg.server.avatars.

    Checks the weights first so a missing file is reported with the command that fetches it. The
    engine itself (musetalk/pipeline + scripts/warm_api.py RealTimeInference) is connected here when
    it lands; until then the server refuses to start rather than serve anything fake.
    """
    from musetalk.models.bundle import missing_files

    missing = missing_files(cfg.models)
    if missing:
        raise WeightsMissing(missing)
    raise EngineUnavailable(
        "the MuseTalk engine is not connected to the server yet (musetalk/server/renderer.py build_renderer); "
        "set server.renderer to a 'module:factory' renderer plugin to serve with another renderer"
    )


def renderer_factory(cfg: AppConfig) -> RendererFactory:
    """The factory named by cfg.server.renderer: "musetalk" or "package.module:callable"."""
    spec = cfg.server.renderer
    if spec == "musetalk":
        return build_renderer
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"server.renderer: expected 'musetalk' or 'package.module:factory', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"server.renderer: cannot import {module_name!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"server.renderer: {module_name!r} has no callable {attr!r}")
    return factory
