"""Reference-based IQA-Adapter input: an IQA model's internal activations on a reference image.

The paper's v2 variant feeds "a flat vector of an IQA model's activations" to the same projection
(docs/METHOD.md §1.9); which model, layers and pooling is not published (docs/METHOD.md §Q16).
So the adapter's descriptor names them: extractor = {"model": pyiqa id, "layers": [module names of the
architecture, in order], "pooling": "avg" | "avg_l2", "dim": D_in}. Each hooked layer's output is
globally average-pooled (spatial axes of (B, C, H, W), token axis of (B, T, C)) and flattened; "avg_l2"
also L2-normalises each layer's vector (ARNIQA-style, content-agnostic scale). The vectors are
concatenated in the listed order.
"""
from __future__ import annotations

import torch

from .errors import InputError
from .iqa_adapter import encode_tokens
from .iqa_models import LoadedMetric, validate_images
from .projection import QualityTokens

POOLINGS = ("avg", "avg_l2")


def _named_module(metric: LoadedMetric, name: str) -> torch.nn.Module:
    """A layer by its name in the architecture (`metric.arch`); a leading 'net.' is accepted too."""
    modules = dict(metric.arch.named_modules())
    for candidate in (name, name[4:] if name.startswith("net.") else None):
        if candidate is not None and candidate in modules:
            return modules[candidate]
    sample = [n for n in modules if n and n.count(".") <= 1][:12]
    raise ValueError(f"reference extractor: layer '{name}' does not exist in {metric.name}'s network "
                     f"({type(metric.arch).__name__}); top-level layers include {sample}")


def _pool(output, batch: int, layer: str) -> torch.Tensor:
    if isinstance(output, (list, tuple)):
        return torch.cat([_pool(item, batch, layer) for item in output if torch.is_tensor(item)], dim=1)
    if not torch.is_tensor(output):
        raise ValueError(f"reference extractor: layer '{layer}' returned {type(output).__name__}, not a tensor")
    x = output.detach().float()
    if x.dim() == 4:
        x = x.mean(dim=(2, 3))
    elif x.dim() == 3:
        x = x.mean(dim=1)
    elif x.dim() != 2:
        x = x.reshape(x.shape[0], -1)
    if x.shape[0] != batch:
        # networks that score several crops per image: average the crops of each image
        if x.shape[0] % batch:
            raise ValueError(f"reference extractor: layer '{layer}' gave {x.shape[0]} rows for {batch} images")
        x = x.reshape(batch, x.shape[0] // batch, -1).mean(dim=1)
    return x


@torch.no_grad()
def extract_activations(metric: LoadedMetric, images_bchw_01: torch.Tensor, layers: list[str],
                        pooling: str = "avg") -> torch.Tensor:
    """(B, D): pooled activations of `layers` while the metric scores `images_bchw_01` (CPU fp32)."""
    if pooling not in POOLINGS:
        raise ValueError(f"reference extractor: pooling must be one of {POOLINGS}, got {pooling!r}")
    if not layers:
        raise ValueError("reference extractor: 'layers' is empty; the descriptor must name at least one layer")
    if metric.is_full_reference:
        raise ValueError(f"reference extractor: '{metric.name}' is a full-reference metric; use a no-reference one")
    validate_images(images_bchw_01, metric.name, "reference images")
    captured: dict[str, object] = {}
    handles = []
    for layer in layers:
        module = _named_module(metric, layer)
        handles.append(module.register_forward_hook(
            lambda _module, _inputs, output, layer=layer: captured.setdefault(layer, output)))
    try:
        device = metric.current_device()
        # pyiqa's own forward (its preprocessing included), gradients off whatever the metric's mode
        metric.arch(images_bchw_01.to(device))
    finally:
        for handle in handles:
            handle.remove()
    batch = images_bchw_01.shape[0]
    parts = []
    for layer in layers:
        if layer not in captured:
            raise ValueError(f"reference extractor: layer '{layer}' of {metric.name} was not run by its forward pass")
        vector = _pool(captured[layer], batch, layer)
        if pooling == "avg_l2":
            vector = torch.nn.functional.normalize(vector, dim=1)
        parts.append(vector)
    return torch.cat(parts, dim=1).cpu()


def check_reference_adapter(adapter, metric: LoadedMetric | None = None) -> dict:
    """The descriptor's extractor; errors for score-conditioned adapters and a mismatched metric."""
    descriptor = adapter.descriptor
    if descriptor.kind != "reference":
        raise InputError("this adapter is score-conditioned (descriptor kind "
                         f"'{descriptor.kind}'): encode quality targets with IQA-Adapter Encode Target instead; "
                         "reference encoding needs an adapter whose descriptor has kind 'reference'", "adapter")
    extractor = descriptor.extractor or {}
    if metric is not None and extractor.get("model") and extractor["model"] != metric.name:
        raise InputError(f"the adapter was trained on activations of '{extractor['model']}', but the metric given "
                         f"is '{metric.name}'; load '{extractor['model']}' with IQA Metric Loader", "metric")
    return extractor


def reference_vectors(adapter, metric: LoadedMetric, images_bchw_01: torch.Tensor) -> torch.Tensor:
    extractor = check_reference_adapter(adapter, metric)
    vectors = extract_activations(metric, images_bchw_01, list(extractor.get("layers") or []),
                                  extractor.get("pooling", "avg"))
    expected = int(adapter.info.input_dim)
    if vectors.shape[1] != expected:
        raise ValueError(f"the activations of {metric.name} at layers {list(extractor.get('layers') or [])} have "
                         f"{vectors.shape[1]} values, but the adapter's input_dim is {expected}; the descriptor's "
                         f"extractor does not match this adapter")
    return vectors


def encode_reference(adapter, metric: LoadedMetric, images_bchw_01: torch.Tensor,
                     negative_bchw_01: torch.Tensor | None = None) -> QualityTokens:
    """cond = projection(activations(reference)); uncond = projection(0) or projection(activations(negative)).
    One token row per reference image; a single negative image applies to every row."""
    vectors = reference_vectors(adapter, metric, images_bchw_01)
    labels = [{"reference": index, "extractor": metric.name} for index in range(vectors.shape[0])]
    if negative_bchw_01 is None:
        return encode_tokens(adapter, vectors, labels=labels)
    negatives = reference_vectors(adapter, metric, negative_bchw_01)
    if negatives.shape[0] == 1:
        negatives = negatives.expand(vectors.shape[0], -1)
    elif negatives.shape[0] != vectors.shape[0]:
        raise InputError(f"{negatives.shape[0]} negative reference images for {vectors.shape[0]} references "
                         f"(give 1 or {vectors.shape[0]})", "negative_reference")
    with torch.no_grad():
        cond = adapter.projection(vectors)
        uncond = adapter.projection(negatives)
    for label in labels:
        label["negative_reference"] = True
    return QualityTokens(cond.float().cpu(), uncond.float().cpu(), labels, adapter.info.cross_attention_dim,
                         adapter.info.num_tokens)
