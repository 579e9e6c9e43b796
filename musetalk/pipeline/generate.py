"""Face sources: who turns audio + avatar frame positions into 256×256 faces.

`FaceSource` is the seam between "produce faces" and "blend + encode": the MuseTalk UNet+VAE here, the
weight-free preview in musetalk/render/preview.py. A source prepares each utterance's conditioning once
(`prepare`), then generates batches of `FaceRequest`s — which may mix frames of several utterances,
sessions and avatars — asynchronously: `submit` returns at once, `wait` returns the faces. The frame
scheduler (pipeline/scheduler.py) is the only caller while serving; `ClipJob` drives one clip alone.

MuseTalk math, batched: UNet at timestep 0 on the cached 8-channel latents of each frame's source image
with that frame's 50 audio tokens; its 4-channel output is the clean latent; × 1/0.18215, VAE-decode,
(x/2 + 0.5).clamp(0, 1) in the VAE dtype, then float32 × 255, round, uint8, RGB → BGR — exactly as
upstream MuseTalk's realtime script. On CUDA the two networks can be replayed as CUDA graphs (one pair
per batch shape; the timestep lives on the device so capture needs no host copy) and/or torch.compiled;
results are copied to pinned host memory without blocking, so the GPU computes batch k+1 while the CPU
blends k.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from musetalk.avatar.cache import AvatarCache
from musetalk.config import AppConfig, project_path
from musetalk.enhance.restore import FaceRestorer
from musetalk.enhance.stage import MouthEnhancer
from musetalk.errors import AvatarNotPrepared, GpuOutOfMemory
from musetalk.models import ModelBundle
from musetalk.models.nets_vae import AutoencoderKL
from musetalk.models.unet import PositionalEncoding
from musetalk.pipeline.audio import (
    WHISPER_BATCH_SHAPES,
    WindowSpec,
    audio_tokens,
    audio_tokens_many,
    whisper_hidden_states_many,
)
from musetalk.pipeline.composite import DeviceCompositor, host_to_device, supports, weight_scale

if TYPE_CHECKING:
    from musetalk.models.nets_whisper import WhisperEncoder, WhisperFeatures

log = logging.getLogger(__name__)

Phonemes = tuple[tuple[float, str], ...]  # (start_s, espeak-ng mnemonic), as in Audio.phonemes
LATENT_CHANNELS_IN = 8  # [masked lower half ‖ reference]
_MAX_DEVICE_AVATARS = 8  # avatars whose latents stay on the device
_GRAPH_WARMUP_RUNS = 3


class PendingFaces(Protocol):
    """One submitted batch."""

    def wait(self) -> NDArray[np.uint8] | list[NDArray[np.uint8]]:
        """Block until done → one item per submitted request, in order: its (256, 256, 3) BGR face, or, for a
        request with `blend_weight` to a source that composites, the finished (H·3/2, W) I420 frame."""
        ...


class FaceRequest(NamedTuple):
    """One face to generate: frame `frame_id` of the utterance whose conditioning is `cond`, shown on avatar
    source frame `source_id`. Requests of different utterances (and avatars) can share a batch.

    `blend_weight`: only for a source with `composites` set — paste the face into the source frame itself
    with this weight and return the I420 frame instead of the face.
    """

    cond: Any  # what FaceSource.prepare returned for that utterance
    frame_id: int
    source_id: int
    blend_weight: float | None = None


class PrepareItem(NamedTuple):
    """What `prepare` takes for one utterance."""

    cache: AvatarCache
    samples_16k: NDArray[np.float32]
    n_frames: int
    phonemes: Phonemes = ()


@runtime_checkable
class BatchPreparer(Protocol):
    """A FaceSource that prepares several utterances at once faster than one by one (MuseTalk: one Whisper pass)."""

    def prepare_many(self, items: Sequence[PrepareItem]) -> list[Any]:
        """`prepare` of every item, in order; raises if any fails."""
        ...


class FaceSource(Protocol):
    """Produces 256×256 faces for frame positions of utterances; used by one thread (the scheduler's)."""

    name: str
    first_batch_size: int  # smaller first batch: the first frame arrives sooner
    batch_size: int
    composites: bool  # pastes faces into frames itself (FaceRequest.blend_weight → I420 frames)

    def prepare(
        self, cache: AvatarCache, samples_16k: NDArray[np.float32], n_frames: int, phonemes: Phonemes = ()
    ) -> Any:
        """Per-utterance conditioning for `n_frames` frames from 16 kHz mono audio (MuseTalk: audio tokens).

        `phonemes` ((start_s, name), when the TTS reported them) may shape the mouth; MuseTalk needs none.
        """
        ...

    def submit(self, requests: Sequence[FaceRequest]) -> PendingFaces:
        """Start generating at most `batch_size` faces without waiting for them."""
        ...

    def accelerated(self) -> dict[int, str]:
        """How each fixed batch shape runs now (e.g. {4: "graphs", 16: "eager"}); {} = any size, eager."""
        ...


class ClipJob:
    """The faces of one clip, batch by batch, without a scheduler (tests, benchmarks, one-off tools)."""

    def __init__(self, source: FaceSource, cond: Any) -> None:
        self.source, self.cond = source, cond

    def submit(self, frame_ids: Sequence[int], source_ids: Sequence[int]) -> PendingFaces:
        """Start faces for clip frames `frame_ids` shown on avatar source frames `source_ids`."""
        if not frame_ids or len(frame_ids) != len(source_ids) or len(frame_ids) > self.source.batch_size:
            raise ValueError(
                f"batch of {len(frame_ids)} frames (with {len(source_ids)} sources; max {self.source.batch_size})"
            )
        return self.source.submit([FaceRequest(self.cond, f, s) for f, s in zip(frame_ids, source_ids, strict=True)])

    def timings_ms(self) -> dict[str, float]:
        """Stage times of this clip so far (when the source keeps them)."""
        timings = getattr(self.cond, "timings_ms", None)
        return dict(timings()) if callable(timings) else {}

    def close(self) -> None:
        """Nothing to release (kept so a job can be used as before in a try/finally)."""


class _Denoise(nn.Module):
    """UNet at timestep 0: (B, 8, 32, 32) latents + (B, T, C) tokens → (B, 4, 32, 32) clean latent."""

    def __init__(self, unet: nn.Module, timestep: torch.Tensor, out_dtype: torch.dtype) -> None:
        super().__init__()
        self.unet = unet
        self.timestep = timestep  # (1,) int64 on the device: a Python 0 would need a host copy
        self.out_dtype = out_dtype

    def forward(self, latents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """One denoising pass, cast to the VAE dtype as upstream."""
        pred = self.unet(latents, self.timestep, tokens)
        return pred.to(self.out_dtype)


class _Decode(nn.Module):
    """(B, 4, 32, 32) latents → (B, 256, 256, 3) BGR uint8, with upstream's rounding."""

    def __init__(self, vae: AutoencoderKL, scale: float) -> None:
        super().__init__()
        self.vae = vae
        self.inv_scale = 1.0 / scale

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode and convert on the device; only uint8 crosses to the host."""
        image = self.vae.decode(self.inv_scale * latents)  # (B, 3, 256, 256)
        image = (image / 2 + 0.5).clamp(0, 1)
        pixels = (image.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8)  # (B, 256, 256, 3) RGB
        return pixels.flip(-1)


@dataclass
class StageClock:
    """Accumulated stage times of one utterance (GPU time of shared batches is split by frame share)."""

    features: float = 0.0
    unet: float = 0.0
    vae: float = 0.0
    batches: int = 0
    frames: int = 0
    padded_frames: float = 0.0

    def as_dict(self) -> dict[str, float]:
        """Stage times (ms) and counters for the clip's timings."""
        return {
            "features_ms": self.features,
            "unet_ms": self.unet,
            "vae_ms": self.vae,
            "batches": float(self.batches),
            "generated_frames": float(self.frames),
            "padded_frames": self.padded_frames,
        }


@dataclass
class MuseTalkConditioning:
    """One utterance's inputs on the device: audio tokens per clip frame, latents per avatar source frame."""

    tokens: torch.Tensor  # (T, 50, C) in the model dtype, positional encoding added
    latents: torch.Tensor  # (N, 8, 32, 32) the avatar's [masked ‖ reference] latents in the model dtype
    clock: StageClock
    cache: AvatarCache  # the avatar (its frames, when the source composites)

    def timings_ms(self) -> dict[str, float]:
        """Stage times of the utterance so far."""
        return self.clock.as_dict()


class _Graphs:
    """UNet and decoder captured as CUDA graphs for one batch size (static inputs/outputs)."""

    def __init__(
        self,
        denoise: nn.Module,
        decode: nn.Module,
        latents: torch.Tensor,
        tokens: torch.Tensor,
        exclusive: threading.Lock,
    ) -> None:
        self.latents, self.tokens = latents, tokens  # static inputs, filled before each replay
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(_GRAPH_WARMUP_RUNS):  # cuDNN autotuning, lazy init, compilation: not in the graph
                decode(denoise(latents, tokens))
        torch.cuda.current_stream().wait_stream(side)
        side.synchronize()
        # While a stream captures, CUDA refuses some calls of other threads (cuDNN's eager convolutions in
        # the scheduler failed with "operation not permitted when stream is capturing"), so the capture
        # holds the source's `exclusive` lock, which every launch and wait of the serving thread takes too.
        # The slow part above (warm-up runs, cuDNN autotuning, compilation) runs beside serving.
        with exclusive:
            self.unet_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.unet_graph, capture_error_mode="thread_local"):
                self.pred = denoise(latents, tokens)
            self.vae_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.vae_graph, pool=self.unet_graph.pool(), capture_error_mode="thread_local"):
                self.faces = decode(self.pred)
            torch.cuda.current_stream().synchronize()


