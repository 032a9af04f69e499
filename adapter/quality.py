"""Quality targets -> the adapter's input vector (B, D_in).

Per metric, a target is given in one of three modes:
- 'percentile' (default): a CC3M percentile in the open interval (0, 100), mapped to the raw metric
  value by piecewise-linear interpolation of the CC3M quantiles (exact at 1/5/10/25/50/75/90/95/99);
- 'zscore': the normalised value directly;
- 'raw': the metric's own units, normalised by its mean/std.
Then, in this order (the training code's): z-scores in descriptor order, a constant 1.0 after them
if the adapter uses the flag, then sin/cos positional encoding if pos_encode_L > 0:
[p_1..p_D, sin(w_0 p_1)..sin(w_{L-1} p_1), sin(w_0 p_2).., cos(w_0 p_1).., ...], w_k = pi * 2^k.

`encode_targets` is the one path from complete target rows to quality tokens (the target and sweep nodes
both take it); `target_tokens` reads the Quality Target node's inputs into such rows. Every check raises
`InputError` naming the input a bad value came from, and the cheap ones (`check_target_inputs`) run at
queue time too.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re

import torch

from ..models import metrics as metric_catalog
from ..models import stats as cc3m
from .descriptor import Descriptor
from .errors import InputError, did_you_mean, quote
from .iqa_adapter import encode_tokens
from .projection import QualityTokens

TARGET_MODES = ("percentile", "zscore", "raw")
# The value fed to the adapter for one metric (a z-score, or a raw value for normalization 'none'): real
# images lie within about +-6 z; far beyond, the tokens overflow or collapse (black or target-blind images).
MAX_INPUT_VALUE = 1.0e4
QUALITY_PRESETS = {"best": 99.0, "high": 90.0, "good": 75.0, "average": 50.0, "low": 25.0, "worst": 1.0}
QUALITY_CHOICES = (*QUALITY_PRESETS, "custom")
NEGATIVE_SCALE_LIMIT = 10.0  # negative quality guidance: the authors use 0.5; far beyond, images over-sharpen
ZSCORE_WARN = 4.0  # |z| beyond this lies outside anything CC3M holds: allowed, but said


def check_mode(mode: str) -> None:
    if not isinstance(mode, str) or mode not in TARGET_MODES:
        raise InputError(f"target mode must be one of {', '.join(TARGET_MODES)}, got {quote(mode)}", "mode")


def check_negative_scale(value) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and abs(value) <= NEGATIVE_SCALE_LIMIT):
        raise InputError(f"expected a number from -{NEGATIVE_SCALE_LIMIT:g} to {NEGATIVE_SCALE_LIMIT:g}, got "
                         f"{quote(value)}", "negative_scale")


def check_score_adapter(descriptor: Descriptor) -> None:
    if descriptor.kind != "score":
        raise InputError("this is a reference-image adapter: it encodes a reference image (Quality From Reference "
                         "Image), not quality targets", "adapter")


def known_metric_names() -> set[str]:
    """Metric names a target may use before the adapter is known: pyiqa's and those with CC3M statistics."""
    return set(metric_catalog.offered_metric_names()) | set(cc3m.known_metrics())


def target_range_problem(value: float, mode: str | None) -> str | None:
    """Why a target value cannot be used in `mode` (None = usable): the one range rule of every target input."""
    if not math.isfinite(value):
        return f"{value} is not a finite number"
    if mode == "percentile" and not 0.0 < value < 100.0:
        return (f"percentile {value:g} is outside (0, 100): percentiles lie strictly between 0 and 100 (0 and 100 "
                "are the CC3M min/max, outliers); use 1 to 99, or 'zscore' or 'raw' mode to go beyond")
    return None


def target_to_raw(descriptor: Descriptor, metric: str, value: float, mode: str = "percentile") -> float | None:
    """The raw metric value a target stands for (None when it cannot be known, e.g. no stats)."""
    check_mode(mode)
    value = float(value)
    if mode == "raw":
        return value
    if mode == "percentile":
        return cc3m.percentile_to_raw(cc3m.get_stats(metric), value)
    try:
        mean, std = descriptor.stats_for(metric)
    except ValueError:
        return None
    return mean + value * std


