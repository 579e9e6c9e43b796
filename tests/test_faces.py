"""Face plugins: dlib landmarks, optional detectors' failure modes, jaw/raw masks, parsers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from musetalk.avatar.synthetic import astronaut_bgr
from musetalk.config import load_config
from musetalk.errors import PluginUnavailable, WeightsMissing
from musetalk.faces import make_detector, make_parser, resolve_detector_name, resolve_parser_name
from musetalk.faces.dlib_detector import DlibDetector
from musetalk.faces.dwpose import DwposeDetector
from musetalk.faces.fan import FAN_FILES, FaceAlignmentDetector
from musetalk.faces.parsing import (
    L_LIP,
    MOUTH,
    NOSE_LABEL,
    SKIN,
    U_LIP,
    BiSeNetParser,
    LandmarkParser,
    cheek_mask,
    jaw_kernel,
    labels_to_mask,
    landmark_labels,
)
from musetalk.testing import write_dlib_predictor


@pytest.fixture(scope="module")
def dlib_detector() -> DlibDetector:
    return DlibDetector()


def test_dlib_finds_the_astronauts_68_landmarks(dlib_detector: DlibDetector) -> None:
    lm = dlib_detector.detect(astronaut_bgr())
    assert lm is not None and lm.shape == (68, 2) and lm.dtype == np.float32
    # face at (179, 83)-(266, 170) in the photo; chin is the lowest jaw point, nose below the eyes
    assert lm[:, 0].min() >= 170 and lm[:, 0].max() <= 280 and lm[:, 1].min() >= 80 and lm[:, 1].max() <= 190
    assert lm[8, 1] == lm[:17, 1].max() and lm[30, 1] > lm[36:48, 1].mean()
    assert dlib_detector.weight_files()[0].name == "shape_predictor_68_face_landmarks.dat"


def test_dlib_returns_none_without_a_face(dlib_detector: DlibDetector) -> None:
    rng = np.random.default_rng(0)
    assert dlib_detector.detect(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)) is None
    assert dlib_detector.detect_batch([np.zeros((64, 64, 3), np.uint8), astronaut_bgr()])[0] is None


def test_dlib_downscaled_detection_keeps_full_resolution_landmarks(dlib_detector: DlibDetector) -> None:
    photo = astronaut_bgr()
    big = np.kron(photo, np.ones((2, 2, 1), dtype=np.uint8))  # 1024², detection runs at 640
    small_lm, big_lm = dlib_detector.detect(photo), dlib_detector.detect(big)
    assert small_lm is not None and big_lm is not None
    assert np.median(np.abs(big_lm / 2 - small_lm)) < 1.5


def test_face_alignment_never_downloads_missing_weights(tmp_path: Path) -> None:
    with pytest.raises(WeightsMissing) as err:
        FaceAlignmentDetector(tmp_path / "face-alignment")
    assert all(name in str(err.value) for name in FAN_FILES) and "make weights" in str(err.value)


@pytest.mark.skipif(importlib.util.find_spec("face_alignment") is not None, reason="face_alignment is installed")
def test_face_alignment_without_its_package_says_how_to_install(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    for name in FAN_FILES:
        (ckpt / name).write_bytes(b"x")
    with pytest.raises(PluginUnavailable, match="pip install face-alignment"):
        FaceAlignmentDetector(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("mmpose") is not None, reason="mmpose is installed")
def test_dwpose_without_mmpose_gives_the_install_recipe(tmp_path: Path) -> None:
    with pytest.raises(PluginUnavailable) as err:
        DwposeDetector(tmp_path / "dw-ll_ucoco_384.pth")
    assert "mmcv==2.1.0" in str(err.value) and "mmpose==1.3.2" in str(err.value)


def test_dlib_siblings_detect_in_parallel_threads_as_one_detector_does(dlib_detector: DlibDetector) -> None:
    from concurrent.futures import ThreadPoolExecutor

    frames = [np.ascontiguousarray(np.roll(astronaut_bgr(), 3 * i, axis=1)) for i in range(8)]
    serial = [dlib_detector.detect(f) for f in frames]
    twins = [dlib_detector.sibling() for _ in range(2)]
    assert twins[0]._predictor is dlib_detector._predictor  # the landmark model is shared, not reloaded
    with ThreadPoolExecutor(2) as pool:  # one HOG detector per thread: sharing one crashes the process
        for _ in range(10):
            found = list(pool.map(lambda k: [twins[k].detect(f) for f in frames[k::2]], range(2)))
            parallel = [found[i % 2][i // 2] for i in range(len(frames))]
            pairs = zip(serial, parallel, strict=True)
            assert all(a is not None and b is not None and np.array_equal(a, b) for a, b in pairs)


def test_prep_dlib_predictor_loads_a_users_own_68_point_model(tmp_path: Path) -> None:
    own = write_dlib_predictor(tmp_path / "own68.dat", "tiny")
    det = make_detector(load_config(overrides=[f"prep.dlib_predictor={own}", "prep.detector=dlib"]))
    assert det.weight_files() == [own]
    lm = det.detect(astronaut_bgr())
    assert lm is not None and lm.shape == (68, 2)
    installed = DlibDetector().detect(astronaut_bgr())
    assert installed is not None and not np.array_equal(lm, installed)  # a different model answered
    with pytest.raises(WeightsMissing, match="missing.dat"):
        DlibDetector(predictor=tmp_path / "missing.dat")


def test_auto_picks_dlib_and_landmarks_without_weights(tmp_path: Path) -> None:
    cfg = load_config(overrides=[f"models.dir={tmp_path}"])
    assert resolve_detector_name(cfg) == "dlib" and resolve_parser_name(cfg) == "landmarks"
    assert make_detector(cfg).name == "dlib" and make_parser(cfg).name == "landmarks"
    with pytest.raises(WeightsMissing, match="79999_iter.pth"):
        make_parser(load_config(overrides=[f"models.dir={tmp_path}", "prep.parser=bisenet"]))


def test_auto_picks_bisenet_when_its_weights_exist(tiny_models_dir: Path) -> None:
    cfg = load_config(overrides=[f"models.dir={tiny_models_dir}"])
    assert resolve_parser_name(cfg) == "bisenet"


def test_jaw_kernel_is_upstreams_cone_and_bar() -> None:
    k = jaw_kernel()
    assert k.shape == (33, 33) and k.dtype == np.uint8
    assert k[:10].sum() == 0
    assert [int(k[r].sum()) for r in range(10, 21)] == list(range(1, 22, 2))
    assert all(k[r].sum() == 21 and k[r, 6:27].all() for r in range(21, 33))
    assert k[16, 16] == 1  # the anchor (centre) is inside the kernel


def test_cheek_mask_bands() -> None:
    m = cheek_mask(90, 90)
    assert (
        m[:, : 256 - 90 + 1].min() == 255 and m[:, 256 - 90 + 1 : 256 + 90].max() == 0 and m[:, 256 + 90 :].min() == 255
    )


def _label_map() -> np.ndarray:
    lab = np.zeros((512, 512), dtype=np.int64)
    lab[150:400, 120:392] = SKIN
    lab[200:300, 236:276] = NOSE_LABEL
    lab[320:340, 200:312] = U_LIP
    lab[340:350, 220:292] = MOUTH
    lab[350:365, 200:312] = L_LIP
    lab[150:200, 150:200] = 4  # an eye: never in the mask
    return lab


def test_raw_mode_is_skin_mouth_and_lips() -> None:
    lab = _label_map()
    mask = labels_to_mask(lab, "raw", 90, 90)
    np.testing.assert_array_equal(mask == 255, np.isin(lab, [SKIN, MOUTH, U_LIP, L_LIP]))


def test_jaw_mode_grows_the_centre_trims_the_cheeks_and_drops_the_nose() -> None:
    lab = _label_map()
    mask = labels_to_mask(lab, "jaw", 90, 90)
    assert set(np.unique(mask)) == {0, 255}
    assert (mask[lab == NOSE_LABEL] == 0).all()
    assert (mask[np.isin(lab, [MOUTH, U_LIP, L_LIP])] == 255).all()
    assert mask[148, 256] == 255 and lab[148, 256] == 0  # dilated above the skin in the central band
    assert mask[250, 121] == 0 and lab[250, 121] == SKIN  # eroded at the skin's side edge in a cheek band
    wide = labels_to_mask(lab, "jaw", 200, 200)  # no cheek bands inside the face: the side stays dilated
    assert wide[250, 121] == 255


def test_landmark_parser_covers_the_mouth_not_the_nose(dlib_detector: DlibDetector) -> None:
    lm = dlib_detector.detect(astronaut_bgr())
    assert lm is not None
    # put the face in a 512² crop, as prep does
    scale = 512 / 200
    crop_lm = (lm - np.array([122.0, 30.0])) * scale
    labels = landmark_labels(crop_lm, 512)
    mouth = crop_lm[48:60].mean(axis=0).astype(int)
    assert labels[mouth[1], mouth[0]] in (MOUTH, U_LIP)
    for mode in ("jaw", "raw"):
        mask = LandmarkParser(mode, 90, 90).parse(
            np.zeros((1, 512, 512, 3), np.uint8), crop_lm[None].astype(np.float32)
        )
        assert mask.shape == (1, 512, 512)
        assert mask[0, mouth[1], mouth[0]] == 255
        nose_tip = crop_lm[33].astype(int) - [0, 4]
        assert mask[0, nose_tip[1], nose_tip[0]] == 0


def test_bisenet_parser_applies_the_mode_to_its_labels(tiny_models_dir: Path) -> None:
    cfg = load_config(overrides=[f"models.dir={tiny_models_dir}", "prep.parsing_mode=raw"])
    parser = make_parser(cfg)
    assert isinstance(parser, BiSeNetParser)
    crops = np.random.default_rng(0).integers(0, 255, (2, 512, 512, 3), dtype=np.uint8)
    labels = parser.labels(crops)
    assert labels.shape == (2, 512, 512) and labels.min() >= 0 and labels.max() < 19
    masks = parser.parse(crops, np.zeros((2, 68, 2), np.float32))
    np.testing.assert_array_equal(masks[1], labels_to_mask(labels[1], "raw", 90, 90))
    # the network sees RGB, ImageNet-normalised: recompute the argmax by hand for one crop
    x = torch.from_numpy(crops[:1, :, :, ::-1].copy()).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        np.testing.assert_array_equal(parser.net(x).argmax(1).numpy()[0], labels[0])
