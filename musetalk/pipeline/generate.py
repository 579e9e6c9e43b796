"""Face sources: who turns audio + avatar frame positions into 256×256 faces.

`FaceSource` is the seam between "produce faces" and "blend + encode": the MuseTalk UNet+VAE here,
a weight-free preview renderer later. A source starts one job per clip (computing its conditioning
once), then serves batches asynchronously: `submit` returns at once, `wait` returns the faces.

MuseTalk math, batched: UNet at timestep 0 on the cached 8-channel latents of
each frame's source image with that frame's 50 audio tokens; its 4-channel output is the clean
latent; × 1/0.18215, VAE-decode, (x/2 + 0.5).clamp(0, 1) in the VAE dtype, then float32 × 255, round,
uint8, RGB → BGR. On CUDA the two networks can be replayed as CUDA graphs (one pair per batch size;
the timestep lives on the device so capture needs no host copy) and/or torch.compiled; results are
copied to pinned host memory without blocking, so the GPU computes batch k+1 while the CPU blends k.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from diffusers import AutoencoderKL
from numpy.typing import NDArray
from torch import nn

from musetalk.avatar.cache import FACE_SIZE_PX, AvatarCache
from musetalk.config import AppConfig
from musetalk.errors import AvatarNotPrepared, GpuOutOfMemory
from musetalk.models import ModelBundle
from musetalk.models.unet import PositionalEncoding
from musetalk.pipeline.audio import WindowSpec, audio_tokens

if TYPE_CHECKING:
    from transformers import WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

log = logging.getLogger(__name__)

Phonemes = tuple[tuple[float, str], ...]  # (start_s, espeak-ng mnemonic), as in Audio.phonemes
LATENT_CHANNELS_IN = 8  # [masked lower half ‖ reference]
_MAX_DEVICE_AVATARS = 8  # avatars whose latents stay on the device
_GRAPH_WARMUP_RUNS = 3


class PendingFaces(Protocol):
    """One submitted batch."""

    def wait(self) -> NDArray[np.uint8]:
        """Block until done → (B, 256, 256, 3) BGR uint8, one face per submitted frame, in order."""
        ...


class FaceJob(Protocol):
    """Faces for one clip; used by one thread; `close` must be called."""

    def submit(self, frame_ids: Sequence[int], source_ids: Sequence[int]) -> PendingFaces:
        """Start generating faces for clip frames `frame_ids` shown on avatar source frames `source_ids`."""
        ...

    def timings_ms(self) -> dict[str, float]:
        """Stage times so far (e.g. features, unet, vae)."""
        ...

    def close(self) -> None:
        """Release the source for the next job."""
        ...


class FaceSource(Protocol):
    """Produces 256×256 faces for frame positions of a clip."""

    name: str
    first_batch_size: int  # smaller first batch: the first frame arrives sooner
    batch_size: int

    def start(
        self, cache: AvatarCache, samples_16k: NDArray[np.float32], n_frames: int, phonemes: Phonemes = ()
    ) -> FaceJob:
        """Begin a clip: compute the conditioning for `n_frames` frames from 16 kHz mono audio.

        `phonemes` ((start_s, name), when the TTS reported them) may shape the mouth; MuseTalk needs none.
        """
        ...


class _Denoise(nn.Module):
    """UNet at timestep 0: (B, 8, 32, 32) latents + (B, T, C) tokens → (B, 4, 32, 32) clean latent."""

    def __init__(self, unet: nn.Module, timestep: torch.Tensor, out_dtype: torch.dtype) -> None:
        super().__init__()
        self.unet = unet
        self.timestep = timestep  # (1,) int64 on the device: a Python 0 would need a host copy
        self.out_dtype = out_dtype

    def forward(self, latents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """One denoising pass, cast to the VAE dtype as upstream."""
        pred = self.unet(latents, self.timestep, encoder_hidden_states=tokens, return_dict=False)[0]
        return pred.to(self.out_dtype)


class _Decode(nn.Module):
    """(B, 4, 32, 32) latents → (B, 256, 256, 3) BGR uint8, with upstream's rounding."""

    def __init__(self, vae: AutoencoderKL, scale: float) -> None:
        super().__init__()
        self.vae = vae
        self.inv_scale = 1.0 / scale

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode and convert on the device; only uint8 crosses to the host."""
        image = self.vae.decode(self.inv_scale * latents, return_dict=False)[0]  # (B, 3, 256, 256)
        image = (image / 2 + 0.5).clamp(0, 1)
        pixels = (image.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8)  # (B, 256, 256, 3) RGB
        return pixels.flip(-1)


@dataclass
class _StageClock:
    """Accumulated stage times of one job."""

    features: float = 0.0
    unet: float = 0.0
    vae: float = 0.0
    batches: int = 0
    frames: int = 0
    padded_frames: int = 0

    def as_dict(self) -> dict[str, float]:
        """Stage times (ms) and counters for the clip's timings."""
        return {
            "features_ms": self.features,
            "unet_ms": self.unet,
            "vae_ms": self.vae,
            "batches": float(self.batches),
            "generated_frames": float(self.frames),
            "padded_frames": float(self.padded_frames),
        }


