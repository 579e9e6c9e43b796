"""GPU stage probe: where the audio-feature time goes, and the GPU stages of avatar prep.

1. Audio features of a 5 s utterance (full-size Whisper-tiny, fp16): feature extractor (CPU numpy vs
   torch on the GPU), encoder, windowing — each timed with a CUDA sync.
2. Prep stages that run on the GPU (the CPU stages are in bench_prep on the CI machine): VAE latents
   (`encode_crops`, 2 encodes per frame) and BiSeNet parsing at 512², frames/s by batch size.

    python -m bench.gpu_stages --models /tmp/full_models --out results/gpu_stages.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from musetalk.avatar.latents import encode_crops
from musetalk.config import load_config
from musetalk.faces.parsing import BiSeNetParser
from musetalk.models import load_models
from musetalk.pipeline.audio import WindowSpec, audio_tokens, frame_windows, whisper_hidden_states
from musetalk.testing import write_models


def _timed(fn: Any, reps: int = 5) -> tuple[float, Any]:
    out = None
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    return sorted(times)[len(times) // 2], out


def main() -> None:
    """Run both probes; print a table and write JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="/tmp/full_models")
    parser.add_argument("--out", default="results/gpu_stages.json")
    args = parser.parse_args()
    models = Path(args.models)
    if not (models / "musetalkV15" / "unet.pth").exists():
        write_models(models, "full", versions=("v15",))
    cfg = load_config(overrides=[f"models.dir={models}", "runtime.device=cuda"])
    bundle = load_models(cfg, parts={"unet", "vae", "whisper", "face_parser"})
    res: dict[str, Any] = {"device": torch.cuda.get_device_name()}
    assert bundle.whisper is not None and bundle.feature_extractor is not None and bundle.pe is not None
    enc, ext, pe = bundle.whisper, bundle.feature_extractor, bundle.pe

    rng = np.random.default_rng(0)
    samples = (0.1 * rng.standard_normal(5 * 16000)).astype(np.float32)
    padded = np.zeros(480000, np.float32)
    padded[: len(samples)] = samples
    spec = WindowSpec(fps=25, pad_left=2, pad_right=2)
    _timed(lambda: audio_tokens(samples, spec, enc, ext, pe), 3)  # warm-up
    rows = {
        "extractor_cpu_ms": _timed(lambda: ext(padded, sampling_rate=16000, return_tensors="pt", device="cpu"))[0],
        "extractor_cuda_ms": _timed(lambda: ext(padded, sampling_rate=16000, return_tensors="pt", device="cuda"))[0],
    }
    mel = ext(padded, sampling_rate=16000, return_tensors="pt", device="cuda").input_features.to("cuda", bundle.dtype)
    with torch.inference_mode():
        rows["encoder_ms"] = _timed(lambda: enc(mel, output_hidden_states=True))[0]
        rows["hidden_states_total_ms"], hidden = _timed(lambda: whisper_hidden_states(samples, enc, ext))
        rows["windows_ms"] = _timed(lambda: pe(frame_windows(hidden, len(samples), spec)))[0]
    rows["audio_tokens_total_ms"] = _timed(lambda: audio_tokens(samples, spec, enc, ext, pe))[0]
    res["audio_features_5s"] = rows
    print(json.dumps(rows))

    assert bundle.vae is not None and bundle.face_parser is not None
    parse = BiSeNetParser(bundle.face_parser, "jaw", 90, 90)
    prep_rows = []
    for b in (8, 32):
        crops = rng.integers(0, 255, (b, 256, 256, 3), dtype=np.uint8)
        big = rng.integers(0, 255, (b, 512, 512, 3), dtype=np.uint8)
        lat_ms = _timed(lambda crops=crops: encode_crops(bundle.vae, crops, bundle.vae_scale, bundle.device,
                                                          bundle.dtype), 3)[0]
        lab_ms = _timed(lambda big=big: parse.labels(big), 3)[0]
        lms = np.zeros((b, 68, 2), np.float32)
        mask_ms = _timed(lambda big=big, lms=lms: parse.parse(big, lms), 3)[0]
        row = {"batch": b, "latents_fps": b / lat_ms * 1000, "bisenet_labels_fps": b / lab_ms * 1000,
               "bisenet_masks_fps": b / mask_ms * 1000}
        prep_rows.append(row)
        print(json.dumps(row))
    res["prep_gpu_stages"] = prep_rows
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