def _time_replays(graphs: _Graphs, runs: int = 5) -> float:
    """Median GPU ms of one UNet + decoder replay."""
    stream = torch.cuda.Stream()
    times = []
    with torch.cuda.stream(stream):
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graphs.unet_graph.replay()
            graphs.vae_graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


class _Pending:
    """A batch in flight: its outputs land in (pinned) host memory; CUDA events time the two networks."""

    def __init__(
        self,
        outputs: torch.Tensor | list[torch.Tensor],
        n: int,
        shares: list[tuple[StageClock, int]],
        events: tuple[torch.cuda.Event, ...] | None,
        cpu_ms: tuple[float, float] = (0.0, 0.0),
        exclusive: threading.Lock | None = None,
    ) -> None:
        self._outputs, self._n, self._shares, self._events = outputs, n, shares, events
        self._cpu_ms = cpu_ms
        self._exclusive = exclusive
        self._done = False

    def wait(self) -> NDArray[np.uint8] | list[NDArray[np.uint8]]:
        """Block until this batch's copies landed → (B, 256, 256, 3) faces, or one array per request."""
        if not self._done:
            unet_ms, vae_ms = self._cpu_ms
            if self._events is not None:
                start, mid, end, copied = self._events
                assert self._exclusive is not None
                with self._exclusive:
                    copied.synchronize()
                    unet_ms, vae_ms = start.elapsed_time(mid), mid.elapsed_time(end)
            for clock, count in self._shares:  # each utterance pays for its share of the batch
                clock.unet += unet_ms * count / self._n
                clock.vae += vae_ms * count / self._n
            self._done = True
        if isinstance(self._outputs, torch.Tensor):
            return self._outputs[: self._n].numpy()  # (B, 256, 256, 3) BGR uint8
        return [t.numpy() for t in self._outputs]


