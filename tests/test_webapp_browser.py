"""The chat page in headless Chromium (Debian's /usr/bin/chromium driven by Playwright; no browser downloads).

If chromium is missing these tests FAIL (run `make setup`, which installs it); they never skip.
Screenshots go to tests/artifacts/ (git-ignored).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from webapp_scaffold import ScaffoldSpeaker, create_scaffold_app, serve

from musetalk.avatar import PrepResult
from musetalk.config import AppConfig, with_overrides
from scripts.screenshot_webapp import CHROMIUM, MP4_TYPE, launch_chromium, send_and_wait

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@pytest.fixture(scope="module")
def webapp_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The one place the browser tests get their server from (the lead re-points this at server_fast's app).

    Today: the chat router + test scaffolding (a synthetic speaker that really encodes and appends clips;
    text containing "explode" fails like a TTS error; each sentence takes at least 0.3 s, like a render).
    """
    speaker = ScaffoldSpeaker(tmp_path_factory.mktemp("webapp"), size_px=128, fail_on="explode", min_call_s=0.3)
    with serve(create_scaffold_app(speaker)) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless system chromium; a missing browser is a failure with the command that installs it."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: run `make setup` (scripts/setup_system.sh installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch_chromium(p)
        yield b
        b.close()


class Page:
    """A fresh browser context + page, with every console error and uncaught exception collected."""

    def __init__(self, browser: Any, url: str, width: int, height: int, init_script: str | None = None) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": height})
        if init_script:
            self.context.add_init_script(init_script)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.url = url
        self.page.goto(url)

    def status(self, job_id: str) -> dict[str, Any]:
        """GET /status/{job_id} from the same server, through the browser's request context."""
        r = self.page.request.get(f"{self.url}/status/{job_id}")
        assert r.ok
        body: dict[str, Any] = r.json()
        return body


@pytest.fixture
def make_page(browser: Any, webapp_url: str) -> Iterator[Any]:
    pages: list[Page] = []

    def make(width: int = 1280, height: int = 800, init_script: str | None = None) -> Page:
        pages.append(Page(browser, webapp_url, width, height, init_script))
        return pages[-1]

    yield make
    for p in pages:
        p.context.close()


# Records every seek of the <video> and every status line the page shows (test instrumentation only).
RECORDER = """() => {
    window.__seeks = [];
    window.__statuses = [];
    const v = document.getElementById('avatar');
    v.addEventListener('seeked', () => window.__seeks.push({src: v.currentSrc, t: v.currentTime}));
    const s = document.getElementById('status'), bar = document.getElementById('progress');
    new MutationObserver(() => window.__statuses.push({text: s.textContent, bar: !bar.hidden, value: bar.value}))
        .observe(s, {childList: true, characterData: true, subtree: true});
}"""


