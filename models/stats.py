"""CC3M statistics of the 21 IQA/IAA metrics (the authors' `CC3M_stats.csv`).

Each row holds min/max/mean/std and the 1, 5, 10, 25, 50, 75, 90, 95, 99th percentiles of one pyiqa
metric over CC3M (images resized to 512x512). The adapter was trained on z = (raw - mean) / std,
and quality targets are usually given as CC3M percentiles: percentile -> raw is piecewise-linear
over the knots (0 -> min, 1, 5, ..., 99, 100 -> max), so the paper's targets (1/25/50/75/99) are exact.
Rows named `<id>_normalized` (the statistics of the z-scored column) are skipped: they carry no
extra information.
"""
from __future__ import annotations

import csv
import functools
import math
import pathlib
from dataclasses import dataclass, field

STATS_CSV = pathlib.Path(__file__).resolve().parent / "CC3M_stats.csv"
QUANTILE_LEVELS = (1, 5, 10, 25, 50, 75, 90, 95, 99)


@dataclass(frozen=True)
class MetricStats:
    name: str
    mean: float
    std: float
    min: float
    max: float
    quantiles: dict[int, float] = field(default_factory=dict)  # percentile level -> raw value

    def knots(self) -> list[tuple[float, float]]:
        """(percentile, raw value) pairs, increasing in percentile: 0 -> min, ..., 100 -> max."""
        points = [(0.0, self.min)]
        points += [(float(level), self.quantiles[level]) for level in QUANTILE_LEVELS]
        points.append((100.0, self.max))
        return points

    def percentile_to_raw(self, percentile: float) -> float:
        return percentile_to_raw(self, percentile)

    def raw_to_percentile(self, raw: float) -> float:
        return raw_to_percentile(self, raw)

    def zscore(self, raw: float) -> float:
        return (raw - self.mean) / self.std


def parse_finite(text) -> float:
    """A finite number written as text (a target, a hold value, a statistics cell); a ValueError that says
    'not a number' or 'not finite' otherwise, for the caller to put in its own context with the text."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError("not a number") from None
    if not math.isfinite(value):
        raise ValueError("not finite")
    return value


def _parse_float(text: str, metric: str, column: str, path: pathlib.Path) -> float:
    try:
        return parse_finite(text)
    except ValueError as why:
        raise ValueError(f"{path}: metric {metric!r}, column {column!r}: {why}: {text!r}") from None


def parse_stats_csv(path: str | pathlib.Path) -> dict[str, MetricStats]:
    """Read a stats CSV in the authors' layout; returns raw-metric rows by pyiqa id, in file order."""
    path = pathlib.Path(path)
    required = ["metric", "min_val", "max_val", "mean_val", "std_val"] + [f"quantile_{q}" for q in QUANTILE_LEVELS]
    out: dict[str, MetricStats] = {}
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [name for name in required if name not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}")
        for row in reader:
            name = row["metric"].strip()
            if name.endswith("_normalized"):
                continue
            values = {column: _parse_float(row[column], name, column, path) for column in required[1:]}
            stats = MetricStats(
                name=name,
                mean=values["mean_val"],
                std=values["std_val"],
                min=values["min_val"],
                max=values["max_val"],
                quantiles={q: values[f"quantile_{q}"] for q in QUANTILE_LEVELS},
            )
            raws = [raw for _, raw in stats.knots()]
            if any(b < a for a, b in zip(raws, raws[1:])) or stats.std <= 0:
                raise ValueError(f"{path}: metric {name!r}: quantiles must be non-decreasing and std > 0")
            out[name] = stats
    return out


@functools.lru_cache(maxsize=1)
def cc3m_stats() -> dict[str, MetricStats]:
    """The bundled CC3M table (parsed once)."""
    return parse_stats_csv(STATS_CSV)


def known_metrics() -> list[str]:
    return list(cc3m_stats())


def get_stats(metric: str) -> MetricStats:
    table = cc3m_stats()
    if metric not in table:
        raise ValueError(
            f"metric {metric!r} has no CC3M statistics; known metrics: {', '.join(table)}. "
            "Give its mean/std in the adapter's sidecar JSON ('metric_stats') to use it."
        )
    return table[metric]


def percentile_to_raw(stats: MetricStats, percentile: float) -> float:
    """Raw metric value at a CC3M percentile in [0, 100]; exact at the knots."""
    p = float(percentile)
    if not (0.0 <= p <= 100.0):
        raise ValueError(f"percentile for {stats.name!r} must be in [0, 100], got {percentile}")
    knots = stats.knots()
    for (p0, r0), (p1, r1) in zip(knots, knots[1:]):
        if p == p0:
            return r0
        if p == p1:
            return r1
        if p0 < p < p1:
            return r0 + (r1 - r0) * (p - p0) / (p1 - p0)
    raise AssertionError("unreachable: knots cover [0, 100]")


def raw_to_percentile(stats: MetricStats, raw: float) -> float:
    """Inverse of percentile_to_raw (for reports). Values outside [min, max] clamp to 0 / 100.

    Where the table is flat (e.g. liqe saturates at 5: q95 == q99) the middle of the flat run is returned.
    """
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError(f"raw value for {stats.name!r} must be finite, got {raw}")
    knots = stats.knots()
    if value <= knots[0][1]:
        return 0.0
    if value >= knots[-1][1]:
        return 100.0
    # Percentile range whose raw value equals `value` exactly (flat runs) or the segment containing it.
    equal = [p for p, r in knots if r == value]
    if equal:
        return 0.5 * (min(equal) + max(equal))
    for (p0, r0), (p1, r1) in zip(knots, knots[1:]):
        if r0 < value < r1:
            return p0 + (p1 - p0) * (value - r0) / (r1 - r0)
    raise AssertionError("unreachable: value lies strictly inside [min, max]")