class MuseTalkFaces:
    """The MuseTalk v1.5 face source: Whisper tokens → UNet (t = 0) → VAE decode, batched across utterances.

    On CUDA every batch is padded to one of a few fixed shapes (`batch_shapes`); each shape runs eagerly
    until `accelerate` has captured its CUDA graphs (and, with runtime.compile, compiled it), which the
    server does in the background so that it can serve as soon as the weights are on the GPU.
    """

    name = "musetalk"

    def __init__(self, bundle: ModelBundle, cfg: AppConfig, composite: bool | None = None) -> None:
        """`composite`: paste faces on the device (pipeline/composite.py); None = engine.gpu_blend on CUDA.

        With `enhance.enabled` the bundle must hold GFPGAN: every generated face's mouth half is restored
        on the device right after the decoder (musetalk/enhance/stage.py), before blending.
        """
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
            # torch's type stubs omit Module.to(memory_format=...), which torch supports
            bundle.unet.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            bundle.vae.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.denoise: nn.Module = _Denoise(bundle.unet, timestep, vae_dtype).eval()
        self.decode: nn.Module = _Decode(bundle.vae, bundle.vae_scale).eval()
        # What `accelerate` runs: compiled copies when asked for; the eager modules above keep serving meanwhile.
        self._fast_denoise, self._fast_decode = self.denoise, self.decode
        self.compiles = cuda and cfg.runtime.compile
        if self.compiles:
            # Compiled kernels persist between starts (inductor's default is a temp folder).
            cache_dir = project_path(cfg.runtime.compile_cache_dir)
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir / "inductor"))
            os.environ.setdefault("TRITON_CACHE_DIR", str(cache_dir / "triton"))
        self._compile_modules = cfg.runtime.compile_modules  # wrapped in accelerate(): see _wrap_compiled
        self._graphs: dict[int, _Graphs] = {}  # replaced whole per shape, read without a lock (atomic)
        self.batch_ms: dict[int, float] = {}  # measured GPU time of one batch per accelerated shape
        self._state: dict[int, str] = {size: "eager" for size in self.batch_shapes} if cuda else {}
        self._device_latents: dict[int, tuple[AvatarCache, torch.Tensor]] = {}
        self._latents_lock = threading.Lock()
        self._exclusive = threading.Lock()  # no CUDA call of the serving thread while a graph is captured
        if composite is None:
            composite = cuda and cfg.engine.gpu_blend and supports(cfg.blend)
        self.compositor = DeviceCompositor(cfg.blend, cfg.prep.expand, self.device) if composite else None
        self.composites = self.compositor is not None
        self.enhancer: MouthEnhancer | None = None
        if cfg.enhance.enabled:
            if bundle.gfpgan is None:
                raise ValueError("enhance.enabled needs the GFPGAN weights loaded (load_models with 'gfpgan')")
            restorer = FaceRestorer(bundle.gfpgan, cfg.enhance.batch_size, cfg.enhance.fixed_noise)
            self.enhancer = MouthEnhancer(restorer, cfg.enhance.weight)

    def _zero_inputs(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(size, 8, 32, 32) latents and (size, T, C) tokens of zeros, in the model dtype and layout."""
        lat = torch.zeros(size, LATENT_CHANNELS_IN, 32, 32, dtype=self.dtype, device=self.device)
        if self.channels_last:
            lat = lat.contiguous(memory_format=torch.channels_last)
        tok = torch.zeros(size, self.tokens_per_frame, self.bundle.audio_dim, dtype=self.dtype, device=self.device)
        return lat, tok

    @property
    def batch_shapes(self) -> list[int]:
        """The batch sizes run on CUDA (a batch is padded up to one of them): first batch, doublings, full."""
        if self.device.type != "cuda":
            return []
        shapes = {self.first_batch_size, self.batch_size}
        size = self.first_batch_size * 2
        while size < self.batch_size:
            shapes.add(size)
            size *= 2
        return sorted(shapes)

    def padded_size(self, n: int) -> int:
        """Smallest fixed batch size holding n frames (CUDA); n itself on CPU."""
        if self.device.type != "cuda":
            return n
        return next(s for s in self.batch_shapes if s >= n)

    def accelerated(self) -> dict[int, str]:
        """How each batch shape runs now: eager | graphs | compiled | compiled+graphs ({} on CPU)."""
        return dict(self._state)

    def _accelerate_shape(self, size: int, compiled: bool) -> None:
        denoise, decode = (self._fast_denoise, self._fast_decode) if compiled else (self.denoise, self.decode)
        t0 = time.perf_counter()
        with torch.inference_mode():
            if self.use_graphs:
                graphs = _Graphs(denoise, decode, *self._zero_inputs(size), exclusive=self._exclusive)
                self.batch_ms[size] = _time_replays(graphs)  # before publishing: nobody else replays it yet
                self._graphs[size] = graphs
            else:
                side = torch.cuda.Stream()
                with torch.cuda.stream(side):
                    decode(denoise(*self._zero_inputs(size)))  # compiles (and autotunes) this shape
                side.synchronize()
        label = ("compiled+graphs" if self.use_graphs else "compiled") if compiled else "graphs"
        self._state[size] = label
        log.info("batch %d: %s ready in %.0f ms", size, label, (time.perf_counter() - t0) * 1000)

    def accelerate(self) -> None:
        """Capture CUDA graphs (and compile) every batch shape, smallest first; safe beside eager serving.

        With both graphs and compile on, plain graphs are captured first (seconds), then each shape is
        compiled and captured again (a minute cold, seconds with a warm compile cache).
        """
        if self.device.type != "cuda" or not (self.use_graphs or self.compiles):
            return
        torch.cuda.set_device(self.device)  # current device is per thread
        if self.use_graphs:
            for size in self.batch_shapes:
                if size not in self._graphs:
                    self._accelerate_shape(size, compiled=False)
        if self.compiles:
            self._wrap_compiled()
            for size in self.batch_shapes:
                self._accelerate_shape(size, compiled=True)

    def _wrap_compiled(self) -> None:
        """The torch.compile wrappers, made here (in the background) rather than at construction: the first
        torch.compile call imports torch._dynamo and inductor, seconds that would delay serving."""
        # One specialised graph per batch size (a handful), no dynamic shapes.
        if self._compile_modules in ("unet", "both") and self._fast_denoise is self.denoise:
            self._fast_denoise = torch.compile(self.denoise, dynamic=False)  # type: ignore[assignment]
        if self._compile_modules in ("vae", "both") and self._fast_decode is self.decode:
            self._fast_decode = torch.compile(self.decode, dynamic=False)  # type: ignore[assignment]

    @torch.inference_mode()
    def warm_audio(self, shapes: Sequence[int] = WHISPER_BATCH_SHAPES) -> None:
        """Run the audio path once per Whisper batch size in `shapes` (its kernels and handles load on the
        calling thread; on CUDA, cuDNN autotunes each size once, so no utterance ever waits for that)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        silence = np.zeros(16000, np.float32)
        encoder, extractor, pe = self._audio_models()
        with self._exclusive:
            audio_tokens(silence, self.spec, encoder, extractor, pe)  # the whole path, at one window
            if self.device.type == "cuda":
                for size in shapes:
                    if size > 1:  # the encoder alone at the other batch sizes
                        whisper_hidden_states_many([silence] * size, encoder, extractor)
                torch.cuda.synchronize(self.device)

    def warmup(self) -> None:
        """Warm the audio path and accelerate every batch shape now (blocking): the first request pays nothing."""
        self.warm_audio()
        if self.device.type == "cuda" and (self.use_graphs or self.compiles):
            self.accelerate()
        elif self.device.type == "cuda":
            with torch.inference_mode():
                for size in self.batch_shapes:
                    self.decode(self.denoise(*self._zero_inputs(size)))
            torch.cuda.synchronize(self.device)
        else:
            with torch.inference_mode():
                self.decode(self.denoise(*self._zero_inputs(1)))

    def _audio_models(self) -> tuple[WhisperEncoder, WhisperFeatures, PositionalEncoding]:
        b = self.bundle
        assert b.whisper is not None and b.feature_extractor is not None and b.pe is not None
        return b.whisper, b.feature_extractor, b.pe

    def latents_on_device(self, cache: AvatarCache) -> torch.Tensor:
        """The avatar's (N, 8, 32, 32) latents in the model dtype on the device, moved once per avatar."""
        with self._latents_lock:
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
        with self._latents_lock:
            if len(self._device_latents) >= _MAX_DEVICE_AVATARS:
                self._device_latents.clear()
            self._device_latents[id(cache)] = (cache, dev)
        return dev

    def prepare(
        self, cache: AvatarCache, samples_16k: NDArray[np.float32], n_frames: int, phonemes: Phonemes = ()
    ) -> MuseTalkConditioning:
        """Audio tokens (T, 50, C) of the utterance and the avatar's latents, on the device."""
        return self.prepare_many([PrepareItem(cache, samples_16k, n_frames, phonemes)])[0]

    def prepare_many(self, items: Sequence[PrepareItem]) -> list[MuseTalkConditioning]:
        """`prepare` for several utterances with one batched Whisper pass (all succeed or the call raises)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # current device is per thread
        t0 = time.perf_counter()
        try:
            with self._exclusive, torch.inference_mode():
                clips = [item.samples_16k for item in items]
                tokens = audio_tokens_many(clips, self.spec, *self._audio_models())  # (T_i, 50, C) each
                latents = [self.latents_on_device(item.cache) for item in items]
        except torch.cuda.OutOfMemoryError as exc:
            raise GpuOutOfMemory("GPU out of memory computing audio features") from exc
        features_ms = (time.perf_counter() - t0) * 1000 / len(items)  # each utterance pays its share
        conds = []
        for item, tok, lat in zip(items, tokens, latents, strict=True):
            if tok.shape[0] != item.n_frames:
                raise ValueError(f"audio gives {tok.shape[0]} frames, caller expects {item.n_frames}")
            clock = StageClock()
            clock.features = features_ms
            conds.append(MuseTalkConditioning(tok, lat, clock, item.cache))
        return conds

    def start(
        self, cache: AvatarCache, samples_16k: NDArray[np.float32], n_frames: int, phonemes: Phonemes = ()
    ) -> ClipJob:
        """One clip's faces without a scheduler: `prepare`, then batches through the returned job."""
        return ClipJob(self, self.prepare(cache, samples_16k, n_frames, phonemes))

    def submit(self, requests: Sequence[FaceRequest]) -> PendingFaces:
        """Launch one batch (at most batch_size frames, from any utterances) without waiting for it."""
        n = len(requests)
        if n == 0 or n > self.batch_size:
            raise ValueError(f"batch of {n} frames (max {self.batch_size})")
        with self._exclusive, torch.inference_mode():
            try:
                return self._submit(requests, n)
            except torch.cuda.OutOfMemoryError as exc:
                raise GpuOutOfMemory(f"GPU out of memory generating a batch of {n} frames") from exc

    def _gather(
        self, requests: Sequence[FaceRequest], lat: torch.Tensor, tok: torch.Tensor
    ) -> list[tuple[StageClock, int]]:
        """Copy each request's latents and tokens into rows of `lat` (S, 8, 32, 32) and `tok` (S, T, C)."""
        groups: dict[int, tuple[MuseTalkConditioning, list[int], list[int], list[int]]] = {}
        for row, req in enumerate(requests):
            cond = req.cond
            group = groups.setdefault(id(cond), (cond, [], [], []))
            group[1].append(row)
            group[2].append(req.frame_id)
            group[3].append(req.source_id)
        # One host→device transfer for every index of the batch: each transfer gives up the GIL and, with
        # many busy threads, waits to get it back (that wait, once per utterance, was most of a launch).
        flat: list[int] = []
        for _, rows, frame_ids, source_ids in groups.values():
            flat += rows + source_ids + frame_ids
        index = host_to_device(flat, torch.long, self.device)
        shares = []
        pos = 0
        for cond, rows, _, _ in groups.values():
            k = len(rows)
            dst, src, fid = index[pos : pos + k], index[pos + k : pos + 2 * k], index[pos + 2 * k : pos + 3 * k]
            pos += 3 * k
            lat.index_copy_(0, dst, cond.latents.index_select(0, src))
            tok.index_copy_(0, dst, cond.tokens.index_select(0, fid))
            cond.clock.batches += 1
            cond.clock.frames += k
            shares.append((cond.clock, k))
        return shares

    def _submit(self, requests: Sequence[FaceRequest], n: int) -> PendingFaces:
        size = self.padded_size(n)
        graphs = self._graphs.get(size) if self.use_graphs else None
        if graphs is not None:
            lat, tok = graphs.latents, graphs.tokens
        else:
            lat, tok = self._zero_inputs(size) if size > n else self._empty_inputs(size)
        shares = self._gather(requests, lat, tok)
        for clock, count in shares:
            clock.padded_frames += (size - n) * count / n
        if self.device.type != "cuda":
            t0 = time.perf_counter()
            pred = self.denoise(lat, tok)
            t1 = time.perf_counter()
            faces = self.decode(pred)
            cpu_ms = ((t1 - t0) * 1000, (time.perf_counter() - t1) * 1000)
            return _Pending(self._outputs(requests, self._enhanced(faces, n)), n, shares, None, cpu_ms)
        events = tuple(torch.cuda.Event(enable_timing=True) for _ in range(4))
        start, mid, end, copied = events
        if graphs is not None:
            start.record()
            graphs.unet_graph.replay()
            mid.record()
            graphs.vae_graph.replay()
            end.record()
            out = graphs.faces
        else:
            # Padding rows stay zero: fixed shapes keep cuDNN's autotuned kernels (padded frames are dropped).
            compiled = self._state.get(size) == "compiled"  # compile without graphs
            denoise, decode = (self._fast_denoise, self._fast_decode) if compiled else (self.denoise, self.decode)
            start.record()
            pred = denoise(lat, tok)
            mid.record()
            out = decode(pred)
            end.record()
        outputs = self._outputs(requests, self._enhanced(out, n))  # ordered before the next replay overwrites `out`
        copied.record()
        return _Pending(outputs, n, shares, events, exclusive=self._exclusive)

    def _enhanced(self, faces: torch.Tensor, n: int) -> torch.Tensor:
        """The batch's first n faces (S, 256, 256, 3), their mouths restored when the enhance stage is on."""
        return faces if self.enhancer is None else self.enhancer.enhance_device(faces[:n])

    def _outputs(self, requests: Sequence[FaceRequest], faces: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """The batch's results in host memory: (n, 256, 256, 3) faces, or one tensor per request when composing.

        On CUDA the copies go to pinned memory without blocking; `faces` (S ≥ n rows) may be a graph's
        static output, so everything here is queued on the stream before the next replay.
        """
        n = len(requests)
        cuda = self.device.type == "cuda"

        def to_host(t: torch.Tensor) -> torch.Tensor:
            if not cuda:
                return t
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            return host.copy_(t, non_blocking=True)

        composed = [k for k, r in enumerate(requests) if r.blend_weight is not None]
        if self.compositor is None or not composed:
            return to_host(faces[:n])
        results: list[torch.Tensor | None] = [None] * n
        plain = [k for k, r in enumerate(requests) if r.blend_weight is None]
        groups: dict[int, list[int]] = {}  # one compose per avatar (frame sizes differ)
        for k in composed:
            groups.setdefault(id(requests[k].cond.cache), []).append(k)
        # All indices in one transfer and all weights in another (see _gather), both in group order.
        flat = plain + [v for rows in groups.values() for v in (*rows, *(requests[k].source_id for k in rows))]
        index = host_to_device(flat, torch.long, self.device)
        scales = [weight_scale(float(requests[k].blend_weight or 0.0)) for rows in groups.values() for k in rows]
        scale = host_to_device(scales, torch.float32, self.device)
        if plain:
            host = to_host(faces.index_select(0, index[: len(plain)]))
            for row, k in zip(host, plain, strict=True):
                results[k] = row
        pos, wpos = len(plain), 0
        for rows in groups.values():
            g = len(rows)
            frames = self.compositor.compose(
                requests[rows[0]].cond.cache,
                faces.index_select(0, index[pos : pos + g]),
                [requests[k].source_id for k in rows],
                device_ids=index[pos + g : pos + 2 * g],
                device_scale=scale[wpos : wpos + g],
            )  # (G, H·3/2, W) I420
            pos, wpos = pos + 2 * g, wpos + g
            host = to_host(frames)
            for row, k in zip(host, rows, strict=True):
                results[k] = row
        return [r for r in results if r is not None]

    def _empty_inputs(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Uninitialised inputs, every row of which _gather fills."""
        lat = torch.empty(size, LATENT_CHANNELS_IN, 32, 32, dtype=self.dtype, device=self.device)
        if self.channels_last:
            lat = lat.contiguous(memory_format=torch.channels_last)
        tok = torch.empty(size, self.tokens_per_frame, self.bundle.audio_dim, dtype=self.dtype, device=self.device)
        return lat, tok
