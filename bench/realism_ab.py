"""A/B the realism options on the preview renderer with the evaluator's figures.

    python -m bench.realism_ab [--video data/video/demo.mp4] [--json results/realism_ab.json]

Prepares the demo video (dlib, landmark parser, no weights) into a temporary cache for each mask option,
renders the same three espeak-ng sentences one by one (each clip continuing the avatar cursor, as a
session does) under each configuration, and scores the joined frames + audio with
musetalk.evaluation.report.evaluate_media. `prep.reference_frame` changes MuseTalk's UNet input only: the
preview renderer ignores latents, so it is not in this table (A/B it on a GPU with real weights).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from musetalk.avatar import load_avatar, prepare_avatar
from musetalk.config import load_config, project_path
from musetalk.evaluation.report import Media, evaluate_media
from musetalk.faces.dlib_detector import DlibDetector
from musetalk.pipeline.audio import WHISPER_RATE_HZ, resample
from musetalk.pipeline.engine import Engine
from musetalk.render.preview import PreviewFaces
from musetalk.tts.espeak import EspeakTTS

SENTENCES = (
    "Hello! I am the demo avatar of the MuseTalk warm server.",
    "Every sentence you send is appended to one continuous video of our conversation.",
    "My mouth follows the sound of each word, and it stays on my face from the first frame to the last.",
)
# name → (config overrides, render each sentence with the previous one as left context)
VARIANTS: dict[str, tuple[list[str], bool]] = {
    "default": ([], False),
    "blend.temporal_smoothing=0.5": (["blend.temporal_smoothing=0.5"], False),
    "prep.parsing_mode=raw_nose": (["prep.parsing_mode=raw_nose"], False),
    "prep.keep_upper_lip=true": (["prep.keep_upper_lip=true"], False),
    "left_context_16k (previous sentence)": ([], True),
}
KEYS = ("av_offset_frames", "mouth_audio_corr", "silence_mouth_closed_ratio", "box_jitter_px", "seam_flicker")


def run_variant(video: Path, cache_dir: Path, overrides: list[str], context: bool) -> dict[str, Any]:
    """Prepare (or reuse) the avatar for these overrides, render the sentences, return the evaluator's figures."""
    cfg = load_config(
        overrides=[
            "runtime.device=cpu", "prep.detector=dlib", "prep.parser=landmarks", f"prep.cache_dir={cache_dir}",
            "avatar_id=demo", *overrides,
        ]
    )  # fmt: skip
    prepare_avatar(cfg, video=video)
    cache = load_avatar(cfg, "demo")
    tts = EspeakTTS(cfg.tts)
    engine = Engine(cfg, PreviewFaces(cfg.fps, cfg.batch_size))
    frames: list[np.ndarray] = []
    samples: list[np.ndarray] = []
    cursor = 0
    previous: np.ndarray | None = None
    try:
        for text in SENTENCES:
            audio = tts.synthesize(text)
            with engine.frames(audio, cache, cursor, left_context_16k=previous if context else None) as stream:
                frames.extend(stream)
                cursor = stream.next_cursor
                n = stream.n_frames
            clip_16k = resample(audio, WHISPER_RATE_HZ)
            samples.append(clip_16k[: n * WHISPER_RATE_HZ // cfg.fps])  # the audio the clip's frames cover
            previous = clip_16k
    finally:
        engine.close()
    return evaluate_media(Media(frames, float(cfg.fps), np.concatenate(samples)), DlibDetector())


def main(argv: list[str] | None = None) -> int:
    """Print the A/B table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", type=Path, default=Path("data/video/demo.mp4"))
    parser.add_argument("--json", type=Path, default=Path("results/realism_ab.json"))
    args = parser.parse_args(argv)
    video = project_path(args.video)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="realism-ab-") as tmp:
        for name, (overrides, context) in VARIANTS.items():
            results[name] = run_variant(video, Path(tmp), overrides, context)
    print(f"{'variant':40s} " + " ".join(f"{k:>26s}" for k in KEYS))
    for name, figures in results.items():
        print(f"{name:40s} " + " ".join(f"{str(figures[k]):>26s}" for k in KEYS))
    out = project_path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"json: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