class _Graphs:
    """UNet and decoder captured as CUDA graphs for one batch size (static inputs/outputs)."""

    def __init__(self, denoise: nn.Module, decode: nn.Module, latents: torch.Tensor, tokens: torch.Tensor) -> None:
        self.latents, self.tokens = latents, tokens  # static inputs, filled before each replay
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(_GRAPH_WARMUP_RUNS):  # cuDNN autotuning, lazy init, compilation: not in the graph
                decode(denoise(latents, tokens))
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        # thread_local: CUDA calls of other threads (e.g. another component of the server) cannot
        # invalidate this capture; only this thread's calls are checked.
        self.unet_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.unet_graph, capture_error_mode="thread_local"):
            self.pred = denoise(latents, tokens)
        self.vae_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.vae_graph, pool=self.unet_graph.pool(), capture_error_mode="thread_local"):
            self.faces = decode(self.pred)
        torch.cuda.synchronize()


def _device_index(ids: Sequence[int], device: torch.device) -> torch.Tensor:
    """Indices on the device without a stream sync (a blocking host→device copy would stall the pipeline)."""
    index = torch.tensor(list(ids), dtype=torch.long)
    if device.type != "cuda":
        return index
    return index.pin_memory().to(device, non_blocking=True)


class _Pending:
    """A batch in flight: faces land in (pinned) host memory; CUDA events time the two networks."""

    def __init__(self, job: _MuseTalkJob, host: torch.Tensor, n: int, events: tuple[torch.cuda.Event, ...] | None):
        self._job, self._host, self._n, self._events = job, host, n, events
        self._done = False

    def wait(self) -> NDArray[np.uint8]:
        """Block until this batch's copy landed → (B, 256, 256, 3) BGR uint8 view of pinned memory."""
        if not self._done:
            if self._events is not None:
                start, mid, end, copied = self._events
                copied.synchronize()
                self._job.clock.unet += start.elapsed_time(mid)
                self._job.clock.vae += mid.elapsed_time(end)
            self._done = True
        return self._host[: self._n].numpy()  # (B, 256, 256, 3) BGR uint8


