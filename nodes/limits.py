"""Limits the host sets, read from the host itself (with its documented default when it cannot be read)."""
from __future__ import annotations

import functools

DEFAULT_BATCH_CAP = 4096  # EmptyLatentImage's batch_size maximum in ComfyUI


@functools.lru_cache(maxsize=1)
def host_batch_cap() -> int:
    """The largest latent batch the host's EmptyLatentImage makes: more token rows can never be sampled."""
    try:
        import nodes as host_nodes  # ComfyUI's own nodes.py (the host root is on sys.path)

        spec = host_nodes.EmptyLatentImage.INPUT_TYPES()["required"]["batch_size"][1]
        return int(spec["max"])
    except Exception:  # noqa: BLE001 - another host layout: fall back to the documented cap
        return DEFAULT_BATCH_CAP
