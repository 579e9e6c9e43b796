"""Live-stream latency at the client: aiortc viewers of the real server (server_fast.py) on 127.0.0.1.

The benchmark starts `server_fast.py`, connects one aiortc viewer per session (musetalk/server/viewer.py,
each session's viewer and requests in a process of its own so that decoding never queues behind another
session), watches the idle avatar, then speaks `--utterances` sentences per session one after another
("wait": false, as the chat page does) and finally interrupts `--interrupts` long utterances. Measured at
the client, per utterance:

- request → first audible audio: arrival of the first 20 ms packet above -36 dBFS;
- request → first speaking frame: arrival of the utterance's first frame (the server's events channel names
  its frame number) out of aiortc's decoder, and of its last RTP packet (what a browser decodes from;
  aiortc's jitter buffer holds each frame until the next frame's first packet arrives, one frame later);
  and of the first frame whose mouth differs from the avatar's own frame (mean |Δ| in the mask box above
  the idle level, `MouthMeter`; with espeak text the first frames can be silent); split by the arrival of
  the events channel's "speaking" message (request → on air: the server's part);
- A/V offset: for `--av-probes` utterances of three voice bursts each, the time the mouth starts moving minus
  the time the voice starts, both on the server's clock (RTCP sender reports: what a browser synchronises
  with); positive = video late;
- frame rate and frame-time jitter (standard deviation of the arrival intervals) while idle and speaking;
- interrupt → silence: from the interrupt request to the end of the last audible packet that arrives.

Sessions start speaking at the same moment (a barrier: their viewer processes take seconds to start) and
then stay in step (their utterances are alike), the worst case for first frames: their first batches meet
on the GPU every time. `--stagger-s S` starts session i i·S/sessions later instead, and `--gap-jitter-s J`
adds a random 0..J s to every pause, so that the sessions drift apart as real conversations do.

Inputs: `--input text` posts the sentence to /speak (TTS on the server: what a chat user waits for);
`--input audio` posts a 2-s voiced wav to /speak_audio (the audio is in when the request arrives).

    python bench/bench_live.py                                    # this CPU: preview renderer, demo avatar, espeak
    python bench/bench_live.py --device cuda --sessions 8 --input audio --height 1080   # MuseTalk, random weights
    python bench/bench_live.py --renderer musetalk --input audio --height 360 --utterances 2  # its path, CPU, tiny
    python bench/bench_live.py --device cuda --sessions 8 --input audio --height 1080 --cluster-replicas 2 \
        --replicas-per-gpu 2        # the same sessions split over two server processes sharing one GPU

With `--cluster-replicas`, the server is `python -m scripts.serve_cluster` (Ray Serve) and the /health
figures are the worst replica's; the server's CPU is not sampled on its own (the machine's is).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import pickle
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_concurrency import (  # noqa: E402
    Sampler,
    Server,
    pct,
    ready_line,
    run_meta,
    speech_wav,
    startup_lines,
)

LOUD_RMS = 500.0  # int16 RMS of an audible 20 ms packet (-36 dBFS)
SENTENCES = [
    "Hello there, nice to meet you.", "How are you today?", "The weather is lovely this morning.",
    "Let me tell you a short story.", "Once upon a time there was a small robot.", "It liked to talk to people.",
    "Every day it learned a new word.", "What would you like to know?", "I can answer questions quickly.",
    "Please ask me anything at all.", "That is a very good question.", "Let me think about it for a moment.",
    "The answer is forty two.", "Numbers can be surprising.", "Music makes people happy.",
    "Do you like to read books?", "Reading opens many doors.", "Thank you for listening to me.",
    "See you again soon.", "Goodbye for now, and take care.",
]  # fmt: skip
LONG_TEXT = "This is a long answer that keeps going for a while, so that there is something to interrupt. " * 3


def _meter(args: argparse.Namespace, avatar_pickle: Path | None, cfg_overrides: list[str], width_px: int) -> Any:
    """The mouth meter of the served avatar, at the width the viewer scales frames to."""
    import cv2

    from musetalk.server.viewer import MouthMeter

    if avatar_pickle is not None:
        with avatar_pickle.open("rb") as f:
            cache = pickle.load(f)
    else:
        from musetalk.avatar import load_avatar
        from musetalk.config import load_config

        cfg = load_config(overrides=cfg_overrides)
        cache = load_avatar(cfg, cfg.avatar_id)
    frames = [cache.frames[i] for i in range(cache.n_frames)]
    h, w = frames[0].shape[:2]
    scale = width_px / (w - w % 2)
    size = (width_px, round((h - h % 2) * scale / 2) * 2)
    small = [cv2.resize(f[: h - h % 2, : w - w % 2], size, interpolation=cv2.INTER_AREA) for f in frames]
    boxes = np.round(cache.mask_boxes.astype(np.float64) * scale).astype(np.int32)
    return MouthMeter(small, boxes)


def _intervals_ms(times: list[float]) -> tuple[float | None, float | None]:
    """(frames/s, standard deviation of the intervals in ms) of arrival times."""
    if len(times) < 3:
        return None, None
    d = np.diff(np.array(times))
    return float(1.0 / d.mean()), float(d.std() * 1000)


async def _session(
    url: str, sid: str, args: argparse.Namespace, meter: Any, width_px: int, offset_s: float = 0.0,
    start: Any = None,
) -> dict[str, Any]:
    """One session's viewer and requests; `start` (a multiprocessing Barrier) lines the sessions up after
    their idle phase, so that they start speaking together (then `offset_s` later)."""
    from musetalk.server.viewer import LiveViewer, rms

    loop = asyncio.get_running_loop()
    out: dict[str, Any] = {"session": sid, "utterances": [], "interrupts": [], "av_offsets_ms": []}
    seed = 1 + sum(map(ord, sid)) % 7
    rng = random.Random(sid)  # --gap-jitter-s: each session's own pauses, the same in every run
    wav, long_wav = speech_wav(args.audio_s, seed), speech_wav(6.0, seed)
    # No keep-alive: the server closes idle connections after server.keep_alive_s, racing a reused one.
    no_reuse = httpx.Limits(max_keepalive_connections=0)
    lags: list[float] = []  # this viewer's own event-loop lag (ms): a busy viewer receives late, whatever the server
    cpu0, wall0 = time.process_time(), time.monotonic()
    lag_task = asyncio.create_task(_loop_lag(lags))
    async with LiveViewer(url, sid, reduce_frame=meter, frame_width_px=width_px) as viewer, httpx.AsyncClient(
        timeout=120, limits=no_reuse
    ) as client:
        r = viewer.received
        await asyncio.sleep(args.idle_s)
        idle = [m for _, _, (_, m) in r.video]
        threshold = max(float(np.percentile(idle, 99)) * 1.5, float(np.percentile(idle, 99)) + 3.0)
        out["idle_mouth_p99"] = float(np.percentile(idle, 99))
        out["idle_fps"], out["idle_jitter_ms"] = _intervals_ms([t for t, _, _ in r.video])
        pts_per_frame = int(np.median(np.diff([pts for _, pts, _ in r.video])))  # 90 kHz / fps
        if start is not None:  # viewer processes take seconds to start, each a different time
            await asyncio.to_thread(start.wait, 300)
        await asyncio.sleep(offset_s)  # --stagger-s: sessions start speaking at different moments

        async def say(k: int, long: bool = False) -> float:
            t0 = loop.time()
            if args.input == "text":
                body = {"text": LONG_TEXT if long else SENTENCES[k % len(SENTENCES)], "session_id": sid, "wait": False}
                resp = await client.post(f"{url}/speak", json=body)
            else:
                resp = await client.post(
                    f"{url}/speak_audio", files={"file": ("u.wav", long_wav if long else wav, "audio/wav")},
                    data={"session_id": sid, "wait": "false"},
                )  # fmt: skip
            if resp.status_code != 202:
                raise RuntimeError(f"speak: {resp.status_code} {resp.text}")
            return t0

        async def until(predicate: Any, timeout_s: float) -> bool:
            deadline = loop.time() + timeout_s
            while not predicate():
                if loop.time() > deadline:
                    return False
                await asyncio.sleep(0.01)
            return True

        for k in range(args.utterances):
            n_events = len(r.events)
            t0 = await say(k)
            if not await until(lambda n=n_events: any(e["type"] == "idle" for _, e in r.events[n:]), 120):
                out["utterances"].append({"error": "no idle event"})
                continue
            t_on = next(t for t, e in r.events[n_events:] if e["type"] == "speaking")
            t_off = next(t for t, e in r.events[n_events:] if e["type"] == "idle")
            audio = [(t, pts, rms(a)) for t, pts, a in r.audio if t >= t0]
            video = [(t, pts, m) for t, pts, (_, m) in r.video if t >= t0]
            heard = next(((t, pts) for t, pts, a in audio if a > LOUD_RMS), None)
            seen = next(((t, pts) for t, pts, m in video if m > threshold), None)
            on_air = next(e["frame"] for _, e in r.events[n_events:] if e["type"] == "speaking")
            first, first_pts = next(((t, pts) for t, pts, _ in video if pts >= on_air * pts_per_frame), (None, None))
            complete = r.video_complete_s(first_pts) if first_pts is not None else None
            speaking = [t for t, _, _ in video if t_on <= t <= t_off]
            fps, jitter = _intervals_ms(speaking)
            item: dict[str, Any] = {
                "first_audio_ms": (heard[0] - t0) * 1000 if heard else None,
                "first_frame_ms": (first - t0) * 1000 if first else None,
                # Its last packet's arrival: when a browser can decode it (aiortc holds it one more frame).
                "first_frame_complete_ms": (complete - t0) * 1000 if complete else None,
                # When the events channel said "on air": the server's part (upload, first frames rendered, the
                # wait for the stream's tick); first_frame_ms minus this is the video path (encode, RTP,
                # the viewer's jitter buffer, decode).
                "on_air_event_ms": (t_on - t0) * 1000,
                "first_moving_frame_ms": (seen[0] - t0) * 1000 if seen else None,
                "speaking_fps": fps, "speaking_jitter_ms": jitter,
                "mouth_max": max((m for t, _, m in video if t_on <= t <= t_off), default=None),
                "threshold": threshold,
            }  # fmt: skip
            out["utterances"].append(item)
            await asyncio.sleep(args.gap_s + rng.uniform(0.0, args.gap_jitter_s))

        for _ in range(args.av_probes):  # voice bursts: unambiguous onsets for the A/V offset
            n_events = len(r.events)
            t0 = loop.time()
            await client.post(
                f"{url}/speak_audio", files={"file": ("b.wav", BURSTS_WAV, "audio/wav")},
                data={"session_id": sid, "wait": "false"},
            )  # fmt: skip
            await until(lambda n=n_events: any(e["type"] == "idle" for _, e in r.events[n:]), 120)
            audio_on = _onsets([(r.sender_time_s("audio", pts), rms(a) > LOUD_RMS) for t, pts, a in r.audio if t >= t0])
            video_on = _onsets(
                [(r.sender_time_s("video", pts), m > threshold) for t, pts, (_, m) in r.video if t >= t0]
            )
            for a_on in audio_on:
                near = min(video_on, key=lambda v: abs(v - a_on), default=None)
                if near is not None and abs(near - a_on) < 0.2:
                    out["av_offsets_ms"].append((near - a_on) * 1000)
            await asyncio.sleep(args.gap_s)

        for _ in range(args.interrupts):
            n_events = len(r.events)
            await say(0, long=True)
            await until(lambda n=n_events: any(e["type"] == "speaking" for _, e in r.events[n:]), 60)
            await asyncio.sleep(1.0)
            t_int = loop.time()
            await client.post(f"{url}/sessions/{sid}/interrupt")
            t_answer = loop.time()
            await asyncio.sleep(1.0)
            loud = [t for t, _, a in r.audio if t > t_int and rms(a) > LOUD_RMS]
            out["interrupts"].append({
                "silence_ms": ((max(loud) + 0.02 - t_int) if loud else 0.0) * 1000,
                "answer_ms": (t_answer - t_int) * 1000,
            })  # fmt: skip
            await asyncio.sleep(args.gap_s)
    lag_task.cancel()
    out["viewer_loop_lag_ms"] = {"p95": pct(lags, 0.95), "max": max(lags, default=None)}
    out["viewer_cpu_cores"] = (time.process_time() - cpu0) / (time.monotonic() - wall0)
    return out


async def _loop_lag(lags: list[float], period_s: float = 0.02) -> None:
    """Note how late each short sleep of this event loop wakes up (ms), until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        t = loop.time()
        await asyncio.sleep(period_s)
        lags.append((loop.time() - t - period_s) * 1000)