def metric_input_value(descriptor: Descriptor, metric: str, value: float, mode: str = "percentile",
                       input_name: str | None = None) -> float:
    """The number fed to the adapter for one metric (its z-score, or the raw value if normalization 'none').
    Errors name `input_name`, the input the value came from."""
    check_mode(mode)
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise InputError(f"target for {metric!r} must be a number, got {quote(value)}", input_name)
    try:
        value = float(value)
    except OverflowError:
        value = math.inf
    problem = target_range_problem(value, mode)
    if problem:
        raise InputError(f"target for {metric!r}: {problem}", input_name)
    if mode == "percentile" and metric not in cc3m.cc3m_stats():
        raise InputError(f"percentile targets need CC3M quantiles, and {metric!r} has none; use 'zscore' or 'raw' "
                         "mode", input_name)
    if descriptor.normalization == "none":
        if mode == "raw":
            fed = value
        elif mode == "zscore":
            mean, std = descriptor.stats_for(metric)
            fed = mean + value * std
        else:
            fed = target_to_raw(descriptor, metric, value, mode)
    elif mode == "zscore":
        fed = value
    else:
        mean, std = descriptor.stats_for(metric)
        fed = (target_to_raw(descriptor, metric, value, mode) - mean) / std
    if not (math.isfinite(fed) and abs(fed) <= MAX_INPUT_VALUE):
        raise InputError(f"target {value:g} for {metric!r} ({mode}) gives the adapter the value {fed:.3g}, beyond "
                         f"+-{MAX_INPUT_VALUE:g} (z-scores of real images lie within about +-6; larger values make "
                         "NaN or collapsed tokens, i.e. black images); use a moderate target", input_name)
    return fed


def _check_target_names(descriptor: Descriptor, target: dict) -> None:
    if not isinstance(target, dict):
        raise ValueError(f"a target must be a dict {{metric: value}}, got {type(target).__name__}")
    unknown = [m for m in target if m not in descriptor.metrics]
    missing = [m for m in descriptor.metrics if m not in target]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown metric(s) {quote(unknown)}")
        if missing:
            parts.append(f"missing metric(s) {missing}")
        raise ValueError(f"target {quote(target)}: {'; '.join(parts)}. This adapter expects exactly: "
                         f"{list(descriptor.metrics)}")


def positional_encoding(vectors: torch.Tensor, num_frequencies: int) -> torch.Tensor:
    """(B, D) -> (B, D*(2L+1)): raw values, then sines feature by feature, then cosines likewise."""
    if num_frequencies <= 0:
        return vectors
    freqs = math.pi * (2.0 ** torch.arange(num_frequencies, dtype=torch.float64))
    angles = vectors.to(torch.float64).unsqueeze(-1) * freqs  # (B, D, L): feature-major, then frequency
    b = vectors.shape[0]
    out = torch.cat(
        [vectors.to(torch.float64), torch.sin(angles).reshape(b, -1), torch.cos(angles).reshape(b, -1)], dim=1)
    return out.to(vectors.dtype)


def build_quality_vector(descriptor: Descriptor, targets: dict | list[dict], mode: str = "percentile",
                         inputs: list[dict[str, str]] | None = None) -> torch.Tensor:
    """Targets (one dict, or a list of dicts = batch) -> fp32 (B, D_in) in the adapter's exact layout.
    `inputs[i][metric]` names the node input row i's value came from (errors blame it)."""
    check_score_adapter(descriptor)
    check_mode(mode)
    rows = [targets] if isinstance(targets, dict) else list(targets)
    if not rows:
        raise ValueError("no targets given")
    values = []
    for index, target in enumerate(rows):
        _check_target_names(descriptor, target)
        row = [metric_input_value(descriptor, m, target[m], mode, inputs[index].get(m) if inputs else None)
               for m in descriptor.metrics]
        if descriptor.use_flag:
            row.append(1.0)
        values.append(row)
    vectors = torch.tensor(values, dtype=torch.float64)
    vectors = positional_encoding(vectors, descriptor.pos_encode_L)
    assert vectors.shape[1] == descriptor.input_dim
    return vectors.to(torch.float32)


