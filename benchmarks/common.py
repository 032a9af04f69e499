"""Shared helpers of the ratio benchmarks: interleaved timing, robust statistics, one JSON object per line.

Bench scripts import it as `comfyui_iqa_adapter.benchmarks.common` (the editable install scripts/setup.sh makes).

Every result line holds at least: name, ratio (variant / baseline, medians), baseline_s, variant_s, repeats,
goal (text such as "<= 1.05") and, when the goal is numeric, goal_max / goal_min and passed.
"""
from __future__ import annotations

import gc
import json
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

from comfyui_iqa_adapter.scripts import comfy_server
from comfyui_iqa_adapter.scripts.comfy_server import host_dir  # noqa: F401  (the selected host, for bench scripts)

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def add_tiny_sampling_args(parser, steps: int = 4, size: int = 64, targets: int = 8) -> None:
    """The arguments of a benchmark that samples the tiny models: steps, size, targets, checkpoint, adapter."""
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--size", type=int, default=size)
    parser.add_argument("--targets", type=int, default=targets)
    parser.add_argument("--ckpt", default="tiny_sd15.safetensors")
    parser.add_argument("--adapter", default="tiny_sd15_iqa_adapter.safetensors")


def is_quick(argv: list[str] | None = None) -> bool:
    return "--quick" in (sys.argv if argv is None else argv)


def import_host_comfy():
    """The selected host's `comfy` package in this process, forced to CPU."""
    comfy_server.import_host(cpu=True)
    import comfy.sample  # noqa: F401

    return comfy


def spread(values: list[float]) -> dict:
    """Median with the interquartile range and min/max (robust to one slow outlier)."""
    ordered = sorted(values)
    if len(ordered) >= 4:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1, q3 = ordered[0], ordered[-1]
    return {"median": statistics.median(ordered), "q1": q1, "q3": q3, "min": ordered[0], "max": ordered[-1]}


def time_call(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(baseline: Callable[[], object], variant: Callable[[], object], repeats: int,
                warmup: int = 1) -> tuple[list[float], list[float]]:
    """Time two callables alternately (ABBA order), so drift (thermal, other processes) hits both alike."""
    for _ in range(warmup):
        baseline()
        variant()
    base_times, variant_times = [], []
    for i in range(repeats):
        gc.collect()
        order = (("b", baseline), ("v", variant)) if i % 2 == 0 else (("v", variant), ("b", baseline))
        for tag, fn in order:
            elapsed = time_call(fn)
            (base_times if tag == "b" else variant_times).append(elapsed)
    return base_times, variant_times


def parse_goal(goal: str) -> tuple[float | None, float | None]:
    """'<= 1.05' -> (None, 1.05); '>= 2' -> (2.0, None); anything else -> (None, None)."""
    text = goal.strip()
    for op, is_max in (("<=", True), ("<", True), (">=", False), (">", False)):
        if text.startswith(op):
            try:
                value = float(text[len(op):].split()[0])
            except (ValueError, IndexError):
                return None, None
            return (None, value) if is_max else (value, None)
    return None, None


def judge(ratio: float, goal_min: float | None, goal_max: float | None) -> bool | None:
    if goal_min is None and goal_max is None:
        return None
    if goal_max is not None and not ratio <= goal_max:
        return False
    if goal_min is not None and not ratio >= goal_min:
        return False
    return True


def result(name: str, baseline_times: list[float], variant_times: list[float], goal: str,
           goal_min: float | None = None, goal_max: float | None = None, **extra) -> dict:
    """The standard result line: ratio of medians, spreads of both sides, pass/fail against the goal."""
    base, var = spread(baseline_times), spread(variant_times)
    ratio = var["median"] / base["median"] if base["median"] > 0 else float("inf")
    if goal_min is None and goal_max is None:
        goal_min, goal_max = parse_goal(goal)
    line = {
        "name": name, "ratio": round(ratio, 4), "baseline_s": round(base["median"], 6),
        "variant_s": round(var["median"], 6), "repeats": len(baseline_times), "goal": goal,
        "goal_min": goal_min, "goal_max": goal_max, "passed": judge(ratio, goal_min, goal_max),
        "baseline_iqr_s": [round(base["q1"], 6), round(base["q3"], 6)],
        "variant_iqr_s": [round(var["q1"], 6), round(var["q3"], 6)],
        "baseline_minmax_s": [round(base["min"], 6), round(base["max"], 6)],
        "variant_minmax_s": [round(var["min"], 6), round(var["max"], 6)],
    }
    line.update(extra)
    return line


def emit(line: dict) -> None:
    """Print one JSON object on one line (what benchmarks/run.py collects)."""
    print(json.dumps(line, sort_keys=False), flush=True)
