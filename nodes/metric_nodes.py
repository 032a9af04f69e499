"""IQAMetricLoader and IQAScore: pyiqa metrics in the graph (glue only; the work is adapter/iqa_models.py).

Weights are looked up, never downloaded: models/iqa (folder_paths "iqa") under pyiqa's default file name
(or the same stem + .safetensors), then pyiqa's cache (torch hub dir/pyiqa). Metrics stay loaded in a
module-level cache across prompts (id + device + differentiable, invalidated when a weight file changes);
`iqa_models.clear_metric_cache()` frees them, and the cache keeps at most `METRIC_CACHE_SIZE` entries.
While scoring, each network is handed to the host's model manager (a ModelPatcher), which may offload
it when another model needs the memory.
"""
from __future__ import annotations

import datetime
import os

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..adapter import errors, files, iqa_models, metric_files, score_card
from ..adapter.errors import InputError
from ..adapter.files import file_signature
from ..models import metrics as metric_catalog
from . import presentation, types
from .host_models import memory_managed
from .inputs import image_to_bchw
from .paths import METRIC_FOLDER

DEVICES = ["auto", "cpu"]
METRIC_CACHE_SIZE = iqa_models.METRIC_CACHE_SIZE
SAVE_FORMATS = ["none", "csv", "json"]


def metric_folders() -> list[str]:
    try:
        return list(folder_paths.get_folder_paths(METRIC_FOLDER))
    except KeyError:
        return [os.path.join(folder_paths.models_dir, METRIC_FOLDER)]


def _folder_fingerprint() -> tuple:
    entries = []
    for folder in metric_folders():
        if os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                path = os.path.join(folder, name)
                if os.path.isfile(path):
                    entries.append(file_signature(path))
    return tuple(entries)


def load_metric_for_graph(name: str, device: str = "auto", differentiable: bool = False) -> iqa_models.LoadedMetric:
    """Loader path shared by the nodes: host memory freed before a GPU build (the cache caps itself)."""
    # 'auto' = where the host runs its models (follows --cpu, --cuda-device, MPS, XPU, DirectML)
    torch_device = comfy.model_management.get_torch_device() if device == "auto" else torch.device(device)
    if torch_device.type != "cpu":
        # let ComfyUI offload its own models first (IQA nets are a few hundred MB at most)
        comfy.model_management.free_memory(1024 ** 3, torch_device)
    return iqa_models.load_metric(name, metric_folders(), str(torch_device), differentiable)


def metric_choices() -> tuple[list[str], str]:
    """The picker's order and its tooltip: no-reference metrics before full-reference ones, each group with
    the metrics that can load here (weights installed, or none needed) first."""
    names = metric_catalog.offered_metric_names()
    folders = metric_folders()
    ready = {name for name in names if iqa_models.missing_weight_files(name, folders, plan=False) == []}
    no_weights = [n for n in names if metric_catalog.catalog_weight_files(n) == []]
    ordered = []
    for full_reference in (False, True):
        group = [n for n in names if metric_catalog.is_full_reference(n) == full_reference]
        ordered += [n for n in group if n in ready] + [n for n in group if n not in ready]
    weight_free_nr = [n for n in no_weights if not metric_catalog.is_full_reference(n)]
    installed = [n for n in ordered if n in ready and n not in no_weights]
    tooltip = (f"Which quality metric. No-reference metrics (judge one image) come first, then full-reference "
               f"ones (compare with a reference image). Ready here: {', '.join(installed) or 'none installed yet'}. "
               f"Weight-free, work without any file: {', '.join(weight_free_nr)}. Others need their weight file "
               f"in models/{METRIC_FOLDER} (the error names it). The paper's metric: topiq_nr.")
    return ordered, tooltip


class IQAMetricLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        options, tooltip = metric_choices()
        return presentation.schema(
            "IQAMetricLoader", presentation.SCORE,
            description="Load an image-quality metric (pyiqa) for Quality Score, the sweep report or gradient "
                        "guidance. Nothing is downloaded: weighted metrics read their file from models/iqa; "
                        "weight-free ones (piqe, psnr, ssim, ...) need none.",
            inputs=[
                io.Combo.Input("metric", options=options, default="topiq_nr", tooltip=tooltip),
                io.Combo.Input("device", options=DEVICES, default="auto",
                               tooltip="auto = the device ComfyUI runs its models on "
                                       "(follows --cpu, --cuda-device, ...)."),
                io.Boolean.Input("differentiable", default=False,
                                 tooltip="On only for Quality Guidance (it needs gradients). Off for scoring."),
            ],
            outputs=[types.Metric.Output(display_name="metric")],
        )

    @classmethod
    def validate_inputs(cls, metric=None, device=None):
        return presentation.validation("IQAMetricLoader", check_loader_inputs, metric, device)

    @classmethod
    def fingerprint_inputs(cls, metric, device, differentiable):
        return _folder_fingerprint()

    @classmethod
    @errors.node_errors("IQAMetricLoader", "metric")
    def execute(cls, metric, device, differentiable) -> io.NodeOutput:
        check_loader_inputs(device=device)
        try:
            loaded = load_metric_for_graph(metric, device, bool(differentiable))
        except metric_files.MissingMetricWeightsError as error:  # a FileNotFoundError whose text says it all
            raise InputError(str(error), "metric") from None
        except (metric_files.UnsafeWeightsError, ValueError) as error:
            raise InputError(f"'{metric}': {error}", "metric") from None
        except ImportError as error:
            raise InputError(f"'{metric}' needs a Python module that is not installed ({error}); CLIP-based pyiqa "
                             f"metrics (clipiqa, laion_aes, liqe) import pkg_resources (setuptools<81)",
                             "metric") from None
        except Exception as error:  # pyiqa's own build failed (e.g. a hub-only model offline)
            raise InputError(f"'{metric}' could not be built offline: {type(error).__name__}: {error}",
                             "metric") from None
        return io.NodeOutput(loaded)


def check_loader_inputs(metric: str | None = None, device: str | None = None) -> None:
    """Load Quality Metric's inputs, at queue time (the metric's weights installed) and when it runs."""
    if device is not None and device not in DEVICES:
        raise InputError(f"expected one of {', '.join(DEVICES)}, got {errors.quote(device)}", "device")
    if metric is None:
        return
    names = metric_catalog.offered_metric_names()
    if metric not in names:
        raise InputError(f"unknown metric {errors.quote(metric)}{errors.did_you_mean(metric, names)}", "metric")
    missing = iqa_models.missing_weight_files(metric, metric_folders())
    if missing:
        weight_free = [n for n in names if metric_catalog.catalog_weight_files(n) == []
                       and not metric_catalog.is_full_reference(n)]
        raise InputError(f"{metric} needs the weight file {', '.join(missing)}, which is not installed: put it in "
                         f"{metric_folders()[0]} (nothing is downloaded). Metrics that need no file: "
                         f"{', '.join(weight_free)}.", "metric")


def score_images(metrics: list[iqa_models.LoadedMetric], images: torch.Tensor, reference: torch.Tensor | None,
                 chunk_size: int, score_size: str = "cc3m") -> iqa_models.IQAScores:
    """The node's scoring path: IMAGE tensors in, IQAScores out; progress bar + interrupt between chunks.
    `score_size` 'cc3m' squashes to 512x512 as the CC3M statistics were made; 'native' keeps the size."""
    images_bchw = image_to_bchw(images, "images")
    reference_bchw = image_to_bchw(reference, "reference") if reference is not None else None
    for metric in metrics:
        if metric.is_full_reference:
            if reference_bchw is None:
                raise InputError(f"metric '{metric.name}' is full-reference: connect reference images", "reference")
            if reference_bchw.shape[2:] != images_bchw.shape[2:]:
                raise InputError(f"reference size {reference_bchw.shape[3]}x{reference_bchw.shape[2]} differs from "
                                 f"image size {images_bchw.shape[3]}x{images_bchw.shape[2]}", "reference")
            if reference_bchw.shape[0] not in (1, images_bchw.shape[0]):
                raise InputError(f"{reference_bchw.shape[0]} reference images for {images_bchw.shape[0]} images (give "
                                 f"1 or {images_bchw.shape[0]})", "reference")
    comfy.model_management.load_models_gpu([memory_managed(metric) for metric in metrics])
    total = images_bchw.shape[0] * len(metrics)
    bar = comfy.utils.ProgressBar(total)
    result = iqa_models.IQAScores(score_size=score_size)
    for index, metric in enumerate(metrics):
        offset = index * images_bchw.shape[0]

        def progress(done, _count, offset=offset):
            comfy.model_management.throw_exception_if_processing_interrupted()
            bar.update_absolute(offset + done, total)
        try:
            values = iqa_models.score_in_chunks(metric, images_bchw, reference_bchw, chunk_size, progress,
                                                score_size=score_size)
        except comfy.model_management.InterruptProcessingException:
            raise
        except Exception as error:  # noqa: BLE001 - pyiqa's own failures on odd images (sizes, degenerate content)
            raise InputError(f"metric '{metric.name}' could not score them: {errors.describe(error)}",
                             "images") from None
        result.add(metric, values.detach().float().cpu().tolist())
    return result


