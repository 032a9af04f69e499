"""pyiqa metrics for the pack: load (cached), score in chunks, the CC3M scoring size, and which weight
files a metric still lacks.

Metrics are built offline by adapter/metric_build.py (files found by adapter/metric_files.py, CLIP
backbones by adapter/clip_weights.py). Loaded metrics are cached (module level) by id + device +
differentiable + user folders, and the cache entry is dropped when one of the weight files it used changes
(files.file_signature). `clear_metric_cache()` frees it; the ComfyUI layer calls that when the host frees
memory.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from ..models.metrics import catalog_weight_files, metric_info
from .clip_weights import clip_cache_dirs
from .files import file_signature
from .metric_build import build_metric, plan_metric
from .metric_files import MissingMetricWeightsError, find_weight_file, search_folders


def resolve_device(device: str) -> torch.device:
    """An explicit device. 'auto' is the host's choice and is resolved by the node layer (ComfyUI's
    model management); host-free callers (scripts, tests) without one get the CPU."""
    if device in (None, "", "auto"):
        return torch.device("cpu")
    return torch.device(device)


# ----------------------------------------------------------------------------------------------------
# Scoring size: how a measured score is made comparable with the CC3M statistics
# ----------------------------------------------------------------------------------------------------

# 'cc3m': the image squashed to 512x512 as the authors made the CC3M statistics (docs/METHOD.md §3.3:
# torchvision `Resize((512, 512))` after `ToTensor`: bilinear with antialiasing, aspect ratio not kept, no
# crop; then clamped to [0, 1]); percentiles and z-scores of such a score mean what the paper's mean.
# 'native': the image as it is (the number pyiqa gives on the tensor you have).
SCORE_SIZES = ("cc3m", "native")
CC3M_SCORE_SIZE = (512, 512)
SCORE_SIZE_NOTES = {
    "cc3m": "squashed to 512x512 (bilinear, antialiased, no crop, clamped to [0, 1]) as the CC3M statistics were made",
    "native": "at the image's own size (not comparable with the CC3M percentiles)",
}


def resize_for_scoring(images_bchw: torch.Tensor, score_size: str) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> what the metric sees under `score_size` (differentiable)."""
    if score_size not in SCORE_SIZES:
        raise ValueError(f"score size must be one of {list(SCORE_SIZES)}, got {score_size!r}")
    if score_size == "native":
        return images_bchw
    if tuple(images_bchw.shape[-2:]) != CC3M_SCORE_SIZE:
        # = torchvision.transforms.Resize((512, 512)) on a float tensor (bilinear, antialias=True)
        images_bchw = torch.nn.functional.interpolate(images_bchw, size=CC3M_SCORE_SIZE, mode="bilinear",
                                                      align_corners=False, antialias=True)
    return images_bchw.clamp(0.0, 1.0)


# ----------------------------------------------------------------------------------------------------
# LoadedMetric
# ----------------------------------------------------------------------------------------------------

