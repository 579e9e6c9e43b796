"""Shared fixtures: tiny models written once per test session in the real on-disk formats."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from musetalk.avatar.prep import PrepResult
    from musetalk.avatar.synthetic import SyntheticVideo
    from musetalk.config import AppConfig

# Tests never touch a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip GPU tests when no CUDA device is present (CI never has one)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models/ folder with tiny random weights for every part, v1.5 and v1."""
    from musetalk.testing import write_models

    return write_models(tmp_path_factory.mktemp("models"), "tiny")


@pytest.fixture(scope="session")
def face_video(tmp_path_factory: pytest.TempPathFactory) -> SyntheticVideo:
    """48 frames of 320×320: the astronaut on a known smooth path + 1 px jitter (ground truth attached)."""
    from musetalk.avatar.synthetic import write_face_video

    return write_face_video(tmp_path_factory.mktemp("video") / "face.mp4")


@pytest.fixture(scope="session")
def prepared_avatar(
    tiny_models_dir: Path, face_video: SyntheticVideo, tmp_path_factory: pytest.TempPathFactory
) -> tuple[AppConfig, PrepResult]:
    """force_prep of `face_video` with tiny models and the landmark parser, in a session temp cache.

    Read-only for tests: copy it (or prepare your own) before changing anything.
    """
    from musetalk.avatar import prepare_avatar
    from musetalk.config import load_config

    cfg = load_config(
        overrides=[
            f"models.dir={tiny_models_dir}",
            "runtime.device=cpu",
            f"prep.cache_dir={tmp_path_factory.mktemp('avatars')}",
            "prep.parser=landmarks",
            "avatar_id=synth",
        ]
    )
    return cfg, prepare_avatar(cfg, video=face_video.path)