def _append_rows(path: str, fmt: str, rows: list[dict]) -> str:
    """Append to our own file only (same CSV header / JSON-lines keys); else a new `<name>_<n>` beside it.
    Returns the path written."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if fmt == "csv":
        return str(files.write_csv(path, list(rows[0]), rows, append=True))
    return str(files.append_jsonl(path, rows))  # JSON lines: one object per row, NaN as null


class IQAScore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return presentation.schema(
            "IQAScore", presentation.SCORE,
            description="Score images with one to three quality metrics and show the scores on the node (a table "
                        "and a score card). By default images are squashed to 512x512 first, as the CC3M statistics "
                        "were made, so scores compare with the percentiles; numbers then equal pyiqa's on those "
                        "pixels ('native' scores the image as it is). RGBA images lose their alpha "
                        "channel; grayscale is repeated to RGB.",
            inputs=[
                io.Image.Input("images", tooltip="Images to score."),
                types.Metric.Input("metric", tooltip="From Load Quality Metric."),
                types.Metric.Input("metric_2", optional=True, tooltip="A second metric (optional)."),
                types.Metric.Input("metric_3", optional=True, tooltip="A third metric (optional)."),
                io.Image.Input("reference", optional=True,
                               tooltip="Reference images for full-reference metrics (same size; 1 or one per image)."),
                io.Combo.Input("score_size", options=list(iqa_models.SCORE_SIZES), default="cc3m", optional=True,
                               tooltip="cc3m: squash each image to 512x512 first, as the authors scored CC3M, so "
                                       "scores compare with the CC3M percentiles and the paper's numbers. "
                                       "native: score the image at its own size."),
                io.Int.Input("chunk_size", default=8, min=1, max=256,
                             tooltip="Images scored at once. 8 suits most GPUs; lower it if memory runs out."),
                io.Combo.Input("save_rows", options=SAVE_FORMATS, default="none",
                               tooltip="Also append one row per image and metric to a CSV or JSON-lines file in "
                                       "the output folder (none = only show them)."),
                io.String.Input("filename_prefix", default="iqa_scores/scores",
                                tooltip="File path inside the output folder (extension added); used only when "
                                        "save_rows is csv or json."),
            ],
            outputs=[
                types.Scores.Output(display_name="scores"),
                io.String.Output(display_name="table"),
                io.Float.Output(display_name="mean"),
            ],
            is_output_node=True,
        )

    @classmethod
    @errors.node_errors("IQAScore", "images")
    def execute(cls, images, metric, chunk_size, save_rows, filename_prefix, score_size="cc3m", metric_2=None,
                metric_3=None, reference=None) -> io.NodeOutput:
        metrics = []
        for input_name, value in (("metric", metric), ("metric_2", metric_2), ("metric_3", metric_3)):
            if value is None:
                continue
            if not isinstance(value, iqa_models.LoadedMetric):
                raise InputError(f"expected an IQA_METRIC from IQA Metric Loader, got {type(value).__name__}",
                                 input_name)
            metrics.append(value)
        if save_rows not in SAVE_FORMATS:
            raise InputError(f"expected one of {', '.join(SAVE_FORMATS)}, got {errors.quote(save_rows)}", "save_rows")
        if score_size not in iqa_models.SCORE_SIZES:
            raise InputError(f"expected one of {', '.join(iqa_models.SCORE_SIZES)}, got {errors.quote(score_size)}",
                             "score_size")
        scores = score_images(metrics, images, reference, int(chunk_size), score_size)
        table = scores.table()
        if save_rows != "none":
            files.check_user_path(filename_prefix, "filename_prefix")
            output_dir = os.path.abspath(folder_paths.get_output_directory())
            extension = "csv" if save_rows == "csv" else "jsonl"
            path = os.path.abspath(os.path.join(output_dir, f"{filename_prefix}.{extension}"))
            if os.path.commonpath([path, output_dir]) != output_dir:
                raise InputError(f"{errors.quote(filename_prefix)} points outside the output folder", "filename_prefix")
            stamp = datetime.datetime.now().isoformat(timespec="seconds")
            with errors.blame("IQAScore", "filename_prefix"):
                written = _append_rows(path, save_rows, scores.rows(timestamp=stamp))
            if written != path:
                table += (f"\n(rows written to {os.path.relpath(written, output_dir)}: "
                          f"{os.path.relpath(path, output_dir)} is not a file of this node's format)")
        first = scores.scores[metrics[0].name]
        mean = float(sum(first) / len(first)) if first else float("nan")
        markdown = score_card.markdown_table(scores.scores, scores.lower_better)
        markdown += f"\n\n*Scored {iqa_models.SCORE_SIZE_NOTES[score_size]}.*"
        card = torch.from_numpy(score_card.render_card(scores.scores, scores.lower_better).astype("float32") / 255.0)
        preview = ui.PreviewImage(card[None], cls=cls).as_dict()
        return io.NodeOutput(scores, table, mean, ui={**preview, **presentation.markdown(markdown)})


NODES = [IQAMetricLoader, IQAScore]