@pytest.mark.slow
def test_send_message_and_video_plays_the_reply(make_page: Any) -> None:
    ui = make_page(1280, 800)
    page = ui.page
    assert page.title() == "MuseTalk · Chat"
    badge = page.locator("#engine")
    badge.filter(has_text="Built-in responder (offline)").wait_for()
    assert badge.get_attribute("data-builtin") == "true"
    can_play = page.evaluate(f"() => document.createElement('video').canPlayType({MP4_TYPE!r})")
    assert can_play == "probably", f"chromium cannot play H.264/AAC mp4: canPlayType={can_play!r}"
    # Accessible names for every control, and a live status region.
    assert page.get_by_label("Message").evaluate("e => e.tagName") == "TEXTAREA"
    page.get_by_role("button", name="Send").wait_for()
    page.get_by_role("button", name="Reset").wait_for()
    assert page.get_by_role("status").get_attribute("aria-live") == "polite"
    assert page.locator("#avatar").get_attribute("aria-label")
    page.evaluate(RECORDER)

    first = send_and_wait(page, "Hello! Who are you?")
    done = ui.status(first["job_id"])
    assert done["status"] == "done" and first["reply"] == done["reply"]
    assert "/sessions/" in first["src"] and f"v={first['version']}" in first["src"]
    assert first["version"] == f"{done['job_id']}.{len(done['sentences'])}"
    seeks = page.evaluate("() => window.__seeks")
    assert seeks and seeks[0]["t"] == pytest.approx(done["clip_start_s"], abs=0.05) == 0.0
    # Stage and progress were shown while the reply rendered.
    shown = page.evaluate("() => window.__statuses")
    assert any("Speaking sentence" in s["text"] and s["bar"] for s in shown), shown
    assert any(s["text"].startswith("Reply ready") and not s["bar"] for s in shown)

    page.evaluate("() => { window.__seeks = []; }")
    second = send_and_wait(page, "Tell me a joke.")
    later = ui.status(second["job_id"])
    assert later["clip_start_s"] > 0 and later["clip_start_s"] == pytest.approx(done["session_duration_s"], abs=0.05)
    assert second["src"] != first["src"]  # cache-busted: the same URL now holds a longer file
    seeks = page.evaluate("() => window.__seeks")
    assert seeks[0]["t"] == pytest.approx(later["clip_start_s"], abs=0.05)  # jumped to the new reply's first clip
    page.wait_for_function("() => { const v = document.getElementById('avatar'); return v.currentTime > "
                           f"{later['clip_start_s']} + 0.1 || v.ended; }}")
    assert page.locator("#messages .msg-user").all_inner_texts() == ["Hello! Who are you?", "Tell me a joke."]

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webapp-chat.png"))
    assert (ARTIFACTS / "webapp-chat.png").stat().st_size > 10_000

    # A reload (same tab) brings back the conversation and the session video.
    page.reload()
    page.locator("#messages .msg-bot[data-status=done]").nth(1).wait_for()
    assert page.locator("#messages .msg-user").all_inner_texts() == ["Hello! Who are you?", "Tell me a joke."]
    page.wait_for_function(
        "(v) => { const e = document.getElementById('avatar'); return e.dataset.version === v && e.readyState >= 2; }",
        arg=second["version"],
    )
    assert ui.errors == []


# Simulates a browser autoplay policy: sound is refused until the user clicks somewhere.
BLOCK_SOUND = """
(() => {
    let allowed = false;
    window.addEventListener('click', () => { allowed = true; }, true);
    const play = HTMLMediaElement.prototype.play;
    HTMLMediaElement.prototype.play = function () {
        if (!this.muted && !allowed) {
            return Promise.reject(new DOMException('play() needs a user gesture', 'NotAllowedError'));
        }
        return play.call(this);
    };
})();
"""


def test_autoplay_refusal_falls_back_to_muted_with_tap_to_unmute(make_page: Any) -> None:
    ui = make_page(1024, 768, init_script=BLOCK_SOUND)
    page = ui.page
    send_and_wait(page, "Hi")
    overlay = page.get_by_role("button", name="Tap to unmute the avatar")
    overlay.wait_for()
    assert "Tap to unmute" in overlay.inner_text()
    assert page.evaluate("() => document.getElementById('avatar').muted") is True
    page.wait_for_function("() => document.getElementById('avatar').currentTime > 0")  # it plays, muted
    overlay.click()
    overlay.wait_for(state="hidden")
    assert page.evaluate("() => document.getElementById('avatar').muted") is False
    assert ui.errors == []


def test_phone_width_layout_errors_inline_and_reset(make_page: Any) -> None:
    ui = make_page(390, 844)
    page = ui.page
    reply = send_and_wait(page, "How are you?")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390  # no sideways scrolling
    for selector in ("#avatar", "#message", "#send", "#reset", "#engine"):
        box = page.locator(selector).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, selector
        assert box["y"] + box["height"] <= 844, selector
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webapp-chat-phone.png"))

    # A failing render is shown inline, and the page stays usable.
    page.get_by_label("Message").fill("Please explode now")
    page.keyboard.press("Enter")
    alert = page.get_by_role("alert")
    alert.wait_for()
    assert "failed" in alert.inner_text() and "explode" in alert.inner_text()
    page.wait_for_function("() => !document.getElementById('send').disabled")

    # Reset clears the chat and the session video on the server.
    video_url = reply["src"].split("?")[0]
    assert page.request.get(video_url).status == 200
    page.get_by_role("button", name="Reset").click()
    page.get_by_role("status").filter(has_text="Conversation cleared").wait_for()
    assert page.locator("#messages li").count() == 0
    assert page.evaluate("() => document.getElementById('avatar').getAttribute('src')") is None
    assert page.request.get(video_url).status == 404
    assert ui.errors == []


