"""Gradient-based quality guidance: steer sampling with a differentiable IQA model (the paper's first method).

The paper's equation could not be read (docs/METHOD.md §2.2, §Q1-§Q4); this is our
reading, the standard one-step estimate + decode + differentiate scheme:

    x̂0 = clamp((Dec(D / s_vae) + 1) / 2, 0, 1)      D = the sampler's (CFG-combined) denoised estimate
    S   = sign · IQA(x̂0) / divisor                  sign makes "raise" mean "better" for every metric
    D'  = D + s · σ² · ∇_D S                        faithful form (= ε̃ = ε̂ − s·√(1−ᾱ)·∇_{z_t} S)

Gradient path: (b) stop-gradient on the network output (D = x − σ·ε̂ with ε̂ held fixed gives ∂D/∂x = I, so
∇_x S = ∇_D S): one decode + one IQA forward/backward per step, no gradient ever reaches the UNet.
Path (a) (through the UNet, "universal guidance") is left out: the host runs prompts under
torch.inference_mode, so the UNet's weights are inference tensors that autograd cannot save; it would need a
full normal-tensor copy of the UNet plus a UNet backward per step.

Pack additions (not the paper's, labelled as such in the node):
  * normalization 'std': S is divided by the metric's CC3M std, so one scale means "CC3M standard deviations"
    for every metric (musiq ~0-100 vs topiq ~0-1). A metric without CC3M statistics is an error, not a
    silent fallback.
  * normalization 'rms': D' = D + s · σ · g / rms(g) per sample, a step of fixed size in σ units.
  * max_resolution: the decoded image is resized (bilinear, antialiased, differentiable) so that its longer
    side is at most this many pixels before scoring (docs/METHOD.md §Q4).

Everything here is plain torch: the caller supplies `decode` (latent in the sampler's space -> image (B, 3, H,
W) in [0, 1], differentiable) and `score` (images -> (B,) scores, differentiable).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TARGETS = ("raise", "lower")
NORMALIZATIONS = ("none", "std", "rms")


@dataclass
class GuidanceResult:
    denoised: torch.Tensor        # D' (same dtype/device as D)
    scores: torch.Tensor          # raw metric scores of the decoded estimate, (B,), float32, detached, CPU


def score_sign(target: str, lower_better: bool) -> float:
    """+1 when increasing the raw score is the wanted direction. 'raise' always means 'better quality'."""
    if target not in TARGETS:
        raise ValueError(f"guidance target must be one of {TARGETS}, got {target!r}")
    better_is_up = not lower_better
    return 1.0 if (target == "raise") == better_is_up else -1.0


def score_divisor(normalization: str, metric_name: str) -> float:
    """1 for 'none'/'rms'; the metric's CC3M std for 'std' (ValueError when the table has no row for it)."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"guidance normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if normalization != "std":
        return 1.0
    from ..models.stats import cc3m_stats
    table = cc3m_stats()
    if metric_name not in table:
        raise ValueError(
            f"normalization 'std' needs the CC3M std of metric {metric_name!r}, which the statistics table "
            f"does not have (known: {', '.join(table)}). Use normalization 'none' or 'rms' for this metric.")
    return float(table[metric_name].std)


def validate_scale(scale: float, what: str = "scale") -> float:
    value = float(scale)
    if not math.isfinite(value):
        raise ValueError(f"guidance {what} must be a finite number, got {scale!r}")
    return value


