"""Serving a session video's committed bytes with HTTP Range (RFC 9110 §14), from an already open file.

The length comes from the session's commit record, not from the file's size: bytes after it (an append
in progress, the provisional audio tail) are never served, and the committed ones never change, so a
download that started before an append stays byte-exact whatever happens to the file meanwhile.
"""

from __future__ import annotations

import os
import re
from typing import BinaryIO

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from musetalk.errors import RangeNotSatisfiable

CHUNK_BYTES = 1 << 20
_SPEC = re.compile(r"([0-9]*)-([0-9]*)")


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one satisfiable range of a Range header as (first, end_exclusive); None = send the whole body.

    A header that is malformed, uses another unit or asks for several ranges is ignored (RFC 9110
    §14.2 lets a server do so: the answer is the whole body, 200). A well-formed range that starts at
    or after the end raises RangeNotSatisfiable (416)."""
    if header is None:
        return None
    unit, sep, specs = header.partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in specs:
        return None
    match = _SPEC.fullmatch(specs.strip())
    if match is None or match.group(0) == "-":
        return None
    first_s, last_s = match.groups()
    unsatisfiable = RangeNotSatisfiable(f"range {specs.strip()!r} is outside the {size} committed bytes", size)
    if not first_s:  # "-N": the last N bytes
        suffix = int(last_s)
        if suffix == 0 or size == 0:
            raise unsatisfiable
        return max(0, size - suffix), size
    first = int(first_s)
    last = int(last_s) if last_s else size - 1
    if last_s and last < first:
        return None  # an invalid range-spec: ignored like any malformed header
    if first >= size:
        raise unsatisfiable
    return first, min(last, size - 1) + 1


class CommittedFileResponse(Response):
    """200 with the first `size` bytes of `file`, or 206 with `span` of them; closes the file when done."""

    def __init__(self, file: BinaryIO, size: int, span: tuple[int, int] | None, media_type: str) -> None:
        self._file = file
        self._start, self._end = span if span is not None else (0, size)
        self.status_code = 200 if span is None else 206
        self.background = None
        headers = [
            (b"content-type", media_type.encode()),
            (b"content-length", str(self._end - self._start).encode()),
            (b"accept-ranges", b"bytes"),
            (b"cache-control", b"no-cache"),
        ]
        if span is not None:
            headers.append((b"content-range", f"bytes {self._start}-{self._end - 1}/{size}".encode()))
        self.raw_headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            pos = self._start
            fd = self._file.fileno()
            while True:
                n = min(CHUNK_BYTES, self._end - pos)
                chunk = await anyio.to_thread.run_sync(os.pread, fd, n, pos) if n else b""
                if n and len(chunk) != n:
                    raise OSError(f"session video ended at {pos + len(chunk)}, before its committed length")
                pos += n
                await send({"type": "http.response.body", "body": chunk, "more_body": pos < self._end})
                if pos >= self._end:
                    break
        finally:
            self._file.close()
