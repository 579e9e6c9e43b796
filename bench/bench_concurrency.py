"""Concurrent sessions through the real HTTP server: the frame scheduler vs one clip at a time.

For each avatar height and scheduler mode the benchmark starts `server_fast.py` on 127.0.0.1 (its real
app, render threads, frame scheduler, blending, encoding and session appends), waits until it is ready
(recording the start-up time and when every batch shape is accelerated), sends one request at once
while the background acceleration is still running, and then, for each N, has N sessions each POST one
5-s all-speech utterance to /speak_audio at the same moment (and, with --staggered, spread over 5 s).
Per N it reports aggregate frames/s, latency p50/p95, first blended frame p50/p95 (server-side, from the
response's timings_ms: from the audio decoded, and from the request's arrival — `upload` plus that), the
upload p50/p95 (request in → audio decoded), sessions finished within their audio's duration, GPU and CPU
use. All sessions' requests go through one HTTP client (`http_client`).

The avatar is a synthetic one built in memory by the renderer factory below (textured frames with a
moving face; latents = VAE encodings of its crops): the rest of the server is exactly what `make serve`
runs. Weights are random, in the real on-disk formats (full size on CUDA: the real FLOPs).

    python bench/bench_concurrency.py --device cuda --heights 1080 720 --out results/bench_concurrency.json
    python bench/bench_concurrency.py --device cpu --size tiny --heights 360 --ns 1 2 4   # this CPU machine
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import pickle
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from musetalk.config import AppConfig  # noqa: E402
from musetalk.types import Renderer  # noqa: E402

AUDIO_S = 5.0


def bench_renderer(cfg: AppConfig) -> Renderer:
    """Renderer factory for `server.renderer=bench.bench_concurrency:bench_renderer`: MuseTalk + a synthetic avatar.

    BENCH_AVATAR_HEIGHT (px, 16:9) and BENCH_AVATAR_FRAMES pick the avatar.
    """
    from musetalk.models import load_models
    from musetalk.pipeline.synthetic import synthetic_avatar
    from musetalk.server.renderer import engine_renderer

    height = int(os.environ.get("BENCH_AVATAR_HEIGHT", "1080"))
    width = (height * 16 // 9) // 2 * 2
    n_frames = int(os.environ.get("BENCH_AVATAR_FRAMES", "50"))
    t0 = time.perf_counter()
    bundle = load_models(cfg)
    t1 = time.perf_counter()
    # Built once per size and kept as a pickle, so that start-up figures measure the server, not this build
    # (a real avatar cache loads from disk in a fraction of a second).
    stored = ROOT / "results" / "bench_avatars" / f"{height}p-{n_frames}-{bundle.device.type}.pkl"
    if stored.is_file():
        with stored.open("rb") as f:
            avatar = replace(pickle.load(f), avatar_id=cfg.avatar_id)
    else:
        avatar = synthetic_avatar(
            n_frames=n_frames, height=height, width=width, vae=bundle.vae, vae_scale=bundle.vae_scale,
            avatar_id=cfg.avatar_id, fps=cfg.fps,
        )
        stored.parent.mkdir(parents=True, exist_ok=True)
        with stored.open("wb") as f:
            pickle.dump(avatar, f)
    t2 = time.perf_counter()
    renderer = engine_renderer(cfg, {cfg.avatar_id: avatar}, bundle)
    logging.getLogger("bench").info(
        "bench renderer: models_ms=%.0f avatar_ms=%.0f engine_ms=%.0f",
        (t1 - t0) * 1000, (t2 - t1) * 1000, (time.perf_counter() - t2) * 1000,
    )  # fmt: skip
    return renderer


def speech_wav(seconds: float, seed: int) -> bytes:
    """A 16 kHz voiced signal with syllable-rate loudness, never silent (every frame is generated)."""
    rate = 16000
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    f0 = 140 + 20 * seed % 60
    voice = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * (3 + 0.2 * seed) * t)
    x = 0.15 * voice * envelope + 0.01 * rng.standard_normal(len(t))
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sampler:
    """Samples GPU utilisation (nvidia-smi) and whole-machine CPU use (/proc/stat) in the background."""

    def __init__(self, pid: int | None = None) -> None:
        """pid: also sample this process's CPU use (in cores: 1.0 = one core busy)."""
        self.gpu: list[float] = []  # every GPU's samples together
        self.per_gpu: dict[int, list[float]] = {}
        self.cpu: list[float] = []
        self.pid = pid
        self.proc_cores: list[float] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._cpu, daemon=True)]
        self._smi: subprocess.Popen[str] | None = None
        if shutil.which("nvidia-smi"):
            self._smi = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )
            self._threads.append(threading.Thread(target=self._gpu, daemon=True))
        for t in self._threads:
            t.start()

    def _gpu(self) -> None:
        assert self._smi is not None and self._smi.stdout is not None
        for line in self._smi.stdout:
            if self._stop.is_set():
                break
            try:
                index, util = (field.strip() for field in line.split(","))
                self.gpu.append(float(util))
                self.per_gpu.setdefault(int(index), []).append(float(util))
            except ValueError:
                continue

    def _cpu(self) -> None:
        def read() -> tuple[int, int]:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            return sum(fields), fields[3] + fields[4]  # total, idle + iowait

        def ticks_of_pid() -> int | None:
            if self.pid is None:
                return None
            try:  # utime + stime (fields 14, 15), after the ")" that ends the command name
                fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                return None
            return int(fields[11]) + int(fields[12])

        hz = os.sysconf("SC_CLK_TCK")
        total0, idle0 = read()
        proc0, t0 = ticks_of_pid(), time.monotonic()
        while not self._stop.wait(0.5):
            total1, idle1 = read()
            if total1 > total0:
                self.cpu.append(100.0 * (1 - (idle1 - idle0) / (total1 - total0)))
            total0, idle0 = total1, idle1
            proc1, t1 = ticks_of_pid(), time.monotonic()
            if proc0 is not None and proc1 is not None:
                self.proc_cores.append((proc1 - proc0) / hz / (t1 - t0))
            proc0, t0 = proc1, t1

    def stop(self) -> dict[str, float | list[float] | None]:
        """Mean GPU and CPU use (%) while it ran (with several GPUs, also each one's)."""
        self._stop.set()
        if self._smi is not None:
            self._smi.terminate()
        return {
            "gpu_util_pct": statistics.mean(self.gpu) if self.gpu else None,
            **({"gpu_util_pct_each": [round(statistics.mean(v), 1) for _, v in sorted(self.per_gpu.items())]}
               if len(self.per_gpu) > 1 else {}),
            "cpu_util_pct": statistics.mean(self.cpu) if self.cpu else None,
            **({"server_cpu_cores": statistics.mean(self.proc_cores)} if self.proc_cores else {}),
        }