def _bursts_wav() -> bytes:
    """Three 0.6-s voiced bursts between 0.6-s silences (16 kHz wav)."""
    rate = 16000
    t = np.arange(round(0.6 * rate)) / rate
    voice = 0.3 * np.sin(2 * np.pi * 140 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    silence = np.zeros_like(voice)
    x = np.concatenate([silence, voice, silence, voice, silence, voice, silence]).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


BURSTS_WAV = _bursts_wav()


def _onsets(flags: list[tuple[float, bool]]) -> list[float]:
    """Times where a flag turns on (after at least 3 items off), in time order."""
    out, off_run = [], 3
    for t, on in sorted(flags):
        if on and off_run >= 3:
            out.append(t)
        off_run = 0 if on else off_run + 1
    return out


def _worker(
    url: str, sid: str, args: argparse.Namespace, meter: Any, width_px: int, out_path: str, offset_s: float,
    start: Any,
) -> None:
    result = asyncio.run(_session(url, sid, args, meter, width_px, offset_s, start))
    Path(out_path).write_text(json.dumps(result))


def _speak_lines(log_text: str) -> list[dict[str, str]]:
    """The server's `speak` log lines (one per utterance: its stage timings), as key → value."""
    out = []
    for line in log_text.splitlines():
        if " speak session=" in line:
            fields = line.split(" speak ", 1)[1].split()
            out.append({"time": line[:23], **dict(f.split("=", 1) for f in fields if "=" in f)})
    return out


def _server_split(speaks: list[dict[str, str]]) -> dict[str, dict[str, float | None]]:
    """p50 / p95 of the server's own per-utterance times for the live sessions: upload (request in → audio
    decoded, before the others start), queued (→ first batch launched) and its parts render_wait (for a
    render thread) and prepare (audio features ready), first_frame (→ first blended frame) and on_air (→ first
    frame on the stream)."""
    out: dict[str, dict[str, float | None]] = {}
    for key in ("upload_ms", "queued_ms", "render_wait_ms", "prepare_ms", "first_frame_ms", "on_air_ms"):
        values = [float(r[key]) for r in speaks if r.get("session", "").startswith("live") and key in r]
        out[key] = {"p50": pct(values, 0.5), "p95": pct(values, 0.95)}
    return out


def _poll_health(server: Any, out: list[dict[str, Any]], stop: threading.Event) -> None:
    """Every second, the server's stream, scheduler, garbage-collection and GIL-wait figures from /health
    (each covers the last 10 s)."""
    while not stop.wait(1.0):
        try:
            health = server.health()
        except httpx.HTTPError:
            continue
        lateness = health.get("scheduler", {}).get("lateness_p95_ms")
        gc = {f"gc_{k}": v for k, v in health.get("gc", {}).items()}
        row = {**health.get("live", {}), "scheduler_lateness_p95_ms": lateness, **gc}
        # A cluster's /health lists every replica's own stream and GIL figures: keep the worst replica's.
        replicas = health.get("replicas") or [{"streams": health.get("live", {}), "gil": health.get("gil", {})}]
        for replica in replicas:
            figures = {**(replica.get("streams") or {}),
                       **{f"gil_{k}": v for k, v in (replica.get("gil") or {}).items() if k != "probes"}}
            for key, value in figures.items():
                if isinstance(value, (int, float)):
                    row[key] = max(value, row.get(key, value))
        out.append(row)


def _worst(polled: list[dict[str, Any]]) -> dict[str, float]:
    """The largest value each /health figure took during the run."""
    keys = {k for row in polled for k, v in row.items() if isinstance(v, (int, float))}
    worst = {k: max(row[k] for row in polled if isinstance(row.get(k), (int, float))) for k in sorted(keys)}
    rows = [row for row in polled if isinstance(row.get("gc_full_pause_max_ms"), (int, float))]
    if rows:  # what the longest full collection freed (not the most any collection freed)
        longest = max(rows, key=lambda row: row["gc_full_pause_max_ms"])
        worst["gc_full_pause_max_freed"] = longest.get("gc_full_pause_max_freed", 0)
    return worst


def _summary(sessions: list[dict[str, Any]]) -> dict[str, Any]:
    utts = [u for s in sessions for u in s["utterances"] if "error" not in u]

    def col(key: str) -> list[float]:
        return [float(u[key]) for u in utts if u.get(key) is not None]

    def p(values: list[float]) -> dict[str, float | None]:
        return {"p50": pct(values, 0.5), "p95": pct(values, 0.95), "n": len(values)}

    offsets = [o for s in sessions for o in s["av_offsets_ms"]]
    silence = [i["silence_ms"] for s in sessions for i in s["interrupts"]]
    # The sessions' first utterances start at one moment (the barrier); later ones drift apart as
    # conversations do (with --gap-jitter-s), so they are also reported on their own.
    later = [u for s in sessions for u in s["utterances"][1:] if "error" not in u]
    return {
        "first_audio_ms": p(col("first_audio_ms")),
        "first_frame_ms": p(col("first_frame_ms")),
        "first_frame_after_first_ms": p([float(u["first_frame_ms"]) for u in later if u.get("first_frame_ms")]),
        "first_frame_complete_ms": p(col("first_frame_complete_ms")),
        "on_air_event_ms": p(col("on_air_event_ms")),
        "first_moving_frame_ms": p(col("first_moving_frame_ms")),
        "av_offset_ms": {**p(offsets), "max_abs": max((abs(o) for o in offsets), default=None)},
        "idle_fps": statistics.mean(s["idle_fps"] for s in sessions if s.get("idle_fps")),
        "idle_jitter_ms": statistics.mean(s["idle_jitter_ms"] for s in sessions if s.get("idle_jitter_ms")),
        "speaking_fps": statistics.mean(col("speaking_fps")) if col("speaking_fps") else None,
        "speaking_jitter_ms": statistics.mean(col("speaking_jitter_ms")) if col("speaking_jitter_ms") else None,
        "interrupt_to_silence_ms": {**p(silence), "max": max(silence, default=None)},
        "errors": sum(1 for s in sessions for u in s["utterances"] if "error" in u),
        "viewer_loop_lag_p95_ms": max((s["viewer_loop_lag_ms"]["p95"] or 0.0) for s in sessions),
        "viewer_loop_lag_max_ms": max((s["viewer_loop_lag_ms"]["max"] or 0.0) for s in sessions),
        "viewer_cpu_cores": statistics.mean(s["viewer_cpu_cores"] for s in sessions),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print a table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--renderer", choices=["preview", "musetalk"], default=None,
                        help="preview: the demo avatar (default on cpu); musetalk: random weights and a synthetic "
                             "avatar (default on cuda)")
    parser.add_argument("--size", choices=["full", "tiny"], default=None,
                        help="musetalk weights (default: full on cuda)")
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--utterances", type=int, default=20, help="per session")
    parser.add_argument("--interrupts", type=int, default=5, help="per session")
    parser.add_argument("--av-probes", type=int, default=3, help="per session: 3 voice bursts each, for the A/V offset")
    parser.add_argument("--input", choices=["text", "audio"], default="text")
    parser.add_argument("--audio-s", type=float, default=2.0, help="--input audio: seconds per utterance")
    parser.add_argument("--idle-s", type=float, default=3.0)
    parser.add_argument("--gap-s", type=float, default=0.5, help="idle between utterances")
    parser.add_argument("--gap-jitter-s", type=float, default=0.0,
                        help="add a random 0..this to each pause between utterances (sessions drift out of step, "
                        "as conversations do)")  # fmt: skip
    parser.add_argument("--stagger-s", type=float, default=0.0,
                        help="session i starts speaking i/sessions of this later (0: all at once)")  # fmt: skip
    parser.add_argument("--height", type=int, default=1080, help="cuda: synthetic avatar height (16:9)")
    parser.add_argument("--avatar-frames", type=int, default=50)
    parser.add_argument("--view-width", type=int, default=480, help="viewers scale decoded frames to this width")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--preset", default="veryfast")
    parser.add_argument("--models", type=Path, default=None)
    parser.add_argument("--set", action="append", default=[], help="extra server overrides key=value")
    parser.add_argument("--profile-s", type=float, default=None,
                        help="py-spy the server (GIL holders, then all threads; 5 s each) this long after the viewers "
                        "start; written beside --out")  # fmt: skip
    parser.add_argument("--cluster-replicas", type=int, default=0,
                        help="serve through `python -m scripts.serve_cluster` with this many replicas (0: the single "
                        "server_fast.py); sessions are spread over them")  # fmt: skip
    parser.add_argument("--replicas-per-gpu", type=int, default=1,
                        help="with --cluster-replicas: replicas sharing each GPU (each its own process and GIL)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_live.json")
    args = parser.parse_args(argv)
    if args.cluster_replicas and args.profile_s is not None:
        parser.error("--profile-s profiles the single server; leave it out with --cluster-replicas")

    meta = run_meta(args.device, device=args.device, sessions=args.sessions, input=args.input,
                    cluster_replicas=args.cluster_replicas, replicas_per_gpu=args.replicas_per_gpu)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-live-") as tmp:
        work = Path(tmp)
        overrides = [f"server.results_dir={work / 'results'}", f"server.log_dir={work / 'logs'}",
                     f"encode.preset={args.preset}", f"server.max_live_sessions={args.sessions + 2}"]  # fmt: skip
        env = {"PYTHONUNBUFFERED": "1"}
        avatar_pickle: Path | None = None
        renderer = args.renderer or ("musetalk" if args.device == "cuda" else "preview")
        meta["renderer_choice"] = renderer
        if renderer == "musetalk":
            from bench.bench_engine import ensure_models

            size = args.size or ("full" if args.device == "cuda" else "tiny")
            models = args.models or ROOT / "results" / "bench_models" / size
            meta["size"], meta["write_models_s"] = size, ensure_models(models, size)
            overrides += [
                f"models.dir={models}", f"runtime.device={args.device}", "avatar_id=bench", "preparation=false",
                "server.renderer=bench.bench_concurrency:bench_renderer",
                f"runtime.compile={str(args.compile).lower()}",
            ]  # fmt: skip
            env.update(BENCH_AVATAR_HEIGHT=str(args.height), BENCH_AVATAR_FRAMES=str(args.avatar_frames))
            name = f"{args.height}p-{args.avatar_frames}-{args.device}.pkl"
            avatar_pickle = ROOT / "results" / "bench_avatars" / name  # written by bench_renderer in the server
        else:
            demo_video = ROOT / "data" / "video" / "demo.mp4"
            if not demo_video.is_file():  # what `make serve` builds first (the server then prepares the avatar)
                subprocess.run([sys.executable, "-m", "scripts.make_demo_video", "--out", str(demo_video)],
                               cwd=ROOT, check=True)  # fmt: skip
        if args.input == "audio":
            overrides.append("tts.engine=tone")  # nothing is synthesised (and the host needs no espeak-ng)
        overrides += args.set
        server: Server
        if args.cluster_replicas:
            from bench.bench_cluster import ClusterServer

            env["RAY_DEDUP_LOGS"] = "0"  # every replica's speak line, not "[repeated 7x across cluster]"
            server = ClusterServer(overrides, env, work / "server.log", args.cluster_replicas, 1000,
                                   ["--replicas-per-gpu", str(args.replicas_per_gpu)])  # fmt: skip
        else:
            server = Server(overrides, env, work / "server.log")
        try:
            meta["ready_s"] = server.wait_ready(900)
            meta["ready_log"] = ready_line(server)  # the server's own start-up breakdown (imports, load, ...)
            print(f"server ready after {meta['ready_s']:.1f} s", flush=True)  # progress: a timed-out run still says
            if args.device == "cuda" and renderer == "musetalk":
                target = "compiled+graphs" if args.compile else "graphs"
                meta["accelerated_s"] = server.wait_accelerated(target, 900)
                print(f"batch shapes {target} after {meta['accelerated_s']} s", flush=True)
            meta["startup_log"] = startup_lines(server)  # phases up to now: built, warmed, accelerated
            health = server.health()
            meta["renderer"], meta["capacity"] = health.get("renderer"), health.get("capacity")
            warm = {"file": ("w.wav", speech_wav(1.0, 0), "audio/wav")}
            for k in range(2 * max(1, args.cluster_replicas)):  # new sessions go to the least loaded replica
                httpx.post(f"{server.url}/speak_audio", files=warm, data={"session_id": f"warm{k}"}, timeout=300)
            cfg_overrides = [o for o in overrides if not o.startswith("server.")]
            meter = _meter(args, avatar_pickle, cfg_overrides, args.view_width)
            sampler = Sampler(None if args.cluster_replicas else server.proc.pid)  # a cluster: the machine only
            polled: list[dict[str, Any]] = []
            stop_polling = threading.Event()
            poller = threading.Thread(target=_poll_health, args=(server, polled, stop_polling), daemon=True)
            poller.start()
            ctx = multiprocessing.get_context("spawn")
            procs = []
            start = ctx.Barrier(args.sessions)
            for i in range(args.sessions):
                path = str(work / f"session-{i}.json")
                offset = args.stagger_s * i / args.sessions
                proc = ctx.Process(
                    target=_worker, args=(server.url, f"live{i}", args, meter, args.view_width, path, offset, start)
                )
                proc.start()
                procs.append((proc, path))
            sessions = []
            print(f"{args.sessions} viewer processes started", flush=True)
            if args.profile_s is not None:
                spy_at = threading.Timer(
                    args.profile_s, lambda: server.profile(args.out.parent / f"{args.out.stem}-pyspy", seconds=5)
                )
                spy_at.start()
            for proc, path in procs:
                proc.join()
                if proc.exitcode == 0:
                    sessions.append(json.loads(Path(path).read_text()))
                    print(f"session {len(sessions)} of {args.sessions} done", flush=True)
                else:
                    print(f"a session process failed with exit code {proc.exitcode}", flush=True)
            meta.update(sampler.stop())
            stop_polling.set()
            poller.join()
            meta["server_stream_figures_max"] = _worst(polled)
        finally:
            server.stop()
            server_log = (work / "server.log").read_text()
    summary = _summary(sessions) if sessions else {}
    speaks = _speak_lines(server_log)
    if summary:
        summary["server_split_ms"] = _server_split(speaks)
    result = {"meta": meta, "summary": summary, "sessions": sessions, "server_speaks": speaks,
              "server_log_tail": server_log[-3000:]}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    if summary:
        print(_table(meta, summary))
    print(f"wrote {args.out}")
    return 0 if sessions and len(sessions) == args.sessions else 1


def _table(meta: dict[str, Any], s: dict[str, Any]) -> str:
    def f(v: float | None, d: int = 0) -> str:
        return "-" if v is None else f"{v:.{d}f}"

    rows = [
        f"{meta['device']} {meta.get('gpu', '')} sessions={meta['sessions']} input={meta['input']} "
        f"renderer={(meta.get('renderer') or {}).get('name')}",
        f"request → first audible audio   p50 {f(s['first_audio_ms']['p50'])} ms   "
        f"p95 {f(s['first_audio_ms']['p95'])} ms   (n={s['first_audio_ms']['n']})",
        f"request → first speaking frame  p50 {f(s['first_frame_ms']['p50'])} ms   "
        f"p95 {f(s['first_frame_ms']['p95'])} ms",
        f"  each session's 2nd utterance on p50 {f(s['first_frame_after_first_ms']['p50'])} ms   "
        f"p95 {f(s['first_frame_after_first_ms']['p95'])} ms   (n={s['first_frame_after_first_ms']['n']}; "
        "the first ones start together)",
        f"  its last packet arrived       p50 {f(s['first_frame_complete_ms']['p50'])} ms   "
        f"p95 {f(s['first_frame_complete_ms']['p95'])} ms   (a browser decodes it then)",
        f"  of which: request → on air    p50 {f(s['on_air_event_ms']['p50'])} ms   "
        f"p95 {f(s['on_air_event_ms']['p95'])} ms   (the events channel's \"speaking\")",
        f"request → first moving mouth    p50 {f(s['first_moving_frame_ms']['p50'])} ms   "
        f"p95 {f(s['first_moving_frame_ms']['p95'])} ms",
        f"A/V offset (video − audio)      p50 {f(s['av_offset_ms']['p50'], 1)} ms   max |·| "
        f"{f(s['av_offset_ms']['max_abs'], 1)} ms",
        f"idle      {f(s['idle_fps'], 1)} fps, jitter {f(s['idle_jitter_ms'], 1)} ms",
        f"speaking  {f(s['speaking_fps'], 1)} fps, jitter {f(s['speaking_jitter_ms'], 1)} ms",
        f"interrupt → silence             p50 {f(s['interrupt_to_silence_ms']['p50'])} ms   max "
        f"{f(s['interrupt_to_silence_ms']['max'])} ms",
        f"errors {s['errors']}  cpu {f(meta.get('cpu_util_pct'))}%  gpu {f(meta.get('gpu_util_pct'))}%  "
        f"server {f(meta.get('server_cpu_cores'), 1)} cores, each viewer {f(s['viewer_cpu_cores'], 2)} cores",
        f"viewers' own loop lag (worst session) p95 {f(s['viewer_loop_lag_p95_ms'])} ms, max "
        f"{f(s['viewer_loop_lag_max_ms'])} ms",
        "server log, per utterance (p50 / p95): "
        + ", ".join(f"{k[:-3]} {f(v['p50'])} / {f(v['p95'])} ms" for k, v in s.get("server_split_ms", {}).items()),
        "server /health, worst over the run: "
        + ", ".join(f"{k} {f(v, 1)}" for k, v in meta.get("server_stream_figures_max", {}).items()),
    ]
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
