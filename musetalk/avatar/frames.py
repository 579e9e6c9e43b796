"""Frame storage, written as frames arrive and read back one frame at a time.

A 60 s 1080p avatar is 1500 × 6.2 MB = 9.3 GB of pixels. Neither prep nor the server holds that in
memory. Avatar caches store their frames compressed (`JpegFrameWriter` / `JpegFrames`: ~1 GB for that
minute); prep works on an uncompressed working copy (`NpyAppendWriter` / `NpyFrames`, a plain .npy read
with `os.pread`, or memory-mapped by tools), which is also how caches of format 1 stored their frames.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
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


# Compressed frames: one JPEG per frame (quality 95, 4:4:4 chroma), back to back in one file, with an
# offsets index. Lossless codecs were measured and miss both targets at 1080p (PNG 2.4-3.6 MB and
# ~75 ms to decode a frame, WebP-lossless 1.5-2.8 MB and ~50 ms); JPEG q95 4:4:4 is 0.6-0.7 MB, decodes
# in 10-20 ms and stays at 42-48 dB PSNR, above what the session's H.264 (CRF 18) keeps. Prep works on
# the decoded frames, so latents and masks match exactly the pixels the server later pastes into.
JPEG_QUALITY = 95
FRAME_CODEC = "jpeg-q95-444"
_JPEG_PARAMS = [
    cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY,
    cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
]  # fmt: skip


def index_path(data_path: Path) -> Path:
    """The offsets file next to a compressed frames file: frames.jpgs → frames.jpgs.idx.npy."""
    return data_path.with_name(data_path.name + ".idx.npy")


class JpegFrameWriter:
    """Append frames to a compressed frames file; close() writes the offsets index beside it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offsets = [0]
        self._fh = path.open("wb")

    @property
    def count(self) -> int:
        """Frames written so far."""
        return len(self._offsets) - 1

    def append(self, frame: NDArray[np.uint8]) -> NDArray[np.uint8]:
        """Store one (H, W, 3) BGR uint8 frame; returns it as a reader will decode it (H, W, 3) uint8."""
        ok, buf = cv2.imencode(".jpg", frame, _JPEG_PARAMS)
        if not ok:
            raise ValueError(f"cannot JPEG-encode a frame of shape {frame.shape}")
        self._fh.write(buf.tobytes())
        self._offsets.append(self._offsets[-1] + len(buf))
        decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR)
        assert decoded is not None
        return np.asarray(decoded, dtype=np.uint8)

    def close(self) -> int:
        """Flush the data and write the index (temp name, then rename); returns the frame count."""
        if not self._fh.closed:
            self._fh.close()
            idx = index_path(self.path)
            tmp = idx.with_name(f".{idx.name}.tmp.npy")
            np.save(tmp, np.asarray(self._offsets, dtype=np.int64))
            os.replace(tmp, idx)
        return self.count

    def abort(self) -> None:
        """Close without an index (the frames cannot be opened)."""
        self._fh.close()


