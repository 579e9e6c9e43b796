"""Sharpen the face in every frame of a video with GFPGAN v1.4; audio copied bit-exact.

    python enhance.py                                   # results/full_session.mp4 → results/full_session_hd.mp4
    python enhance.py --input data/video/me.mp4 --output data/video/me_hd.mp4 --weight 0.7
    python enhance.py --temporal off --set runtime.device=cpu

Needs models/gfpgan/GFPGANv1.4.pth (make weights ARGS="--groups enhance"). Faces are found with the
project's own detector (prep.detector), aligned to GFPGAN's 512×512 template, restored in batches
(enhance.batch_size) on the GPU when there is one, and pasted back with a soft mask; frames without a
face are copied unchanged. --weight 0 keeps the source, 1 takes the restored face in full.
--temporal motion (default) smooths the added detail over time where the face is still, so the lips
do not flicker more than in the source.
Exit codes: 0 done, 1 environment problem (missing weights/plugin), 2 bad input or config.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from musetalk.cli import add_config_args, config_from_args, exit_code
from musetalk.config import project_path
from musetalk.errors import ConfigError, MuseTalkError

DEFAULT_INPUT = Path("results/full_session.mp4")
DEFAULT_OUTPUT = Path("results/full_session_hd.mp4")


def build_parser() -> argparse.ArgumentParser:
    """The enhance.py argument parser (defaults for weight/temporal come from the config)."""
    parser = argparse.ArgumentParser(
        prog="python enhance.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(parser)
    parser.add_argument("--input", default=None, help=f"video to enhance (default: {DEFAULT_INPUT})")
    parser.add_argument("--output", default=None, help=f"where to write it (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--weight", type=float, help="0 = source, 1 = restored (default: config enhance.weight)")
    parser.add_argument("--temporal", choices=("off", "motion"), help="flicker control (default: config)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _path(arg: str | None, default: Path) -> Path:
    # Paths typed by the user are relative to where they are; the defaults to the project folder.
    return Path(arg).expanduser().resolve() if arg else project_path(default)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    src, dst = _path(args.input, DEFAULT_INPUT), _path(args.output, DEFAULT_OUTPUT)
    if args.weight is not None and not 0.0 <= args.weight <= 1.0:
        print(f"error: --weight must be within [0, 1], got {args.weight}", file=sys.stderr)
        return 2

    from musetalk.enhance.restore import FaceRestorer
    from musetalk.enhance.video import STAGES, check_input, enhance_video
    from musetalk.faces import make_detector
    from musetalk.faces.dlib_detector import DlibDetector
    from musetalk.models import load_models

    try:
        check_input(src)  # before the weights: a wrong path is the most common mistake
        bundle = load_models(cfg, parts={"gfpgan"})
        assert bundle.gfpgan is not None
        restorer = FaceRestorer(bundle.gfpgan, cfg.enhance.batch_size, cfg.enhance.fixed_noise)
        detector = make_detector(cfg, device=str(bundle.device))
        # dlib: one detector per detection thread (sharing the landmark model); a GPU detector batches by
        # itself and stays alone.
        more = detector.sibling if isinstance(detector, DlibDetector) else None
        result = enhance_video(
            cfg, restorer, detector, src, dst, weight=args.weight, temporal=args.temporal, progress=not args.quiet,
            more_detectors=more,
        )  # fmt: skip
    except MuseTalkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_code(exc)
    total = result.wall_s
    lines = [
        f"{result.output}: {result.n_frames} frames at {result.fps:g} fps, {result.size_wh[0]}x{result.size_wh[1]}, "
        f"{result.n_faces} with a face restored, {result.audio_packets} audio packets copied "
        f"(device {bundle.device}, detector {detector.name})",
    ]
    lines.append("  busy time per stage (the stages run side by side):")
    for stage in STAGES:
        s = result.seconds.get(stage, 0.0)
        lines.append(f"  {stage:8s} {s:7.2f} s  {result.n_frames / s if s > 0 else float('inf'):8.1f} frames/s")
    lines.append(f"  wall     {total:7.2f} s  {result.n_frames / total if total > 0 else 0.0:8.1f} frames/s")
    f = result.flicker
    if f.get("pairs"):
        lines.append(
            f"mouth flicker (mean |frame difference| in the mouth box, grey levels): source {f['source_td']:.2f}, "
            f"output {f['output_td']:.2f}, added by restoration {f['added']:.2f}"
        )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
