"""What an adapter's input vector means: metrics and their order, normalisation, flag, encoding.

None of this is stored in the weights (only the input size D_in is). Sources, in priority order:
1. a sidecar JSON next to the weights, `<file stem>.json` (schema: models/README.md);
2. the built-in catalog of released adapters (models/adapters.py), matched by file name (a guess);
3. otherwise an error that explains how to write the sidecar.
"""
from __future__ import annotations

import json
import math
import pathlib
from dataclasses import dataclass, field

from ..models import adapters as catalog
from ..models import stats as cc3m
from .errors import InputError, quote

KINDS = ("score", "reference")
NORMALIZATIONS = ("zscore", "none")
# CLIP antonym features of the training CLI (no CC3M statistics; usable with custom stats or 'none').
CLIP_ANTONYM_FEATURES = ("brightness", "noisiness", "colorfulness", "sharpness", "contrast", "realism")
MAX_SIDECAR_BYTES = 1024 ** 2
SIDECAR_KEYS = {"name", "kind", "metrics", "normalization", "metric_stats", "use_flag", "pos_encode_L", "extractor"}
EXTRACTOR_KEYS = {"model", "layers", "pooling", "dim"}

SIDECAR_EXAMPLE = (
    '{"kind": "score", "metrics": ["topiq_nr", "laion_aes"], "normalization": "zscore", '
    '"use_flag": false, "pos_encode_L": 0}'
)


@dataclass(frozen=True)
class Descriptor:
    kind: str = "score"  # 'score': a vector of metric values; 'reference': IQA activations of an image
    metrics: tuple[str, ...] = ()  # pyiqa ids in input-vector order (score kind)
    normalization: str = "zscore"  # 'zscore' (CC3M or custom mean/std) or 'none' (raw values)
    metric_stats: dict[str, dict[str, float]] = field(default_factory=dict)  # custom {"mean", "std"} per metric
    use_flag: bool = False  # a constant 1.0 appended after the metrics
    pos_encode_L: int = 0  # sin/cos encoding with L frequencies; 0 = off
    extractor: dict | None = None  # reference kind: {"model", "layers", "pooling", "dim"}
    name: str = ""
    source: str = ""  # where it came from (sidecar path / catalog entry / caller), for messages

    @property
    def base_dim(self) -> int:
        """Length of the vector before positional encoding (metrics + flag)."""
        if self.kind == "reference":
            return int(self.extractor["dim"])
        return len(self.metrics) + int(self.use_flag)

    @property
    def input_dim(self) -> int:
        return self.base_dim * (2 * self.pos_encode_L + 1)

    def stats_for(self, metric: str) -> tuple[float, float]:
        """(mean, std) used to z-score `metric`: the descriptor's own values first, then CC3M."""
        if metric in self.metric_stats:
            custom = self.metric_stats[metric]
            return float(custom["mean"]), float(custom["std"])
        stats = cc3m.get_stats(metric)
        return stats.mean, stats.std

    def label(self) -> str:
        if self.kind == "reference":
            return f"reference ({self.extractor.get('model', '?')}, D={self.base_dim})"
        extras = (["flag"] if self.use_flag else []) + ([f"L={self.pos_encode_L}"] if self.pos_encode_L else [])
        return "+".join(self.metrics) + (f" [{', '.join(extras)}]" if extras else "")


class DescriptorError(InputError):
    """A descriptor that cannot be used, with where it came from."""

    def __init__(self, source, message: str):
        super().__init__(f"IQA-Adapter descriptor ({source}): {message}")