class JpegFrames:
    """FrameStore over a compressed frames file: pread + JPEG decode per frame, safe from many threads.

    Recently decoded frames are kept (`cache_frames`, so a frame several sessions show at once is decoded
    once) and reading ahead follows each reader's direction through the ping-pong cycle: a request for
    frame i right after i-1 decodes i+1 in the background (i-1 after i+1 when playing backwards).
    """

    def __init__(
        self, path: Path, size_hw: tuple[int, int], cache_frames: int = 8, readahead_workers: int = 2
    ) -> None:
        self.path = path
        self._size_hw = (int(size_hw[0]), int(size_hw[1]))
        self._cache_frames = max(1, cache_frames)
        self._readahead_workers = readahead_workers
        offsets = np.load(index_path(path), allow_pickle=False)
        if offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0 or np.any(np.diff(offsets) <= 0):
            raise ValueError(f"{index_path(path).name}: not a valid frame index")
        size = path.stat().st_size
        if int(offsets[-1]) != size:
            raise ValueError(f"{path.name}: {size} bytes, its index expects {int(offsets[-1])}")
        self._offsets = offsets.astype(np.int64)
        self.shape: tuple[int, int, int, int] = (len(offsets) - 1, self._size_hw[0], self._size_hw[1], 3)
        self._fd: int | None = os.open(path, os.O_RDONLY)
        self._lock = threading.Lock()
        self._decoded: OrderedDict[int, NDArray[np.uint8]] = OrderedDict()  # LRU, oldest first
        self._pending: dict[int, Future[NDArray[np.uint8]]] = {}
        self._requested: deque[int] = deque(maxlen=64)  # recent requests, to tell each reader's direction
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        """Number of frames N."""
        return self.shape[0]

    def _decode(self, i: int) -> NDArray[np.uint8]:
        fd = self._fd
        if fd is None:
            raise ValueError(f"{self.path.name}: frame store is closed")
        start, end = int(self._offsets[i]), int(self._offsets[i + 1])
        buf = np.frombuffer(os.pread(fd, end - start, start), dtype=np.uint8)
        frame = cv2.imdecode(buf, cv2.IMREAD_COLOR)  # (H, W, 3) BGR uint8
        if frame is None or frame.shape[:2] != self._size_hw:
            raise ValueError(f"{self.path.name}: frame {i} does not decode to {self._size_hw}")
        frame.flags.writeable = False  # shared between sessions
        return np.asarray(frame, dtype=np.uint8)

    def _keep(self, i: int, frame: NDArray[np.uint8]) -> None:
        """Remember a decoded frame (caller holds the lock)."""
        self._decoded[i] = frame
        self._decoded.move_to_end(i)
        while len(self._decoded) > self._cache_frames:
            self._decoded.popitem(last=False)

    def _prefetched(self, i: int) -> NDArray[np.uint8]:
        frame = self._decode(i)
        with self._lock:
            self._pending.pop(i, None)
            self._keep(i, frame)
        return frame

    def _read_ahead(self, i: int) -> None:
        """Start decoding the frame after i in this reader's direction (caller holds the lock)."""
        if self._readahead_workers <= 0:
            return
        step = 1 if (i - 1) in self._requested else -1 if (i + 1) in self._requested else 0
        nxt = i + step
        if step == 0 or not 0 <= nxt < len(self) or nxt in self._decoded or nxt in self._pending:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._readahead_workers, thread_name_prefix="frame-readahead")
        self._pending[nxt] = self._pool.submit(self._prefetched, nxt)

    def __getitem__(self, index: int) -> NDArray[np.uint8]:
        """Frame `index` (H, W, 3) BGR uint8, read-only."""
        n = len(self)
        i = int(index) + n if int(index) < 0 else int(index)
        if not 0 <= i < n:
            raise IndexError(f"frame {index} out of range for {n} frames")
        with self._lock:
            frame = self._decoded.get(i)
            pending = self._pending.get(i)
            if frame is not None:
                self._decoded.move_to_end(i)
            self._read_ahead(i)
            self._requested.append(i)
        if frame is not None:
            return frame
        if pending is not None:
            return pending.result()
        frame = self._decode(i)
        with self._lock:
            self._keep(i, frame)
        return frame

    def close(self, wait: bool = True) -> None:
        """Stop reading ahead (waiting for a decode in progress when `wait`) and release the file."""
        pool, self._pool = getattr(self, "_pool", None), None
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=True)
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        # The last reference may go away on a read-ahead thread, which cannot wait for itself.
        self.close(wait=False)

    def __reduce__(self) -> tuple[Any, ...]:
        # Worker processes reopen the file instead of pickling a descriptor and a thread pool.
        return (JpegFrames, (self.path, self._size_hw, self._cache_frames, self._readahead_workers))
