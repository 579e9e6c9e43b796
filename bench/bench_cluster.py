"""N concurrent sessions through the Ray Serve cluster vs the single `server_fast.py` on the same machine.

For each avatar height the benchmark starts `server_fast.py` (the single server) and the cluster with the
smallest `--replicas` (`python -m scripts.serve_cluster`, one replica per GPU) side by side, then each
larger cluster alone, all on 127.0.0.1 with the same settings, the benchmark's renderer factory (MuseTalk
with random weights in the real formats and a synthetic avatar, as bench/bench_concurrency.py) and the
tone voice. Each waits until ready and until every replica's batch shapes run accelerated, takes two
warm-up requests per replica, and then for each N has N new sessions POST one 5-s all-speech utterance
to /speak_audio at the same moment: `--repeats` rounds per N, the servers of a group taking turns round
by round (alternating order, so a slow moment of a shared machine falls on both alike); the median round
by frames/s is reported. Per round: aggregate frames/s, latency p50/p95, first blended frame p50/p95
(server-side), sessions finished within their 5 s, GPU and CPU use. The cluster's frames/s over the
single server's at the same N is the overhead of Ray (1.00 = none); with several cluster sizes, frames/s
over the smallest cluster's is the scaling (with `--per-replica`, N sessions per replica: ideal = the
ratio of replica counts).

With `--kill`, after the rounds of the largest cluster: N sessions speak, the replica owning most of them
is killed (SIGKILL), and every session speaks again until answered: the time until its request is
accepted and answered, and the clips lost (acknowledged clips minus the clip index the next answer
reports; must be 0).

    python bench/bench_cluster.py --device cuda --heights 1080 --ns 1 4 8 --replicas 1
    python bench/bench_cluster.py --device cuda --heights 1080 720 --replicas 1 2 4 8 --per-replica --ns 4 8 --kill
    python bench/bench_cluster.py --device cpu --size tiny --heights 360 --ns 1 2 4 --replicas 1 2 --kill  # here
    python bench/bench_cluster.py --device cuda --heights 1080 --ns 12 --replicas 2 --replicas-per-gpu 2  # 1 GPU

With `--replicas-per-gpu K`, K server processes share each GPU: on one GPU, `--replicas 2 --replicas-per-gpu
2` compares two processes (each its own interpreter for blending, encoding and streaming) with the single
server on the same GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_concurrency import (  # noqa: E402
    AUDIO_S,
    Server,
    _f,
    free_port,
    run_meta,
    run_round,
    speak,
    speech_wav,
)


class ClusterServer(Server):
    """`python -m scripts.serve_cluster` as a child process on 127.0.0.1 (it starts and stops its own Ray)."""

    def __init__(
        self,
        overrides: list[str],
        env: dict[str, str],
        log_path: Path,
        replicas: int,
        object_store_mb: int,
        extra_args: Sequence[str] = (),
    ) -> None:
        """extra_args: more serve_cluster options (e.g. --replicas-per-gpu 2)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.replicas = replicas
        cmd = [
            sys.executable,
            "-m",
            "scripts.serve_cluster",
            "--replicas",
            str(replicas),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--object-store-mb",
            str(object_store_mb),
            *extra_args,
        ]
        for item in overrides:
            cmd += ["--set", item]
        self.log = log_path.open("w")
        self.t_spawn = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds from spawn until /health answers 200 and lists every replica with its pid."""
        super().wait_ready(timeout_s)
        deadline = self.t_spawn + timeout_s
        while time.perf_counter() < deadline:
            if sum(1 for r in self.health().get("replicas", []) if r.get("pid")) == self.replicas:
                return time.perf_counter() - self.t_spawn
            time.sleep(0.2)
        raise TimeoutError("not every replica reported in time")

    def wait_accelerated(self, target: str, timeout_s: float) -> float | None:
        """Seconds from spawn until every batch shape of every replica reports `target`."""
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            rows = self.health().get("replicas", [])
            shapes = [r.get("accelerated") or {} for r in rows]
            if not rows or not all(shapes):
                return None
            if all(v == target for s in shapes for v in s.values()):
                return time.perf_counter() - self.t_spawn
            time.sleep(0.5)
        return None

    def stop(self) -> None:
        """Stop the cluster as Ctrl-C does (it shuts its Ray down), then kill if it hangs."""
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def overrides_for(args: argparse.Namespace, models_dir: Path, results_dir: Path, work: Path) -> list[str]:
    """The server settings both the single server and the cluster run with."""
    return [
        f"models.dir={models_dir}",
        f"runtime.device={args.device}",
        "server.renderer=bench.bench_concurrency:bench_renderer",
        "tts.engine=tone",
        "avatar_id=bench",
        "preparation=false",
        f"server.results_dir={results_dir}",
        f"server.log_dir={work / 'logs'}",
        # Per replica (one server process); with --per-replica each replica gets max(ns) sessions at most.
        f"server.max_live_sessions={max(args.ns) + 8}",  # measure the raw behaviour, not admission control
        f"server.queue_size={max(args.ns) * 2 + 8}",
        f"server.max_concurrent_uploads={min(256, max(args.ns) * max(args.replicas) + 8)}",  # all upload at once
        f"runtime.compile={str(args.compile).lower()}",
        f"encode.preset={args.preset}",
        *args.set,
    ]


def bring_up(args: argparse.Namespace, server: Server, label: str, height: int, wavs: list[bytes]) -> dict[str, Any]:
    """Ready, accelerated, then warm-up requests (two per replica, so that every replica has rendered)."""
    out: dict[str, Any] = {"label": label, "height": height, "rounds": {}}
    out["ready_s"] = server.wait_ready(args.start_timeout_s)
    target = ("compiled+graphs" if args.compile else "graphs") if args.device == "cuda" else ""
    out["accelerated_s"] = server.wait_accelerated(target, args.accel_timeout_s) if target else None
    out["health"] = server.health()
    for i in range(2 * (server.replicas if isinstance(server, ClusterServer) else 1)):
        speak(server.url, f"{label}-warm{i}", wavs[i % len(wavs)], time.perf_counter())
    return out


def sessions_for(args: argparse.Namespace, server: Server, n: int) -> int:
    """Sessions in a round of `n`: n, or n per replica with --per-replica (the single server counts as one)."""
    return n * (server.replicas if isinstance(server, ClusterServer) else 1) if args.per_replica else n


def measure(
    args: argparse.Namespace,
    servers: dict[str, Server],
    runs: dict[str, dict[str, Any]],
    height: int,
    wavs: list[bytes],
) -> None:
    """For each N, `repeats` rounds on every server, the servers taking turns (alternating order), so that
    a slow moment of the machine falls on all of them alike; the median round by frames/s is kept."""
    labels = list(servers)
    for n in args.ns:
        rounds: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
        for k in range(args.repeats):
            for label in labels if k % 2 == 0 else labels[::-1]:
                r = run_round(
                    servers[label].url, sessions_for(args, servers[label], n), f"{label}-n{n}-r{k}", False, wavs
                )
                r.pop("requests", None)
                rounds[label].append(r)
        for label in labels:
            best = sorted(rounds[label], key=lambda r: r["aggregate_fps"])[len(rounds[label]) // 2]
            best["all_fps"] = [round(r["aggregate_fps"], 1) for r in rounds[label]]
            runs[label]["rounds"][n] = best
            print(
                f"{height}p {label:10s} N={best['n']:2d} fps={best['aggregate_fps']:6.1f} {best['all_fps']} "
                f"lat p50/p95={_f(best['latency_p50_s'])}/{_f(best['latency_p95_s'])} s "
                f"first p50/p95={_f(best['first_frame_p50_ms'], 0)}/{_f(best['first_frame_p95_ms'], 0)} ms "
                f"rt={best['realtime']}/{best['n']} ok={best['ok']} gpu={_f(best['gpu_util_pct'], 0)}% "
                f"{best.get('gpu_util_pct_each') or ''} "
                f"cpu={_f(best['cpu_util_pct'], 0)}% {best['errors'] or ''}",
                flush=True,
            )


def kill_round(server: ClusterServer, n: int, label: str, wavs: list[bytes]) -> dict[str, Any]:
    """N sessions speak once; a replica that owns some of them is killed; each speaks again until answered."""
    sessions = [f"{label}-kill-{i}" for i in range(n)]
    acknowledged: dict[str, int] = {}
    owner: dict[str, str] = {}
    lock = threading.Lock()

    def first(i: int) -> None:
        r = httpx.post(
            f"{server.url}/speak_audio",
            files={"file": ("u.wav", wavs[i % len(wavs)], "audio/wav")},
            data={"session_id": sessions[i]},
            timeout=300,
        )
        if r.status_code == 200:
            with lock:
                acknowledged[sessions[i]] = 1
                owner[sessions[i]] = r.headers.get("x-served-by", "")

    threads = [threading.Thread(target=first, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = server.health()["replicas"]
    victim = max(rows, key=lambda r: sum(1 for o in owner.values() if o == r["id"]))
    moved = [s for s, o in owner.items() if o == victim["id"]]
    os.kill(int(victim["pid"]), signal.SIGKILL)
    t_kill = time.perf_counter()
    accepted: dict[str, float] = {}  # kill → the send of the request that was answered 200
    served_again: dict[str, float] = {}  # kill → that answer (it includes rendering the utterance)
    lost: dict[str, int] = {}
    statuses: dict[int, int] = {}

    def again(i: int) -> None:
        session = sessions[i]
        while time.perf_counter() - t_kill < 300:
            t_send = time.perf_counter()
            try:
                r = httpx.post(
                    f"{server.url}/speak_audio",
                    data={"session_id": session},
                    files={"file": ("u.wav", wavs[i % len(wavs)], "audio/wav")},
                    timeout=300,
                )
            except httpx.HTTPError:
                time.sleep(0.5)
                continue
            with lock:
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 200:
                with lock:
                    accepted[session] = t_send - t_kill
                    served_again[session] = time.perf_counter() - t_kill
                    lost[session] = acknowledged.get(session, 0) - int(r.json()["clip_index"])
                return
            time.sleep(0.5)

    threads = [threading.Thread(target=again, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    moved_s = [served_again[s] for s in moved if s in served_again]
    moved_accepted = [accepted[s] for s in moved if s in accepted]
    result = {
        "sessions": n,
        "killed_replica": victim["id"],
        "sessions_on_killed_replica": len(moved),
        "served_again": len(served_again),
        "max_s_to_accepted_moved": max(moved_accepted) if moved_accepted else None,
        "max_s_to_answered_moved": max(moved_s) if moved_s else None,
        "max_s_to_answered_all": max(served_again.values()) if served_again else None,
        "clips_lost": sum(max(0, v) for v in lost.values()),
        "statuses": statuses,
    }
    print(f"kill: {result}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print a table; write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--size", choices=["full", "tiny"], default=None, help="weights (default: full on cuda)")
    parser.add_argument("--models", type=Path, default=None, help="models folder (default results/bench_models/<size>)")
    parser.add_argument("--heights", type=int, nargs="+", default=[1080])
    parser.add_argument("--ns", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1], help="cluster sizes to run (one GPU each)")
    parser.add_argument(
        "--replicas-per-gpu",
        type=int,
        default=1,
        help="server processes sharing each GPU (serve_cluster --replicas-per-gpu)",
    )
    parser.add_argument(
        "--per-replica",
        action="store_true",
        help="each N is sessions per replica (a cluster of R replicas gets N x R at once)",
    )
    parser.add_argument("--no-single", dest="single", action="store_false", help="skip the server_fast.py baseline")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per N (the median is reported)")
    parser.add_argument("--kill", action="store_true", help="kill a replica of the largest cluster at the end")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--object-store-mb", type=int, default=1000, help="the cluster's Ray object store")
    parser.add_argument("--preset", default="veryfast")
    parser.add_argument("--avatar-frames", type=int, default=50)
    parser.add_argument("--start-timeout-s", type=float, default=400)
    parser.add_argument("--accel-timeout-s", type=float, default=400)
    parser.add_argument("--set", action="append", default=[], help="extra server overrides key=value")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_cluster.json")
    args = parser.parse_args(argv)
    size = args.size or ("full" if args.device == "cuda" else "tiny")
    models_dir = args.models or ROOT / "results" / "bench_models" / size
    from bench.bench_engine import ensure_models

    write_s = ensure_models(models_dir, size)
    import ray

    meta = run_meta(args.device, size=size, ray=ray.__version__, write_models_s=write_s, audio_s=AUDIO_S,
                    preset=args.preset, compile=args.compile, repeats=args.repeats,
                    replicas_per_gpu=args.replicas_per_gpu)  # fmt: skip
    result: dict[str, Any] = {"meta": meta, "runs": [], "summary": []}
    wavs = [speech_wav(AUDIO_S, seed) for seed in range(8)]
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        work = Path(tmp)
        for height in args.heights:
            env = {
                "BENCH_AVATAR_HEIGHT": str(height),
                "BENCH_AVATAR_FRAMES": str(args.avatar_frames),
                "PYTHONUNBUFFERED": "1",
            }
            clusters = [(f"cluster{r}", r) for r in args.replicas]
            # The single server and the smallest cluster run side by side, taking turns round by round (one
            # GPU holds both); larger clusters need the GPUs to themselves and come one after another.
            groups = (
                [[("single", 0), clusters[0]], *[[c] for c in clusters[1:]]] if args.single else [[c] for c in clusters]
            )
            runs: dict[str, dict[str, Any]] = {}
            for group in groups:
                servers: dict[str, Server] = {}
                try:
                    for label, replicas in group:
                        overrides = overrides_for(args, models_dir, work / f"results-{height}-{label}", work)
                        log = work / f"server-{height}-{label}.log"
                        servers[label] = (
                            ClusterServer(
                                overrides,
                                env,
                                log,
                                replicas,
                                args.object_store_mb,
                                ["--replicas-per-gpu", str(args.replicas_per_gpu)],
                            )
                            if replicas
                            else Server(overrides, env, log)
                        )
                    for label, server in servers.items():
                        runs[label] = bring_up(args, server, label, height, wavs)
                    measure(args, servers, runs, height, wavs)
                    label, last = group[-1][0], servers[group[-1][0]]
                    if args.kill and isinstance(last, ClusterServer) and last.replicas == max(args.replicas) > 1:
                        runs[label]["kill"] = kill_round(last, sessions_for(args, last, max(args.ns)), label, wavs)
                except Exception as exc:  # keep the other runs' figures
                    print(
                        f"{height}p {[g[0] for g in group]}: FAILED {type(exc).__name__}: {str(exc)[-2000:]}",
                        flush=True,
                    )
                    for label, _ in group:
                        log = work / f"server-{height}-{label}.log"
                        runs.setdefault(label, {"label": label, "height": height, "rounds": {}})
                        runs[label]["error"] = str(exc)[-4000:]
                        runs[label]["log_tail"] = log.read_text()[-4000:] if log.is_file() else ""
                finally:
                    for server in servers.values():
                        server.stop()
                result["runs"] = [r for r in result["runs"] if r.get("height") != height] + list(runs.values())
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=1))
            result["summary"] += summarize(height, runs, args)
        result["server_log_tails"] = {p.name: p.read_text()[-3000:] for p in sorted(work.glob("server-*.log"))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


def summarize(height: int, runs: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per N: frames/s of each run, the cluster over the single server (Ray's overhead), and the scaling."""
    rows = []
    for n in args.ns:
        fps = {label: run["rounds"][n]["aggregate_fps"] for label, run in runs.items() if n in run.get("rounds", {})}
        row: dict[str, Any] = {"height": height, "n": n, "fps": {k: round(v, 1) for k, v in fps.items()}}
        one = fps.get(f"cluster{min(args.replicas)}")
        smallest = f"cluster{min(args.replicas)}"
        if "single" in fps and smallest in fps:  # Ray's overhead (one replica), or what K processes on a GPU add
            row[f"{smallest}_over_single"] = round(fps[smallest] / fps["single"], 3)
        if one:
            clusters = {k: v for k, v in fps.items() if k.startswith("cluster")}
            row["scaling_vs_smallest_cluster"] = {k: round(v / one, 2) for k, v in clusters.items()}
        rows.append(row)
        print(f"{height}p N={n}: {row}", flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
