"""Benchmark the warm engine against an upstream-style baseline; prints a table and writes JSON.

GPU (one H100, full-size random-weight models, synthetic 1080p avatar, 5 s utterance at 25 fps):

    python bench/bench_engine.py --device cuda --out results/bench_engine_gpu.json

CPU (tiny models; what `make bench` runs):

    python bench/bench_engine.py --device cpu --size tiny --out results/bench_engine_cpu.json

Needs torch, av, soxr, soundfile, opencv and this repository (not diffusers / transformers); no network.
Steps, each timed: write random weights in the real on-disk formats (reused from --models-dir when
present), load them through load_models, build a synthetic avatar cache (latents = VAE encodings of its
crops), then
  1. generation throughput (UNet + VAE decode + copy to host) per variant and batch size:
     eager, CUDA graphs, CUDA graphs + channels_last;
  2. the engine end to end, `run()` (audio in → mp4 on disk) and `frames()` (streaming, no encoding):
     per-stage ms, frames/s, time to first blended frame, peak GPU memory;
  3. (CUDA, time allowed) torch.compile (`runtime.compile_modules`, default the VAE decoder) + CUDA
     graphs, in a child process with a timeout so a slow compile cannot sink the run: 1. and 2. again;
  4. the upstream-style baseline in the same process: eager fp16, batch 4, clip restarts at frame 0,
     one blending thread (PIL paste) writing PNGs, then `ffmpeg -f image2 … -crf 18` and a second
     ffmpeg muxing the audio (which re-encodes the video, as upstream's command does);
and reports total-time ratios. Everything stays under --budget-s (default 450 s): optional steps are
skipped, and said so in the JSON, when time runs short. `--set key=value` overrides the engine config
(e.g. `--set runtime.compile_modules=both`, `--set encode.segment_workers=1`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import platform
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from musetalk.avatar.cache import AvatarCache, cycle_index  # noqa: E402
from musetalk.config import AppConfig, load_config  # noqa: E402
from musetalk.models import ModelBundle, load_models  # noqa: E402
from musetalk.pipeline.audio import WHISPER_RATE_HZ, WindowSpec, audio_tokens, num_frames, resample  # noqa: E402
from musetalk.pipeline.encode import segment_workers  # noqa: E402
from musetalk.pipeline.generate import MuseTalkFaces  # noqa: E402
from musetalk.pipeline.synthetic import synthetic_avatar  # noqa: E402
from musetalk.types import Audio  # noqa: E402

TTS_RATE_HZ = 24000  # typical TTS output rate: the engine resamples it, as in production
BASELINE_RESERVE_S = 70  # kept for the baseline when deciding whether torch.compile still fits


# ---------------------------------------------------------------------------------------------- setup


class Budget:
    """Wall-clock budget for the whole run."""

    def __init__(self, seconds: float) -> None:
        self.t0 = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def ensure_models(models_dir: Path, size: str) -> float:
    """Write random weights in the real formats unless already there; returns seconds spent."""
    from musetalk.testing import write_models

    marker = models_dir / f".bench-{size}-complete"
    if marker.is_file():
        return 0.0
    t0 = time.perf_counter()
    write_models(models_dir, size, versions=("v15",))  # type: ignore[arg-type]
    marker.write_text("ok")
    return time.perf_counter() - t0


def speech_like(seconds: float, rate: int, seed: int = 0) -> Audio:
    """A voiced signal with syllable-rate loudness changes, never below the silence threshold."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.35 + 0.25 * np.sin(2 * np.pi * 4.0 * t) ** 2
    x = 0.25 * envelope * voiced + 0.01 * rng.standard_normal(len(t))
    return Audio(x.astype(np.float32), rate)


def make_cfg(args: argparse.Namespace, models_dir: Path, *extra: str) -> AppConfig:
    overrides = [
        f"models.dir={models_dir}",
        f"runtime.device={args.device}",
        f"batch_size={args.batch_size}",
        f"engine.blend_workers={args.blend_workers}",
        f"engine.output_dir={args.workdir / 'clips'}",
        "audio.silence_enabled=false",  # every frame generated: the worst case for speed
        *args.set,
        *extra,
    ]
    return load_config(overrides=overrides)


