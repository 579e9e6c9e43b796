"""scripts.serve_cluster's replica plan and argument errors (no Ray started)."""

from __future__ import annotations

import pytest

from musetalk.errors import ConfigError
from scripts import serve_cluster
from scripts.serve_cluster import CPU_REPLICAS, EXIT_CANNOT_START, replica_plan


def test_one_replica_per_gpu_by_default_and_k_sharing_each_gpu_when_asked() -> None:
    assert replica_plan(gpus=4, replicas=0, per_gpu=1) == (4, 1.0)
    assert replica_plan(gpus=4, replicas=0, per_gpu=2) == (8, 0.5)
    replicas, share = replica_plan(gpus=1, replicas=0, per_gpu=3)
    assert replicas == 3 and share == 0.3333 and replicas * share <= 1.0  # Ray counts shares to 4 decimals
    assert replica_plan(gpus=2, replicas=3, per_gpu=2) == (3, 0.5)  # an explicit count wins
    assert replica_plan(gpus=0, replicas=0, per_gpu=2) == (CPU_REPLICAS, 0.0)  # no GPUs: nothing to share
    with pytest.raises(ConfigError, match="at least 1"):
        replica_plan(gpus=1, replicas=0, per_gpu=0)


def test_a_bad_replicas_per_gpu_exits_before_ray_starts(capsys: pytest.CaptureFixture[str]) -> None:
    assert serve_cluster.main(["--replicas-per-gpu", "0"]) == EXIT_CANNOT_START
    assert "--replicas-per-gpu must be at least 1" in capsys.readouterr().err
