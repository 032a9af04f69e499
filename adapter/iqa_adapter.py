"""The `IQA_ADAPTER` object (validated weights, their meaning, the projection) and quality tokens from it.

Above adapter/checkpoint.py (reading and validating weight files) and adapter/projection.py (the projection
module, QualityTokens): both are used here, neither imports this module.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from .checkpoint import AdapterInfo, load_adapter_weights
from .descriptor import Descriptor, check_input_dim, resolve_descriptor
from .errors import InputError
from .projection import INPUT_VALUE_LIMIT, QualityProjection, QualityTokens


@dataclass
class IQAAdapter:
    """The ComfyUI `IQA_ADAPTER` object: weights + their meaning. Everything fp32, CPU."""
    path: str
    info: AdapterInfo
    descriptor: Descriptor
    projection: torch.nn.Module
    to_k_ip: list[torch.Tensor] = field(repr=False)
    to_v_ip: list[torch.Tensor] = field(repr=False)


def load_adapter(path: str | os.PathLike, descriptor: Descriptor | None = None) -> IQAAdapter:
    """Read, validate, build the projection and attach the descriptor (sidecar > catalog > error).

    A given `descriptor` replaces the lookup; its input size must still equal the weights' D_in.
    """
    weights = load_adapter_weights(path)
    info = weights.info
    if descriptor is None:
        descriptor = resolve_descriptor(path, info.input_dim)
    else:
        check_input_dim(descriptor, info.input_dim, path)
    projection = QualityProjection.from_weights(weights.image_proj, info, source=str(path))
    return IQAAdapter(path=str(path), info=info, descriptor=descriptor, projection=projection,
                      to_k_ip=weights.to_k_ip, to_v_ip=weights.to_v_ip)


@torch.no_grad()
def encode_tokens(adapter: IQAAdapter, vectors: torch.Tensor, negative_scale: float = 0.0,
                  labels: list[dict] | None = None) -> QualityTokens:
    """cond = proj(v); uncond = proj(-k * v) (k = negative_scale; k = 0 gives proj(0), the default)."""
    vectors = torch.as_tensor(vectors, dtype=torch.float32)
    if vectors.dim() == 1:
        vectors = vectors.unsqueeze(0)
    if not math.isfinite(negative_scale):
        raise InputError(f"negative_scale must be a finite number, got {negative_scale}", "negative_scale")
    if not torch.isfinite(vectors).all():
        raise InputError("the quality vector contains NaN or infinite values")
    if vectors.numel() and float(vectors.abs().max()) > INPUT_VALUE_LIMIT:
        raise InputError(f"the quality vector reaches {float(vectors.abs().max()):.3g}, beyond {INPUT_VALUE_LIMIT:g} "
                         "(the tokens would collapse or overflow); use moderate target values")
    projection = adapter.projection
    cond = projection(vectors)
    uncond = projection(-float(negative_scale) * vectors) if negative_scale else projection(torch.zeros_like(vectors))
    return QualityTokens(cond.float().cpu(), uncond.float().cpu(), labels or [], adapter.info.cross_attention_dim,
                         adapter.info.num_tokens)
