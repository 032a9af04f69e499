"""Catalog of IQA metrics: the paper's 21 (in the order of CC3M_stats.csv) first, then the rest of pyiqa's
per-image registry.

Everything here comes from `models/metric_catalog.json` (mode, direction, rough range and weight files of
each metric, written from pyiqa by `scripts/metric_catalog.py`), so the node layer can build its menus and
validate a prompt without importing pyiqa: pyiqa is imported only where a metric is built. The paper's
metrics carry the ranges the paper's statistics use. All 21 are no-reference and higher-is-better.
"""
from __future__ import annotations

import functools
import json
import pathlib
from dataclasses import dataclass

# The paper's 21 metrics, in the column order of models/CC3M_stats.csv.
PAPER_METRICS: tuple[str, ...] = (
    "topiq_nr-flive", "topiq_nr", "topiq_nr-spaq", "maniqa", "clipiqa+", "musiq-paq2piq", "arniqa",
    "arniqa-kadid", "topiq_iaa", "dbcnn", "laion_aes", "liqe_mix", "liqe", "maniqa-pipal",
    "nima-vgg16-ava", "hyperiqa", "tres-flive", "arniqa-flive", "musiq", "musiq-ava", "cnniqa",
)

# Rough ranges of the paper's metrics: ~0-100 for musiq, musiq-paq2piq, tres-flive; 1-10 for the aesthetic
# ones; 1-5 for liqe, liqe_mix; ~0-1 otherwise.
_PAPER_RANGES: dict[str, tuple[float, float]] = {name: (0.0, 1.0) for name in PAPER_METRICS}
_PAPER_RANGES.update({name: (0.0, 100.0) for name in ("musiq", "musiq-paq2piq", "tres-flive")})
_PAPER_RANGES.update({name: (1.0, 10.0) for name in ("topiq_iaa", "laion_aes", "nima-vgg16-ava", "musiq-ava")})
_PAPER_RANGES.update({name: (1.0, 5.0) for name in ("liqe", "liqe_mix")})


@dataclass(frozen=True)
class MetricInfo:
    name: str                                  # pyiqa id
    lower_better: bool
    score_range: tuple[float, float] | None    # rough (pyiqa says "only rough estimation")
    is_full_reference: bool
    in_paper: bool


def parse_score_range(text) -> tuple[float, float] | None:
    """pyiqa writes ranges as strings like '~0, ~1' or '0, 100'; '~' marks a soft bound."""
    if text is None:
        return None
    if isinstance(text, (tuple, list)) and len(text) == 2:
        return float(text[0]), float(text[1])
    try:
        low, high = (part.strip().lstrip("~").strip() for part in str(text).split(","))
        return float(low), float(high)
    except ValueError:
        return None


CATALOG_FILE = pathlib.Path(__file__).resolve().parent / "metric_catalog.json"


@functools.lru_cache(maxsize=1)
def _catalog() -> dict[str, dict]:
    """name -> {"mode": "NR"|"FR", "lower_better", "score_range", "files"}, in the order pyiqa lists them."""
    return dict(json.loads(CATALOG_FILE.read_text())["metrics"])


def metric_info(name: str) -> MetricInfo:
    entry = _catalog().get(name)
    if entry is None:
        raise ValueError(f"unknown IQA metric {name!r}: not in pyiqa's registry (models/metric_catalog.json)")
    return MetricInfo(
        name=name,
        lower_better=bool(entry["lower_better"]),
        score_range=_PAPER_RANGES.get(name) or parse_score_range(entry["score_range"]),
        is_full_reference=entry["mode"] == "FR",
        in_paper=name in PAPER_METRICS,
    )


def offered_metric_names() -> list[str]:
    """The paper's 21 first (stats-file order), then the rest of pyiqa's NR and FR registry."""
    return list(PAPER_METRICS) + [name for name in _catalog() if name not in PAPER_METRICS]


def catalog_weight_files(name: str) -> list[str] | None:
    """pyiqa's file names the metric reads ([] = weight-free); None when not known without building the
    metric (or the metric is not in the catalog)."""
    entry = _catalog().get(name)
    files = entry["files"] if entry else None
    return list(files) if files is not None else None


def is_full_reference(name: str) -> bool:
    try:
        return metric_info(name).is_full_reference
    except ValueError:
        return False