def describe_target(descriptor: Descriptor, target: dict, mode: str = "percentile") -> dict:
    """Label for reports: the target as given, plus its raw value and CC3M percentile where known."""
    label = {"mode": mode, "target": {m: float(target[m]) for m in descriptor.metrics}, "raw": {}, "percentile": {}}
    for metric in descriptor.metrics:
        raw = target_to_raw(descriptor, metric, target[metric], mode)
        label["raw"][metric] = raw
        if raw is not None and metric in cc3m.cc3m_stats():
            label["percentile"][metric] = cc3m.raw_to_percentile(cc3m.get_stats(metric), raw)
    return label


_ENTRY = re.compile(r"^\s*([A-Za-z0-9_+\-.]+)\s*=\s*(\S+)\s*$")


def parse_targets(text: str, max_rows: int | None = None) -> list[dict[str, float]]:
    """"topiq_nr=99, laion_aes=90; topiq_nr=1, laion_aes=1" -> one dict per row (rows: ';' or newlines).
    More than `max_rows` rows is an error, raised before any row is built."""
    rows: list[dict[str, float]] = []
    pieces = re.split(r"[;\n]", text)
    if max_rows is not None:
        count = sum(1 for piece in pieces if piece.strip())
        if count > max_rows:
            raise InputError(f"{count} target rows, but at most {max_rows} fit this adapter and the host's latent "
                             "batch (one row conditions one latent); use fewer rows", "targets")
    for row_number, row in enumerate(pieces, start=1):
        if not row.strip():
            continue
        target: dict[str, float] = {}
        for entry in row.split(","):
            if not entry.strip():
                continue
            match = _ENTRY.match(entry)
            if not match:
                raise InputError(f"targets row {row_number}: cannot read {quote(entry.strip())}; write metric=value, "
                                 "e.g. 'topiq_nr=99, laion_aes=90' (rows separated by ';' or new lines)", "targets")
            name, raw_value = match.groups()
            try:
                value = cc3m.parse_finite(raw_value)
            except ValueError as why:
                raise InputError(f"targets row {row_number}: value of {quote(name)} is {why}: {quote(raw_value)}",
                                 "targets") from None
            if name in target:
                raise InputError(f"targets row {row_number}: {quote(name)} given twice", "targets")
            target[name] = value
        rows.append(target)
    if not rows:
        raise InputError("no targets given; write e.g. 'topiq_nr=99, laion_aes=90'", "targets")
    return rows


def convert_target(descriptor: Descriptor, metric: str, value: float, from_mode: str, to_mode: str) -> float:
    """A target expressed in another mode (percentile -> raw via CC3M quantiles, raw <-> z via the
    descriptor's statistics)."""
    check_mode(from_mode)
    check_mode(to_mode)
    if from_mode == to_mode:
        return float(value)
    if to_mode == "percentile":
        raw = target_to_raw(descriptor, metric, value, from_mode)
        if raw is None:
            raise ValueError(f"{metric!r} has no statistics to convert a {from_mode} target")
        return cc3m.raw_to_percentile(cc3m.get_stats(metric), raw)
    raw = target_to_raw(descriptor, metric, value, from_mode)
    if raw is None:
        raise ValueError(f"{metric!r} has no statistics to convert a {from_mode} target")
    if to_mode == "raw":
        return raw
    mean, std = descriptor.stats_for(metric)
    return (raw - mean) / std


def complete_rows(descriptor: Descriptor, rows: list[dict], fallback_percentile: float, mode: str) -> list[dict]:
    """Rows with every adapter metric: metrics a row leaves out get `fallback_percentile` (the percentile
    slider), expressed in `mode`. Unknown metric names raise."""
    complete = []
    for number, row in enumerate(rows, start=1):
        unknown = [m for m in row if m not in descriptor.metrics]
        if unknown:
            raise InputError(f"row {number}: this adapter has no metric {', '.join(unknown)}; "
                             f"it knows {', '.join(descriptor.metrics)}", "targets")
        filled = {}
        for m in descriptor.metrics:
            if m in row:
                filled[m] = float(row[m])
                continue
            try:
                filled[m] = convert_target(descriptor, m, fallback_percentile, "percentile", mode)
            except ValueError as error:
                raise InputError(str(error), "percentile") from None
        complete.append(filled)
    return complete


