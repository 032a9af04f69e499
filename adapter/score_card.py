"""Scores as a person reads them after Run: a Markdown table (the frontend renders it on the node) and a
score-card picture (the node previews it like any image, on every frontend).

Plain data in, text/pixels out: no ComfyUI here.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

MAX_CARD_ROWS = 16  # images listed one by one on the card; larger batches show the summary rows only


def number(value: float) -> str:
    """4 significant digits, no float noise ('0.6124', '57.31', '-'); NaN shows as 'n/a'."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.4g}"


def _direction(lower_better: bool) -> str:
    return "lower is better" if lower_better else "higher is better"


def summary_rows(scores: Mapping[str, Sequence[float]]) -> list[tuple[str, list[str]]]:
    names = list(scores)
    rows = []
    for label, reduce in (("mean", np.mean), ("min", np.min), ("max", np.max)):
        cells = [number(float(reduce(np.asarray(scores[n], dtype=np.float64)))) if len(scores[n]) else "-"
                 for n in names]
        rows.append((label, cells))
    return rows


def markdown_table(scores: Mapping[str, Sequence[float]], lower_better: Mapping[str, bool],
                   title: str = "Quality scores") -> str:
    """One row per image, one column per metric (with its direction), then mean/min/max when >1 image."""
    names = list(scores)
    count = max((len(v) for v in scores.values()), default=0)
    head = "| image | " + " | ".join(f"{n} ({'↓' if lower_better.get(n) else '↑'})" for n in names) + " |"
    lines = [f"**{title}**", "", head, "|---:|" + "---:|" * len(names)]
    for i in range(count):
        lines.append(f"| {i + 1} | " + " | ".join(number(scores[n][i]) if i < len(scores[n]) else "-"
                                                  for n in names) + " |")
    if count > 1:
        for label, cells in summary_rows(scores):
            lines.append(f"| **{label}** | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("; ".join(f"{n}: {_direction(bool(lower_better.get(n)))}" for n in names))
    return "\n".join(lines)


def render_card(scores: Mapping[str, Sequence[float]], lower_better: Mapping[str, bool],
                title: str = "Quality scores", width: int = 512) -> np.ndarray:
    """The same table drawn as a picture: uint8 (H, W, 3)."""
    from PIL import Image, ImageDraw

    from .sweep import _font

    names = list(scores)
    count = max((len(v) for v in scores.values()), default=0)
    rows: list[tuple[str, list[str]]] = []
    if count <= MAX_CARD_ROWS:
        rows += [(str(i + 1), [number(scores[n][i]) if i < len(scores[n]) else "-" for n in names])
                 for i in range(count)]
    if count > 1:
        rows += summary_rows(scores)
    head = ["image"] + names
    directions = [""] + [_direction(bool(lower_better.get(n))) for n in names]
    font, bold, small = _font(18), _font(22), _font(13)
    line = 28
    height = 16 + 34 + line * (len(rows) + 2) + 8
    columns = len(head)
    width = max(width, 90 + 150 * (columns - 1))
    canvas = Image.new("RGB", (width, height), (250, 250, 247))
    draw = ImageDraw.Draw(canvas)
    draw.text((14, 12), title, fill=(20, 20, 20), font=bold)
    x_of = [14] + [90 + (width - 104) * k // max(1, columns - 1) for k in range(columns - 1)]
    y = 16 + 34
    draw.rectangle((0, y - 4, width, y + 2 * line - 4), fill=(225, 230, 240))
    for x, text, direction in zip(x_of, head, directions):
        draw.text((x, y), text, fill=(20, 20, 60), font=font)
        draw.text((x, y + line - 4), direction, fill=(70, 70, 100), font=small)
    y += line
    for r, (label, cells) in enumerate(rows):
        y += line
        if r % 2:
            draw.rectangle((0, y - 4, width, y + line - 4), fill=(240, 240, 236))
        summary = not label.isdigit()
        for x, text in zip(x_of, [label] + cells):
            draw.text((x, y), text, fill=(90, 40, 0) if summary else (20, 20, 20), font=font)
    return np.asarray(canvas)
