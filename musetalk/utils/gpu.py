"""Recognising and recovering from accelerator out-of-memory errors, without importing torch."""

from __future__ import annotations

import sys

from musetalk.errors import GpuOutOfMemory


def is_out_of_memory(exc: BaseException) -> bool:
    """True for our GpuOutOfMemory or a CUDA (or other accelerator) out-of-memory error from torch."""
    if isinstance(exc, GpuOutOfMemory):
        return True
    torch = sys.modules.get("torch")  # only loaded if the renderer uses it
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def release_cached_memory() -> None:
    """Give torch's cached CUDA blocks back after an out-of-memory error (no-op without CUDA)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