class _MuseTalkJob:
    """One clip's generation; holds the source's lock until closed."""

    def __init__(self, owner: MuseTalkFaces, tokens: torch.Tensor, latents: torch.Tensor, clock: _StageClock) -> None:
        self.owner, self.tokens, self.latents, self.clock = owner, tokens, latents, clock
        self._closed = False

    def submit(self, frame_ids: Sequence[int], source_ids: Sequence[int]) -> PendingFaces:
        """Launch one batch (at most batch_size frames) without waiting for it."""
        owner = self.owner
        n = len(frame_ids)
        if n == 0 or n != len(source_ids) or n > owner.batch_size:
            raise ValueError(f"batch of {n} frames (with {len(source_ids)} sources; max {owner.batch_size})")
        with torch.inference_mode():
            return self._submit(frame_ids, source_ids, n)

    def _submit(self, frame_ids: Sequence[int], source_ids: Sequence[int], n: int) -> PendingFaces:
        owner = self.owner
        dev = owner.device
        lat = self.latents.index_select(0, _device_index(source_ids, dev))  # (n, 8, 32, 32)
        tok = self.tokens.index_select(0, _device_index(frame_ids, dev))  # (n, T, C)
        self.clock.batches += 1
        self.clock.frames += n
        try:
            if dev.type != "cuda":
                t0 = time.perf_counter()
                pred = owner.denoise(lat, tok)
                t1 = time.perf_counter()
                faces = owner.decode(pred)
                self.clock.unet += (t1 - t0) * 1000
                self.clock.vae += (time.perf_counter() - t1) * 1000
                return _Pending(self, faces, n, None)
            return self._submit_cuda(lat, tok, n)
        except torch.cuda.OutOfMemoryError as exc:
            raise GpuOutOfMemory(f"GPU out of memory generating a batch of {n} frames") from exc

    def _submit_cuda(self, lat: torch.Tensor, tok: torch.Tensor, n: int) -> PendingFaces:
        owner = self.owner
        size = owner.padded_size(n)
        self.clock.padded_frames += size - n
        events = tuple(torch.cuda.Event(enable_timing=True) for _ in range(4))
        start, mid, end, copied = events
        graphs = owner.graphs(size) if owner.use_graphs else None
        if graphs is not None:
            graphs.latents[:n].copy_(lat)
            graphs.tokens[:n].copy_(tok)
            start.record()
            graphs.unet_graph.replay()
            mid.record()
            graphs.vae_graph.replay()
            end.record()
            out = graphs.faces
        else:
            if size > n:  # fixed shapes keep cuDNN's autotuned kernels (repeat the last frame)
                lat = torch.cat([lat, lat[-1:].expand(size - n, *lat.shape[1:])])
                tok = torch.cat([tok, tok[-1:].expand(size - n, *tok.shape[1:])])
            if owner.channels_last:
                lat = lat.contiguous(memory_format=torch.channels_last)
            start.record()
            pred = owner.denoise(lat, tok)
            mid.record()
            out = owner.decode(pred)
            end.record()
        host = torch.empty((n, FACE_SIZE_PX, FACE_SIZE_PX, 3), dtype=torch.uint8, pin_memory=True)
        host.copy_(out[:n], non_blocking=True)  # ordered before the next replay overwrites `out`
        copied.record()
        return _Pending(self, host, n, events)

    def timings_ms(self) -> dict[str, float]:
        """Stage times so far."""
        return self.clock.as_dict()

    def close(self) -> None:
        """Release the source's lock (idempotent)."""
        if not self._closed:
            self._closed = True
            self.owner._lock.release()


