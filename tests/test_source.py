"""Avatar source reading: fps resampling by timestamp, photos, size rules, bad files; frame storage."""

from __future__ import annotations

import pickle
import resource
from pathlib import Path

import cv2
import numpy as np
import pytest

from musetalk.avatar.frames import JpegFrames, JpegFrameWriter, NpyAppendWriter, NpyFrames
from musetalk.avatar.source import SourceInfo, output_size_hw, read_source
from musetalk.avatar.synthetic import write_video
from musetalk.errors import InputError

_BITS = 6


def _numbered_frames(n: int, h: int = 64, w: int = 96) -> list[np.ndarray]:
    """Frames whose index is written as 6 black/white 16 px squares (survives H.264)."""
    out = []
    for k in range(n):
        img = np.zeros((h, w, 3), dtype=np.uint8)
        for b in range(_BITS):
            if k >> b & 1:
                img[:16, 16 * b : 16 * b + 16] = 255
        out.append(img)
    return out


def _read(path: Path, fps: int = 25, max_side_px: int = 0) -> tuple[list[np.ndarray], SourceInfo]:
    frames: list[np.ndarray] = []
    info = read_source(path, fps, max_side_px, frames.append)
    return frames, info


def _index(frame: np.ndarray) -> int:
    return sum(1 << b for b in range(_BITS) if frame[4:12, 16 * b + 4 : 16 * b + 12].mean() > 128)


@pytest.mark.parametrize("src_fps", [30, 25, 12])
def test_video_is_resampled_to_the_configured_fps_by_nearest_timestamp(tmp_path: Path, src_fps: int) -> None:
    n_src = 36
    path = tmp_path / f"v{src_fps}.mp4"
    write_video(path, _numbered_frames(n_src), src_fps, crf=0)
    frames, info = _read(path)
    duration_s = n_src / src_fps
    assert len(frames) == round(duration_s * 25)
    expected = [min(n_src - 1, int(np.floor(k / 25 * src_fps + 0.5 - 1e-9))) for k in range(len(frames))]
    got = [_index(f) for f in frames]
    # ties (output time exactly between two source frames) may go either way
    assert all(abs(g - e) <= 1 for g, e in zip(got, expected, strict=True))
    assert sum(g != e for g, e in zip(got, expected, strict=True)) <= len(frames) // 10
    assert info.kind == "video" and info.n_src_frames == n_src


@pytest.mark.parametrize(("rotation", "code"), [(90, cv2.ROTATE_90_COUNTERCLOCKWISE), (-90, cv2.ROTATE_90_CLOCKWISE)])
def test_phone_video_display_rotation_is_applied(tmp_path: Path, rotation: int, code: int) -> None:
    import av

    img = np.zeros((64, 96, 3), np.uint8)
    img[:16, :32] = 255  # a white block in the top-left corner
    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.set_display_rotation(rotation)
        for packet in [*stream.encode(av.VideoFrame.from_ndarray(img, format="bgr24")), *stream.encode()]:
            container.mux(packet)
    frames, info = _read(path)
    assert frames[0].shape == (96, 64, 3) and info.size_hw == (96, 64)
    assert np.abs(frames[0].astype(int) - cv2.rotate(img, code)).mean() < 10  # what ffmpeg shows


def test_photo_is_a_one_frame_avatar_with_even_size(tmp_path: Path) -> None:
    img = np.random.default_rng(0).integers(0, 255, (101, 151, 3), dtype=np.uint8)
    path = tmp_path / "p.png"
    cv2.imwrite(str(path), img)
    frames, info = _read(path)
    assert len(frames) == 1 and frames[0].shape == (100, 150, 3)
    np.testing.assert_array_equal(frames[0], img[:100, :150])
    assert info.kind == "photo"