@dataclass
class LoadedMetric:
    """IQA_METRIC: one pyiqa metric with its weights, ready to score (B, C, H, W) images in [0, 1]."""
    name: str
    lower_better: bool
    score_range: tuple[float, float] | None
    differentiable: bool
    is_full_reference: bool
    device: torch.device
    net: torch.nn.Module                     # pyiqa's InferenceModel (its `.net` is the architecture)
    weight_files: list[str] = field(default_factory=list)

    @property
    def arch(self) -> torch.nn.Module:
        return self.net.net

    def current_device(self) -> torch.device:
        for tensor in self.arch.parameters():
            return tensor.device
        return self.device

    def score(self, images_bchw_01: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
        """Scores (B,). Non-differentiable: exactly pyiqa's `metric(x)`; differentiable: the
        architecture's forward with gradients (pyiqa's as_loss path without its loss reduction)."""
        validate_images(images_bchw_01, self.name, "images")
        if self.is_full_reference:
            if ref is None:
                raise ValueError(f"IQA metric '{self.name}' is full-reference: it needs reference images")
            validate_images(ref, self.name, "reference")
            if ref.shape != images_bchw_01.shape:
                raise ValueError(f"IQA metric '{self.name}': reference shape {tuple(ref.shape)} differs from "
                                 f"image shape {tuple(images_bchw_01.shape)}")
        device = self.current_device()
        if self.differentiable:
            args = (images_bchw_01.to(device),) + ((ref.to(device),) if self.is_full_reference else ())
            with torch.enable_grad():
                output = self.arch(*args)
        else:
            with torch.no_grad():
                output = self.net(images_bchw_01, ref) if self.is_full_reference else self.net(images_bchw_01)
        if isinstance(output, (tuple, list)):
            output = output[0]
        output = output.reshape(-1)
        if output.numel() != images_bchw_01.shape[0]:
            raise ValueError(f"IQA metric '{self.name}' returned {output.numel()} values for "
                             f"{images_bchw_01.shape[0]} images")
        return output


def validate_images(images: torch.Tensor, metric: str, what: str) -> None:
    if not torch.is_tensor(images) or images.dim() != 4:
        raise ValueError(f"IQA metric '{metric}': {what} must be a (B, C, H, W) tensor, got "
                         f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
    if images.shape[1] != 3:
        raise ValueError(f"IQA metric '{metric}': {what} must have 3 (RGB) channels, got {images.shape[1]}")
    if images.shape[2] < 2 or images.shape[3] < 2:
        raise ValueError(f"IQA metric '{metric}': {what} are {images.shape[3]}x{images.shape[2]} pixels; "
                         f"at least 2x2 is needed (most metrics need 32x32 or more)")


# ----------------------------------------------------------------------------------------------------
# Loading + cache
# ----------------------------------------------------------------------------------------------------

_CACHE: dict[tuple, tuple[LoadedMetric, list[tuple]]] = {}  # insertion order = least recently used first
_CACHE_LOCK = threading.RLock()
METRIC_CACHE_SIZE = 4  # cached metrics, counting each (device, differentiable) variant: the cap holds on every path


def load_metric(name: str, user_folders: Iterable[str] = (), device: str = "auto",
                differentiable: bool = False, use_cache: bool = True) -> LoadedMetric:
    """Build (or reuse) a metric. Fails within seconds with MissingMetricWeightsError when a file is absent."""
    user_folders = tuple(os.path.abspath(f) for f in user_folders)
    torch_device = resolve_device(device)
    key = (name, str(torch_device), bool(differentiable), user_folders)
    with _CACHE_LOCK:
        if use_cache and key in _CACHE:
            metric, signatures = _CACHE[key]
            try:
                if [file_signature(path) for path, *_ in signatures] == signatures:
                    _CACHE[key] = _CACHE.pop(key)  # most recently used
                    return metric  # same files, unchanged
            except OSError:
                pass  # a weight file vanished: rebuild (and fail clearly if it is really gone)
            _CACHE.pop(key, None)
        info = metric_info(name)
        model, files = build_metric(name, user_folders, torch_device)
        if differentiable:
            for parameter in model.parameters():
                parameter.requires_grad_(False)  # gradients flow to the image, not into the metric
        metric = LoadedMetric(
            name=name, lower_better=bool(getattr(model, "lower_better", info.lower_better)),
            score_range=info.score_range, differentiable=bool(differentiable),
            is_full_reference=getattr(model, "metric_mode", None) == "FR", device=torch_device,
            net=model, weight_files=files)
        if use_cache:
            while len(_CACHE) >= METRIC_CACHE_SIZE:
                del _CACHE[next(iter(_CACHE))]
            _CACHE[key] = (metric, [file_signature(path) for path in files])
        return metric


def clear_metric_cache(name: str | None = None) -> int:
    """Drop cached metrics (all, or one id); returns how many were dropped."""
    with _CACHE_LOCK:
        keys = [key for key in _CACHE if name is None or key[0] == name]
        for key in keys:
            del _CACHE[key]
    return len(keys)


@dataclass
class IQAScores:
    """IQA_SCORES: {metric: [one float per image]} plus each metric's direction and range."""
    scores: dict[str, list[float]] = field(default_factory=dict)
    lower_better: dict[str, bool] = field(default_factory=dict)
    score_range: dict[str, tuple[float, float] | None] = field(default_factory=dict)
    score_size: str = "native"             # SCORE_SIZES: how the images were sized for the metric

    def add(self, metric: LoadedMetric, values: list[float]) -> None:
        self.scores[metric.name] = [float(v) for v in values]
        self.lower_better[metric.name] = bool(metric.lower_better)
        self.score_range[metric.name] = metric.score_range

    def table(self) -> str:
        """Plain-text table: one row per image, one column per metric, then the mean."""
        names = list(self.scores)
        count = max((len(v) for v in self.scores.values()), default=0)
        heads = [f"{n} ({'lower' if self.lower_better[n] else 'higher'} better)" for n in names]
        widths = [max(len(h), 12) for h in heads]
        lines = ["image  " + "  ".join(h.rjust(w) for h, w in zip(heads, widths))]
        for i in range(count):
            cells = [f"{self.scores[n][i]:.6g}".rjust(w) for n, w in zip(names, widths)]
            lines.append(f"{i:>5}  " + "  ".join(cells))
        means = [f"{sum(self.scores[n]) / len(self.scores[n]):.6g}".rjust(w) if self.scores[n] else "-".rjust(w)
                 for n, w in zip(names, widths)]
        lines.append(" mean  " + "  ".join(means))
        lines.append(f"scored {SCORE_SIZE_NOTES.get(self.score_size, self.score_size)}")
        return "\n".join(lines)

    def rows(self, **extra) -> list[dict]:
        return [{**extra, "image": i, "metric": name, "lower_better": self.lower_better[name],
                 "score_size": self.score_size, "score": value}
                for name, values in self.scores.items() for i, value in enumerate(values)]


# ----------------------------------------------------------------------------------------------------
# Chunked scoring
# ----------------------------------------------------------------------------------------------------

def score_in_chunks(metric: LoadedMetric, images_bchw: torch.Tensor, ref_bchw: torch.Tensor | None = None,
                    chunk_size: int = 8, progress: Callable[[int, int], None] | None = None,
                    score_size: str = "native") -> torch.Tensor:
    """Scores (B,) on CPU, `chunk_size` images per forward; `progress(done, total)` after each chunk
    (it may raise to interrupt). `score_size` (SCORE_SIZES) resizes each chunk (and its reference) first."""
    if score_size not in SCORE_SIZES:
        raise ValueError(f"score size must be one of {list(SCORE_SIZES)}, got {score_size!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    total = images_bchw.shape[0]
    if ref_bchw is not None and metric.is_full_reference and ref_bchw.shape[0] not in (1, total):
        raise ValueError(f"IQA metric '{metric.name}': {ref_bchw.shape[0]} reference images for {total} "
                         f"images (give 1 or {total})")
    results = []
    for start in range(0, total, chunk_size):
        chunk = images_bchw[start:start + chunk_size]
        ref = None
        if metric.is_full_reference and ref_bchw is not None:
            ref = ref_bchw.expand(total, *ref_bchw.shape[1:]) if ref_bchw.shape[0] == 1 else ref_bchw
            ref = ref[start:start + chunk_size]
        chunk = resize_for_scoring(chunk, score_size)
        ref = resize_for_scoring(ref, score_size) if ref is not None else None
        scores = metric.score(chunk, ref)
        results.append(scores.detach().float().cpu() if not metric.differentiable else scores)
        if progress is not None:
            progress(min(start + chunk_size, total), total)
    return torch.cat(results) if results else torch.zeros(0)


def expected_weight_files(name: str, user_folders: Iterable[str] = ()) -> list[str]:
    """File names (pyiqa's default names) the metric's network reads at load time; [] = weight-free.
    CLIP backbones come first, under OpenAI's names (e.g. 'ViT-L-14.pt'; '.safetensors' is accepted too).
    Other files read during the build itself (e.g. NIQE's .mat) are only reported when missing, by the error."""
    plan = plan_metric(name, user_folders)
    clip_files = list(dict.fromkeys(load.file_name for load in plan.clip_loads))
    return clip_files + [load.file_name for load in plan.weight_loads]


_EXPECTED_FILES: dict[str, list[str] | None] = {}


def missing_weight_files(name: str, user_folders: Iterable[str] = (), plan: bool = True) -> list[str] | None:
    """Weight files `name` needs that are in none of the searched folders ([] = ready to load; None =
    not known). Reads the catalog (models/metric_catalog.json); with `plan`, a metric it does not list is
    planned once (architecture only, no weights read) and remembered."""
    files = catalog_weight_files(name)
    if files is None:
        if not plan:
            return None
        if name not in _EXPECTED_FILES:
            try:
                _EXPECTED_FILES[name] = expected_weight_files(name, user_folders)
            except MissingMetricWeightsError as error:
                _EXPECTED_FILES[name] = [error.file_name]
            except Exception:  # noqa: BLE001 - not buildable offline: the loader says why when it runs
                _EXPECTED_FILES[name] = None
        files = _EXPECTED_FILES[name]
        if files is None:
            return None
    folders = search_folders(user_folders)
    clip_folders = folders + [f for f in clip_cache_dirs() if f not in folders]
    return [file for file in files if find_weight_file(file, clip_folders) is None]