def set_memory_format(bundle: ModelBundle, channels_last: bool) -> None:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert bundle.unet is not None and bundle.vae is not None
    bundle.unet.to(memory_format=fmt)  # type: ignore[call-overload]  # torch's stubs omit memory_format
    bundle.vae.to(memory_format=fmt)  # type: ignore[call-overload]


# ------------------------------------------------------------------------------------ 1. generation


def bench_generation(
    bundle: ModelBundle,
    cfg: AppConfig,
    avatar: AvatarCache,
    samples_16k: np.ndarray,
    n_batches: int,
    source: MuseTalkFaces | None = None,
) -> dict[str, Any]:
    """Frames/s of UNet + decode + host copy at cfg.batch_size, two batches in flight (as the engine runs)."""
    device = bundle.device
    t0 = time.perf_counter()
    if source is None:
        set_memory_format(bundle, cfg.runtime.channels_last)
        reset_peak(device)
        source = MuseTalkFaces(bundle, cfg)
        source.warmup()
    setup_s = time.perf_counter() - t0
    size = cfg.batch_size
    n = num_frames(len(samples_16k), cfg.fps)
    job = source.start(avatar, samples_16k, n)
    try:
        ids = [list(range(i * size, (i + 1) * size)) for i in range(n_batches)]
        ids = [[f % n for f in b] for b in ids]
        srcs = [[cycle_index(f, avatar.n_frames) for f in b] for b in ids]
        job.submit(ids[0], srcs[0]).wait()  # one more warm batch inside a job
        sync(device)
        before = job.timings_ms()
        t1 = time.perf_counter()
        pending = []
        for b in range(n_batches):
            pending.append(job.submit(ids[b], srcs[b]))
            if len(pending) == 2:
                pending.pop(0).wait()
        for p in pending:
            p.wait()
        wall = time.perf_counter() - t1
        after = job.timings_ms()
    finally:
        job.close()
    frames = n_batches * size
    unet = (after["unet_ms"] - before["unet_ms"]) / n_batches
    vae = (after["vae_ms"] - before["vae_ms"]) / n_batches
    result = {
        "batch_size": size,
        "fps": frames / wall,
        "ms_per_batch": wall * 1000 / n_batches,
        "unet_ms_per_batch": unet,
        "vae_ms_per_batch": vae,
        "setup_s": setup_s,
        "peak_gpu_gb": peak_gb(device),
    }
    del job
    return result


# ----------------------------------------------------------------------------------- 2. our engine


def bench_engine(
    bundle: ModelBundle,
    cfg: AppConfig,
    avatar: AvatarCache,
    audio: Audio,
    repeats: int,
    workdir: Path,
    source: MuseTalkFaces | None = None,
) -> dict[str, Any]:
    """End to end through RealTimeInference: run() to an mp4, and frames() streaming."""
    from scripts.warm_api import RealTimeInference

    device = bundle.device
    t0 = time.perf_counter()
    if source is None:
        set_memory_format(bundle, cfg.runtime.channels_last)
        rti = RealTimeInference.from_config(cfg, [avatar], bundle=bundle)
    else:
        rti = RealTimeInference(cfg, source, [avatar])
    setup_s = time.perf_counter() - t0
    out: dict[str, Any] = {"setup_s": setup_s, "runs": [], "stream_runs": []}
    try:
        rti.run(audio, avatar, workdir / "warm.mp4")  # first call: thread pools, encoder, pinned memory
        reset_peak(device)
        cursor = 0
        for r in range(repeats):
            sync(device)
            t1 = time.perf_counter()
            clip, cursor = rti.run(audio, avatar, workdir / f"ours_{r}.mp4", cursor=cursor)
            wall = time.perf_counter() - t1
            timings = dict(clip.timings_ms)
            timings["wall_ms"] = wall * 1000
            out["runs"].append(timings)
        out["n_frames"] = clip.n_frames
        out["peak_gpu_gb"] = peak_gb(device)
        out["clip"] = str(clip.path)
        for _ in range(repeats):
            t1 = time.perf_counter()
            with rti.frames(audio, avatar) as stream:
                count = sum(1 for _ in stream)
            timings = dict(stream.timings_ms)
            timings["wall_ms"] = (time.perf_counter() - t1) * 1000
            timings["fps"] = count / (timings["wall_ms"] / 1000)
            out["stream_runs"].append(timings)
    finally:
        rti.close()
    del rti
    reset_peak(device)
    return out


