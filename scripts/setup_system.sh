#!/usr/bin/env bash
# System pieces the Python packages do not bring. ffmpeg comes from imageio-ffmpeg and espeak-ng from
# espeakng-loader (both pip packages); this checks they work. The web app's browser test drives Debian's
# chromium through Playwright (never `playwright install`: nothing may download a browser build), so
# chromium is installed from Debian when it is missing.
set -euo pipefail
PY="${PY:-.venv/bin/python}"
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"

if [[ ! -x "$CHROMIUM" ]]; then
    if [[ "$(id -u)" -eq 0 ]]; then
        SUDO=()
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "setup: $CHROMIUM is missing and installing it needs root." >&2
        echo "setup: run as root (or with passwordless sudo): apt-get update && apt-get install -y --no-install-recommends chromium" >&2
        exit 1
    fi
    echo "setup: installing Debian chromium (for the web app's browser test)"
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -q
    "${SUDO[@]}" apt-get install -y -q --no-install-recommends chromium
    if [[ ! -x "$CHROMIUM" ]]; then
        echo "setup: apt-get installed chromium but $CHROMIUM is still missing" >&2
        exit 1
    fi
fi
echo "setup: $("$CHROMIUM" --version 2>/dev/null || echo "chromium at $CHROMIUM")"

"$PY" - <<'PYEOF'
import subprocess
import imageio_ffmpeg
import espeakng_loader
exe = imageio_ffmpeg.get_ffmpeg_exe()
subprocess.run([exe, "-hide_banner", "-version"], check=True, capture_output=True)
print(f"setup: ffmpeg {exe}")
print(f"setup: espeak-ng {espeakng_loader.get_library_path()}")
PYEOF
