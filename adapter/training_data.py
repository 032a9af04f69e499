"""Training data for the trainer: image folders and WebDataset tar shards, the authors' preprocessing,
quality labels scored as the CC3M statistics were, a resume-safe label table and statistics.

Host-free: images are PIL/torch; metrics come from adapter/iqa_models.py (the pack's offline loader).

- Samples are keyed: a folder image by its path relative to the folder (posix), a tar member by its
  WebDataset key (member path up to the first '.' of the file name). Labels and captions use the key.
- Captions: `<stem>.txt` beside a folder image, the `txt` member of a tar sample, or a CSV/JSONL file
  with columns `image` (key or file name) and `text` (or `caption`); none means the empty caption.
- Preprocessing as the authors' trainer (docs/METHOD.md §5.2): shorter side resized to the resolution
  (bilinear), pixels to [-1, 1], centre crop; the original size and crop offsets go to SDXL's
  micro-conditioning.
- Labels as the CC3M statistics were made (docs/METHOD.md §3.3, §5.2): the whole image in [0, 1], squashed to 512x512
  with bilinear resizing (no crop), clamped to [0, 1], pyiqa's default (non-loss) model.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import pathlib
import tarfile
from dataclasses import dataclass

import numpy as np
import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_EXTENSIONS = ("txt",)
STATS_QUANTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)


@dataclass(frozen=True)
class SampleRef:
    key: str
    source: str  # image file, or tar shard
    offset: int = -1  # byte offset of the image member's data inside the tar (-1: a plain file)
    size: int = 0
    caption: str = ""


class ImageDataset:
    """Map-style dataset of `SampleRef`s (folder and/or tar shards), sorted by key: order is reproducible."""

    def __init__(self, refs: list[SampleRef], description: str):
        if not refs:
            raise ValueError(f"training data {description}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
        keys = [ref.key for ref in refs]
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})[:3]
            raise ValueError(f"training data {description}: duplicate image keys {dup}")
        self.refs = sorted(refs, key=lambda ref: ref.key)
        self.description = description

    def __len__(self) -> int:
        return len(self.refs)

    def keys(self) -> list[str]:
        return [ref.key for ref in self.refs]

    def open_image(self, index: int):
        from PIL import Image

        ref = self.refs[index]
        if ref.offset < 0:
            image = Image.open(ref.source)
        else:
            with open(ref.source, "rb") as handle:
                handle.seek(ref.offset)
                image = Image.open(io.BytesIO(handle.read(ref.size)))
        try:
            return image.convert("RGB")
        except OSError as error:
            raise ValueError(f"training data: cannot decode image {ref.key!r} ({ref.source}): {error}") from None


def _read_caption_table(path: pathlib.Path) -> dict[str, str]:
    """CSV or JSONL with an image column (`image`, `file_name`, `key`) and a text column (`text`, `caption`)."""
    rows: list[dict] = []
    if path.suffix.lower() == ".jsonl":
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"captions {path}: line {number}: invalid JSON ({error.msg})") from None
    else:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    table = {}
    for number, row in enumerate(rows, start=1):
        image = next((row[c] for c in ("image", "file_name", "key") if c in row), None)
        text = next((row[c] for c in ("text", "caption", "txt") if c in row), None)
        if image is None or text is None:
            raise ValueError(f"captions {path}: row {number} needs an image column (image/file_name/key) and a "
                             f"text column (text/caption); got columns {sorted(row)}")
        table[str(image)] = str(text)
    return table


def _caption_for(table: dict[str, str], key: str, name: str) -> str | None:
    for candidate in (key, name, pathlib.PurePosixPath(key).stem):
        if candidate in table:
            return table[candidate]
    return None


def folder_refs(folder: str | os.PathLike) -> list[SampleRef]:
    folder = pathlib.Path(folder)
    refs = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            key = path.relative_to(folder).as_posix()
            text_file = path.with_suffix(".txt")
            caption = text_file.read_text(encoding="utf-8").strip() if text_file.is_file() else ""
            refs.append(SampleRef(key=key, source=str(path), caption=caption))
    return refs


def tar_refs(shard: str | os.PathLike) -> list[SampleRef]:
    """Index a WebDataset shard: one sample per key (image member + optional `txt`), read by offset later."""
    shard = str(shard)
    images: dict[str, tarfile.TarInfo] = {}
    captions: dict[str, str] = {}
    try:
        with tarfile.open(shard, "r:") as archive:  # uncompressed tar only: members are read by offset
            for member in archive:
                if not member.isfile():
                    continue
                directory, _, name = member.name.rpartition("/")
                if "." not in name:
                    continue
                stem, extension = name.split(".", 1)
                key = f"{directory}/{stem}" if directory else stem
                if f".{extension.lower()}" in IMAGE_EXTENSIONS:
                    images[key] = member
                elif extension.lower() in CAPTION_EXTENSIONS:
                    captions[key] = archive.extractfile(member).read().decode("utf-8").strip()
    except tarfile.TarError as error:
        raise ValueError(f"training data: {shard} is not a readable (uncompressed) tar shard: {error}") from None
    return [SampleRef(key=key, source=shard, offset=member.offset_data, size=member.size, caption=captions.get(key, ""))
            for key, member in images.items()]


def open_dataset(sources: list[str], captions_file: str | None = None) -> ImageDataset:
    """Folders and/or `.tar` shards (a folder of shards counts as shards when it holds no images)."""
    refs: list[SampleRef] = []
    for source in sources:
        path = pathlib.Path(source)
        if path.is_dir():
            images = folder_refs(path)
            shards = sorted(path.glob("*.tar")) if not images else []
            refs += images
            for shard in shards:
                refs += tar_refs(shard)
        elif path.is_file() and path.suffix.lower() == ".tar":
            refs += tar_refs(path)
        else:
            raise ValueError(f"training data: {source} is neither a folder nor a .tar shard")
    if captions_file:
        table = _read_caption_table(pathlib.Path(captions_file))
        refs = [SampleRef(r.key, r.source, r.offset, r.size,
                          _caption_for(table, r.key, pathlib.PurePosixPath(r.key).name) or r.caption) for r in refs]
    return ImageDataset(refs, ", ".join(sources))


# ---------------------------------------------------------------- preprocessing

def pil_to_tensor01(image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [0, 1] (torchvision's ToTensor)."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


@dataclass
class PreparedImage:
    pixels: torch.Tensor  # (3, S, S) in [-1, 1]
    original_size: tuple[int, int]  # (height, width) of the file
    crop_top_left: tuple[int, int]  # (top, left) in the resized image


def prepare_image(image, resolution: int) -> PreparedImage:
    """Shorter side -> resolution (bilinear, the longer side truncated as torchvision does), [-1, 1], centre crop."""
    from PIL import Image

    width, height = image.size
    if width <= height:
        new_w, new_h = resolution, int(resolution * height / width)
    else:
        new_w, new_h = int(resolution * width / height), resolution
    resized = image.resize((new_w, new_h), Image.BILINEAR)
    pixels = pil_to_tensor01(resized) * 2.0 - 1.0
    top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    pixels = pixels[:, top:top + resolution, left:left + resolution].contiguous()
    return PreparedImage(pixels, (height, width), (top, left))


def cc3m_label_input(image) -> torch.Tensor:
    """(1, 3, 512, 512) in [0, 1]: the whole image squashed as for the CC3M statistics, then clamped."""
    from .iqa_models import resize_for_scoring  # the one CC3M sizing the whole pack scores with

    return resize_for_scoring(pil_to_tensor01(image).unsqueeze(0), "cc3m")


# ---------------------------------------------------------------- label table (resume-safe)

class LabelTable:
    """Raw scores of one metric by image key, in `<folder>/<metric>.csv` (columns: image, score).

    Rows are appended and flushed as they are scored, so an interrupted run keeps what it scored; a
    torn last line (killed mid-write) is ignored and scored again.
    """

    def __init__(self, folder: str | os.PathLike, metric: str):
        self.path = pathlib.Path(folder) / f"{metric}.csv"
        self.metric = metric
        self.scores: dict[str, float] = {}
        if self.path.is_file():
            with self.path.open(newline="", encoding="utf-8") as handle:
                for row in csv.reader(handle):
                    if len(row) != 2 or row[0] == "image":
                        continue
                    try:
                        value = float(row[1])
                    except ValueError:
                        continue
                    if math.isfinite(value):
                        self.scores[row[0]] = value

    def missing(self, keys: list[str]) -> list[str]:
        return [key for key in keys if key not in self.scores]

    def append(self, rows: list[tuple[str, float]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new_file = not self.path.is_file() or self.path.stat().st_size == 0
        with self.path.open("a", newline="", encoding="utf-8") as handle:
            if not new_file:
                handle.seek(0, os.SEEK_END)
            writer = csv.writer(handle)
            if new_file:
                writer.writerow(["image", "score"])
            for key, value in rows:
                writer.writerow([key, repr(float(value))])
            handle.flush()
            os.fsync(handle.fileno())
        self.scores.update({key: float(value) for key, value in rows})


def score_dataset(dataset: ImageDataset, metric_name: str, label_dir: str | os.PathLike, device: str = "cpu",
                  metric_folders: tuple[str, ...] = (), chunk_size: int = 8, progress=None) -> dict[str, float]:
    """Raw scores of every image for one metric (cached in the label table; only missing keys are scored)."""
    from . import iqa_models

    table = LabelTable(label_dir, metric_name)
    keys = dataset.keys()
    missing = set(table.missing(keys))
    if missing:
        metric = iqa_models.load_metric(metric_name, metric_folders, device=device)
        todo = [i for i, key in enumerate(keys) if key in missing]
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start:start + chunk_size]
            images = torch.cat([cc3m_label_input(dataset.open_image(i)) for i in chunk])
            values = metric.score(images.to(metric.current_device())).detach().float().cpu()
            if not torch.isfinite(values).all():
                bad = [keys[i] for i, v in zip(chunk, values) if not math.isfinite(float(v))]
                raise ValueError(f"metric {metric_name}: non-finite score for {bad}")
            table.append([(keys[i], float(v)) for i, v in zip(chunk, values)])
            if progress is not None:
                progress(min(start + chunk_size, len(todo)), len(todo))
    return {key: table.scores[key] for key in keys}


# ---------------------------------------------------------------- statistics (CC3M_stats.csv layout)

def metric_statistics(values: list[float]) -> dict[str, float]:
    """min/max/mean/std (sample std, as pandas) and the CC3M quantiles (linear interpolation, as pandas)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size < 2:
        raise ValueError(f"statistics need at least 2 labelled images, got {array.size}")
    stats = {"min_val": float(array.min()), "max_val": float(array.max()), "mean_val": float(array.mean()),
             "std_val": float(array.std(ddof=1))}
    for q in STATS_QUANTILES:
        stats[f"quantile_{q}"] = float(np.quantile(array, q / 100.0))
    return stats


def write_stats_csv(path: str | os.PathLike, scores: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Write `<metric>` and `<metric>_normalized` rows in the layout of the authors' CC3M_stats.csv."""
    columns = ["metric", "min_val", "max_val", "mean_val", "std_val"] + [f"quantile_{q}" for q in STATS_QUANTILES]
    rows, stats = [], {}
    for metric, by_key in scores.items():
        raw = list(by_key.values())
        stats[metric] = metric_statistics(raw)
        if stats[metric]["std_val"] <= 0:
            raise ValueError(f"metric {metric}: every image has the same score {raw[0]}; it cannot be z-scored")
    for metric in scores:
        rows.append({"metric": metric, **stats[metric]})
    for metric, by_key in scores.items():
        mean, std = stats[metric]["mean_val"], stats[metric]["std_val"]
        rows.append({"metric": f"{metric}_normalized",
                     **metric_statistics([(v - mean) / std for v in by_key.values()])})
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([""] + columns)
        for index, row in enumerate(rows):
            writer.writerow([index] + [row["metric"]] + [repr(row[c]) for c in columns[1:]])
    return stats
