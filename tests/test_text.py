"""Speakable-text rules and the path redaction of error messages sent to remote callers."""

from __future__ import annotations

from pathlib import Path

from musetalk.utils.text import redact_paths, speech_text_problem


def test_speech_text_problem() -> None:
    assert speech_text_problem("Hello,\tworld.\nTwo lines — ünïcode ok 🙂") is None
    assert "U+0000" in (speech_text_problem("hello\x00world") or "")
    assert "U+0007" in (speech_text_problem("bell\x07") or "")
    assert "surrogate" in (speech_text_problem("a\udfff") or "")


def test_redact_paths_keeps_names_and_urls(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    msg = (
        f"session file {tmp_path}/results/sessions/a/full_session.mp4 is damaged; "
        f"missing {project}/models/sd-vae/config.json; see GET /sessions/a/video"
    )
    out = redact_paths(msg, project)
    assert str(tmp_path) not in out
    assert "session file full_session.mp4 is damaged" in out
    assert "missing models/sd-vae/config.json" in out and "GET /sessions/a/video" in out
