"""GPU probe: load full-size random weights through load_models on CUDA and time UNet + VAE decode.

Checks the real loading path (real on-disk formats, fp16 on CUDA) and how generation throughput
depends on batch size and execution mode (eager, CUDA-graph replay, torch.compile). Prints a table and
writes JSON to --out.

    python -m bench.gpu_probe --out results/gpu_probe.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from musetalk.config import load_config
from musetalk.models import load_models
from musetalk.testing import write_models


def _step_fn(bundle: Any, latents: torch.Tensor, tokens: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """UNet at t=0 then VAE decode → (B, 3, 256, 256) in [-1, 1]."""
    pred = bundle.unet(latents, t, bundle.pe(tokens))
    return bundle.vae.decode(pred / bundle.vae_scale)


def _time_cuda(fn: Any, reps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def _save(results: dict[str, Any], out: str) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))


def main() -> None:
    """Run the probe."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="/tmp/full_models")
    parser.add_argument("--out", default="results/gpu_probe.json")
    parser.add_argument("--batches", default="1,4,16,32,64")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    models = Path(args.models)
    t0 = time.perf_counter()
    if not (models / "musetalkV15" / "unet.pth").exists():
        write_models(models, "full", versions=("v15",))
    write_s = time.perf_counter() - t0
    cfg = load_config(overrides=[f"models.dir={models}", "runtime.device=cuda"])
    t0 = time.perf_counter()
    bundle = load_models(cfg)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    print(f"write {write_s:.1f} s, load_models {load_s:.2f} s, dtype {bundle.dtype}, {torch.cuda.get_device_name()}")
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "load_s": load_s, "rows": []}
    t = torch.zeros(1, device="cuda", dtype=bundle.dtype)
    unet: Any = bundle.unet
    pe: Any = bundle.pe
    n_tok = 10 * bundle.audio_layers
    with torch.inference_mode():
        for b in [int(x) for x in args.batches.split(",")]:
            lat = torch.randn(b, 8, 32, 32, device="cuda", dtype=bundle.dtype)
            tok = torch.randn(b, n_tok, bundle.audio_dim, device="cuda", dtype=bundle.dtype)
            for _ in range(3):
                _step_fn(bundle, lat, tok, t)
            torch.cuda.synchronize()
            eager_ms = _time_cuda(lambda lat=lat, tok=tok: _step_fn(bundle, lat, tok, t), 10)
            unet_ms = _time_cuda(
                lambda lat=lat, tok=tok: unet(lat, t, pe(tok)), 10
            )
            row: dict[str, Any] = {"batch": b, "eager_ms": eager_ms, "eager_fps": b / eager_ms * 1000,
                                   "unet_ms": unet_ms}
            # CUDA graph of the whole step: removes the UNet's launch overhead.
            try:
                static_lat, static_tok = lat.clone(), tok.clone()
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        _step_fn(bundle, static_lat, static_tok, t)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_out = _step_fn(bundle, static_lat, static_tok, t)
                graph_ms = _time_cuda(graph.replay, 10)
                ref = _step_fn(bundle, lat, tok, t)
                row.update(graph_ms=graph_ms, graph_fps=b / graph_ms * 1000,
                           graph_max_abs_diff=float((static_out - ref).abs().max()))
            except Exception as exc:  # report, keep probing
                row["graph_error"] = f"{type(exc).__name__}: {exc}"
            results["rows"].append(row)
            print(json.dumps(row))
            _save(results, args.out)
            torch.cuda.empty_cache()
        if args.compile:
            t0 = time.perf_counter()
            unet_c: Any = torch.compile(bundle.unet, mode="default")
            vae: Any = bundle.vae
            dec_c: Any = torch.compile(vae.decoder, mode="default")
            b = 16
            lat = torch.randn(b, 8, 32, 32, device="cuda", dtype=bundle.dtype)
            tok = torch.randn(b, n_tok, bundle.audio_dim, device="cuda", dtype=bundle.dtype)

            def step_c() -> torch.Tensor:
                pred = unet_c(lat, t, pe(tok))
                return dec_c(vae.post_quant_conv(pred / bundle.vae_scale))

            for _ in range(3):
                step_c()
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            ms = _time_cuda(step_c, 10)
            results["compile"] = {"batch": b, "ms": ms, "fps": b / ms * 1000, "compile_s": compile_s}
            _save(results, args.out)
            print(json.dumps(results["compile"]))
    results["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    _save(results, args.out)
    print(f"peak {results['peak_mem_gb']:.1f} GB")


if __name__ == "__main__":
    main()