def test_max_side_downscales_keeping_even_sizes(tmp_path: Path) -> None:
    assert output_size_hw((1080, 1920), 640) == (360, 640)
    assert output_size_hw((1081, 1921), 0) == (1080, 1920)
    path = tmp_path / "v.mp4"
    write_video(path, _numbered_frames(5, 240, 320), 25)
    frames, info = _read(path, max_side_px=160)
    assert frames[0].shape == (120, 160, 3) and info.size_hw == (120, 160)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.mp4", b"", "file is empty"),
        ("noise.mp4", bytes(np.random.default_rng(1).integers(0, 255, 4096, dtype=np.uint8)), "not a readable video"),
        ("notes.txt", b"hello, this is not a video\n" * 20, "not a readable video"),
        ("broken.png", b"\x89PNG not really", "not a readable image"),
    ],
)
def test_unusable_files_raise_one_clear_input_error(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        _read(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        _read(tmp_path / "nope.mp4")


def test_npy_frames_round_trip_and_read_one_frame_at_a_time(tmp_path: Path) -> None:
    frames = np.random.default_rng(0).integers(0, 255, (7, 24, 32, 3), dtype=np.uint8)
    writer = NpyAppendWriter(tmp_path / "f.npy", frames.shape[1:])
    for f in frames:
        writer.append(f)
    assert writer.close() == 7
    np.testing.assert_array_equal(np.load(tmp_path / "f.npy"), frames)  # a plain .npy
    for mmap in (False, True):
        store = NpyFrames(tmp_path / "f.npy", mmap=mmap)
        assert len(store) == 7
        np.testing.assert_array_equal(store[3], frames[3])
        np.testing.assert_array_equal(store[-1], frames[-1])
        assert not store[0].flags.writeable
        with pytest.raises(IndexError):
            store[7]
        store.close()


def test_truncated_frames_file_is_rejected(tmp_path: Path) -> None:
    writer = NpyAppendWriter(tmp_path / "f.npy", (8, 8, 3))
    writer.append(np.zeros((3, 8, 8, 3), np.uint8))
    writer.close()
    data = (tmp_path / "f.npy").read_bytes()
    (tmp_path / "f.npy").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated"):
        NpyFrames(tmp_path / "f.npy")


def test_pread_frames_do_not_grow_the_process_memory(tmp_path: Path) -> None:
    # 60 frames of 480×640 = 55 MB on disk; reading them all must not keep them resident in this process.
    n, shape = 60, (480, 640, 3)
    writer = NpyAppendWriter(tmp_path / "f.npy", shape)
    for k in range(n):
        writer.append(np.full(shape, k, np.uint8))
    writer.close()
    store = NpyFrames(tmp_path / "f.npy")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    total = sum(int(store[k][0, 0, 0]) for k in range(n) for _ in range(2))
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert total == 2 * sum(range(n))
    assert grown_kib < 20_000  # one or two frames (0.9 MB each), not 55 MB


def _photo_frames(n: int, h: int = 270, w: int = 480) -> list[np.ndarray]:
    """Camera-like frames: a photo at video scale, shifted a little per frame, with sensor-like noise."""
    from skimage import data

    base = cv2.resize(cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR), (w + n, h))
    rng = np.random.default_rng(0)
    noisy = [base[:, k : k + w].astype(np.float32) + rng.normal(0, 1.5, (h, w, 3)) for k in range(n)]
    return [np.clip(f, 0, 255).astype(np.uint8) for f in noisy]


def test_jpeg_frames_are_visually_lossless_and_safe_to_share(tmp_path: Path) -> None:
    frames = _photo_frames(12)
    writer = JpegFrameWriter(tmp_path / "f.jpgs")
    served = [writer.append(f) for f in frames]
    assert writer.close() == 12
    raw_bytes = sum(f.nbytes for f in frames)
    assert (tmp_path / "f.jpgs").stat().st_size < raw_bytes / 3
    for src, got in zip(frames, served, strict=True):
        mse = float(np.mean((src.astype(np.float64) - got) ** 2))
        assert 10 * np.log10(255**2 / mse) > 39.5  # PSNR, dB (40.5 with this libjpeg-turbo)

    store = JpegFrames(tmp_path / "f.jpgs", (270, 480))
    assert len(store) == 12 and not store[0].flags.writeable
    np.testing.assert_array_equal(store[-1], served[-1])
    with pytest.raises(IndexError):
        store[12]
    # Eight readers at different points of the ping-pong cycle, concurrently: every frame is the right one.
    from concurrent.futures import ThreadPoolExecutor

    from musetalk.avatar.cache import cycle_index

    def play(start: int) -> bool:
        indices = [cycle_index(p, 12) for p in range(start, start + 60)]
        return all(np.array_equal(store[i], served[i]) for i in indices)

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(play, range(0, 24, 3)))
    again = pickle.loads(pickle.dumps(store))  # worker processes reopen the file
    np.testing.assert_array_equal(again[5], served[5])
    store.close()
    again.close()
    # A damaged file is refused when opened, not when a frame is due.
    (tmp_path / "f.jpgs").write_bytes((tmp_path / "f.jpgs").read_bytes()[:-5])
    with pytest.raises(ValueError, match="its index expects"):
        JpegFrames(tmp_path / "f.jpgs", (270, 480))
