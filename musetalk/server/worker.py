"""Render threads: each admitted clip renders on one (generation is batched across them by the engine's scheduler).

A render call spends its time waiting for faces from the frame scheduler, blending (in the engine's blend
pool) and x264-encoding, all of which release the GIL, so clips of different sessions render side by
side. `threads=1` reproduces the one-clip-at-a-time server (engine.scheduler: serial).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from musetalk.errors import Busy, GpuOutOfMemory
from musetalk.utils.gpu import is_out_of_memory, release_cached_memory

log = logging.getLogger(__name__)

T = TypeVar("T")


class RenderPool:
    """`threads` worker threads with a bounded number of pending jobs (queued or running)."""

    def __init__(self, max_pending: int, retry_after_s: int, threads: int = 1) -> None:
        self.max_pending = max_pending
        self.retry_after_s = retry_after_s
        self.threads = threads
        self._pending = 0
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def pending(self) -> int:
        """Jobs submitted and not finished."""
        return self._pending

    def start(self) -> None:
        """Start the threads (idempotent)."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="render")

    def stop(self) -> None:
        """Finish the running jobs and stop; queued jobs are cancelled."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...], submitted: float) -> tuple[T, float, float]:
        started = time.perf_counter()
        try:
            result = fn(*args)
        except Exception as exc:
            if is_out_of_memory(exc):
                release_cached_memory()
                log.error("GPU out of memory in %s: %s", getattr(fn, "__name__", fn), exc)
                if isinstance(exc, GpuOutOfMemory):
                    raise
                raise GpuOutOfMemory(
                    "the GPU ran out of memory for this request; retry shortly", self.retry_after_s
                ) from exc
            raise
        return result, (started - submitted) * 1000, (time.perf_counter() - started) * 1000

    async def run(self, fn: Callable[..., T], *args: Any) -> tuple[T, float, float]:
        """Run fn(*args) on a render thread → (result, queued_ms, run_ms); Busy when the queue is full."""
        if self._executor is None:
            raise Busy("the render threads are not running", self.retry_after_s)
        if self._pending >= self.max_pending:
            raise Busy(f"{self._pending} renders pending; retry later", self.retry_after_s)
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._call, fn, args, time.perf_counter())
        finally:
            self._pending -= 1
