"""Warm MuseTalk inference (seed name): models and avatar caches loaded once, each call audio → clip.

    python -m scripts.warm_api --audio speech.wav [--avatar-id demo] [--out clip.mp4] [--set key=value ...]

In code:

    rti = RealTimeInference.from_config(load_config())
    clip, cursor = rti.run("speech.wav")                    # results/clips/<avatar>_<id>.mp4
    clip, cursor = rti.run("next.wav", cursor=cursor)       # the avatar keeps moving across clips
    for frame in rti.frames("speech.wav"): ...              # BGR frames as they are blended (streaming)

RealTimeInference holds no per-session state: the session owns the cursor.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import uuid
from collections.abc import Iterable
from pathlib import Path

import torch

from musetalk.avatar.cache import AvatarCache
from musetalk.cli import add_config_args, config_from_args
from musetalk.config import AppConfig, project_path
from musetalk.errors import AvatarNotPrepared, MuseTalkError
from musetalk.models import ModelBundle, load_models
from musetalk.pipeline.audio import AudioSource
from musetalk.pipeline.engine import Engine, FrameStream, RenderResult
from musetalk.pipeline.generate import FaceSource, MuseTalkFaces

log = logging.getLogger(__name__)


class RealTimeInference:
    """The warm API: one engine over loaded models, any number of loaded avatars."""

    def __init__(self, cfg: AppConfig, source: FaceSource, avatars: Iterable[AvatarCache] = ()) -> None:
        self.cfg = cfg
        self.engine = Engine(cfg, source)
        self._avatars: dict[str, AvatarCache] = {a.avatar_id: a for a in avatars}

    @classmethod
    def from_config(
        cls, cfg: AppConfig, avatars: Iterable[AvatarCache] = (), bundle: ModelBundle | None = None, warmup: bool = True
    ) -> RealTimeInference:
        """Load the models once (unless a bundle is given), build the MuseTalk engine, warm it up."""
        if cfg.runtime.threads:
            torch.set_num_threads(cfg.runtime.threads)  # process-wide: this is the composition root
        bundle = bundle if bundle is not None else load_models(cfg)
        source = MuseTalkFaces(bundle, cfg)
        rti = cls(cfg, source, avatars)
        if warmup:
            rti.engine.on_gpu_thread(source.warmup)
        return rti

    def add_avatar(self, cache: AvatarCache) -> None:
        """Make a prepared avatar available by its id (replaces one with the same id)."""
        self._avatars[cache.avatar_id] = cache

    def avatar(self, avatar: str | AvatarCache | None = None) -> AvatarCache:
        """The cache for an id (default: cfg.avatar_id), loading it from disk on first use."""
        if isinstance(avatar, AvatarCache):
            return avatar
        avatar_id = avatar or self.cfg.avatar_id
        cache = self._avatars.get(avatar_id)
        if cache is None:
            load = getattr(importlib.import_module("musetalk.avatar"), "load_avatar", None)
            if load is None:
                raise AvatarNotPrepared(
                    f"avatar {avatar_id!r} is not loaded; prepare it with "
                    f"`python -m scripts.force_prep --avatar-id {avatar_id}`"
                )
            cache = load(self.cfg, avatar_id)
            assert isinstance(cache, AvatarCache)
            self._avatars[avatar_id] = cache
        return cache

    def run(
        self,
        audio: AudioSource,
        avatar: str | AvatarCache | None = None,
        out_path: Path | str | None = None,
        cursor: int = 0,
    ) -> RenderResult:
        """Audio (path, bytes or Audio) → finished clip; returns (clip, next_cursor)."""
        cache = self.avatar(avatar)
        if out_path is None:
            out_path = project_path(self.cfg.engine.output_dir) / f"{cache.avatar_id}_{uuid.uuid4().hex[:12]}.mp4"
        return self.engine.render(audio, cache, Path(out_path), cursor)

    def frames(self, audio: AudioSource, avatar: str | AvatarCache | None = None, cursor: int = 0) -> FrameStream:
        """Blended BGR frames of a clip as they are produced; `.next_cursor` and `.timings_ms` on the stream."""
        return self.engine.frames(audio, self.avatar(avatar), cursor)

    def close(self) -> None:
        """Stop worker threads."""
        self.engine.close()


def main(argv: list[str] | None = None) -> int:
    """Render one clip from an audio file with the configured avatar."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--audio", required=True, help="audio file (wav, mp3, ogg, ...)")
    parser.add_argument("--avatar-id", default=None, help="prepared avatar (default: avatar_id from the config)")
    parser.add_argument("--out", default=None, help="output mp4 (default: engine.output_dir)")
    parser.add_argument("--cursor", type=int, default=0, help="avatar cycle position of the first frame")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
        rti = RealTimeInference.from_config(cfg)
        try:
            clip, next_cursor = rti.run(args.audio, args.avatar_id, args.out, args.cursor)
        finally:
            rti.close()
    except MuseTalkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stages = ", ".join(f"{k} {v:.0f}" for k, v in clip.timings_ms.items() if k.endswith("_ms"))
    print(f"{clip.path}  ({clip.n_frames} frames, {clip.duration_s:.2f} s; next cursor {next_cursor})")
    print(f"timings (ms): {stages}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
