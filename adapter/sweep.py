"""Quality-target sweeps ("degradation studies"): target spacing, Spearman's rho, report tables and plots.

Host-free (numpy, matplotlib with the Agg backend, Pillow). Used by nodes/sweep_nodes.py
(IQATargetSweep, IQASweepReport) and by the CLI scripts/sweep.py, so both write the same report:
a grid PNG (each image labelled with its target and measured score), a chart PNG (measured score vs
target per metric, with the ideal monotone line and Spearman's rho), a CSV table and a JSON file.

A sweep conditions every image of one batch on its own target (row i of the tokens <-> latent i), so a
single sampler run renders the whole sweep. The paper uses low targets as a degradation model and
reports that scores follow the target monotonically (docs/METHOD.md §6.3): rho is the check.
"""
from __future__ import annotations

import io as _io
import math
import pathlib
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from statistics import NormalDist

import numpy as np

from ..models import stats as cc3m
from ..models.metrics import metric_info
from . import files, quality
from .errors import InputError, did_you_mean, quote
from .projection import QualityTokens, check_row_count

# linear: evenly spaced values (the default: 8 targets from 1 to 99); quantile-knots: the CC3M quantile
# levels inside [from, to] (exact statistics, percentile mode only; 'steps' ignored); normal: evenly spaced
# in z = Phi^-1(p/100), i.e. denser towards the tails where percentiles move the raw score most (percentile
# mode; else linear); paper: the paper's five targets, CC3M percentiles 1/25/50/75/99 (docs/METHOD.md §6.1;
# percentile mode; from/to/steps ignored).
SPACINGS = ("linear", "quantile-knots", "normal", "paper")
PAPER_PERCENTILES = (1.0, 25.0, 50.0, 75.0, 99.0)
CC3M_KNOTS = tuple(float(level) for level in cc3m.QUANTILE_LEVELS)
MAX_SWEEP_STEPS = 256

REPORT_SUFFIXES = (".csv", ".json", "_chart.png", "_grid.png")
REPORT_COLUMNS = ("prompt", "seed", "model", "adapter", "index", "image", "target_mode", "swept_metrics",
                  "target", "target_raw", "metric", "lower_better", "score_size", "score")


def check_sweep_inputs(metrics_text: str | None = None, start: float | None = None, stop: float | None = None,
                       steps: int | None = None, mode: str | None = None, spacing: str | None = None,
                       hold: str | None = None, negative_scale: float | None = None) -> None:
    """The sweep node's inputs, checked without the adapter (at queue time and again when it runs): raises
    InputError naming the input. None = not known yet (wired from another node): not checked."""
    if metrics_text is not None:
        known = quality.known_metric_names()
        for name in metric_names(metrics_text):
            if name not in known:
                raise InputError(f"unknown metric {quote(name)}{did_you_mean(name, known)}", "metrics")
    if mode is not None:
        quality.check_mode(mode)
    if spacing is not None and spacing not in SPACINGS:
        raise InputError(f"spacing must be one of {', '.join(SPACINGS)}, got {quote(spacing)}", "spacing")
    if spacing in ("paper", "quantile-knots") and mode is not None and mode != "percentile":
        raise InputError(f"spacing '{spacing}' needs mode 'percentile' (its targets are CC3M percentiles)", "spacing")
    for name, label, value in (("start", "from", start), ("stop", "to", stop)):
        problem = quality.target_range_problem(float(value), mode) if value is not None else None
        if problem:
            raise InputError(f"'{label}': {problem}", name)
    if steps is not None and not 1 <= int(steps) <= MAX_SWEEP_STEPS:
        raise InputError(f"steps must be in [1, {MAX_SWEEP_STEPS}], got {quote(steps)}", "steps")
    if hold is not None:
        parse_hold(hold)
    if negative_scale is not None:
        quality.check_negative_scale(negative_scale)


