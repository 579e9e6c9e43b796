"""Contact sheet of a session video: evenly spaced frames, tiled with their timestamps.

    python -m scripts.contact_sheet [--video results/full_session.mp4] [--out docs/demo-contact-sheet.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import av
import cv2
import numpy as np

from musetalk.config import project_path


def contact_sheet(video: Path, out: Path, cols: int = 4, rows: int = 3, tile_px: int = 256) -> Path:
    """Write a cols×rows grid of frames spread over the whole video; returns `out`."""
    with av.open(str(video)) as container:
        frames = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
        fps = float(container.streams.video[0].average_rate or 25)
    picks = np.linspace(0, len(frames) - 1, cols * rows).round().astype(int)
    tiles = []
    for idx in picks:
        tile = cv2.resize(frames[idx], (tile_px, tile_px), interpolation=cv2.INTER_AREA)
        cv2.putText(tile, f"{idx / fps:5.2f} s", (8, tile_px - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 2)
        tiles.append(tile)
    grid = np.vstack([np.hstack(tiles[r * cols : (r + 1) * cols]) for r in range(rows)])
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), grid)
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", type=Path, default=Path("results/full_session.mp4"))
    parser.add_argument("--out", type=Path, default=Path("docs/demo-contact-sheet.png"))
    args = parser.parse_args(argv)
    video = project_path(args.video)
    if not video.is_file():
        print(f"error: {video} does not exist (run `make demo` first)", file=sys.stderr)
        return 2
    print(contact_sheet(video, project_path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