@pytest.fixture(scope="module")
def real_server_url(
    prepared_avatar: tuple[AppConfig, PrepResult], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """server_fast's own app (chat routes mounted): preview renderer, real espeak-ng, built-in responder."""
    from server_fast import build_app

    tmp = tmp_path_factory.mktemp("real-server")
    cfg = with_overrides(
        prepared_avatar[0],
        [f"models.dir={tmp / 'no-models'}", f"server.results_dir={tmp / 'results'}", "encode.preset=ultrafast"],
    )
    with serve(build_app(cfg, env={}), lifespan="on", start_timeout_s=120) as url:
        yield url


@pytest.mark.slow
def test_real_server_chat_round_trip(browser: Any, real_server_url: str) -> None:
    ui = Page(browser, real_server_url, 1280, 800)
    try:
        page = ui.page
        page.goto(f"{real_server_url}/?clips")  # clip mode: the live page is tested below
        page.locator("#engine").filter(has_text="Built-in responder (offline)").wait_for()
        # send_and_wait returns only once the <video> holds the reply's (cache-busted) source with
        # readyState >= 2; readyState itself may drop again right after (seeking, end of a short clip).
        reply = send_and_wait(page, "Hello! Who are you?")
        done = ui.status(reply["job_id"])
        assert done["status"] == "done" and "/sessions/" in reply["src"] and f"v={reply['version']}" in reply["src"]
        assert done["clip_duration_s"] > 0.5
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "webapp-real-server.png"))
        assert not ui.errors, ui.errors
    finally:
        ui.context.close()


DECODED_FRAMES_JS = "() => document.getElementById('avatar').getVideoPlaybackQuality().totalVideoFrames"


@pytest.mark.slow
def test_live_chat_page_idles_speaks_and_is_interrupted(browser: Any, real_server_url: str) -> None:
    """The page on the live stream: a MediaStream whose decoded frames grow while idle, a reply spoken on it,
    a second message interrupting the first, no console errors."""
    ui = Page(browser, real_server_url, 1280, 800)
    try:
        page = ui.page
        page.locator("body[data-mode=live]").wait_for(timeout=30_000)
        assert page.evaluate("() => document.getElementById('avatar').srcObject instanceof MediaStream")
        assert page.locator("#placeholder").is_hidden()
        page.wait_for_function(f"() => ({DECODED_FRAMES_JS})() > 0", timeout=15_000)
        idle_start = page.evaluate(DECODED_FRAMES_JS)
        page.wait_for_timeout(2000)
        assert page.evaluate(DECODED_FRAMES_JS) - idle_start >= 25  # ~50 expected at 25 fps: never frozen

        page.get_by_label("Message").fill("Hello! Who are you?")
        page.get_by_label("Message").press("Enter")
        page.locator("body[data-on-air]").wait_for(timeout=30_000)
        page.get_by_role("status").filter(has_text="Speaking sentence 1").wait_for(timeout=10_000)
        first = int(page.evaluate("() => document.body.dataset.onAir"))

        page.get_by_label("Message").fill("Tell me more, please.")  # while the avatar talks: barge-in
        page.get_by_label("Message").press("Enter")
        bubbles = page.locator("#messages .msg-bot")
        bubbles.nth(0).and_(page.locator("[data-status=interrupted]")).wait_for(timeout=10_000)
        page.wait_for_function(
            f"() => Number(document.body.dataset.onAir || 0) > {first} "
            "&& document.querySelectorAll('#messages .msg-bot')[1].dataset.status !== 'error'",
            timeout=30_000,
        )
        bubbles.nth(1).and_(page.locator("[data-status=done]")).wait_for(timeout=60_000)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "webapp-live.png"))
        assert not ui.errors, ui.errors
    finally:
        ui.context.close()