@dataclass
class Request:
    session: str
    t_send: float
    t_done: float = 0.0
    status: int = 0
    frames: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    error: str = ""


def pct(values: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of values, None if empty."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(np.ceil(q * len(s))) - 1))]


class Server:
    """server_fast.py as a child process on 127.0.0.1."""

    def __init__(self, overrides: list[str], env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, str(ROOT / "server_fast.py"), "--host", "127.0.0.1", "--port", str(self.port)]
        for item in overrides:
            cmd += ["--set", item]
        self.log = log_path.open("w")
        self.t_spawn = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds from spawn until /health answers 200."""
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                self.log.flush()
                tail = Path(self.log.name).read_text()[-4000:]
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{tail}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.perf_counter() - self.t_spawn
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError("server not ready in time")

    def health(self) -> dict[str, Any]:
        """GET /health as JSON."""
        return dict(httpx.get(self.url + "/health", timeout=5).json())

    def wait_accelerated(self, target: str, timeout_s: float) -> float | None:
        """Seconds from spawn until every batch shape reports `target` (None on timeout or without shapes)."""
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            shapes = self.health().get("scheduler", {}).get("accelerated", {})
            if not shapes:
                return None
            if all(v == target for v in shapes.values()):
                return time.perf_counter() - self.t_spawn
            time.sleep(0.2)
        return None

    def profile(self, out: Path, seconds: int = 4) -> threading.Thread | None:
        """py-spy while a round runs: `out`.gil.txt (GIL holders), then `out`.all.txt (every thread, idle too)."""
        spy = shutil.which("py-spy")
        if spy is None:
            print("py-spy not installed: no profile", flush=True)
            return None
        base = [spy, "record", "--pid", str(self.proc.pid), "--duration", str(seconds), "--rate", "250",
                "--threads", "--format", "raw", "--nonblocking"]  # fmt: skip

        def record() -> None:
            for tag, extra in (("gil", ["--gil"]), ("all", ["--idle"])):
                cmd = [*base, *extra, "--output", f"{out}.{tag}.txt"]
                subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)

        thread = threading.Thread(target=record, daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """Stop the server (SIGTERM, then kill)."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


_http: httpx.Client | None = None
_http_lock = threading.Lock()


def http_client() -> httpx.Client:
    """The one HTTP client of every session's requests (thread-safe, its pool holding a connection per session).

    A client per request (`httpx.post`) builds a TLS context even for http:// — ~30 ms of this process's CPU
    each, under its GIL: sixteen sessions starting at once reached the server over ~0.5 s (up to 0.73 s after
    their send on the H200 host), which the latencies counted as the server's."""
    global _http
    with _http_lock:
        if _http is None:
            limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
            _http = httpx.Client(timeout=300, limits=limits)
        return _http


def speak(url: str, session: str, wav: bytes, start_at: float) -> Request:
    """POST one utterance at `start_at` (perf_counter time) and record what came back."""
    client = http_client()
    delay = start_at - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
    req = Request(session, time.perf_counter())
    try:
        r = client.post(
            url + "/speak_audio", files={"file": ("u.wav", wav, "audio/wav")}, data={"session_id": session}
        )
        req.status = r.status_code
        if r.status_code == 200:
            body = r.json()
            req.timings = body["timings_ms"]
            req.frames = round(body["clip_duration_s"] * 25)
        else:
            req.error = r.text[:200]
    except httpx.HTTPError as exc:
        req.error = f"{type(exc).__name__}: {exc}"
    req.t_done = time.perf_counter()
    return req


def run_round(url: str, n: int, tag: str, staggered: bool, wavs: list[bytes]) -> dict[str, Any]:
    """N sessions, one utterance each, at once (or spread over AUDIO_S)."""
    t0 = time.perf_counter() + 0.3
    results: list[Request] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        offset = (i * AUDIO_S / n) if staggered else 0.0
        r = speak(url, f"{tag}-{i}", wavs[i % len(wavs)], t0 + offset)
        with lock:
            results.append(r)

    sampler = Sampler()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    use = sampler.stop()
    ok = [r for r in results if r.status == 200]
    latencies = [r.t_done - r.t_send for r in ok]
    first = [r.timings.get("first_frame", 0.0) for r in ok]
    upload = [r.timings["upload"] for r in ok if "upload" in r.timings]  # request in → its audio decoded
    from_arrival = [r.timings["upload"] + r.timings.get("first_frame", 0.0) for r in ok if "upload" in r.timings]
    span = max(r.t_done for r in results) - min(r.t_send for r in results)
    return {
        "n": n,
        "staggered": staggered,
        "ok": len(ok),
        "errors": sorted({f"{r.status} {r.error[:80]}" for r in results if r.status != 200}),
        "aggregate_fps": sum(r.frames for r in ok) / span if span > 0 else 0.0,
        "latency_p50_s": pct(latencies, 0.5),
        "latency_p95_s": pct(latencies, 0.95),
        "first_frame_p50_ms": pct(first, 0.5),
        "first_frame_p95_ms": pct(first, 0.95),
        "upload_p50_ms": pct(upload, 0.5),
        "upload_p95_ms": pct(upload, 0.95),
        "first_frame_from_request_p50_ms": pct(from_arrival, 0.5),  # request in → first frame (server clock)
        "first_frame_from_request_p95_ms": pct(from_arrival, 0.95),
        "realtime": sum(1 for x in latencies if x <= AUDIO_S),
        "server_total_p50_ms": pct([r.timings.get("total", 0.0) for r in ok], 0.5),
        **use,
        "requests": [asdict(r) for r in results],
    }


def run_config(args: argparse.Namespace, models_dir: Path, height: int, mode: str, work: Path) -> dict[str, Any]:
    """One server (height, scheduler mode): start-up figures, then every N."""
    results_dir = work / f"results-{height}-{mode}"
    overrides = [
        f"models.dir={models_dir}",
        f"runtime.device={args.device}",
        "server.renderer=bench.bench_concurrency:bench_renderer",
        "tts.engine=tone",
        "avatar_id=bench",
        "preparation=false",
        f"server.results_dir={results_dir}",
        f"server.log_dir={work / 'logs'}",
        f"engine.scheduler={mode}",
        f"server.max_live_sessions={max(args.ns) + 8}",  # measure the raw behaviour, not admission control
        f"server.queue_size={max(args.ns) * 2 + 8}",
        f"server.max_concurrent_uploads={max(args.ns) + 8}",  # every session uploads its audio at once
        f"runtime.compile={str(args.compile).lower()}",
        f"encode.preset={args.preset}",
        *args.set,
    ]
    env = {"BENCH_AVATAR_HEIGHT": str(height), "BENCH_AVATAR_FRAMES": str(args.avatar_frames), "PYTHONUNBUFFERED": "1"}
    server = Server(overrides, env, work / f"server-{height}-{mode}.log")
    out: dict[str, Any] = {"height": height, "mode": mode, "rounds": []}
    try:
        out["ready_s"] = server.wait_ready(args.start_timeout_s)
        out["ready_log"] = ready_line(server)
        wavs = [speech_wav(AUDIO_S, seed) for seed in range(8)]
        # The first request while graphs are still being captured / modules compiled in the background.
        early = speak(server.url, "early", wavs[0], time.perf_counter())
        out["first_request_during_acceleration"] = {
            "status": early.status, "latency_s": early.t_done - early.t_send, "error": early.error,
            "accelerated_then": server.health().get("scheduler", {}).get("accelerated"),
        }
        target = ("compiled+graphs" if args.compile else "graphs") if args.device == "cuda" else ""
        out["accelerated_s"] = server.wait_accelerated(target, args.accel_timeout_s) if target else None
        out["startup_log"] = startup_lines(server)  # phases up to now: built, warmed, accelerated
        health = server.health()
        out["health"] = {k: health.get(k) for k in ("renderer", "capacity", "scheduler")}
        speak(server.url, "warm", wavs[1], time.perf_counter())  # every stage warm once more
        for n in args.ns:
            if mode == "serial" and n > args.serial_max_n:
                continue
            for staggered in (False, True) if (args.staggered and mode == "batched") else (False,):
                tag = f"{'st' if staggered else 'n'}{n}"
                before = server.health().get("scheduler", {}).get("thread_s", {})
                spy = server.profile(args.out.parent / f"pyspy-{height}-{mode}-{tag}") if n in args.profile_ns else None
                r = run_round(server.url, n, tag, staggered, wavs)
                if spy is not None:
                    spy.join()
                after = server.health().get("scheduler", {}).get("thread_s", {})
                # Where the scheduler's GPU thread spent this round (s): idle, prepare, launch, collect.
                r["gpu_thread_s"] = {k: round(after[k] - before.get(k, 0.0), 3) for k in after}
                out["rounds"].append(r)
                print(
                    f"{height}p {mode:7s} N={n:2d}{' stag' if staggered else '     '} fps={r['aggregate_fps']:6.1f} "
                    f"lat p50/p95={_f(r['latency_p50_s'])}/{_f(r['latency_p95_s'])} s "
                    f"first p50/p95={_f(r['first_frame_p50_ms'], 0)}/{_f(r['first_frame_p95_ms'], 0)} ms "
                    f"(upload {_f(r['upload_p50_ms'], 0)}/{_f(r['upload_p95_ms'], 0)}, from request "
                    f"{_f(r['first_frame_from_request_p50_ms'], 0)}/{_f(r['first_frame_from_request_p95_ms'], 0)}) "
                    f"rt={r['realtime']}/{n} ok={r['ok']} gpu={_f(r['gpu_util_pct'], 0)}% "
                    f"cpu={_f(r['cpu_util_pct'], 0)}% {r['errors'] or ''} gpu-thread={r['gpu_thread_s']}",
                    flush=True,
                )
    finally:
        server.stop()
    return out


def startup_only(args: argparse.Namespace, models_dir: Path, compile_: bool, work: Path, tag: str) -> dict[str, Any]:
    """Process start → ready, and → every shape accelerated, for one configuration."""
    overrides = [
        f"models.dir={models_dir}", f"runtime.device={args.device}",
        "server.renderer=bench.bench_concurrency:bench_renderer", "tts.engine=tone", "avatar_id=bench",
        "preparation=false", f"server.results_dir={work / ('results-start-' + tag)}", f"server.log_dir={work / 'logs'}",
        f"runtime.compile={str(compile_).lower()}", *args.set,
    ]
    env = {"BENCH_AVATAR_HEIGHT": "720", "BENCH_AVATAR_FRAMES": str(args.avatar_frames), "PYTHONUNBUFFERED": "1"}
    server = Server(overrides, env, work / f"server-start-{tag}.log")
    try:
        ready = server.wait_ready(args.start_timeout_s)
        ready_log = ready_line(server)
        early = speak(server.url, "early", speech_wav(AUDIO_S, 0), time.perf_counter())
        accel = server.wait_accelerated("compiled+graphs" if compile_ else "graphs", args.accel_timeout_s)
    finally:
        server.stop()
    row = {"tag": tag, "compile": compile_, "ready_s": ready, "accelerated_s": accel, "ready_log": ready_log,
           "first_request_status": early.status, "first_request_latency_s": early.t_done - early.t_send}
    print(f"start-up {tag}: ready {ready:.1f} s, accelerated {_f(accel)} s, first request {early.status} "
          f"in {early.t_done - early.t_send:.2f} s", flush=True)
    return row


def run_meta(device: str, /, **extra: Any) -> dict[str, Any]:
    """The header of a bench's JSON: when, the command, the host, and on CUDA the GPUs and torch; plus `extra`."""
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(), **extra,
    }  # fmt: skip
    if device == "cuda":
        import torch

        meta.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(), torch=torch.__version__)
    return meta


