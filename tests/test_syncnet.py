"""SyncNet: the real checkpoint format through load_models, full-size parameter count, and LSE scoring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from musetalk.config import load_config
from musetalk.errors import WeightsInvalid, WeightsMissing
from musetalk.evaluation.sync import SyncNetScorer, log_mel, lower_face
from musetalk.models.bundle import load_models
from musetalk.models.syncnet import FULL_PARAMETERS, SyncNet, SyncNetShape, load_syncnet, write_syncnet
from musetalk.testing import TINY_SYNCNET


def test_full_size_parameter_count_matches_the_published_checkpoint() -> None:
    with torch.device("meta"):
        net = SyncNet()
    n = sum(p.numel() for p in net.parameters())
    assert n == FULL_PARAMETERS == 371_766_496
    # latentsync_syncnet.pt is listed at 1.49 GB (float32 pickle): 4 bytes per parameter plus pickle overhead.
    assert round(4 * n / 1e9, 2) == 1.49
    keys = set(net.state_dict())
    assert "audio_encoder.down_blocks.6.downsample_conv.weight" in keys
    assert "visual_encoder.down_blocks.1.conv_shortcut.weight" in keys and "visual_encoder.norm_out.bias" in keys
    assert not any("down_blocks.3.downsample_conv" in k and k.startswith("audio") for k in keys)  # stride 1 block


def test_tiny_checkpoint_loads_through_load_models(tiny_models_dir: Path) -> None:
    path = tiny_models_dir / "syncnet" / "latentsync_syncnet.pt"
    blob = torch.load(path, map_location="cpu", weights_only=True)
    assert set(blob) == {"state_dict", "global_step"}
    cfg = load_config(overrides=[f"models.dir={tiny_models_dir}", "runtime.device=cpu"])
    net = load_models(cfg, parts={"syncnet"}).syncnet
    assert net is not None and not net.training
    faces = torch.randn(2, 48, 128, 256)
    mel = torch.randn(2, 1, 80, 52)
    v, a = net.embed_faces(faces), net.embed_audio(mel)
    assert v.shape == a.shape == (2, 64)
    assert torch.allclose(v.norm(dim=1), torch.ones(2), atol=1e-5)
    assert net.visual_encoder(faces).shape[-2:] == net.audio_encoder(mel).shape[-2:] == (1, 1)


def test_bad_checkpoints_are_refused(tmp_path: Path) -> None:
    with pytest.raises(WeightsMissing):
        load_syncnet(tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsInvalid):
        load_syncnet(tmp_path / "junk.pt")
    state = SyncNet(TINY_SYNCNET).state_dict()
    del state["visual_encoder.down_blocks.7.conv2.weight"]
    torch.save({"state_dict": state}, tmp_path / "cut.pt")
    with pytest.raises(WeightsInvalid, match="down_blocks.7.conv2"):
        load_syncnet(tmp_path / "cut.pt")
    wide = write_syncnet(tmp_path / "wide.pt", SyncNetShape((32,) * 7, (64,) * 8))
    assert load_syncnet(wide).visual_encoder.norm_out.num_channels == 64  # widths come from the file


@pytest.mark.skipif(
    not (Path("models/syncnet/latentsync_syncnet.pt")).is_file(), reason="the real SyncNet is not downloaded here"
)
def test_real_checkpoint_has_the_full_parameter_count() -> None:
    net = load_syncnet(Path("models/syncnet/latentsync_syncnet.pt"))
    assert sum(p.numel() for p in net.parameters()) == FULL_PARAMETERS


def test_log_mel_frames_and_a_tone() -> None:
    t = np.arange(16000) / 16000
    tone = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    mel = log_mel(tone)
    assert mel.shape == (80, 81) and mel.min() >= -4 and mel.max() <= 4
    silent = log_mel(np.zeros(16000, np.float32))
    assert np.all(silent == -4.0)
    peak = int(np.argmax(mel[:, 40]))
    assert 25 <= peak <= 40  # 1 kHz sits in the lower-middle Slaney bands (55-7600 Hz over 80 bands)


def test_scorer_reports_lse_on_a_video(tiny_models_dir: Path) -> None:
    from musetalk.avatar.synthetic import astronaut_bgr
    from musetalk.faces.dlib_detector import DlibDetector

    photo = astronaut_bgr()
    lm = DlibDetector().detect(photo)
    assert lm is not None
    crop = lower_face(photo, lm)
    assert crop.shape == (3, 128, 256) and -1.0 <= crop.min() < crop.max() <= 1.0
    n = 40
    frames = [photo] * n
    landmarks = np.repeat(lm[None], n, axis=0)
    rng = np.random.default_rng(0)
    samples = (0.1 * rng.standard_normal(n * 640)).astype(np.float32)
    net = load_syncnet(tiny_models_dir / "syncnet" / "latentsync_syncnet.pt")
    result = SyncNetScorer(net).score(frames, landmarks, samples, 25.0)
    assert set(result) == {"lse_c", "lse_d", "offset_frames", "windows"}
    assert 0.0 <= result["lse_d"] <= 2.0 and result["lse_c"] >= 0.0 and -8 <= result["offset_frames"] <= 8
    assert result["windows"] == len(range(8, n - 16 - 8 + 1, 4))
    assert SyncNetScorer(net).score(frames[:20], landmarks[:20], samples, 25.0) == {}  # shorter than a window