def median_of(runs: list[dict[str, float]], key: str) -> float | None:
    values = [r[key] for r in runs if key in r]
    return float(np.median(values)) if values else None


# ------------------------------------------------------------------------------------- 3. baseline


def ffmpeg_binary() -> str | None:
    with contextlib.suppress(ImportError, RuntimeError):
        import imageio_ffmpeg

        return str(imageio_ffmpeg.get_ffmpeg_exe())
    return shutil.which("ffmpeg")


@dataclass
class UpstreamAvatar:
    """What upstream's realtime Avatar keeps: the 2N cycle of frames, int boxes, crop-size blurred masks."""

    frames: list[np.ndarray]
    coords: list[tuple[int, int, int, int]]
    masks: list[np.ndarray]
    crop_boxes: list[tuple[int, int, int, int]]
    latents: list[torch.Tensor]


def upstream_avatar(avatar: AvatarCache, bundle: ModelBundle) -> UpstreamAvatar:
    """Upstream's cached material from our synthetic cache; realtime blur 0.1·W."""
    assert avatar.latents is not None
    frames, coords, masks, crops, lats = [], [], [], [], []
    for p in range(2 * avatar.n_frames):
        i = cycle_index(p, avatar.n_frames)
        frame = np.asarray(avatar.frames[i])
        x1, y1, x2, y2 = (int(round(float(v))) for v in avatar.boxes[i])
        xc, yc = (x1 + x2) // 2, (y1 + y2) // 2
        s = int(max(x2 - x1, y2 - y1) // 2 * 1.5)
        crop = (xc - s, yc - s, xc + s, yc + s)
        canvas = np.zeros((2 * s, 2 * s), np.uint8)
        mx1, my1, mx2, my2 = (int(v) for v in avatar.mask_boxes[i])
        hard = avatar.masks[i]
        ox, oy = mx1 - crop[0], my1 - crop[1]
        cx1, cy1 = max(0, ox), max(0, oy)
        cx2, cy2 = min(2 * s, ox + (mx2 - mx1)), min(2 * s, oy + (my2 - my1))
        canvas[cy1:cy2, cx1:cx2] = hard[cy1 - oy : cy2 - oy, cx1 - ox : cx2 - ox]
        k = int(0.1 * (2 * s) // 2 * 2) + 1
        frames.append(frame)
        coords.append((x1, y1, x2, y2))
        masks.append(cv2.GaussianBlur(canvas, (k, k), 0))
        crops.append(crop)
        lats.append(avatar.latents[i : i + 1].to(bundle.device, bundle.dtype))
    return UpstreamAvatar(frames, coords, masks, crops, lats)


def _paste_pil(image: np.ndarray, face: np.ndarray, box: tuple[int, int, int, int], mask: np.ndarray,
               crop: tuple[int, int, int, int]) -> np.ndarray:
    """upstream get_image_blending (PIL; numpy with the same arithmetic where Pillow is missing)."""
    try:
        from PIL import Image
    except ImportError:
        return _paste_numpy(image, face, box, mask, crop)
    body = Image.fromarray(image[:, :, ::-1])
    face_img = Image.fromarray(face[:, :, ::-1])
    x, y, x1, y1 = box
    x_s, y_s, _, _ = crop
    face_large = body.crop(crop)
    mask_image = Image.fromarray(mask).convert("L")
    face_large.paste(face_img, (x - x_s, y - y_s, x1 - x_s, y1 - y_s))
    body.paste(face_large, crop[:2], mask_image)
    return np.array(body)[:, :, ::-1]


def _paste_numpy(image: np.ndarray, face: np.ndarray, box: tuple[int, int, int, int], mask: np.ndarray,
                 crop: tuple[int, int, int, int]) -> np.ndarray:
    out = image.copy()
    h, w = image.shape[:2]
    x, y, x1, y1 = box
    x_s, y_s, x_e, y_e = crop
    large = np.zeros((y_e - y_s, x_e - x_s, 3), np.uint8)
    sx1, sy1, sx2, sy2 = max(0, x_s), max(0, y_s), min(w, x_e), min(h, y_e)
    large[sy1 - y_s : sy2 - y_s, sx1 - x_s : sx2 - x_s] = image[sy1:sy2, sx1:sx2]
    large[y - y_s : y1 - y_s, x - x_s : x1 - x_s] = face
    m = mask[sy1 - y_s : sy2 - y_s, sx1 - x_s : sx2 - x_s, None].astype(np.uint16)
    src = large[sy1 - y_s : sy2 - y_s, sx1 - x_s : sx2 - x_s].astype(np.uint16)
    out[sy1:sy2, sx1:sx2] = ((src * m + out[sy1:sy2, sx1:sx2] * (255 - m) + 127) // 255).astype(np.uint8)
    return out


def bench_baseline(
    bundle: ModelBundle, cfg: AppConfig, up: UpstreamAvatar, audio: Audio, workdir: Path, run_id: int
) -> dict[str, float]:
    """Upstream realtime_inference.py Avatar.inference, with the same models, at batch 4 in eager fp16."""
    assert bundle.unet is not None and bundle.vae is not None and bundle.pe is not None
    assert bundle.whisper is not None and bundle.feature_extractor is not None
    ffmpeg = ffmpeg_binary()
    device = bundle.device
    tmp = workdir / f"baseline_{run_id}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    wav = tmp / "audio.wav"
    sf.write(str(wav), audio.samples, audio.sample_rate)  # upstream gets a wav path
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    samples, rate = sf.read(str(wav), dtype="float32")
    samples_16k = resample(Audio(samples, rate), WHISPER_RATE_HZ)
    with torch.inference_mode():
        chunks = audio_tokens(samples_16k, WindowSpec(cfg.fps), bundle.whisper, bundle.feature_extractor, bundle.pe)
        # audio_tokens adds PE already; upstream adds it per batch: same arithmetic, counted in the loop below.
        sync(device)
    timings["features_ms"] = (time.perf_counter() - t0) * 1000
    n = chunks.shape[0]
    res_queue: queue.Queue[np.ndarray] = queue.Queue()
    errors: list[BaseException] = []

    def process_frames() -> None:
        try:
            for idx in range(n):  # (upstream stops at n − 1, dropping the last frame; we keep it)
                face = res_queue.get(timeout=60)
                p = idx % len(up.frames)
                x1, y1, x2, y2 = up.coords[p]
                ori = up.frames[p].copy()
                face = cv2.resize(face.astype(np.uint8), (x2 - x1, y2 - y1))
                combined = _paste_pil(ori, face, up.coords[p], up.masks[p], up.crop_boxes[p])
                cv2.imwrite(str(tmp / f"{idx:08d}.png"), combined)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    worker = threading.Thread(target=process_frames)
    worker.start()
    timesteps = torch.tensor([0], device=device)
    t1 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, n, 4):
            idx = range(start, min(start + 4, n))
            latent_batch = torch.cat([up.latents[i % len(up.latents)] for i in idx]).to(bundle.dtype)
            feats = chunks[start : idx.stop]
            pred = bundle.unet(latent_batch, timesteps, feats)
            pred = pred.to(dtype=next(bundle.vae.parameters()).dtype)
            decoded = bundle.vae.decode((1 / bundle.vae_scale) * pred)
            decoded = (decoded / 2 + 0.5).clamp(0, 1)
            image = decoded.detach().cpu().permute(0, 2, 3, 1).float().numpy()
            image = (image * 255).round().astype("uint8")[..., ::-1]
            for face in image:
                res_queue.put(face)
    timings["generate_ms"] = (time.perf_counter() - t1) * 1000
    worker.join()
    if errors:
        raise errors[0]
    timings["blend_png_ms"] = (time.perf_counter() - t1) * 1000
    t2 = time.perf_counter()
    temp_mp4, out_mp4 = tmp / "temp.mp4", workdir / f"baseline_{run_id}.mp4"
    if ffmpeg is not None:
        subprocess.run([ffmpeg, "-y", "-v", "warning", "-r", str(cfg.fps), "-f", "image2", "-i",
                        str(tmp / "%08d.png"), "-vcodec", "libx264", "-vf", "format=yuv420p", "-crf", "18",
                        str(temp_mp4)], check=True)
        timings["ffmpeg_video_ms"] = (time.perf_counter() - t2) * 1000
        t3 = time.perf_counter()
        subprocess.run([ffmpeg, "-y", "-v", "warning", "-i", str(wav), "-i", str(temp_mp4), str(out_mp4)],
                       check=True)
        timings["ffmpeg_mux_ms"] = (time.perf_counter() - t3) * 1000
        timings["encoder"] = 1.0
    else:
        _pyav_encode_pngs(tmp, n, cfg.fps, temp_mp4)
        timings["ffmpeg_video_ms"] = (time.perf_counter() - t2) * 1000
        timings["encoder"] = 0.0
    timings["total_ms"] = (time.perf_counter() - t0) * 1000
    timings["n_frames"] = float(n)
    shutil.rmtree(tmp, ignore_errors=True)
    return timings


def _pyav_encode_pngs(folder: Path, n: int, fps: int, out: Path) -> None:
    """Fallback when no ffmpeg CLI exists: read the PNGs back and encode with libx264 crf 18 (medium)."""
    import av

    with av.open(str(out), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "18"})
        images = (np.asarray(cv2.imread(str(folder / f"{i:08d}.png")), dtype=np.uint8) for i in range(n))
        first = next(images)
        stream.height, stream.width = first.shape[:2]
        stream.pix_fmt = "yuv420p"
        for img in itertools.chain([first], images):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="bgr24")))
        container.mux(stream.encode(None))


