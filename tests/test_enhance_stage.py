"""MouthEnhancer: the server's optional GFPGAN stage on 256² generated faces (tiny weights, CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from musetalk.avatar.geometry import upstream_box
from musetalk.avatar.synthetic import astronaut_bgr
from musetalk.config import load_config
from musetalk.enhance.align import face_to_template
from musetalk.enhance.restore import FaceRestorer
from musetalk.enhance.stage import CROP_IN_TEMPLATE_PX, CROP_PX, MouthEnhancer, mouth_mask
from musetalk.faces.dlib_detector import DlibDetector
from musetalk.models import load_models


@pytest.fixture(scope="module")
def enhancer(tiny_models_dir: Path) -> MouthEnhancer:
    cfg = load_config(overrides=[f"models.dir={tiny_models_dir}", "runtime.device=cpu"])
    net = load_models(cfg, parts={"gfpgan"}).gfpgan
    assert net is not None
    return MouthEnhancer(FaceRestorer(net, batch_size=2), weight=1.0)


def test_only_the_generated_rows_change_and_batching_is_consistent(enhancer: MouthEnhancer) -> None:
    faces = np.random.default_rng(0).integers(0, 255, (3, CROP_PX, CROP_PX, 3), dtype=np.uint8)
    out = enhancer.enhance(faces)
    assert out.shape == faces.shape and out.dtype == np.uint8
    assert np.array_equal(out[:, : CROP_PX // 2], faces[:, : CROP_PX // 2])
    assert np.abs(out[:, 3 * CROP_PX // 4 :].astype(int) - faces[:, 3 * CROP_PX // 4 :]).mean() > 5
    # batch_size 2 splits 3 faces into 2 + 1: each face's result equals its own single-face result.
    single = np.concatenate([enhancer.enhance(faces[i : i + 1]) for i in range(3)])
    assert np.abs(single.astype(int) - out).max() <= 1
    with pytest.raises(ValueError, match="expected"):
        enhancer.enhance(faces[:, :128])


def test_weight_zero_is_identity(enhancer: MouthEnhancer) -> None:
    faces = np.random.default_rng(1).integers(0, 255, (2, CROP_PX, CROP_PX, 3), dtype=np.uint8)
    zero = MouthEnhancer(enhancer.restorer, weight=0.0)
    assert np.array_equal(zero.enhance(faces), faces)


def test_mouth_mask_is_zero_above_the_boundary_and_one_in_the_mouth() -> None:
    m = mouth_mask()
    assert torch.all(m[: CROP_PX // 2] == 0) and m[200, 128] == 1


def test_crop_placement_in_the_template_matches_a_detected_face() -> None:
    img = astronaut_bgr()
    lm = DlibDetector().detect(img)
    assert lm is not None
    x1, y1, x2, y2 = upstream_box(lm, 0.0, 10.0)
    m = face_to_template(lm)
    corners = np.array([[x1, y1], [x2, y1], [x1, y2], [x2, y2]]) @ m[:, :2].T + m[:, 2]
    # The photo's head is rolled ~3°: compare the axis-aligned means of opposite edges.
    measured = (
        corners[[0, 2], 0].mean(),
        corners[[0, 1], 1].mean(),
        corners[[1, 3], 0].mean(),
        corners[[2, 3], 1].mean(),
    )
    assert np.allclose(measured, CROP_IN_TEMPLATE_PX, atol=6.0)
