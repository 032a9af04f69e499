"""Modules the pack hands to the host's model manager (ModelPatchers): the host loads them beside the
diffusion model, counts their memory and may offload them between uses."""
from __future__ import annotations

import comfy.model_management
import comfy.model_patcher
import torch

from ..adapter import iqa_models


def host_managed(module: torch.nn.Module, device: torch.device) -> comfy.model_patcher.ModelPatcher:
    """`module` as a plain host ModelPatcher (never dynamic) that the host loads to `device`."""
    return comfy.model_patcher.ModelPatcher(module, load_device=device,
                                            offload_device=comfy.model_management.unet_offload_device())


def memory_managed(metric: iqa_models.LoadedMetric) -> comfy.model_patcher.ModelPatcher:
    """The metric's network as its one host ModelPatcher (kept on the metric, so scoring and guidance share
    it; when the metric leaves the pack's cache, the patcher goes with it)."""
    patcher = getattr(metric, "_host_patcher", None)
    if patcher is None:
        patcher = host_managed(metric.net, metric.device)
        object.__setattr__(metric, "_host_patcher", patcher)
    return patcher
