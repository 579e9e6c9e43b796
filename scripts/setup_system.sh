#!/usr/bin/env bash
# System pieces the Python packages do not bring. ffmpeg comes from imageio-ffmpeg and espeak-ng from
# espeakng-loader (both pip packages), so nothing is needed here yet; this checks they work.
set -euo pipefail
PY="${PY:-.venv/bin/python}"
"$PY" - <<'PYEOF'
import subprocess
import imageio_ffmpeg
import espeakng_loader
exe = imageio_ffmpeg.get_ffmpeg_exe()
subprocess.run([exe, "-hide_banner", "-version"], check=True, capture_output=True)
print(f"setup: ffmpeg {exe}")
print(f"setup: espeak-ng {espeakng_loader.get_library_path()}")
PYEOF
