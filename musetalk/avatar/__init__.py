"""Avatar preparation (force_prep) and the on-disk avatar cache.

`prepare_avatar(cfg, ...)` builds `results/avatars/<id>/` once; `load_avatar(cfg, id)` opens it
read-only for serving (frames and masks stay on disk) and refuses a stale or missing cache with
the force_prep command that fixes it.
"""

from musetalk.avatar.cache import AvatarCache, cycle_index
from musetalk.avatar.prep import PrepResult, prepare_avatar
from musetalk.avatar.store import load_avatar

__all__ = ["AvatarCache", "PrepResult", "cycle_index", "load_avatar", "prepare_avatar"]
