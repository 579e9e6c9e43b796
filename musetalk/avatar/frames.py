"""Frame storage: an uncompressed .npy written as frames arrive, read back one frame at a time.

A 60 s 1080p avatar is 1500 × 6.2 MB = 9.3 GB of pixels. Neither prep nor the server holds that in
memory: prep appends each decoded frame to `frames.npy`, and the server reads frame i on demand
with `os.pread` (RSS stays one frame deep; the OS page cache does the caching and can drop it).
The file stays a plain .npy, so `np.load(path, mmap_mode="r")` works for tools as well.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

_MAGIC = b"\x93NUMPY\x01\x00"
# The header is written last (the row count is unknown until the end), so it gets a fixed slot.
# 128 bytes hold any 4-D uint8 shape and keep the data 64-byte aligned as numpy prefers.
HEADER_BYTES = 128


def _header(shape: tuple[int, ...], dtype: np.dtype[Any]) -> bytes:
    text = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    body_len = HEADER_BYTES - len(_MAGIC) - 2
    body = (text + " " * body_len)[: body_len - 1] + "\n"
    if len(text) >= body_len:
        raise ValueError(f"npy header for shape {shape} does not fit in {HEADER_BYTES} bytes")
    return _MAGIC + body_len.to_bytes(2, "little") + body.encode("latin1")


class NpyAppendWriter:
    """Append rows of a fixed shape to a .npy whose length is fixed only by close()."""

    def __init__(self, path: Path, row_shape: tuple[int, ...], dtype: np.dtype[Any] | type = np.uint8) -> None:
        self.path = path
        self.row_shape = tuple(int(d) for d in row_shape)
        self.dtype = np.dtype(dtype)
        self.count = 0
        self._fh = path.open("wb")
        self._fh.write(b"\0" * HEADER_BYTES)

    def append(self, rows: NDArray[Any]) -> None:
        """Append one row (row_shape) or a stack of rows (k, *row_shape)."""
        arr = np.ascontiguousarray(rows, dtype=self.dtype)
        if arr.shape == self.row_shape:
            arr = arr[None]
        if arr.shape[1:] != self.row_shape:
            raise ValueError(f"row shape {arr.shape[1:]} != {self.row_shape}")
        self._fh.write(arr.tobytes())
        self.count += len(arr)

    def close(self) -> int:
        """Write the header and close; returns the number of rows."""
        if not self._fh.closed:
            self._fh.seek(0)
            self._fh.write(_header((self.count, *self.row_shape), self.dtype))
            self._fh.close()
        return self.count

    def abort(self) -> None:
        """Close without a valid header (the file is left unloadable)."""
        self._fh.close()


def read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype[Any], int]:
    """(shape, dtype, data offset) of a C-ordered .npy file, without reading its data."""
    with path.open("rb") as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        if fortran:
            raise ValueError(f"{path}: Fortran-ordered arrays are not supported")
        return tuple(int(d) for d in shape), dtype, fh.tell()


class NpyFrames:
    """FrameStore over frames.npy (N, H, W, 3) uint8: pread per frame, or a read-only memory map."""

    def __init__(self, path: Path, mmap: bool = False) -> None:
        self.path = path
        self._fd: int | None = None
        self._map: NDArray[np.uint8] | None = None
        shape, dtype, self._offset = read_npy_header(path)
        if len(shape) != 4 or shape[3] != 3 or dtype != np.uint8:
            raise ValueError(f"{path}: expected (N, H, W, 3) uint8 frames, got {shape} {dtype}")
        self.shape: tuple[int, int, int, int] = (shape[0], shape[1], shape[2], shape[3])
        self._frame_bytes = shape[1] * shape[2] * 3
        expected = self._offset + shape[0] * self._frame_bytes
        if path.stat().st_size < expected:
            raise ValueError(f"{path}: truncated ({path.stat().st_size} bytes, expected {expected})")
        if mmap:
            self._map = np.load(path, mmap_mode="r")
        else:
            self._fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        """Number of frames N."""
        return self.shape[0]

    def __getitem__(self, index: int) -> NDArray[np.uint8]:
        """Frame `index` (H, W, 3) BGR uint8, read-only."""
        n = self.shape[0]
        i = int(index) + n if int(index) < 0 else int(index)
        if not 0 <= i < n:
            raise IndexError(f"frame {index} out of range for {n} frames")
        if self._map is not None:
            return self._map[i]
        assert self._fd is not None
        buf = os.pread(self._fd, self._frame_bytes, self._offset + i * self._frame_bytes)
        frame = np.frombuffer(buf, dtype=np.uint8).reshape(self.shape[1:])
        return frame  # frombuffer over bytes is already read-only

    def close(self) -> None:
        """Release the file descriptor / map."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._map = None

    def __del__(self) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        # Worker processes reopen the file instead of pickling a descriptor.
        return (NpyFrames, (self.path, self._map is not None))