# ------------------------------------------------------------------------------------------ driver


def variants_for(device: str) -> list[tuple[str, list[str]]]:
    if device == "cpu":
        return [("eager", ["runtime.cuda_graphs=false"])]
    return [
        ("eager", ["runtime.cuda_graphs=false", "runtime.channels_last=false"]),
        ("graphs", ["runtime.cuda_graphs=true", "runtime.channels_last=false"]),
        ("graphs+channels_last", ["runtime.cuda_graphs=true", "runtime.channels_last=true"]),
    ]


def run_compile_child(args: argparse.Namespace, models_dir: Path, timeout_s: float) -> dict[str, Any]:
    """torch.compile in a child process, so a slow compile cannot take the whole run down with it."""
    out = args.workdir / "compile.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--size", args.size,
           "--models-dir", str(models_dir), "--out", str(out), "--only-compile", "--batch-size", str(args.batch_size),
           "--gen-batch-sizes", ",".join(map(str, args.gen_batch_sizes)), "--repeats", "1",
           "--blend-workers", str(args.blend_workers), "--height", str(args.height), "--width", str(args.width),
           "--seconds", str(args.seconds), "--avatar-frames", str(args.avatar_frames),
           "--workdir", str(args.workdir / "compile")]
    for s in args.set:
        cmd += ["--set", s]
    log(f"torch.compile variant in a child process (timeout {timeout_s:.0f} s)")
    try:
        subprocess.run(cmd, check=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout_s:.0f} s"}
    except subprocess.CalledProcessError as exc:
        return {"skipped": f"child failed with exit code {exc.returncode}"}
    data = json.loads(out.read_text())
    return dict(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=("full", "tiny"), default=None, help="default: full on cuda, tiny on cpu")
    parser.add_argument("--out", type=Path, required=True, help="JSON results file")
    parser.add_argument("--models-dir", type=Path, default=None, help="default: results/bench_models/<size>")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--seconds", type=float, default=5.0, help="utterance length")
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--avatar-frames", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16, help="engine batch size")
    parser.add_argument("--gen-batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=None)
    parser.add_argument("--blend-workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gen-batches", type=int, default=8, help="batches per generation measurement")
    parser.add_argument("--budget-s", type=float, default=450.0)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--only-compile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args(argv)
    args.size = args.size or ("full" if args.device.startswith("cuda") else "tiny")
    if args.gen_batch_sizes is None:
        args.gen_batch_sizes = [16, 32, 64] if args.device.startswith("cuda") else [16]
    budget = Budget(args.budget_s)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    owned_tmp = None
    if args.workdir is None:
        owned_tmp = tempfile.mkdtemp(prefix="bench_engine_")
        args.workdir = Path(owned_tmp)
    args.workdir.mkdir(parents=True, exist_ok=True)
    models_dir = args.models_dir or ROOT / "results" / "bench_models" / args.size
    results: dict[str, Any] = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "device": args.device,
            "device_name": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else cpu_name(),
            "cpu_name": cpu_name(),
            "load_avg_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "size": args.size,
            "frame_px": [args.width, args.height],
            "seconds": args.seconds,
            "avatar_frames": args.avatar_frames,
            "batch_size": args.batch_size,
            "blend_workers": args.blend_workers,
            "x264_segment_workers": segment_workers(load_config(overrides=args.set).encode),
        },
        "skipped": [],
    }
    try:
        run(args, models_dir, budget, results)
    finally:
        results["meta"]["bench_wall_s"] = budget.elapsed()
        results["meta"]["load_avg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=float))
        if owned_tmp:
            shutil.rmtree(owned_tmp, ignore_errors=True)
    if not args.only_compile:
        print_table(results)
        log(f"wrote {args.out}")
    return 0


def run(args: argparse.Namespace, models_dir: Path, budget: Budget, results: dict[str, Any]) -> None:
    device = torch.device(args.device)
    if not args.only_compile:
        log(f"models ({args.size}) in {models_dir}")
        results["setup"] = {"write_models_s": ensure_models(models_dir, args.size)}
    # Compiled: one batch shape only (the first batch is full size too): each shape compiles anew (~minutes).
    base_extra = (["runtime.compile=true", "runtime.cuda_graphs=true", f"engine.first_batch_size={args.batch_size}"]
                  if args.only_compile else [])
    cfg = make_cfg(args, models_dir, *base_extra)
    t0 = time.perf_counter()
    bundle = load_models(cfg)
    results.setdefault("setup", {})["load_models_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    avatar = synthetic_avatar(n_frames=args.avatar_frames, height=args.height, width=args.width,
                              vae=bundle.vae, vae_scale=bundle.vae_scale, avatar_id="bench")
    results["setup"]["avatar_s"] = time.perf_counter() - t0
    audio = speech_like(args.seconds, TTS_RATE_HZ)
    samples_16k = resample(audio)
    log(f"setup done at {budget.elapsed():.0f} s: {args.width}x{args.height} avatar, {args.seconds} s audio")

    if args.only_compile:
        # One compiled source (batch shapes: first batch and engine batch) for both measurements:
        # every new module instance or shape would compile again.
        t0 = time.perf_counter()
        source = MuseTalkFaces(bundle, cfg)
        source.warmup()
        compile_s = time.perf_counter() - t0
        log(f"compiled + captured in {compile_s:.0f} s")
        gen = bench_generation(bundle, cfg, avatar, samples_16k, args.gen_batches, source)
        gen["setup_s"] = compile_s
        label = f"compile-{cfg.runtime.compile_modules}+graphs/bs{args.batch_size}"
        results["generation"] = {label: gen}
        log(f"{label}: {gen['fps']:.0f} fps")
        results["engine"] = {label: bench_engine(bundle, cfg, avatar, audio, args.repeats, args.workdir, source)}
        return

    # 1. generation throughput
    results["generation"] = {}
    for name, extra in variants_for(args.device):
        # The largest batch only for plain graphs: it is the most likely to pay, and time is short.
        sizes = args.gen_batch_sizes if name == "graphs" else args.gen_batch_sizes[:2]
        for bs in sizes:
            if budget.left() < BASELINE_RESERVE_S + 90:  # keep time for the engine runs and the baseline
                results["skipped"].append(f"generation {name}/bs{bs}: budget")
                continue
            c = make_cfg(args, models_dir, *extra, f"batch_size={bs}")
            try:
                r = bench_generation(bundle, c, avatar, samples_16k, args.gen_batches)
            except Exception as exc:  # report and go on: one variant must not sink the run
                results["generation"][f"{name}/bs{bs}"] = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"generation {name} bs {bs} failed: {exc}")
                continue
            results["generation"][f"{name}/bs{bs}"] = r
            log(f"generation {name} bs {bs}: {r['fps']:.0f} fps ({r['ms_per_batch']:.1f} ms/batch)")

    # 2. engine end to end: eager at the engine batch size, the fastest non-compiled variant at that batch
    #    size, and the fastest (variant, batch size) overall
    variants = dict(variants_for(args.device))
    gen = results["generation"]
    fps = {(n, bs): gen.get(f"{n}/bs{bs}", {}).get("fps", 0.0) for n in variants for bs in args.gen_batch_sizes}
    best_at_bs = max(variants, key=lambda n: fps.get((n, args.batch_size), 0.0))
    best_any = max(fps, key=lambda k: fps[k]) if fps else (best_at_bs, args.batch_size)
    runs_wanted = [(next(iter(variants)), args.batch_size), (best_at_bs, args.batch_size), best_any]
    results["engine"] = {}
    for name, bs in dict.fromkeys(runs_wanted):
        label = f"{name}/bs{bs}"
        if budget.left() < BASELINE_RESERVE_S + 30:
            results["skipped"].append(f"engine {label}: budget")
            continue
        try:
            c = make_cfg(args, models_dir, *variants[name], f"batch_size={bs}")
            results["engine"][label] = bench_engine(bundle, c, avatar, audio, args.repeats, args.workdir)
        except Exception as exc:
            results["engine"][label] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"engine {label} failed: {exc}")
            continue
        eng = results["engine"][label]
        log(f"engine {label}: total {median_of(eng['runs'], 'total_ms'):.0f} ms, "
            f"first frame {median_of(eng['stream_runs'], 'first_frame_ms'):.0f} ms")

    # 3. torch.compile in a child process, if it can still fit (keeping time for the baseline)
    if args.device.startswith("cuda") and not args.no_compile:
        left = budget.left() - BASELINE_RESERVE_S
        if left < 120:
            results["skipped"].append(f"compile: only {left:.0f} s left")
        else:
            reset_peak(device)
            child = run_compile_child(args, models_dir, left)
            results["generation"].update(child.get("generation", {}))
            results["engine"].update(child.get("engine", {}))
            if "skipped" in child and isinstance(child["skipped"], str):
                results["skipped"].append(f"compile: {child['skipped']}")

    # 4. upstream-style baseline (same process, same models and avatar)
    if not args.no_baseline:
        results["baseline"] = {"runs": [], "ffmpeg": ffmpeg_binary() or "none: PyAV fallback (no mux step)"}
        try:
            up = upstream_avatar(avatar, bundle)
            set_memory_format(bundle, False)
            bench_baseline(bundle, cfg, up, audio, args.workdir, -1)  # warm-up (cuDNN, allocator, PNG codec)
            for run_id in range(max(1, args.repeats - 1)):
                if budget.left() < 15:
                    results["skipped"].append(f"baseline run {run_id}: budget")
                    break
                results["baseline"]["runs"].append(bench_baseline(bundle, cfg, up, audio, args.workdir, run_id))
                log(f"baseline run {run_id}: {results['baseline']['runs'][-1]['total_ms']:.0f} ms")
            del up
        except Exception as exc:
            results["baseline"]["error"] = f"{type(exc).__name__}: {exc}"
            log(f"baseline failed: {exc}")

    summarise(results)