def target_warning(value: float, mode: str) -> str | None:
    if mode == "zscore" and abs(value) > ZSCORE_WARN:
        return (f"z-score {value:g} is beyond ±{ZSCORE_WARN:g}: far outside the training data, expect "
                f"over-stylised or broken images")
    return None


def check_target_inputs(quality: str, percentile, targets: str, mode: str, negative_scale,
                        max_rows: int | None = None) -> list[dict[str, float]]:
    """The Quality Target node's inputs, checked without the adapter (at queue time and again when it runs):
    raises InputError naming the input; returns the typed rows ([] when 'targets' is empty)."""
    if not isinstance(quality, str) or quality not in QUALITY_CHOICES:
        raise InputError(f"expected one of {', '.join(QUALITY_CHOICES)}, got {quote(quality)}", "quality")
    check_mode(mode)
    if not (isinstance(percentile, (int, float)) and 1.0 <= float(percentile) <= 99.0):
        raise InputError(f"expected a percentile from 1 to 99, got {quote(percentile)}", "percentile")
    preset = QUALITY_PRESETS.get(quality)
    if preset is not None and float(percentile) != preset:
        raise InputError(f"{float(percentile):g} would be ignored while quality is '{quality}' (= {preset:g}); set "
                         f"quality to 'custom' to use the slider", "percentile")
    check_negative_scale(negative_scale)
    if not str(targets).strip():
        if mode != "percentile":
            raise InputError(f"'{mode}' applies to values typed in 'targets', which is empty; type targets or set "
                             f"mode to percentile", "mode")
        return []
    rows = parse_targets(str(targets), max_rows)
    known = known_metric_names()
    for number, row in enumerate(rows, start=1):
        for metric, value in row.items():
            if metric not in known:
                raise InputError(f"row {number}: unknown metric {quote(metric)}{did_you_mean(metric, known)}",
                                 "targets")
            problem = target_range_problem(value, mode)
            if problem:
                raise InputError(f"row {number}, {metric}: {problem}", "targets")
    return rows


def encode_targets(adapter, rows: list[dict[str, float]], mode: str, negative_scale: float = 0.0,
                   inputs: list[dict[str, str]] | None = None) -> QualityTokens:
    """Complete target rows -> quality tokens, one token row per target row: the one encode path of the target
    and sweep nodes. `inputs[i][metric]` names the node input row i's value came from (errors blame it)."""
    check_negative_scale(negative_scale)
    vectors = build_quality_vector(adapter.descriptor, rows, mode, inputs)
    labels = [describe_target(adapter.descriptor, row, mode) for row in rows]
    return encode_tokens(adapter, vectors, float(negative_scale), labels)


@dataclasses.dataclass(frozen=True)
class EncodedTargets:
    tokens: QualityTokens
    rows: list[dict[str, float]]  # complete rows, every adapter metric
    typed: list[dict[str, float]]  # what 'targets' gave per row (the rest came from the slider)
    fallback: float  # the percentile of the quality preset / slider
    warnings: list[str]


def target_tokens(adapter, quality: str, percentile: float, targets: str, mode: str, negative_scale: float,
                  max_rows: int) -> EncodedTargets:
    """The Quality Target node's inputs -> tokens: typed rows, metrics they leave out at the preset/slider
    percentile, at most `max_rows` rows."""
    check_score_adapter(adapter.descriptor)
    typed = check_target_inputs(quality, percentile, targets, mode, negative_scale, max_rows) or [{}]
    fallback = QUALITY_PRESETS.get(quality, float(percentile))
    rows = complete_rows(adapter.descriptor, typed, fallback, mode)
    inputs = [{m: "targets" if m in given else "percentile" for m in row} for row, given in zip(rows, typed)]
    tokens = encode_targets(adapter, rows, mode, negative_scale, inputs)
    warnings = [w for row in typed for value in row.values() if (w := target_warning(value, mode))]
    return EncodedTargets(tokens, rows, typed, fallback, list(dict.fromkeys(warnings)))
