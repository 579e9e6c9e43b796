"""Reading checkpoint files and loading them strictly into modules built on the meta device."""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from musetalk.errors import WeightsInvalid

M = TypeVar("M", bound=nn.Module)
StateDict = dict[str, torch.Tensor]


def read_state_dict(path: Path) -> StateDict:
    """Read a plain state dict from .safetensors, zip .pth/.bin (memory-mapped) or a legacy pickle."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path), device="cpu"))
    # mmap works only for the zip format; legacy (pre-1.6) pickles such as 79999_iter.pth raise on it.
    mmap = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:
        raise WeightsInvalid(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsInvalid(f"{path}: expected a plain state dict (name -> tensor)")
    return dict(obj)


def build_on_meta(factory: Callable[[], M]) -> M:
    """Construct a module without allocating or initialising its weights."""
    with torch.device("meta"):
        return factory()


def load_strict(
    module: M, state: Mapping[str, torch.Tensor], source: Path, dtype: torch.dtype | None = None
) -> M:
    """Load `state` (cast to `dtype` if given) into a meta-built module by assignment.

    Any missing or unexpected key or shape mismatch is fatal: a silent partial load would leave
    random weights.
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or bad_shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if bad_shapes:
            parts.append(f"{len(bad_shapes)} shape mismatches (e.g. {bad_shapes[:2]})")
        raise WeightsInvalid(f"{source}: checkpoint does not match the architecture: " + "; ".join(parts))
    cast = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(cast, strict=True, assign=True)
    leftovers = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if leftovers:
        raise WeightsInvalid(f"{source}: tensors not provided by the checkpoint: {leftovers[:5]}")
    return module
