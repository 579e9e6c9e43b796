"""Build the demo avatar video (data/video/demo.mp4) from the public-domain astronaut photo.

    python -m scripts.make_demo_video [--out data/video/demo.mp4] [--seconds 6] [--force]

Slow idle motion (sway, breathing, a slight tilt) and two blinks; see musetalk/avatar/demo.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from musetalk.config import project_path

DEFAULT_OUT = Path("data/video/demo.mp4")


def main(argv: list[str] | None = None) -> int:
    """Write the demo video unless it exists (or --force); returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    out = project_path(args.out)
    if out.is_file() and not args.force:
        print(f"demo video: {out} (exists)")
        return 0
    from musetalk.avatar.demo import write_demo_video
    from musetalk.avatar.synthetic import astronaut_bgr
    from musetalk.faces.dlib_detector import DlibDetector

    landmarks = DlibDetector().detect(astronaut_bgr())
    if landmarks is None:
        print("error: no face found in the demo photo", file=sys.stderr)
        return 1
    write_demo_video(out, landmarks, seconds=args.seconds)
    print(f"demo video: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
