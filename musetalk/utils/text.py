"""What text a voice may be given: printable Unicode plus newlines and tabs."""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path

_ALLOWED_CONTROLS = frozenset("\n\r\t")


def speech_text_problem(text: str) -> str | None:
    """Why `text` cannot be spoken as it is (a control character, a lone surrogate), or None if it can.

    A NUL would end the string inside the C TTS libraries (everything after it silently lost) and a lone
    surrogate cannot be encoded as UTF-8 at all, so neither may get past the edge.
    """
    for index, char in enumerate(text):
        category = unicodedata.category(char)
        if category == "Cc" and char not in _ALLOWED_CONTROLS:
            return f"control character U+{ord(char):04X} at position {index}"
        if category == "Cs":
            return f"lone surrogate U+{ord(char):04X} at position {index} (not valid Unicode text)"
    return None


# An absolute POSIX path of two or more parts: "/srv/x/results/a.mp4".
_ABS_PATH_RE = re.compile(r"(?<![\w.~/:])/(?:[^\s/'\"`:;,()<>\[\]{}]+/)+([^\s/'\"`:;,()<>\[\]{}]*)")


def redact_paths(message: str, project_root: Path | None = None) -> str:
    """`message` with every absolute server path cut to its last part, or to its path inside
    `project_root` ("models/sd-vae/config.json"): a file name tells a remote caller what failed, the
    folders around it are the server's business. URL paths such as /sessions/x/video stay: only paths
    whose first folder exists on this machine are cut."""
    root = f"{project_root}/" if project_root is not None else None

    def cut(match: re.Match[str]) -> str:
        path = match.group(0)
        if not os.path.isdir("/" + path.split("/", 2)[1]):
            return path
        if root is not None and path.startswith(root) and len(path) > len(root):
            return path[len(root) :]
        return match.group(1) or "…"

    return _ABS_PATH_RE.sub(cut, message)