def sweep_values(
    start: float, stop: float, steps: int, spacing: str = "linear", mode: str = "percentile"
) -> list[float]:
    """The swept target values, from `start` to `stop` (either order), `steps` of them (see SPACINGS)."""
    check_sweep_inputs(start=start, stop=stop, steps=steps, mode=mode, spacing=spacing)
    start, stop, steps = float(start), float(stop), int(steps)
    if spacing == "paper":
        return list(PAPER_PERCENTILES)
    if spacing == "quantile-knots":
        low, high = min(start, stop), max(start, stop)
        values = sorted({low, high, *[k for k in CC3M_KNOTS if low <= k <= high]})
        return values if start <= stop else values[::-1]
    if steps == 1:
        return [start]
    if spacing == "normal" and mode == "percentile":
        normal = NormalDist()
        z = np.linspace(normal.inv_cdf(start / 100.0), normal.inv_cdf(stop / 100.0), steps)
        values = [100.0 * normal.cdf(float(v)) for v in z]
        values[0], values[-1] = start, stop  # exact ends despite the round trip
        return values
    return [float(v) for v in np.linspace(start, stop, steps)]


def metric_names(text: str) -> list[str]:
    """'topiq_nr, laion_aes' (',' or ';' between names) -> the names."""
    return [name.strip() for name in str(text or "").replace(";", ",").split(",") if name.strip()]


def resolve_metrics(adapter_metrics: Sequence[str], text: str) -> list[str]:
    """'topiq_nr, laion_aes' -> the swept metrics (empty text: all of the adapter's metrics)."""
    names = metric_names(text)
    if not names:
        return list(adapter_metrics)
    unknown = [name for name in names if name not in adapter_metrics]
    if unknown:
        raise InputError(f"metric(s) {quote(unknown)} are not inputs of this adapter; it takes "
                         f"{list(adapter_metrics)}", "metrics")
    if len(set(names)) != len(names):
        raise InputError(f"a metric is listed twice: {quote(names)}", "metrics")
    return [m for m in adapter_metrics if m in names]  # adapter order


def parse_hold(hold: str) -> float | str | None:
    """The hold input: None (empty: the CC3M median), 'same', or a finite number."""
    text = str(hold or "").strip().lower()
    if text in ("", "same"):
        return text or None
    try:
        return cc3m.parse_finite(text)
    except ValueError:
        raise InputError(f"hold must be empty (CC3M median), 'same', or a finite number, got {quote(hold)}",
                         "hold") from None


def hold_value(metric: str, hold: str, mode: str) -> float | None:
    """Value for a metric that is not swept: '' = the CC3M median in the sweep's mode, a number = that
    value (in the sweep's mode), 'same' = None (follow the swept value)."""
    parsed = parse_hold(hold)
    if parsed == "same":
        return None
    if parsed is not None:
        return parsed
    if mode == "percentile":
        return 50.0
    if mode == "zscore":
        return 0.0
    return cc3m.get_stats(metric).quantiles[50]


@dataclass
class SweepTargets:
    """The `IQA_TARGETS` object: what each batch row was conditioned on (row i <-> image i)."""
    mode: str
    swept_metrics: list[str]
    values: list[float]                      # the swept value of row i (x axis of the chart)
    rows: list[dict[str, float]]            # the complete target of row i (every adapter metric)
    spacing: str = "linear"
    raw: list[dict] = field(default_factory=list)  # row i: metric -> raw value (None when unknown)

    def __len__(self) -> int:
        return len(self.values)

    def value_inputs(self) -> list[dict[str, str]]:
        """The sweep input each value of each row stands for: 'hold' for held metrics, else 'start' in the
        first row and 'stop' after it. A target's adapter input grows monotonically along the sweep, so when
        'from' is usable an unusable later value means 'to' is not."""
        return [{m: "hold" if m not in self.swept_metrics else "start" if index == 0 else "stop" for m in row}
                for index, row in enumerate(self.rows)]


def build_sweep(adapter_metrics: Sequence[str], metrics_text: str, start: float, stop: float, steps: int,
                mode: str = "percentile", spacing: str = "linear", hold: str = "",
                descriptor=None) -> SweepTargets:
    """All rows of a sweep: swept metrics get each value, the others their hold value."""
    swept = resolve_metrics(adapter_metrics, metrics_text)
    values = sweep_values(start, stop, steps, spacing, mode)
    held = {m: hold_value(m, hold, mode) for m in adapter_metrics if m not in swept}
    rows = []
    for value in values:
        rows.append({m: (float(value) if m in swept or held[m] is None else float(held[m])) for m in adapter_metrics})
    raw = []
    for row in rows:
        entry = {}
        for metric, value in row.items():
            if mode == "zscore" and descriptor is None:
                entry[metric] = None  # needs the adapter's mean/std
                continue
            try:
                entry[metric] = quality.target_to_raw(descriptor, metric, value, mode)
            except ValueError:
                entry[metric] = None
        raw.append(entry)
    return SweepTargets(mode, swept, [float(v) for v in values], rows, spacing, raw)