def summarise(results: dict[str, Any]) -> None:
    """Ratios and targets (issue 4) from the medians."""
    summary: dict[str, Any] = {}
    base = median_of(results.get("baseline", {}).get("runs", []), "total_ms")
    summary["baseline_total_ms"] = base
    for name, eng in results.get("engine", {}).items():
        if "runs" not in eng:
            continue
        total = median_of(eng["runs"], "total_ms")
        first = median_of(eng["stream_runs"], "first_frame_ms")
        summary[name] = {
            "total_ms": total,
            "speedup_vs_baseline": (base / total) if base and total else None,
            "first_frame_ms": first,
            "first_frame_ms_in_run": median_of(eng["runs"], "first_frame_ms"),
            "stream_fps": median_of(eng["stream_runs"], "fps"),
            "target_4x": bool(base and total and base / total >= 4),
            "target_first_frame_150ms": bool(first is not None and first <= 150),
        }
    gen = {k: v["fps"] for k, v in results.get("generation", {}).items() if "fps" in v}
    if gen:
        best = max(gen, key=lambda k: gen[k])
        summary["best_generation"] = {"variant": best, "fps": gen[best], "target_300fps": gen[best] >= 300}
    results["summary"] = summary


def _fmt(v: float | None, digits: int = 0) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def print_table(results: dict[str, Any]) -> None:
    meta = results["meta"]
    print(f"\n== bench_engine: {meta['device_name']} ({meta['device']}, {meta['cpu_count']} CPUs: {meta['cpu_name']}), "
          f"{meta['size']} models, {meta['frame_px'][0]}x{meta['frame_px'][1]} avatar, {meta['seconds']} s audio, "
          f"{meta['date']}, load avg {meta.get('load_avg_start')} → {meta.get('load_avg_end')}")
    print("\n-- generation (UNet + VAE decode + copy to host, 2 batches in flight)")
    print(f"{'variant':28s} {'batch':>5s} {'fps':>7s} {'ms/batch':>9s} {'unet ms':>8s} {'vae ms':>8s} {'peak GB':>8s}")
    for name, r in results.get("generation", {}).items():
        if "fps" not in r:
            print(f"{name:28s} error: {r.get('error')}")
            continue
        print(f"{name:28s} {r['batch_size']:5d} {r['fps']:7.0f} {r['ms_per_batch']:9.1f} "
              f"{r['unet_ms_per_batch']:8.1f} {r['vae_ms_per_batch']:8.1f} {_fmt(r['peak_gpu_gb'], 2):>8s}")
    print("\n-- end to end, medians (ms; unet/vae = summed GPU time, blend = summed CPU time over workers)")
    cols = ["total_ms", "first_frame_ms", "audio_ms", "features_ms", "unet_ms", "vae_ms", "blend_ms", "encode_ms",
            "fps"]
    print(f"{'mode':34s} " + " ".join(f"{c.removesuffix('_ms'):>9s}" for c in cols) + f" {'peak GB':>8s}")
    for name, eng in results.get("engine", {}).items():
        if "runs" not in eng:
            print(f"{name:34s} error: {eng.get('error')}")
            continue
        for label, runs in ((f"{name} run() → mp4", eng["runs"]), (f"{name} frames() stream", eng["stream_runs"])):
            print(f"{label:34s} " + " ".join(f"{_fmt(median_of(runs, c)):>9s}" for c in cols)
                  + f" {_fmt(eng.get('peak_gpu_gb'), 2):>8s}")
    base = results.get("baseline", {}).get("runs", [])
    if base:
        cols_b = ["total_ms", "features_ms", "generate_ms", "blend_png_ms", "ffmpeg_video_ms", "ffmpeg_mux_ms"]
        print("\n-- upstream-style baseline (eager fp16, batch 4, PNG frames + ffmpeg), medians (ms)")
        print(" ".join(f"{c.removesuffix('_ms'):>14s}" for c in cols_b))
        print(" ".join(f"{_fmt(median_of(base, c)):>14s}" for c in cols_b))
    print("\n-- summary")
    print(json.dumps(results.get("summary", {}), indent=2, default=float))
    if results.get("skipped"):
        print("skipped:", "; ".join(results["skipped"]))


if __name__ == "__main__":
    sys.exit(main())