def _finite_number(value) -> bool:
    """A JSON number that is finite as a float (huge JSON integers overflow float conversion)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def descriptor_from_dict(data: dict, source: str = "descriptor") -> Descriptor:
    """Validate a sidecar-style dict and build a Descriptor; every problem names the field."""
    if not isinstance(data, dict):
        raise DescriptorError(source, f"expected a JSON object, got {type(data).__name__}. Example: {SIDECAR_EXAMPLE}")
    unknown = sorted(set(data) - SIDECAR_KEYS)
    if unknown:
        raise DescriptorError(source, f"unknown field(s) {quote(unknown)}; allowed: {sorted(SIDECAR_KEYS)}")
    kind = data.get("kind", "score")
    if kind not in KINDS:
        raise DescriptorError(source, f"'kind' must be one of {KINDS}, got {quote(kind)}")
    normalization = data.get("normalization", "zscore")
    if normalization not in NORMALIZATIONS:
        raise DescriptorError(source, f"'normalization' must be one of {NORMALIZATIONS}, got {quote(normalization)}")
    use_flag = data.get("use_flag", False)
    if not isinstance(use_flag, bool):
        raise DescriptorError(source, f"'use_flag' must be true or false, got {quote(use_flag)}")
    pos_encode_L = data.get("pos_encode_L", 0)
    if not isinstance(pos_encode_L, int) or isinstance(pos_encode_L, bool) or not 0 <= pos_encode_L <= 32:
        raise DescriptorError(source, f"'pos_encode_L' must be an integer in 0..32 (0 = no positional encoding), "
                                      f"got {quote(pos_encode_L)}")

    metric_stats_raw = data.get("metric_stats", {}) or {}
    if not isinstance(metric_stats_raw, dict):
        raise DescriptorError(source, "'metric_stats' must be an object {metric: {\"mean\": m, \"std\": s}}")
    metric_stats: dict[str, dict[str, float]] = {}
    for metric, entry in metric_stats_raw.items():
        if not isinstance(entry, dict) or set(entry) != {"mean", "std"}:
            raise DescriptorError(source, f"'metric_stats'[{quote(metric)}] must be "
                                          f"{{\"mean\": number, \"std\": number}}, got {quote(entry)}")
        mean, std = entry["mean"], entry["std"]
        if not all(_finite_number(v) for v in (mean, std)):
            raise DescriptorError(source, f"'metric_stats'[{quote(metric)}]: mean and std must be finite numbers, "
                                          f"got {quote(entry)}")
        if std <= 0:
            raise DescriptorError(source, f"'metric_stats'[{quote(metric)}]: std must be > 0, got {std}")
        metric_stats[metric] = {"mean": float(mean), "std": float(std)}

    metrics = data.get("metrics", [])
    extractor = data.get("extractor")
    if kind == "score":
        if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) for m in metrics):
            raise DescriptorError(source, f"'metrics' must be a non-empty list of pyiqa metric ids, "
                                          f"got {quote(metrics)}. Example: {SIDECAR_EXAMPLE}")
        if len(set(metrics)) != len(metrics):
            raise DescriptorError(source, f"'metrics' lists a metric twice: {quote(metrics)}")
        known = set(cc3m.known_metrics())
        for metric in metrics:
            if metric in known or metric in metric_stats:
                continue
            if normalization == "none" and metric in CLIP_ANTONYM_FEATURES:
                continue
            raise DescriptorError(source, f"unknown metric {quote(metric)}: it has no CC3M statistics. "
                                          f"Known: {', '.join(sorted(known))}. "
                                          "For another metric give its mean/std in 'metric_stats'.")
        if extractor is not None:
            raise DescriptorError(source, "'extractor' is only for kind 'reference'")
    else:
        if metrics:
            raise DescriptorError(source, "'metrics' must be empty for kind 'reference' (the input is IQA activations)")
        if not isinstance(extractor, dict):
            raise DescriptorError(source, "kind 'reference' needs 'extractor': "
                                          "{\"model\": pyiqa id, \"layers\": [...], "
                                          "\"pooling\": \"avg\", \"dim\": activation vector length}")
        unknown = sorted(set(extractor) - EXTRACTOR_KEYS)
        if unknown:
            raise DescriptorError(source, f"unknown 'extractor' field(s) {quote(unknown)}; "
                                          f"allowed: {sorted(EXTRACTOR_KEYS)}")
        if not isinstance(extractor.get("model"), str):
            raise DescriptorError(source, f"'extractor'.'model' must be a pyiqa metric id, "
                                          f"got {quote(extractor.get('model'))}")
        dim = extractor.get("dim")
        if not isinstance(dim, int) or isinstance(dim, bool) or not 0 < dim <= 1_000_000:
            raise DescriptorError(source, f"'extractor'.'dim' must be a positive integer "
                                          f"(the activation vector length), got {quote(dim)}")
        if use_flag or pos_encode_L:
            raise DescriptorError(source, "kind 'reference' takes no 'use_flag' / 'pos_encode_L'")
        extractor = dict(extractor)
    name = data.get("name", "")
    if not isinstance(name, str):
        raise DescriptorError(source, f"'name' must be a string, got {quote(name)}")
    return Descriptor(
        kind=kind, metrics=tuple(metrics), normalization=normalization, metric_stats=metric_stats,
        use_flag=use_flag, pos_encode_L=pos_encode_L, extractor=extractor, name=name, source=source,
    )


def sidecar_path(weights_path: str | pathlib.Path) -> pathlib.Path:
    weights_path = pathlib.Path(weights_path)
    return weights_path.with_name(weights_path.stem + ".json")


def load_sidecar(path: str | pathlib.Path) -> Descriptor:
    path = pathlib.Path(path)
    try:
        if path.stat().st_size > MAX_SIDECAR_BYTES:
            raise DescriptorError(path, f"the sidecar JSON has {path.stat().st_size} bytes; "
                                  f"a descriptor is a few hundred (at most {MAX_SIDECAR_BYTES})")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DescriptorError(path, f"cannot read the sidecar JSON: {error}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DescriptorError(path, f"invalid JSON at line {error.lineno}, column {error.colno}: "
                              f"{error.msg}. Example: {SIDECAR_EXAMPLE}") from None
    except (RecursionError, ValueError):
        raise DescriptorError(path, f"the sidecar JSON is nested too deeply or holds "
                              f"unreadable numbers. Example: {SIDECAR_EXAMPLE}") from None
    return descriptor_from_dict(data, source=str(path))


def descriptor_from_catalog(weights_path: str | pathlib.Path, input_dim: int | None = None) -> Descriptor | None:
    """Built-in descriptor for a released adapter, matched by file name (a guess, see models/adapters.py)."""
    entry, tied = catalog.match_catalog(pathlib.Path(weights_path).name, input_dim)
    if entry is None:
        if tied:
            names = ", ".join(e.name for e in tied)
            raise ValueError(f"IQA-Adapter descriptor ({weights_path}): the file name matches several released "
                             f"adapters ({names}); write a sidecar {sidecar_path(weights_path).name}, "
                             f"e.g. {SIDECAR_EXAMPLE}")
        return None
    variants = entry.input_dim_variants()
    if input_dim is not None:
        variants = [v for v in variants if v[2] == input_dim] or variants
    use_flag, pos_encode_L, _ = variants[0]
    layout = f"{'flag' if use_flag else 'no flag'}{f', L={pos_encode_L} encoding' if pos_encode_L else ''}"
    how = (f"recipe-matched to the authors' training script, {layout}" if entry.recipe
           else f"recipe-matched by file name (a guess), {layout}")
    return Descriptor(
        kind="score", metrics=entry.metrics, normalization="zscore", use_flag=use_flag, pos_encode_L=pos_encode_L,
        name=entry.name, source=f"built-in catalog: {entry.name} ({how})",
    )


def check_input_dim(descriptor: Descriptor, input_dim: int, weights_path: str | pathlib.Path) -> None:
    if descriptor.input_dim != input_dim:
        raise ValueError(
            f"IQA-Adapter {weights_path}: the weights take an input vector of size {input_dim}, but the descriptor "
            f"({descriptor.source}: {descriptor.label()}) describes size {descriptor.input_dim}. Fix the sidecar "
            f"{sidecar_path(weights_path).name} (metrics, use_flag, pos_encode_L)."
        )


def resolve_descriptor(weights_path: str | pathlib.Path, input_dim: int | None = None) -> Descriptor:
    """Sidecar, else catalog, else an error explaining the sidecar. Checks D_in when given."""
    weights_path = pathlib.Path(weights_path)
    side = sidecar_path(weights_path)
    if side.is_file():
        descriptor = load_sidecar(side)
    else:
        descriptor = descriptor_from_catalog(weights_path, input_dim)
        if descriptor is None:
            raise ValueError(
                f"IQA-Adapter {weights_path}: no descriptor. The weights do not say which metrics (in which order), "
                f"flag or encoding they were trained with{f' (input size {input_dim})' if input_dim else ''}. "
                f"Write {side.name} next to the weights, e.g. {SIDECAR_EXAMPLE} (schema: models/README.md)."
            )
    if input_dim is not None:
        check_input_dim(descriptor, input_dim, weights_path)
    return descriptor
