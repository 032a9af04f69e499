"""Quality targets -> the adapter's input vector (B, D_in).

Per metric, a target is given in one of three modes:
- 'percentile' (default): a CC3M percentile in the open interval (0, 100), mapped to the raw metric
  value by piecewise-linear interpolation of the CC3M quantiles (exact at 1/5/10/25/50/75/90/95/99);
- 'zscore': the normalised value directly;
- 'raw': the metric's own units, normalised by its mean/std.
Then, in this order (the training code's): z-scores in descriptor order, a constant 1.0 after them
if the adapter uses the flag, then sin/cos positional encoding if pos_encode_L > 0:
[p_1..p_D, sin(w_0 p_1)..sin(w_{L-1} p_1), sin(w_0 p_2).., cos(w_0 p_1).., ...], w_k = pi * 2^k.
"""
from __future__ import annotations

import math
import numbers
import re

import torch

from ..models import stats as cc3m
from .descriptor import Descriptor
from .errors import InputError, quote

TARGET_MODES = ("percentile", "zscore", "raw")
# The value fed to the adapter for one metric (a z-score, or a raw value for normalization 'none'): real
# images lie within about +-6 z; far beyond, the tokens overflow or collapse (black or target-blind images).
MAX_INPUT_VALUE = 1.0e4


def _check_mode(mode: str) -> None:
    if mode not in TARGET_MODES:
        raise InputError(f"target mode must be one of {TARGET_MODES}, got {quote(mode)}", "mode")


def target_to_raw(descriptor: Descriptor, metric: str, value: float, mode: str = "percentile") -> float | None:
    """The raw metric value a target stands for (None when it cannot be known, e.g. no stats)."""
    _check_mode(mode)
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


def metric_input_value(descriptor: Descriptor, metric: str, value: float, mode: str = "percentile") -> float:
    """The number fed to the adapter for one metric (its z-score, or the raw value if normalization 'none')."""
    _check_mode(mode)
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"target for {metric!r} must be a number, got {quote(value)}")
    try:
        value = float(value)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise ValueError(f"target for {metric!r} must be finite, got {quote(value)}")
    if mode == "percentile" and not 0.0 < value < 100.0:
        raise ValueError(f"percentile target for {metric!r} must be strictly between 0 and 100, got {value} "
                         "(0 and 100 are the CC3M min/max, outliers; use 'raw' or 'zscore' mode to go beyond)")
    if mode == "percentile" and metric not in cc3m.cc3m_stats():
        raise ValueError(f"percentile targets need CC3M quantiles, and {metric!r} has none; use 'zscore' or 'raw' mode")
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
        raise ValueError(f"target {value:g} for {metric!r} ({mode}) gives the adapter the value {fed:.3g}, beyond "
                         f"+-{MAX_INPUT_VALUE:g} (z-scores of real images lie within about +-6; larger values make "
                         "NaN or collapsed tokens, i.e. black images); use a moderate target")
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
    out = torch.cat([vectors.to(torch.float64), torch.sin(angles).reshape(b, -1), torch.cos(angles).reshape(b, -1)], dim=1)
    return out.to(vectors.dtype)


def build_quality_vector(descriptor: Descriptor, targets: dict | list[dict], mode: str = "percentile") -> torch.Tensor:
    """Targets (one dict, or a list of dicts = batch) -> fp32 (B, D_in) in the adapter's exact layout."""
    if descriptor.kind != "score":
        raise ValueError("this adapter is a reference-image adapter: encode a reference image, not score targets")
    _check_mode(mode)
    rows = [targets] if isinstance(targets, dict) else list(targets)
    if not rows:
        raise ValueError("no targets given")
    values = []
    for target in rows:
        _check_target_names(descriptor, target)
        row = [metric_input_value(descriptor, m, target[m], mode) for m in descriptor.metrics]
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
            raise ValueError(f"{count} target rows, but at most {max_rows} fit this adapter and the host's latent "
                             "batch (one row conditions one latent); use fewer rows")
    for row_number, row in enumerate(pieces, start=1):
        if not row.strip():
            continue
        target: dict[str, float] = {}
        for entry in row.split(","):
            if not entry.strip():
                continue
            match = _ENTRY.match(entry)
            if not match:
                raise ValueError(f"targets row {row_number}: cannot read {quote(entry.strip())}; write metric=value, "
                                 "e.g. 'topiq_nr=99, laion_aes=90' (rows separated by ';' or new lines)")
            name, raw_value = match.groups()
            try:
                value = float(raw_value)
            except ValueError:
                raise ValueError(f"targets row {row_number}: value of {quote(name)} is not a number: {quote(raw_value)}") from None
            if not math.isfinite(value):
                raise ValueError(f"targets row {row_number}: value of {quote(name)} must be finite, got {quote(raw_value)}")
            if name in target:
                raise ValueError(f"targets row {row_number}: {quote(name)} given twice")
            target[name] = value
        rows.append(target)
    if not rows:
        raise ValueError("no targets given; write e.g. 'topiq_nr=99, laion_aes=90'")
    return rows


QUALITY_PRESETS = {"best": 99.0, "high": 90.0, "good": 75.0, "average": 50.0, "low": 25.0, "worst": 1.0}
ZSCORE_WARN = 4.0  # |z| beyond this lies outside anything CC3M holds: allowed, but said


def convert_target(descriptor: Descriptor, metric: str, value: float, from_mode: str, to_mode: str) -> float:
    """A target expressed in another mode (percentile -> raw via CC3M quantiles, raw <-> z via the
    descriptor's statistics)."""
    _check_mode(from_mode)
    _check_mode(to_mode)
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
    """Rows with every adapter metric: metrics a row leaves out get `fallback_percentile`, expressed in
    `mode`. Unknown metric names raise."""
    complete = []
    for number, row in enumerate(rows, start=1):
        unknown = [m for m in row if m not in descriptor.metrics]
        if unknown:
            raise ValueError(f"row {number}: this adapter has no metric {', '.join(unknown)}; "
                             f"it knows {', '.join(descriptor.metrics)}")
        complete.append({m: float(row[m]) if m in row else
                         convert_target(descriptor, m, fallback_percentile, "percentile", mode)
                         for m in descriptor.metrics})
    return complete


def target_range_problem(value: float, mode: str) -> str | None:
    """Why a typed target cannot be used in `mode` (None = usable)."""
    if not math.isfinite(value):
        return f"{value} is not a finite number"
    if mode == "percentile" and not 0.0 < value < 100.0:
        return f"percentile {value:g} is outside (0, 100); use 1 to 99"
    return None


def target_warning(value: float, mode: str) -> str | None:
    if mode == "zscore" and abs(value) > ZSCORE_WARN:
        return (f"z-score {value:g} is beyond ±{ZSCORE_WARN:g}: far outside the training data, expect "
                f"over-stylised or broken images")
    return None
