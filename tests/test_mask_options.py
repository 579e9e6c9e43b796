"""Blend-mask options: parsing_mode raw_nose and prep.keep_upper_lip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from musetalk.avatar import PrepResult, load_avatar, prepare_avatar
from musetalk.avatar.synthetic import SyntheticVideo, astronaut_bgr
from musetalk.config import AppConfig, with_overrides
from musetalk.faces.dlib_detector import DlibDetector
from musetalk.faces.parsing import NOSE_LABEL, U_LIP, keep_upper_lip, labels_to_mask, landmark_labels


def test_raw_nose_adds_the_nose_to_raw() -> None:
    lm = DlibDetector().detect(astronaut_bgr())
    assert lm is not None
    labels = landmark_labels(lm, 512)
    raw = labels_to_mask(labels, "raw", 90, 90)
    nose = labels_to_mask(labels, "raw_nose", 90, 90)
    assert np.all(nose[labels == NOSE_LABEL] == 255) and np.all(raw[labels == NOSE_LABEL] == 0)
    assert np.array_equal(raw[labels != NOSE_LABEL], nose[labels != NOSE_LABEL])


def test_keep_upper_lip_clears_everything_above_the_lips() -> None:
    lm = DlibDetector().detect(astronaut_bgr())
    assert lm is not None
    labels = landmark_labels(lm, 512)
    full = labels_to_mask(labels, "raw", 90, 90)
    cut = keep_upper_lip(full, lm)
    seam_y = float(lm[[61, 62, 63], 1].mean())
    cx = int(lm[62, 0])
    assert not cut[: int(seam_y) - 1, cx].any() and full[int(seam_y) - 8, cx] == 255  # philtrum: source
    upper_lip = (labels == U_LIP) & (np.arange(512)[:, None] < lm[[50, 51, 52], 1].max())
    assert upper_lip.any() and not cut[upper_lip].any()
    below = np.arange(512)[:, None] >= lm[[60, 64, 66], 1].max() + 1
    assert np.array_equal(cut[np.broadcast_to(below, cut.shape)], full[np.broadcast_to(below, full.shape)])


@pytest.mark.slow
def test_prep_with_keep_upper_lip_stores_smaller_masks(
    prepared_avatar: tuple[AppConfig, PrepResult], face_video: SyntheticVideo, tmp_path: Path
) -> None:
    base = with_overrides(prepared_avatar[0], [f"prep.cache_dir={tmp_path}", "prep.detector=dlib"])
    narrow_cfg = with_overrides(base, ["prep.keep_upper_lip=true"])
    default = load_avatar(prepared_avatar[0], prepared_avatar[0].avatar_id)
    prepare_avatar(narrow_cfg, "narrow", face_video.path)
    narrow = load_avatar(narrow_cfg, "narrow")
    for i in (0, 20, 47):
        assert 0 < int((narrow.masks[i] > 0).sum()) < int((default.masks[i] > 0).sum())
