"""Small helpers with no project dependencies (ffmpeg, timing, logging)."""
