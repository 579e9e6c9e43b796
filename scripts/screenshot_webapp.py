"""Screenshot the chat page after a short conversation (docs/screenshot-chat.png for the README).

    python -m scripts.screenshot_webapp --url http://127.0.0.1:8000          # a running server (make serve)
    python -m scripts.screenshot_webapp --scaffold                            # the test scaffold (synthetic face)

Drives Debian's chromium (/usr/bin/chromium, installed by `make setup`) through Playwright; never
downloads a browser. The helpers here are shared with tests/test_webapp_browser.py.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
# Root needs --no-sandbox; the rest keep chromium from calling out on a closed network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
    # The server offers 127.0.0.1 alone when bound to loopback; Chromium leaves loopback out of WebRTC without this.
    "--allow-loopback-in-peer-connection",
]
MP4_TYPE = 'video/mp4; codecs="avc1.42E01E, mp4a.40.2"'


def launch_chromium(playwright: Any) -> Any:
    """Start the system chromium headless; raise RuntimeError (with the fix) if it is not installed."""
    if not CHROMIUM.is_file():
        raise RuntimeError(f"{CHROMIUM} is missing: run `make setup` (it installs Debian's chromium)")
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)


def send_and_wait(page: Any, text: str, timeout_ms: int = 60_000) -> dict[str, Any]:
    """Type `text`, press Enter, wait until the reply is done and the video plays its file; return its state."""
    before = page.locator("#messages .msg-bot").count()
    page.get_by_label("Message").fill(text)
    page.get_by_label("Message").press("Enter")
    bubble = page.locator("#messages .msg-bot").nth(before)
    bubble.and_(page.locator("[data-status=done]")).wait_for(timeout=timeout_ms)
    version = bubble.get_attribute("data-version")
    page.wait_for_function(
        """(version) => {
            const v = document.getElementById('avatar');
            return v.dataset.version === version && v.currentSrc.includes('v=' + encodeURIComponent(version))
                && v.readyState >= 2;
        }""",
        arg=version,
        timeout=timeout_ms,
    )
    state: dict[str, Any] = page.evaluate(
        """() => {
            const v = document.getElementById('avatar');
            return {src: v.currentSrc, readyState: v.readyState, currentTime: v.currentTime,
                    seek: Number(v.dataset.seek), duration: v.duration, muted: v.muted, paused: v.paused};
        }"""
    )
    state["version"] = version
    state["job_id"] = bubble.get_attribute("data-job-id")
    state["reply"] = bubble.locator(".text").inner_text()
    return state


@contextmanager
def _scaffold_server() -> Iterator[str]:
    """The test scaffold (tests/webapp_scaffold.py): chat routes + a synthetic speaker, on a free port."""
    sys.path.insert(0, str(PROJECT_ROOT / "tests"))
    scaffold = importlib.import_module("webapp_scaffold")
    with tempfile.TemporaryDirectory() as tmp:
        speaker = scaffold.ScaffoldSpeaker(Path(tmp), size_px=384)
        with scaffold.serve(scaffold.create_scaffold_app(speaker)) as url:
            yield url


def take(url: str, out: Path, messages: list[str], width: int, height: int, color_scheme: str = "dark") -> None:
    """Chat through the page at `url`, then save a screenshot to `out`."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": width, "height": height}, color_scheme=color_scheme)
            page.goto(url)
            for text in messages:
                send_and_wait(page, text)
            # Show a moment into the reply (mid-word) rather than its first frame.
            page.evaluate("() => { const v = document.getElementById('avatar'); v.pause(); v.currentTime += 0.6; }")
            page.wait_for_function("() => { const v = document.getElementById('avatar'); return !v.seeking; }")
            page.wait_for_function("() => document.getElementById('avatar').readyState >= 2")
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.tmp.png")
            page.screenshot(path=str(tmp))
            tmp.replace(out)
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and take the screenshot."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--scaffold", action="store_true", help="serve the test scaffold (synthetic face) instead")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs" / "screenshot-chat.png")
    parser.add_argument("--message", action="append", dest="messages", help="message to send (repeatable)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=760)
    parser.add_argument("--color-scheme", choices=["dark", "light"], default="dark")
    args = parser.parse_args(argv)
    messages = args.messages or ["Hello! Who are you?", "Tell me a joke."]
    if args.url:
        take(args.url, args.out, messages, args.width, args.height, args.color_scheme)
    else:
        with _scaffold_server() as url:
            take(url, args.out, messages, args.width, args.height, args.color_scheme)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
