"""Shared fixtures: tiny models written once per test session in the real on-disk formats."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
