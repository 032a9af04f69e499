"""Inputs several nodes share: the host's IMAGE tensors and the start/end schedule. Problems raise
InputError naming the input; the node's `errors.node_errors` (run time) or `presentation.validation`
(queue time) names the node."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..adapter.errors import InputError, quote


def image_to_bchw(images: torch.Tensor, input_name: str) -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, C) -> (B, 3, H, W) in [0, 1]. RGBA: alpha is dropped (not composited);
    grayscale (C=1) is repeated to RGB."""
    if not torch.is_tensor(images) or images.dim() != 4:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise InputError(f"expected an IMAGE batch (B, H, W, C), got {shape}", input_name)
    if images.shape[0] < 1:
        raise InputError("the image batch is empty (0 images)", input_name)
    channels = images.shape[-1]
    if channels == 4:
        images = images[..., :3]
    elif channels == 1:
        images = images.expand(*images.shape[:-1], 3)
    elif channels != 3:
        raise InputError(f"expected 1, 3 or 4 channels (gray, RGB, RGBA), got {channels}", input_name)
    if images.shape[1] < 2 or images.shape[2] < 2:
        raise InputError(f"images are {images.shape[2]}x{images.shape[1]} pixels; IQA needs at least 2x2 "
                         f"(most metrics 32x32 or more)", input_name)
    images = images.movedim(-1, 1).float().contiguous()
    if images.min() < 0 or images.max() > 1:  # clamp only when needed: no extra copy of large batches
        images = images.clamp(0, 1)
    return images


def schedule_inputs(end_hint: str = "") -> list:
    """The start_at/end_at widgets of a node that acts during part of the sampling (checked by check_schedule)."""
    return [
        io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="When to start, as a fraction of the steps (0 = from the first step)."),
        io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip=f"When to stop, as a fraction of the steps (1 = until the last step{end_hint})."),
    ]


def check_schedule(start_at, end_at) -> None:
    """A start/end pair of fractions of the sampling steps (None: wired, not known yet)."""
    for name, value in (("start_at", start_at), ("end_at", end_at)):
        if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
            raise InputError(f"expected a fraction from 0 to 1, got {quote(value)}", name)
    if start_at is not None and end_at is not None and start_at > end_at:
        raise InputError(f"start_at ({start_at:g}) is after end_at ({end_at:g}); start must not be later than end",
                         "start_at")