def resize_longer_side(images: torch.Tensor, max_resolution: int) -> torch.Tensor:
    """Differentiable downscale so that max(H, W) <= max_resolution (0 = keep the decoded size)."""
    if max_resolution <= 0:
        return images
    height, width = images.shape[-2:]
    longer = max(height, width)
    if longer <= max_resolution:
        return images
    factor = max_resolution / longer
    size = (max(1, round(height * factor)), max(1, round(width * factor)))
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def latent_decoder(decode_raw: Callable[[torch.Tensor], torch.Tensor],
                   to_vae_latent: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """decode(z) = clamp((decode_raw(to_vae_latent(z)) + 1) / 2, 0, 1).

    `to_vae_latent` maps the sampler's latent space to the VAE's (the host's latent_format.process_out,
    i.e. z / s_vae (+ shift)); `decode_raw` returns images in [-1, 1] as the SD decoders do."""
    def decode(latent: torch.Tensor) -> torch.Tensor:
        return ((decode_raw(to_vae_latent(latent)) + 1.0) * 0.5).clamp(0.0, 1.0)
    return decode


def quality_guided_denoised(denoised: torch.Tensor, sigma: torch.Tensor, decode: Callable, score: Callable,
                            scale: float, sign: float = 1.0, normalization: str = "none",
                            divisor: float = 1.0, max_resolution: int = 0, chunk_size: int = 4) -> GuidanceResult:
    """D' from D (see the module docstring). `sigma`: (B,) or scalar. Works inside torch.inference_mode.

    scale == 0 returns D itself (no decode, no scoring) so the sample is bit-for-bit the unguided one.
    The batch is processed `chunk_size` samples at a time (peak memory of the decoder backward)."""
    scale = validate_scale(scale)
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"guidance normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if chunk_size < 1:
        raise ValueError(f"guidance chunk_size must be >= 1, got {chunk_size}")
    batch = denoised.shape[0]
    if scale == 0.0:
        nan = torch.full((batch,), float("nan"))
        return GuidanceResult(denoised, nan)

    sigma_b = torch.as_tensor(sigma).reshape(-1)
    if sigma_b.numel() == 1:
        sigma_b = sigma_b.expand(batch)
    if sigma_b.numel() != batch:
        raise ValueError(f"guidance: sigma has {sigma_b.numel()} values for a batch of {batch}")

    # Inference tensors cannot be saved for backward: work on normal copies with autograd on.
    with torch.inference_mode(False), torch.enable_grad():
        work = denoised.detach().clone().float()
        sigma_f = sigma_b.detach().clone().float().to(work.device).reshape(batch, *([1] * (work.dim() - 1)))
        updates, scores = [], []
        for start in range(0, batch, chunk_size):
            chunk = work[start:start + chunk_size].clone().requires_grad_(True)
            images = resize_longer_side(decode(chunk), max_resolution)
            raw = score(images).reshape(-1)
            if raw.numel() != chunk.shape[0]:
                raise ValueError(f"guidance: the scorer returned {raw.numel()} values for {chunk.shape[0]} images")
            objective = (sign / divisor) * raw.float()
            (gradient,) = torch.autograd.grad(objective.sum(), chunk)
            gradient = gradient.detach()
            chunk_sigma = sigma_f[start:start + chunk_size]
            if normalization == "rms":
                rms = gradient.pow(2).flatten(1).mean(1).sqrt()
                safe = torch.where(rms > 0, rms, torch.ones_like(rms)).reshape(-1, *([1] * (gradient.dim() - 1)))
                update = scale * chunk_sigma * gradient / safe
            else:
                update = scale * chunk_sigma.pow(2) * gradient
            updates.append(update)
            scores.append(raw.detach().float().cpu())
        update = torch.cat(updates).to(device=denoised.device, dtype=denoised.dtype)
    # The addition runs in the caller's mode (inference or not); `update` has no autograd history.
    return GuidanceResult(denoised + update, torch.cat(scores))


# ----------------------------------------------------------------------------------------------------
# Normal-tensor copies of frozen networks (decoders, IQA nets loaded under inference mode)
# ----------------------------------------------------------------------------------------------------

def has_inference_tensors(module: torch.nn.Module) -> bool:
    return any(t.is_inference() for t in list(module.parameters()) + list(module.buffers()))


def normal_tensors(module: torch.nn.Module) -> torch.nn.Module:
    """Replace, in place, every inference tensor of `module` (a module the caller alone owns) by a normal copy,
    so autograd can save it for the backward pass; `module` is returned. Values and devices are unchanged."""
    if not has_inference_tensors(module):
        return module
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, parameter in list(sub._parameters.items()):
                if parameter is not None and parameter.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(parameter.clone(), requires_grad=False)
            for name, buffer in list(sub._buffers.items()):
                if buffer is not None and buffer.is_inference():
                    sub._buffers[name] = buffer.clone()
    return module


def frozen_twin(module: torch.nn.Module) -> torch.nn.Module:
    """A frozen (eval, requires_grad False) copy of a plain torch module with its own normal tensors.
    Only for modules that hold nothing but tensors: never a host module that carries native buffers."""
    with torch.inference_mode(False):
        twin = copy.deepcopy(module)  # outside inference mode, deepcopy clones into normal tensors
        twin.eval()
        for parameter in twin.parameters():
            parameter.requires_grad_(False)
    normal_tensors(twin)
    return twin