def sweep_tokens(adapter, metrics_text: str, start: float, stop: float, steps: int, mode: str, spacing: str,
                 hold: str, negative_scale: float, max_rows: int) -> tuple[QualityTokens, SweepTargets]:
    """The sweep node's inputs -> (tokens, targets): one token row per swept target, at most `max_rows`."""
    quality.check_score_adapter(adapter.descriptor)
    check_sweep_inputs(metrics_text, start, stop, steps, mode, spacing, hold, negative_scale)
    targets = build_sweep(adapter.descriptor.metrics, metrics_text, start, stop, steps, mode, spacing, hold,
                          adapter.descriptor)
    check_row_count(len(targets), max_rows, "sweep targets", "steps")
    return quality.encode_targets(adapter, targets.rows, mode, negative_scale, targets.value_inputs()), targets


def targets_text(rows: Sequence[dict[str, float]]) -> str:
    """Rows in the syntax IQAAdapterEncodeTarget reads: 'a=1, b=2; a=3, b=4'."""
    return "; ".join(", ".join(f"{m}={v:.6g}" for m, v in row.items()) for row in rows)


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------

def rank_average(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties get the mean of their ranks (as Spearman's rho needs)."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson of average ranks); NaN when undefined (n < 2 or a constant)."""
    if len(x) != len(y):
        raise ValueError(f"spearman_rho: {len(x)} targets but {len(y)} scores")
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 2:
        return float("nan")
    rx, ry = rank_average(x), rank_average(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denominator = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


def lower_better(metric: str, known: dict[str, bool] | None = None) -> bool:
    if known and metric in known:
        return bool(known[metric])
    try:
        return metric_info(metric).lower_better
    except ValueError:
        return False


def summarize(values: Sequence[float], scores: dict[str, Sequence[float]],
              directions: dict[str, bool] | None = None) -> dict[str, dict]:
    """Per measured metric: rho(target, score), the expected sign (+1 higher-better, -1 lower-better),
    and the direction-corrected rho (1 = scores follow the targets perfectly)."""
    out = {}
    for metric, series in scores.items():
        rho = spearman_rho(values, series)
        sign = -1.0 if lower_better(metric, directions) else 1.0
        out[metric] = {"rho": rho, "expected_sign": int(sign), "aligned_rho": sign * rho if math.isfinite(rho) else rho,
                       "n": int(len(series)), "lower_better": sign < 0}
    return out


# --------------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------------

def tidy(value: float, digits: int = 7) -> float:
    """A float rounded to `digits` significant digits, so tables read 33.66667, not 33.666666666666664."""
    value = float(value)
    return float(f"{value:.{digits}g}") if math.isfinite(value) else value


def build_table(targets: SweepTargets, scores: dict[str, Sequence[float]], image_names: Sequence[str],
                meta: dict | None = None, directions: dict[str, bool] | None = None,
                per_image_meta: Sequence[dict] | None = None, score_sizes: dict[str, str] | None = None) -> list[dict]:
    """One row per (image, measured metric); per_image_meta[i] overrides meta for image i (CLI: prompt, seed).
    `score_sizes`: metric -> how its images were sized (iqa_models.SCORE_SIZES; '' when unknown)."""
    meta = meta or {}
    n = len(targets)
    for metric, series in scores.items():
        if len(series) != n:
            raise ValueError(f"{metric}: {len(series)} scores for {n} targets (one score per image expected)")
    if len(image_names) != n:
        raise ValueError(f"{len(image_names)} image names for {n} targets")
    swept = targets.swept_metrics
    rows = []
    for i in range(n):
        raw_of_first = (targets.raw[i].get(swept[0]) if targets.raw and swept else None)
        item = {**meta, **(per_image_meta[i] if per_image_meta else {})}
        for metric, series in scores.items():
            rows.append({
                "prompt": item.get("prompt", ""), "seed": item.get("seed", ""), "model": item.get("model", ""),
                "adapter": item.get("adapter", ""), "index": i, "image": image_names[i],
                "target_mode": targets.mode, "swept_metrics": "+".join(swept), "target": tidy(targets.values[i]),
                "target_raw": "" if raw_of_first is None else tidy(raw_of_first), "metric": metric,
                "lower_better": lower_better(metric, directions),
                "score_size": (score_sizes or {}).get(metric, ""), "score": tidy(series[i]),
            })
    return rows


def write_csv(rows: Sequence[dict], path: str | pathlib.Path) -> pathlib.Path:
    """A new CSV (never overwrites; formula-like text neutralised): files.write_csv."""
    return files.write_csv(path, REPORT_COLUMNS, rows)


def write_json(report: dict, path: str | pathlib.Path) -> None:
    """A new JSON file (never overwrites); NaN becomes null."""
    files.create_new(path, files.json_text(report, indent=2))


# --------------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------------

def plain_text(text: str) -> str:
    """matplotlib parses '$...$' as mathtext (user text could crash the chart): escape every dollar."""
    return str(text).replace("$", r"\$")


def _format_target(value: float, mode: str) -> str:
    return {"percentile": f"p{value:.3g}", "zscore": f"z={value:+.2f}", "raw": f"{value:.4g}"}[mode]


def plot_score_vs_target(values: Sequence[float], scores: dict[str, Sequence[float]], mode: str,
                         swept_metrics: Sequence[str] = (), directions: dict[str, bool] | None = None,
                         ideal: dict[str, Sequence[float]] | None = None, groups: Sequence[str] | None = None,
                         title: str = "") -> np.ndarray:
    """Chart (one panel per measured metric) -> uint8 (H, W, 3).

    Points: measured scores (several images per target: all drawn, the mean connected). Dashed line:
    the ideal monotone response — the raw score the target stands for, where the measured metric is a
    swept one with CC3M statistics (`ideal`), else a straight line from the lowest to the highest
    measured score, rising for higher-is-better metrics and falling for lower-is-better ones.
    """
    import matplotlib
    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = list(scores)
    if not metrics:
        raise ValueError("no scores to plot")
    x = np.asarray(values, dtype=np.float64)
    summary = summarize(values, scores, directions)
    figure = Figure(figsize=(4.6 * len(metrics), 4.6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    x_label = {"percentile": "target (CC3M percentile)", "zscore": "target (z-score)", "raw": "target (raw)"}[mode]
    if swept_metrics:
        x_label += " of " + " + ".join(swept_metrics)
    x_label = plain_text(x_label)
    for axis, metric in zip(axes, metrics):
        y = np.asarray(scores[metric], dtype=np.float64)
        group_names = sorted(set(groups)) if groups is not None else [None]
        for name in group_names:
            mask = np.ones(len(x), bool) if name is None else np.array([g == name for g in groups])
            axis.scatter(x[mask], y[mask], s=22, alpha=0.8,
                         label=plain_text(name) if name and len(group_names) > 1 else None)
        unique_x = np.unique(x[np.isfinite(x)])
        means = np.array([np.nanmean(y[x == u]) for u in unique_x])
        axis.plot(unique_x, means, color="tab:blue", linewidth=1.2, label="measured (mean)")
        lower = summary[metric]["lower_better"]
        if ideal and metric in ideal and ideal[metric] is not None:
            axis.plot(x, np.asarray(ideal[metric], dtype=np.float64), "--", color="tab:green", linewidth=1.2,
                      label="ideal (score the target asks for)")
        elif len(unique_x) > 1 and np.isfinite(y).any():
            low, high = float(np.nanmin(y)), float(np.nanmax(y))
            ends = (high, low) if lower else (low, high)
            axis.plot([unique_x[0], unique_x[-1]], list(ends), "--", color="tab:gray", linewidth=1.0,
                      label="ideal monotone " + ("(lower is better)" if lower else "(higher is better)"))
        rho = summary[metric]["rho"]
        text = f"Spearman rho = {rho:+.3f}" if math.isfinite(rho) else "Spearman rho: undefined"
        text += f"\nexpected sign {'-' if lower else '+'} ({'lower' if lower else 'higher'} is better)"
        axis.text(0.03, 0.97, text, transform=axis.transAxes, va="top", fontsize=9,
                  bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85})
        axis.set_xlabel(x_label, fontsize=9)
        axis.set_ylabel(plain_text(f"{metric} (measured)"), fontsize=9)
        axis.set_title(plain_text(metric), fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    if title:
        figure.suptitle(plain_text(title), fontsize=10)
    figure.tight_layout()
    canvas = figure.canvas
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def make_grid(images: np.ndarray, captions: Sequence[str], columns: int | None = None, header: str = "") -> np.ndarray:
    """(B, H, W, 3) floats in [0, 1] or uint8 + one caption per image -> labelled grid uint8 (H', W', 3),
    with `header` lines (wrapped to the grid's width) above the images."""
    from PIL import Image, ImageDraw

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"make_grid: expected images (B, H, W, C), got {list(images.shape)}")
    if images.dtype != np.uint8:
        images = (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    images = images[..., :3]
    b, h, w, _ = images.shape
    if len(captions) != b:
        raise ValueError(f"make_grid: {len(captions)} captions for {b} images")
    columns = columns or min(b, max(1, math.ceil(math.sqrt(b * 1.5))))
    rows = math.ceil(b / columns)
    font_size = max(10, min(28, w // 11))
    lines = max(1, max(c.count("\n") + 1 for c in captions))
    strip = lines * (font_size + 4) + 6
    pad = 4
    width = columns * (w + pad) + pad
    header_size = max(12, min(22, width // 48))
    header_lines = []
    for paragraph in header.splitlines():
        header_lines += textwrap.wrap(paragraph, max(20, int(width / (header_size * 0.55)))) or [""]
    top = len(header_lines) * (header_size + 4) + (8 if header_lines else 0)
    canvas = Image.new("RGB", (width, top + rows * (h + strip + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if header_lines:
        draw.multiline_text((pad + 2, 6), "\n".join(header_lines), fill=(0, 0, 0), font=_font(header_size), spacing=4)
    font = _font(font_size)
    for i in range(b):
        r, c = divmod(i, columns)
        x0, y0 = pad + c * (w + pad), top + pad + r * (h + strip + pad)
        canvas.paste(Image.fromarray(images[i]), (x0, y0))
        draw.multiline_text((x0 + 2, y0 + h + 3), captions[i], fill=(0, 0, 0), font=font, spacing=4)
    return np.asarray(canvas)


def caption(value: float, mode: str, scores: dict[str, float]) -> str:
    parts = [f"target {_format_target(value, mode)}"]
    parts += [f"{metric} {score:.4g}" for metric, score in scores.items()]
    return "\n".join(parts)


def save_png(array: np.ndarray, path: str | pathlib.Path) -> None:
    from PIL import Image
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image
    buffer = _io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def ideal_scores(targets: SweepTargets, measured: Sequence[str]) -> dict[str, list[float] | None]:
    """For measured metrics that were swept and have raw values: the raw score each row asked for."""
    out = {}
    for metric in measured:
        if metric in targets.swept_metrics and targets.raw and all(r.get(metric) is not None for r in targets.raw):
            out[metric] = [float(r[metric]) for r in targets.raw]
        else:
            out[metric] = None
    return out


def write_report(out_dir: str | pathlib.Path, stem: str, targets: SweepTargets, scores: dict[str, Sequence[float]],
                 images: np.ndarray | None, image_names: Sequence[str], meta: dict | None = None,
                 directions: dict[str, bool] | None = None, grid: np.ndarray | None = None,
                 groups: Sequence[str] | None = None, per_image_meta: Sequence[dict] | None = None,
                 progress: Callable[[str], None] | None = None, replace: bool = False,
                 score_sizes: dict[str, str] | None = None) -> dict:
    """Write <stem>_grid.png, <stem>_chart.png, <stem>.csv, <stem>.json in out_dir; returns paths, arrays, summary.
    Nothing is overwritten: when one of those exists, the stem becomes <stem>_2, <stem>_3, ... `replace`
    (the resumable CLI, which owns its folder and rewrites the report of its own state) replaces them.
    `score_sizes`: metric -> how its images were sized for scoring (recorded in the CSV / JSON)."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if replace:
        for suffix in REPORT_SUFFIXES:
            (out_dir / f"{stem}{suffix}").unlink(missing_ok=True)
    stem = files.free_stem(out_dir, stem, REPORT_SUFFIXES)
    meta = dict(meta or {})
    score_sizes = {metric: (score_sizes or {}).get(metric, "") for metric in scores}
    table = build_table(targets, scores, image_names, meta, directions, per_image_meta, score_sizes)
    summary = summarize(targets.values, scores, directions)
    if grid is None and images is not None:
        captions = [caption(targets.values[i], targets.mode, {m: float(s[i]) for m, s in scores.items()})
                    for i in range(len(targets))]
        grid = make_grid(images, captions, header=grid_header(targets, scores, meta, directions))
    title_bits = [meta.get("model") or "", meta.get("adapter") or ""]
    # the CC3M "ideal" line only means something for scores made the way the statistics were (not 'native')
    ideal = {metric: (None if score_sizes[metric] == "native" else line)
             for metric, line in ideal_scores(targets, list(scores)).items()}
    chart = plot_score_vs_target(targets.values, scores, targets.mode, targets.swept_metrics, directions,
                                 ideal, groups,
                                 title=" | ".join(b for b in title_bits if b))
    paths = {"chart": out_dir / f"{stem}_chart.png", "csv": out_dir / f"{stem}.csv", "json": out_dir / f"{stem}.json"}
    files.create_new(paths["chart"], png_bytes(chart))
    if grid is not None:
        paths["grid"] = out_dir / f"{stem}_grid.png"
        files.create_new(paths["grid"], png_bytes(grid))
    write_csv(table, paths["csv"])
    write_json({**meta, "targets": asdict(targets), "summary": summary, "score_sizes": score_sizes, "rows": table,
                "files": {k: p.name for k, p in paths.items()}}, paths["json"])
    if progress:
        progress(f"report written to {out_dir}")
    return {"paths": paths, "chart": chart, "grid": grid, "summary": summary, "table": table}


def grid_header(targets: SweepTargets, scores: dict[str, Sequence[float]], meta: dict,
                directions: dict[str, bool] | None = None) -> str:
    lines = []
    if meta.get("prompt"):
        lines.append(f"prompt: {meta['prompt']}")
    facts = [f"{k} {meta[k]}" for k in ("seed", "model", "adapter") if meta.get(k) not in (None, "")]
    swept = " + ".join(targets.swept_metrics) or "all metrics"
    facts.append(f"target: {swept} ({targets.mode})")
    lines.append(" | ".join(facts))
    lines.append("scores: " + ", ".join(f"{m} ({'lower' if lower_better(m, directions) else 'higher'} is better)"
                                        for m in scores))
    return "\n".join(lines)


def summary_markdown(summary: dict[str, dict], meta: dict) -> str:
    """The report on the node: prompt, seed, model, adapter, and each metric's rho with its direction."""
    lines = ["**Sweep report**", ""]
    for key in ("prompt", "seed", "model", "adapter"):
        if meta.get(key) not in (None, ""):
            lines.append(f"- {key}: {meta[key]}")
    lines += ["", "| metric | Spearman rho | better is | images |", "|---|---:|---|---:|"]
    for metric, entry in summary.items():
        rho = entry["rho"]
        lines.append(f"| {metric} | {f'{rho:+.3f}' if math.isfinite(rho) else 'n/a'} | "
                     f"{'lower' if entry['lower_better'] else 'higher'} | {entry['n']} |")
    return "\n".join(lines)


def summary_text(summary: dict[str, dict]) -> str:
    lines = []
    for metric, entry in summary.items():
        rho = entry["rho"]
        rho_text = f"{rho:+.3f}" if math.isfinite(rho) else "undefined"
        lines.append(f"{metric}: Spearman rho {rho_text} over {entry['n']} images "
                     f"(expected sign {'-' if entry['lower_better'] else '+'})")
    return "\n".join(lines)
