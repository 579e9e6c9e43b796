"""`make serve-cluster`: the server on a Ray Serve cluster — REPLICAS copies (one GPU each), sessions pinned.

    python -m scripts.serve_cluster [--replicas N] [--host H] [--port P] [--config FILE] [--set key=value ...]

Serves the same HTTP API and web page as `server_fast.py` on HOST:PORT through Ray Serve's HTTP proxy.
Without RAY_ADDRESS it starts a Ray cluster on this machine (127.0.0.1, no dashboard) and stops it again
on Ctrl-C or SIGTERM. With RAY_ADDRESS set (`ray start --head` on one host, `ray start --address ...` on
the others) it joins that cluster, deploys the application, and on exit removes the application only.
Each replica asks for one GPU when the cluster has GPUs (1/K of one with --replicas-per-gpu K) and an
equal share of the cluster's CPUs; REPLICAS defaults to the number of GPUs × K (2 without GPUs). Exits
with status 2 when the application cannot start (with the replica's message).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from musetalk.cli import add_config_args, config_from_args
from musetalk.config import PROJECT_ROOT, AppConfig, with_overrides
from musetalk.errors import ConfigError, MuseTalkError

EXIT_CANNOT_START = 2
CPU_REPLICAS = 2  # default on a cluster without GPUs
WORKER_NICENESS_ENV = "RAY_worker_niceness"
log = logging.getLogger("serve_cluster")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description="MuseTalk warm server on a Ray Serve cluster")
    add_config_args(parser)
    parser.add_argument("--host", default=None, help="bind address of the HTTP proxy (default: server.host)")
    parser.add_argument("--port", type=int, default=None, help="port (default: server.port)")
    parser.add_argument("--replicas", type=int, default=0, help="server replicas (default: one per GPU, else 2)")
    parser.add_argument("--replicas-per-gpu", type=int, default=1,
                        help="server processes sharing each GPU (each has its own event loop and GIL for its "
                             "sessions' live streams; the GPU's batches are then split between them)")
    parser.add_argument("--gateways", type=int, default=1, help="gateway replicas (request parsing, no GPU)")
    parser.add_argument("--cpus-per-replica", type=int, default=0,
                        help="cores each replica asks for (default: the cluster's CPUs / replicas)")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="local cluster only: CPUs Ray may schedule on (default: max(cores, replicas))")
    parser.add_argument("--object-store-mb", type=int, default=None, help="local cluster only: object store size")
    return parser.parse_args(argv)


def load(args: argparse.Namespace) -> AppConfig:
    """The config with --host/--port applied."""
    cfg = config_from_args(args)
    overrides = [f"server.host={args.host}"] if args.host is not None else []
    overrides += [f"server.port={args.port}"] if args.port is not None else []
    return with_overrides(cfg, overrides) if overrides else cfg


def replica_plan(gpus: int, replicas: int, per_gpu: int) -> tuple[int, float]:
    """(replicas, GPUs each): `per_gpu` per GPU unless `replicas` is given; without GPUs CPU_REPLICAS, no GPU."""
    if per_gpu < 1:
        raise ConfigError(f"--replicas-per-gpu must be at least 1, got {per_gpu}")
    if not gpus:
        return replicas or CPU_REPLICAS, 0.0
    # Ray counts GPU shares to 4 decimals: 3 replicas of 0.3333 fit on one GPU.
    return replicas or gpus * per_gpu, 1.0 if per_gpu == 1 else int(10_000 / per_gpu) / 10_000


def prepare_avatars(cfg: AppConfig) -> None:
    """Build missing avatar caches once, here, rather than in every replica at once (built-in renderers)."""
    from musetalk.server.app import configured_avatars
    from musetalk.server.renderer import BUILT_IN, ensure_prepared

    if cfg.server.renderer in BUILT_IN:
        for avatar_id in configured_avatars(cfg):
            ensure_prepared(cfg, avatar_id)


def main(argv: list[str] | None = None) -> int:
    """Start (or join) the cluster, deploy, serve until interrupted; returns the exit status."""
    args = parse_args(argv)
    try:
        cfg = load(args)
        replica_plan(0, args.replicas, args.replicas_per_gpu)  # bad arguments fail here, before Ray starts
    except ConfigError as exc:
        print(f"serve_cluster: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    from musetalk.utils.logs import configure_logging

    configure_logging(cfg.server.log_level)
    try:
        prepare_avatars(cfg)
    except MuseTalkError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_CANNOT_START

    address = os.environ.get("RAY_ADDRESS")
    if not address:
        # One host: Ray's processes address each other over loopback. Ray otherwise swaps 127.0.0.1 for the
        # host's network address; this switch (read when ray is imported) keeps loopback.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # Ray runs its workers at niceness 15; the replicas are the server itself (a joined cluster sets
        # this when its `ray start` runs).
        os.environ.setdefault(WORKER_NICENESS_ENV, "0")
    import ray
    from ray import serve

    from musetalk.server.cluster.deployment import APP_NAME, build_application
    from server_fast import build_app

    # Ray's workers import this project: put it on their path (the local cluster inherits this environment).
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(
            address="local",
            num_cpus=args.num_cpus or max(os.cpu_count() or 1, args.replicas or CPU_REPLICAS),
            object_store_memory=args.object_store_mb * 1024 * 1024 if args.object_store_mb else None,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            logging_level=logging.WARNING,
        )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    status = 0
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        replicas, gpu_share = replica_plan(gpus, args.replicas, args.replicas_per_gpu)
        cpus = args.cpus_per_replica or max(1, int(ray.cluster_resources().get("CPU", 1)) // replicas)
        serve.start(http_options={"host": cfg.server.host, "port": cfg.server.port})
        application = build_application(cfg, build_app, replicas, gpu_share, cpus, args.gateways)
        try:
            serve.run(application, name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:
            log.error("cannot start: %s", str(exc)[-4000:])
            status = EXIT_CANNOT_START
        else:
            log.info(
                "serving on http://%s:%d: %d replicas (%s%d CPUs each), cluster %s",
                cfg.server.host, cfg.server.port, replicas, f"{gpu_share:g} GPU, " if gpus else "", cpus,
                address or "started here",
            )
            stop.wait()
            log.info("stopping")
    finally:
        if address:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
        ray.shutdown()
    return status


if __name__ == "__main__":
    sys.exit(main())
