"""MouthEnhancer: the server's optional GFPGAN stage on 256² generated faces (tiny weights, CPU)."""

from __future__ import annotations

import shutil
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


def test_server_stage_restores_only_the_mouth_half_of_generated_faces(tiny_models_dir: Path) -> None:
    """enhance.enabled: MuseTalkFaces runs the stage after the decoder; the build needs the GFPGAN weights."""
    from musetalk.avatar.cache import cycle_index
    from musetalk.errors import WeightsMissing
    from musetalk.models import SERVE_PARTS
    from musetalk.pipeline.generate import MuseTalkFaces
    from musetalk.pipeline.synthetic import synthetic_avatar
    from musetalk.server.renderer import build_renderer

    base = [f"models.dir={tiny_models_dir}", "runtime.device=cpu"]
    plain_cfg = load_config(overrides=base)
    cfg = load_config(overrides=[*base, "enhance.enabled=true", "enhance.weight=1.0"])
    bundle = load_models(cfg, SERVE_PARTS | {"gfpgan"})
    avatar = synthetic_avatar(n_frames=4, height=96, width=128, vae=bundle.vae, vae_scale=bundle.vae_scale)
    samples = (0.2 * np.sin(np.arange(8000) / 16000 * 2 * np.pi * 200)).astype(np.float32)  # 12 frames
    faces = {}
    for name, c in (("plain", plain_cfg), ("enhanced", cfg)):
        source = MuseTalkFaces(bundle, c)
        job = source.start(avatar, samples, 12)
        ids = list(range(4))
        faces[name] = np.array(job.submit(ids, [cycle_index(i, 4) for i in ids]).wait())
    assert source.enhancer is not None
    np.testing.assert_array_equal(faces["enhanced"][:, :128], faces["plain"][:, :128])  # the upper half: untouched
    assert np.abs(faces["enhanced"][:, 160:].astype(int) - faces["plain"][:, 160:].astype(int)).mean() > 1

    with pytest.raises(ValueError, match="GFPGAN"):
        MuseTalkFaces(load_models(plain_cfg), cfg)  # enabled without the weights loaded
    missing = tiny_models_dir.parent / "no-gfpgan"
    shutil.copytree(tiny_models_dir, missing)
    (missing / "gfpgan" / "GFPGANv1.4.pth").unlink()
    with pytest.raises(WeightsMissing, match="GFPGAN"):
        overrides = [f"models.dir={missing}", "runtime.device=cpu", "enhance.enabled=true", "server.renderer=musetalk"]
        build_renderer(load_config(overrides=overrides))