STARTUP_RUNS = ("graphs", "compile-cold", "compile-warm")  # --startup: in this order
STARTUP_MARKS = (
    " ready ", "renderer built", "bench renderer:", "audio path warmed", "warm-up clip rendered", "shapes accelerated"
)


def ready_line(server: Server) -> str:
    """The server's "ready" log line (its start-up breakdown)."""
    lines = startup_lines(server)
    return next((ln for ln in reversed(lines) if " ready " in ln), "")


def startup_lines(server: Server) -> list[str]:
    """The server's log lines about its start-up so far (phases and their times)."""
    server.log.flush()
    return [ln for ln in Path(server.log.name).read_text().splitlines() if any(m in ln for m in STARTUP_MARKS)]


def _f(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print a table; write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--size", choices=["full", "tiny"], default=None, help="weights (default: full on cuda)")
    parser.add_argument("--models", type=Path, default=None, help="models folder (default results/bench_models/<size>)")
    parser.add_argument("--heights", type=int, nargs="+", default=[1080, 720])
    parser.add_argument("--modes", nargs="+", default=["batched", "serial"], choices=["batched", "serial"])
    parser.add_argument("--ns", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16, 24])
    parser.add_argument("--serial-max-n", type=int, default=16, help="skip larger N for the (slow) serial baseline")
    parser.add_argument("--serial-heights", type=int, nargs="*", default=None, help="heights that get a baseline")
    parser.add_argument("--staggered", action="store_true", help="also arrivals spread over 5 s (batched)")
    parser.add_argument("--startup", nargs="*", choices=STARTUP_RUNS, default=None,
                        help="also measure start-up: these runs (all three when none is named; compile-cold empties "
                        "the compile cache first)")  # fmt: skip
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--preset", default="veryfast")
    parser.add_argument("--avatar-frames", type=int, default=50)
    parser.add_argument("--start-timeout-s", type=float, default=300)
    parser.add_argument("--accel-timeout-s", type=float, default=300)
    parser.add_argument("--profile-ns", type=int, nargs="*", default=[], help="N whose round py-spy records")
    parser.add_argument("--set", action="append", default=[], help="extra server overrides key=value")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_concurrency.json")
    args = parser.parse_args(argv)
    size = args.size or ("full" if args.device == "cuda" else "tiny")
    models_dir = args.models or ROOT / "results" / "bench_models" / size
    from bench.bench_engine import ensure_models

    write_s = ensure_models(models_dir, size)
    meta = run_meta(args.device, size=size, write_models_s=write_s, audio_s=AUDIO_S, preset=args.preset,
                    compile=args.compile)  # fmt: skip
    result: dict[str, Any] = {"meta": meta, "configs": [], "startup": []}
    with tempfile.TemporaryDirectory(prefix="bench-conc-") as tmp:
        work = Path(tmp)
        if args.startup is not None and args.device == "cuda":
            for tag in args.startup or STARTUP_RUNS:
                compile_ = tag != "graphs"
                if tag == "compile-cold":
                    shutil.rmtree(ROOT / ".cache" / "torch-compile", ignore_errors=True)
                try:
                    result["startup"].append(startup_only(args, models_dir, compile_, work, tag))
                except Exception as exc:
                    print(f"start-up {tag}: FAILED {type(exc).__name__}: {str(exc)[-2000:]}", flush=True)
                    result["startup"].append({"tag": tag, "error": str(exc)[-4000:]})
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=1))
        for height in args.heights:
            for mode in args.modes:
                if mode == "serial" and args.serial_heights is not None and height not in args.serial_heights:
                    continue
                try:
                    result["configs"].append(run_config(args, models_dir, height, mode, work))
                except Exception as exc:  # keep the other configurations' figures
                    print(f"{height}p {mode}: FAILED {type(exc).__name__}: {str(exc)[-2000:]}", flush=True)
                    result["configs"].append({"height": height, "mode": mode, "error": str(exc)[-4000:]})
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=1))
        logs = sorted(work.glob("server-*.log"))
        result["server_log_tails"] = {p.name: p.read_text()[-3000:] for p in logs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