class MuseTalkFaces:
    """The MuseTalk v1.5 face source: Whisper tokens → UNet (t = 0) → VAE decode, batched."""

    name = "musetalk"

    def __init__(self, bundle: ModelBundle, cfg: AppConfig) -> None:
        missing = [n for n in ("unet", "vae", "whisper", "feature_extractor", "pe") if getattr(bundle, n) is None]
        if missing:
            raise ValueError(f"MuseTalkFaces needs a bundle with {missing} loaded")
        assert bundle.unet is not None and bundle.vae is not None and bundle.whisper is not None
        self.bundle = bundle
        self.device, self.dtype = bundle.device, bundle.dtype
        if self.device.type == "cuda" and self.device.index is None:
            # torch.cuda.set_device needs an explicit index ("cuda" alone raises).
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.spec = WindowSpec(cfg.fps, cfg.audio.pad_left, cfg.audio.pad_right)
        self.batch_size = cfg.batch_size
        self.first_batch_size = min(cfg.engine.first_batch_size, cfg.batch_size)
        cuda = self.device.type == "cuda"
        self.use_graphs = cuda and cfg.runtime.cuda_graphs
        self.channels_last = cuda and cfg.runtime.channels_last
        self.tokens_per_frame = self.spec.rows_per_frame * bundle.audio_layers
        vae_dtype = next(bundle.vae.parameters()).dtype
        timestep = torch.zeros(1, dtype=torch.long, device=self.device)
        if cuda:
            torch.backends.cudnn.benchmark = True  # fixed batch shapes: autotune once per size
        if self.channels_last:
            bundle.unet.to(memory_format=torch.channels_last)
            bundle.vae.to(memory_format=torch.channels_last)
        self.denoise: nn.Module = _Denoise(bundle.unet, timestep, vae_dtype).eval()
        self.decode: nn.Module = _Decode(bundle.vae, bundle.vae_scale).eval()
        if cuda and cfg.runtime.compile:
            # One specialised graph per batch size (a handful), no dynamic shapes.
            if cfg.runtime.compile_modules in ("unet", "both"):
                self.denoise = torch.compile(self.denoise, dynamic=False)  # type: ignore[assignment]
            if cfg.runtime.compile_modules in ("vae", "both"):
                self.decode = torch.compile(self.decode, dynamic=False)  # type: ignore[assignment]
        self._graphs: dict[int, _Graphs] = {}
        self._lock = threading.Lock()
        self._device_latents: dict[int, tuple[AvatarCache, torch.Tensor]] = {}

    def _zero_inputs(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(size, 8, 32, 32) latents and (size, T, C) tokens of zeros, in the model dtype and layout."""
        lat = torch.zeros(size, LATENT_CHANNELS_IN, 32, 32, dtype=self.dtype, device=self.device)
        if self.channels_last:
            lat = lat.contiguous(memory_format=torch.channels_last)
        tok = torch.zeros(size, self.tokens_per_frame, self.bundle.audio_dim, dtype=self.dtype, device=self.device)
        return lat, tok

    @property
    def batch_sizes(self) -> list[int]:
        """The batch shapes run on CUDA (partial batches are padded up to one of them)."""
        return sorted({self.first_batch_size, self.batch_size})

    def padded_size(self, n: int) -> int:
        """Smallest fixed batch size holding n frames (CUDA); n itself on CPU."""
        if self.device.type != "cuda":
            return n
        return next(s for s in self.batch_sizes if s >= n)

    def graphs(self, size: int) -> _Graphs:
        """The CUDA graphs for a batch size, captured on first use."""
        g = self._graphs.get(size)
        if g is None:
            with torch.inference_mode():
                t0 = time.perf_counter()
                g = _Graphs(self.denoise, self.decode, *self._zero_inputs(size))
            log.info("captured CUDA graphs for batch %d in %.0f ms", size, (time.perf_counter() - t0) * 1000)
            self._graphs[size] = g
        return g

    @torch.inference_mode()
    def warmup(self) -> None:
        """Run every batch shape once (and capture graphs) so the first request pays nothing extra."""
        with self._lock:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            audio_tokens(np.zeros(16000, np.float32), self.spec, *self._audio_models())
            if self.use_graphs:
                for size in self.batch_sizes:
                    self.graphs(size)
                return
            for size in self.batch_sizes if self.device.type == "cuda" else [1]:
                self.decode(self.denoise(*self._zero_inputs(size)))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

    def _audio_models(self) -> tuple[WhisperEncoder, WhisperFeatureExtractor, PositionalEncoding]:
        b = self.bundle
        assert b.whisper is not None and b.feature_extractor is not None and b.pe is not None
        return b.whisper, b.feature_extractor, b.pe

    def latents_on_device(self, cache: AvatarCache) -> torch.Tensor:
        """The avatar's (N, 8, 32, 32) latents in the model dtype on the device, moved once per avatar."""
        hit = self._device_latents.get(id(cache))
        if hit is not None and hit[0] is cache:
            return hit[1]
        if cache.latents is None:
            raise AvatarNotPrepared(
                f"avatar {cache.avatar_id!r} has no latents (preview-only cache); rebuild it with "
                f"`python -m scripts.force_prep --avatar-id {cache.avatar_id}` and the MuseTalk weights"
            )
        lat = cache.latents
        if lat.ndim != 4 or lat.shape[1] != LATENT_CHANNELS_IN or lat.shape[0] != cache.n_frames:
            raise AvatarNotPrepared(f"avatar {cache.avatar_id!r}: latents {tuple(lat.shape)} do not fit the cache")
        dev = lat.to(device=self.device, dtype=self.dtype)
        if len(self._device_latents) >= _MAX_DEVICE_AVATARS:
            self._device_latents.clear()
        self._device_latents[id(cache)] = (cache, dev)
        return dev

    def start(
        self, cache: AvatarCache, samples_16k: NDArray[np.float32], n_frames: int, phonemes: Phonemes = ()
    ) -> FaceJob:
        """Lock the source for this clip, compute its audio tokens (T, 50, C) and fetch the latents."""
        self._lock.acquire()
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)  # current device is per thread
            clock = _StageClock()
            t0 = time.perf_counter()
            with torch.inference_mode():
                tokens = audio_tokens(samples_16k, self.spec, *self._audio_models())  # (T, 50, C)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
            clock.features = (time.perf_counter() - t0) * 1000
            if tokens.shape[0] != n_frames:
                raise ValueError(f"audio gives {tokens.shape[0]} frames, caller expects {n_frames}")
            latents = self.latents_on_device(cache)
            return _MuseTalkJob(self, tokens, latents, clock)
        except torch.cuda.OutOfMemoryError as exc:
            self._lock.release()
            raise GpuOutOfMemory("GPU out of memory computing audio features") from exc
        except BaseException:
            self._lock.release()
            raise
