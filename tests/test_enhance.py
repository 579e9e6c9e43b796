"""GFPGAN network + enhance.py: real checkpoint format, real video/audio I/O, tiny weights."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch

from musetalk.avatar.synthetic import astronaut_bgr, render_frame, smooth_path
from musetalk.config import PROJECT_ROOT, load_config
from musetalk.enhance.align import TEMPLATE_512, face_to_template, five_points, paste_back, similarity, template_mask
from musetalk.enhance.restore import DetailSmoother, mouth_flicker
from musetalk.errors import WeightsInvalid
from musetalk.models import load_models
from musetalk.models.gfpgan import GFPGANSpec, GFPGANv1Clean, load_gfpgan, parameter_count
from musetalk.testing import TINY_GFPGAN_SPEC, write_gfpgan

N_FACELESS, N_FACE = 3, 5


def _talking_video(path: Path, fps: int = 25, size_hw: tuple[int, int] = (200, 200), rate: int = 48000) -> Path:
    """Noise frames (no face) then the astronaut moving, with an AAC tone track."""
    photo = astronaut_bgr()
    h, w = size_hw
    rng = np.random.default_rng(0)
    offsets = smooth_path(N_FACE, fps, (6.0, 3.0), (0.5, 0.3))
    n = N_FACELESS + N_FACE
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.options = {"crf": "18", "preset": "veryfast"}
        a = c.add_stream("aac", rate=rate, layout="mono")
        t = np.arange(int(n / fps * rate)) / rate
        pcm = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
        af = av.AudioFrame.from_ndarray(pcm[None], format="fltp", layout="mono")
        af.sample_rate, af.pts = rate, 0
        for p in [*a.encode(af), *a.encode(None)]:
            c.mux(p)
        for i in range(n):
            if i < N_FACELESS:
                img = np.asarray(
                    cv2.resize(rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8), (w, h)), dtype=np.uint8
                )
            else:
                img = render_frame(photo, size_hw, offsets[i - N_FACELESS], 0.0, 0.55)
            c.mux(vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="bgr24")))
        c.mux(vs.encode(None))
    return path


def _audio_bytes(path: Path) -> bytes:
    with av.open(str(path)) as c:
        return b"".join(bytes(p) for p in c.demux(c.streams.audio[0]) if p.size)


def _yuv_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="yuv420p") for f in c.decode(video=0)]


def _video_info(path: Path) -> tuple[int, Fraction, float]:
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        n = sum(1 for _ in c.decode(video=0))
        assert v.average_rate is not None and v.duration is not None and v.time_base is not None
        return n, Fraction(v.average_rate), float(v.duration * v.time_base)


def test_full_size_network_has_the_published_parameter_count() -> None:
    # Instantiating the upstream class GFPGANv1Clean(out_size=512, channel_multiplier=2, ...) counts 86,444,252.
    assert parameter_count(GFPGANSpec()) == 86_444_252


def test_tiny_checkpoint_loads_through_load_models(tiny_models_dir: Path) -> None:
    cfg = load_config(overrides=[f"models.dir={tiny_models_dir}", "runtime.device=cpu"])
    bundle = load_models(cfg, parts={"gfpgan"})
    assert bundle.gfpgan is not None and bundle.unet is None
    assert bundle.gfpgan.spec == TINY_GFPGAN_SPEC
    file_state = torch.load(tiny_models_dir / "gfpgan" / "GFPGANv1.4.pth", weights_only=True)["params_ema"]
    own = bundle.gfpgan.state_dict()
    assert set(own) == set(file_state)
    assert all(torch.equal(own[k], file_state[k]) for k in own)
    out = bundle.gfpgan(torch.rand(2, 3, 512, 512) * 2 - 1)
    assert tuple(out.shape) == (2, 3, 512, 512) and torch.isfinite(out).all()
    # Fixed noise: the output is a function of the input alone.
    x = torch.rand(1, 3, 512, 512)
    assert torch.equal(bundle.gfpgan(x), bundle.gfpgan(x))


def test_checkpoint_with_wrong_keys_is_rejected(tmp_path: Path) -> None:
    path = write_gfpgan(tmp_path / "g.pth")
    state = torch.load(path, weights_only=True)["params_ema"]
    state.pop("final_linear.bias")
    torch.save({"params_ema": state}, path)
    with pytest.raises(WeightsInvalid, match="final_linear.bias"):
        load_gfpgan(path)
    torch.save({"model": state}, path)
    with pytest.raises(WeightsInvalid, match="params_ema"):
        load_gfpgan(path)


def test_alignment_maps_five_points_onto_the_template() -> None:
    rot = np.array([[0.8, -0.3], [0.3, 0.8]])
    lm = np.zeros((68, 2))
    pts = TEMPLATE_512 @ rot.T + (40, 25)
    lm[36:42], lm[42:48], lm[30], lm[48], lm[54] = pts[0], pts[1], pts[2], pts[3], pts[4]
    assert np.allclose(five_points(lm), pts)
    m = face_to_template(lm)
    assert np.allclose(pts @ m[:, :2].T + m[:, 2], TEMPLATE_512, atol=1e-6)
    assert np.allclose(similarity(TEMPLATE_512, TEMPLATE_512), np.hstack([np.eye(2), np.zeros((2, 1))]), atol=1e-9)


def test_paste_back_touches_only_the_face_region() -> None:
    frame = np.random.default_rng(1).integers(0, 255, (600, 800, 3), dtype=np.uint8)
    m = np.array([[2.0, 0.0, -300.0], [0.0, 2.0, -200.0]])  # face crop covers frame x 150..406, y 100..356
    restored = np.full((512, 512, 3), 255, np.uint8)
    out = paste_back(frame, restored, m, template_mask(), 1.0)
    changed = np.any(out != frame, axis=2)
    ys, xs = np.nonzero(changed)
    assert xs.min() >= 150 and xs.max() <= 407 and ys.min() >= 100 and ys.max() <= 357
    assert np.all(out[228, 278] == 255)  # crop centre fully restored
    assert np.array_equal(paste_back(frame, restored, m, template_mask(), 0.0), frame)


def test_detail_smoother_holds_still_regions_and_follows_motion() -> None:
    torch.manual_seed(0)
    src = torch.full((3, 64, 64), 0.5)
    smoother = DetailSmoother(tau=12.0, min_follow=0.2, blur_px=3)
    outs = [smoother.step(src, src + 0.1 * torch.randn(3, 64, 64)) for _ in range(30)]
    still_flicker = float(np.mean([(a - b).abs().mean() for a, b in zip(outs[10:], outs[11:], strict=False)]))
    raw_flicker = 0.1 * np.sqrt(2) * np.sqrt(2 / np.pi)  # mean |N(0, 0.1²) − N(0, 0.1²)|
    assert still_flicker < 0.5 * raw_flicker
    moved = src.clone()
    moved[:, :, 32:] = 1.0  # the right half changes by 127 grey levels: new detail is taken in full
    target = moved.clone()
    target[:, :, 32:] = 0.8
    out = smoother.step(moved, target)
    assert torch.allclose(out[:, 8:-8, 40:], target[:, 8:-8, 40:], atol=1e-6)


def test_mouth_flicker_measures_added_change() -> None:
    rng = np.random.default_rng(0)
    src = [rng.integers(0, 255, (40, 40, 3), dtype=np.uint8) for _ in range(5)]
    box = (10, 10, 30, 30)
    same = mouth_flicker(src, src, [box] * 5)
    assert same["added"] == 0 and same["source_td"] == same["output_td"] > 0 and same["pairs"] == 4
    brighter = [np.clip(s.astype(int) + 5 * (i % 2), 0, 255).astype(np.uint8) for i, s in enumerate(src)]
    assert mouth_flicker(src, brighter, [box] * 5)["added"] > 3


@pytest.mark.slow
def test_enhance_keeps_frames_duration_audio_and_faceless_frames(tiny_models_dir: Path, tmp_path: Path) -> None:
    src = _talking_video(tmp_path / "talk.mp4")
    dst = tmp_path / "out" / "talk_hd.mp4"
    cmd = [
        sys.executable, str(PROJECT_ROOT / "enhance.py"), "--input", str(src), "--output", str(dst), "--quiet",
        "--weight", "1", "--set", f"models.dir={tiny_models_dir}", "--set", "runtime.device=cpu",
        "--set", "encode.crf=0",  # lossless: untouched frames must decode to the very same pixels
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"{N_FACE} with a face restored" in proc.stdout and "mouth flicker" in proc.stdout
    assert not list(dst.parent.glob(".*tmp*"))
    n_in, fps_in, dur_in = _video_info(src)
    n_out, fps_out, dur_out = _video_info(dst)
    assert (n_out, fps_out) == (n_in, fps_in) == (N_FACELESS + N_FACE, 25)
    assert dur_out == pytest.approx(dur_in, abs=1e-3)
    assert _audio_bytes(dst) == _audio_bytes(src) and len(_audio_bytes(src)) > 0
    yuv_in, yuv_out = _yuv_frames(src), _yuv_frames(dst)
    for i in range(N_FACELESS):
        assert np.array_equal(yuv_out[i], yuv_in[i]), f"faceless frame {i} changed"
    # Random tiny weights turn the face into something else: the face frames must have changed.
    assert all(np.abs(yuv_out[i].astype(int) - yuv_in[i]).mean() > 1 for i in range(N_FACELESS, n_in))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["missing", "empty", "no_frames"])
def test_missing_or_empty_input_exits_2(kind: str, tmp_path: Path) -> None:
    src = tmp_path / "in.mp4"
    if kind == "empty":
        src.write_bytes(b"")
    elif kind == "no_frames":
        with av.open(str(src), "w") as c:  # a valid MP4 with an audio stream and no video
            a = c.add_stream("aac", rate=48000, layout="mono")
            af = av.AudioFrame.from_ndarray(np.zeros((1, 4800), np.float32), format="fltp", layout="mono")
            af.sample_rate, af.pts = 48000, 0
            for p in [*a.encode(af), *a.encode(None)]:
                c.mux(p)
    cmd = [sys.executable, str(PROJECT_ROOT / "enhance.py"), "--input", str(src), "--output", str(tmp_path / "o.mp4")]
    # Checked before any weights are needed: an empty models folder must not matter.
    cmd += ["--set", f"models.dir={tmp_path / 'none'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Input video not found or empty" in proc.stderr
    assert not (tmp_path / "o.mp4").exists()


def test_network_output_depends_on_the_input() -> None:
    torch.manual_seed(0)
    net = GFPGANv1Clean(TINY_GFPGAN_SPEC).eval()
    with torch.no_grad():
        a, b = net(torch.zeros(1, 3, 512, 512)), net(torch.ones(1, 3, 512, 512))
    assert not torch.allclose(a, b)


@pytest.mark.slow
def test_parallel_stages_give_the_same_video_as_one_thread(tiny_models_dir: Path, tmp_path: Path) -> None:
    from musetalk.enhance.restore import FaceRestorer
    from musetalk.enhance.video import enhance_video
    from musetalk.faces.base import FaceDetector
    from musetalk.faces.dlib_detector import DlibDetector

    src = _talking_video(tmp_path / "talk.mp4")
    outputs = []
    for workers in (1, 3):
        overrides = [f"models.dir={tiny_models_dir}", "runtime.device=cpu", "encode.crf=0", "enhance.batch_size=4",
                     f"enhance.workers={workers}", "prep.detector=dlib"]  # fmt: skip
        cfg = load_config(overrides=overrides)
        bundle = load_models(cfg, parts={"gfpgan"})
        assert bundle.gfpgan is not None
        made: list[FaceDetector] = []
        first = DlibDetector()

        def more(made: list[FaceDetector] = made, first: DlibDetector = first) -> FaceDetector:
            made.append(first.sibling())
            return made[-1]

        res = enhance_video(cfg, FaceRestorer(bundle.gfpgan, 4), first, src, tmp_path / f"w{workers}.mp4",
                            weight=1.0, progress=False, more_detectors=more)  # fmt: skip
        assert res.n_faces == N_FACE and len(made) == workers - 1  # a detector of its own per extra thread
        outputs.append(_yuv_frames(tmp_path / f"w{workers}.mp4"))
    assert len(outputs[0]) == len(outputs[1]) == N_FACELESS + N_FACE
    for i, (a, b) in enumerate(zip(*outputs, strict=True)):
        assert np.array_equal(a, b), f"frame {i} differs between 1 and 3 threads"
