"""Catalog of IQA metrics: the paper's 21 (reference README section 5, stats-file order) first.

Direction and range come from pyiqa's own table when pyiqa is importable (`pyiqa.default_model_configs`,
read lazily, no network); the paper metrics carry the ranges of the reference README so the catalog
works without pyiqa too. All 21 paper metrics are no-reference and higher-is-better.
"""
from __future__ import annotations

import functools
import json
import pathlib
from dataclasses import dataclass

# Reference README section 5, in the order of CC3M_stats.csv.
PAPER_METRICS: tuple[str, ...] = (
    "topiq_nr-flive", "topiq_nr", "topiq_nr-spaq", "maniqa", "clipiqa+", "musiq-paq2piq", "arniqa",
    "arniqa-kadid", "topiq_iaa", "dbcnn", "laion_aes", "liqe_mix", "liqe", "maniqa-pipal",
    "nima-vgg16-ava", "hyperiqa", "tres-flive", "arniqa-flive", "musiq", "musiq-ava", "cnniqa",
)

# "~0-100 for musiq, musiq-paq2piq, tres-flive; 1-10 for topiq_iaa, laion_aes, nima, musiq-ava;
# 1-5 for liqe, liqe_mix; ~0-1 otherwise" (reference README section 5).
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


def _pyiqa_configs() -> dict:
    try:
        from pyiqa.default_model_configs import DEFAULT_CONFIGS
    except Exception:  # pyiqa missing or broken: the paper list still works
        return {}
    return DEFAULT_CONFIGS


def metric_info(name: str) -> MetricInfo:
    config = _pyiqa_configs().get(name)
    if config is None:
        if name in PAPER_METRICS:
            return MetricInfo(name, False, _PAPER_RANGES[name], False, True)
        raise ValueError(f"unknown IQA metric {name!r}: not in pyiqa's registry (pyiqa.list_models())")
    score_range = _PAPER_RANGES.get(name) or parse_score_range(config.get("score_range"))
    return MetricInfo(
        name=name,
        lower_better=bool(config.get("lower_better", False)),
        score_range=score_range,
        is_full_reference=config.get("metric_mode") == "FR",
        in_paper=name in PAPER_METRICS,
    )


def offered_metric_names() -> list[str]:
    """The paper's 21 first (README section 5 order), then the rest of pyiqa's NR and FR registry."""
    configs = _pyiqa_configs()
    try:
        import pyiqa
        registry = list(pyiqa.list_models(metric_mode="NR")) + list(pyiqa.list_models(metric_mode="FR"))
    except Exception:
        registry = [name for name, cfg in configs.items() if cfg.get("metric_mode") in ("NR", "FR")]
    # fid/inception_score are dataset-level, not per-image scores.
    skip = {"fid", "fid_dinov2", "inception_score"}
    rest = [name for name in registry if name not in PAPER_METRICS and name not in skip]
    return list(PAPER_METRICS) + rest


_WEIGHT_CATALOG = pathlib.Path(__file__).resolve().parent / "metric_weights.json"


@functools.lru_cache(maxsize=1)
def _weight_catalog() -> dict[str, list[str]]:
    try:
        return dict(json.loads(_WEIGHT_CATALOG.read_text())["files"])
    except (OSError, ValueError, KeyError):
        return {}


def catalog_weight_files(name: str) -> list[str] | None:
    """pyiqa's file names the metric reads ([] = weight-free), from models/metric_weights.json
    (written by scripts/metric_weight_catalog.py); None when the catalog does not list the metric."""
    files = _weight_catalog().get(name)
    return list(files) if files is not None else None


def is_full_reference(name: str) -> bool:
    try:
        return metric_info(name).is_full_reference
    except ValueError:
        return False
