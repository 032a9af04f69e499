"""IQA-Adapter nodes: load an adapter, encode quality targets into tokens, apply them to a model, save/load tokens.

Thin glue: reading/validating files is adapter/checkpoint.py, targets -> vectors adapter/quality.py,
tokens adapter/iqa_adapter.py, the attention patch nodes/adapter_patch.py.
"""
from __future__ import annotations

import math
import os
import pathlib
import threading

import folder_paths
from comfy_api.latest import io

from ..adapter import checkpoint, errors, iqa_adapter, projection, quality
from ..adapter.files import check_user_path, file_signature
from ..adapter import quality as quality_module  # 'quality' is also the encode node's input name
from ..models import metrics as metric_catalog
from ..models import stats as cc3m
from . import adapter_patch, graph, presentation
from .limits import host_batch_cap
from .paths import ADAPTER_FOLDER

IQAAdapterType = io.Custom("IQA_ADAPTER")
QualityTokensType = io.Custom("QUALITY_TOKENS")
TOKENS_EXTENSION = ".safetensors"

# Loaded adapters by weights file and descriptor (checkpoint.adapter_cache_key): a replaced weights file or an
# edited, broken or deleted sidecar JSON is read again.
_ADAPTER_CACHE: dict[tuple, iqa_adapter.IQAAdapter] = {}
_ADAPTER_CACHE_LOCK = threading.Lock()
_ADAPTER_CACHE_SIZE = 4


_fail = errors.fail  # raises `Display Name: input: message` (errors.NodeInputError, a ValueError)


def load_adapter_cached(path: str) -> iqa_adapter.IQAAdapter:
    key = checkpoint.adapter_cache_key(path)
    with _ADAPTER_CACHE_LOCK:
        cached = _ADAPTER_CACHE.get(key)
    if cached is not None:
        return cached
    adapter = iqa_adapter.load_adapter(path)
    with _ADAPTER_CACHE_LOCK:
        for stale in [k for k in _ADAPTER_CACHE if k[0] == key[0]]:
            del _ADAPTER_CACHE[stale]
        while len(_ADAPTER_CACHE) >= _ADAPTER_CACHE_SIZE:
            del _ADAPTER_CACHE[next(iter(_ADAPTER_CACHE))]
        _ADAPTER_CACHE[key] = adapter
    return adapter


def _file_fingerprint(path: str | None):
    if not path or not os.path.isfile(path):
        return None
    return file_signature(path)


class IQAAdapterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return presentation.schema(
            "IQAAdapterLoader", presentation.GENERATE,
            description="Load an IQA-Adapter (quality adapter) file from models/iqa_adapter. Adapters come from "
                        "the IQA-Adapter authors' release (SDXL and SD1.5) or your own training; a JSON file of the "
                        "same name beside it can say which quality metrics it was trained on.",
            inputs=[
                io.Combo.Input("adapter_name", options=folder_paths.get_filename_list(ADAPTER_FOLDER),
                               tooltip="An adapter file in models/iqa_adapter (.safetensors or .bin). Use one made "
                                       "for your checkpoint's family (SDXL or SD1.5)."),
            ],
            outputs=[IQAAdapterType.Output(display_name="adapter")],
        )

    @classmethod
    def validate_inputs(cls, adapter_name=None):
        if adapter_name is None or folder_paths.get_full_path(ADAPTER_FOLDER, adapter_name) is not None:
            return True
        present = folder_paths.get_filename_list(ADAPTER_FOLDER)
        folders = ", ".join(folder_paths.get_folder_paths(ADAPTER_FOLDER))
        listing = (f"files there: {', '.join(present[:20])}{' …' if len(present) > 20 else ''}" if present
                   else "the folder is empty: put an IQA-Adapter .safetensors file there")
        return presentation.invalid("IQAAdapterLoader", "adapter_name",
                                    f"{presentation.quoted(adapter_name)} is not in {folders}; {listing}"
                                    f"{presentation.did_you_mean(adapter_name, present)}")

    @classmethod
    def fingerprint_inputs(cls, adapter_name):
        # The same key as the adapter cache: the node re-runs when the weights or the descriptor change.
        try:
            path = folder_paths.get_full_path(ADAPTER_FOLDER, check_user_path(adapter_name, "adapter_name"))
            return checkpoint.adapter_cache_key(path) if path else None
        except (ValueError, OSError):
            return None  # execute reports it

    @classmethod
    @errors.node_errors("IQAAdapterLoader", "adapter_name")
    def execute(cls, adapter_name) -> io.NodeOutput:
        check_user_path(adapter_name, "adapter_name")
        path = folder_paths.get_full_path(ADAPTER_FOLDER, adapter_name)
        if path is None:
            _fail("IQAAdapterLoader", "adapter_name", f"{presentation.quoted(adapter_name)} not found in models/{ADAPTER_FOLDER}")
        try:
            adapter = load_adapter_cached(path)
        except ValueError as error:
            _fail("IQAAdapterLoader", "adapter_name", str(error))
        return io.NodeOutput(adapter)


QUALITY_CHOICES = [*quality.QUALITY_PRESETS, "custom"]
ENCODE = "IQAAdapterEncodeTarget"


def known_metric_names() -> set[str]:
    return set(metric_catalog.offered_metric_names()) | set(cc3m.known_metrics())


def _slider_percentile(quality_choice: str, percentile: float) -> float:
    return quality.QUALITY_PRESETS.get(quality_choice, float(percentile))


def check_encode_inputs(quality_choice, percentile, targets, mode, negative_scale) -> tuple[str, str] | None:
    """(input, problem) for the first input the encode node cannot use, else None. Shared by queue-time
    validation and execution."""
    if quality_choice not in QUALITY_CHOICES:
        return "quality", f"expected one of {', '.join(QUALITY_CHOICES)}, got {presentation.quoted(quality_choice)}"
    if mode not in quality.TARGET_MODES:
        return "mode", f"expected one of {', '.join(quality.TARGET_MODES)}, got {presentation.quoted(mode)}"
    if not (isinstance(percentile, (int, float)) and 1.0 <= float(percentile) <= 99.0):
        return "percentile", f"expected a percentile from 1 to 99, got {presentation.quoted(percentile)}"
    preset = quality.QUALITY_PRESETS.get(quality_choice)
    if preset is not None and float(percentile) != preset:
        return "percentile", (f"{float(percentile):g} would be ignored while quality is '{quality_choice}' "
                              f"(= {preset:g}); set quality to 'custom' to use the slider")
    if not (isinstance(negative_scale, (int, float)) and math.isfinite(negative_scale)
            and -10.0 <= negative_scale <= 10.0):
        return "negative_scale", f"expected a number from -10 to 10, got {presentation.quoted(negative_scale)}"
    if not str(targets).strip():
        if mode != "percentile":
            return "mode", (f"'{mode}' applies to values typed in 'targets', which is empty; type targets "
                            f"or set mode to percentile")
        return None
    try:
        rows = quality.parse_targets(str(targets))
    except ValueError as error:
        return "targets", str(error)
    known = known_metric_names()
    for number, row in enumerate(rows, start=1):
        for metric, value in row.items():
            if metric not in known:
                return "targets", (f"row {number}: unknown metric {presentation.quoted(metric)}"
                                   f"{presentation.did_you_mean(metric, known)}")
            problem = quality.target_range_problem(value, mode)
            if problem:
                return "targets", f"row {number}, {metric}: {problem}"
    return None


def _row_count(targets: str) -> int:
    try:
        return len(quality.parse_targets(targets)) if str(targets).strip() else 1
    except ValueError:
        return 0


def batch_problem(rows: int, batches: list[tuple[str, int]]) -> str | None:
    for sampler, batch in batches:
        if rows > 1 and batch != rows:
            return (f"{rows} target rows but the latent batch of sampler #{sampler} is {batch}; set its batch "
                    f"size to {rows} (wire this node's 'count' output into it) or use one row")
    return None


def encode_summary(descriptor, rows: list[dict], given: list[dict], mode: str, fallback: float,
                   warnings: list[str]) -> str:
    names = list(descriptor.metrics)
    unit = {"percentile": "percentile", "zscore": "z-score", "raw": "raw score"}[mode]
    lines = [f"**Quality target** ({len(rows)} row{'s' if len(rows) != 1 else ''}, {unit})", "",
             "| row | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for number, (row, typed) in enumerate(zip(rows, given), start=1):
        cells = [f"{row[m]:.4g}" + ("" if m in typed else " (slider)") for m in names]
        lines.append(f"| {number} | " + " | ".join(cells) + " |")
    if any(len(typed) < len(names) for typed in given):
        lines += ["", f"(slider) = percentile {fallback:g} from quality/percentile"]
    lines += [""] + [f"- ⚠ {w}" for w in warnings]
    return "\n".join(lines).rstrip()


class IQAAdapterEncodeTarget(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return presentation.schema(
            ENCODE, presentation.GENERATE,
            description="Choose how good the images should look: a quality preset or a percentile (99 = better "
                        "than 99% of a large photo collection, 1 = worse than 99%). For batches, type one row per "
                        "image in 'targets'; metrics a row leaves out use the preset/slider. Wire 'count' into the "
                        "latent batch size.",
            inputs=[
                IQAAdapterType.Input("adapter", tooltip="From Load Quality Adapter."),
                io.Combo.Input("quality", options=QUALITY_CHOICES, default="best",
                               tooltip="best = 99, high = 90, good = 75, average = 50, low = 25, worst = 1 "
                                       "(percentiles). 'custom' uses the slider below. Start with best."),
                io.Float.Input("percentile", default=99.0, min=1.0, max=99.0, step=1.0,
                               display_mode=io.NumberDisplay.slider,
                               tooltip="Target percentile, 1 (worst) to 99 (best), used when quality is 'custom'; "
                                       "choosing a preset moves it. 90-99 for clean, detailed images."),
                io.String.Input("targets", default="", multiline=True,
                                tooltip="Optional, for batches and studies: one row per image, e.g. "
                                        "'topiq_nr=99, laion_aes=50' (rows separated by new lines or ';'). "
                                        "Metrics a row leaves out use the percentile above. Empty = one image "
                                        "at the percentile above."),
                io.Combo.Input("mode", options=list(quality.TARGET_MODES), default="percentile",
                               tooltip="Units of the numbers typed in 'targets': percentile (1-99), zscore "
                                       "(about -3 to 3; beyond ±4 warns) or raw (the metric's own scale)."),
                io.Float.Input("negative_scale", default=0.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="0 (recommended; the authors' default) = neutral negative. Above 0 also "
                                       "pushes away from low quality: the authors use 0.5 when they turn it on "
                                       "(try 0.5-1); too high over-sharpens."),
            ],
            outputs=[QualityTokensType.Output(display_name="tokens"),
                     io.Int.Output(display_name="count", tooltip="Number of target rows: wire into batch_size.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, quality=None, percentile=None, targets=None, mode=None, negative_scale=None):
        values = (quality, percentile, targets, mode, negative_scale)
        if any(v is None for v in values):  # wired from another node: checked when the node runs
            return True
        problem = check_encode_inputs(*values)
        if problem is None:
            problem = ("targets", batch_problem(_row_count(targets), graph.recorded_batches(
                cls.hidden.unique_id if cls.hidden else None,
                {"quality": quality, "percentile": percentile, "targets": targets, "mode": mode})))
        if problem[1] is None:
            return True
        return presentation.invalid(ENCODE, *problem)

    @classmethod
    @errors.node_errors(ENCODE, "targets")
    def execute(cls, adapter, quality, percentile, targets, mode, negative_scale) -> io.NodeOutput:
        node = ENCODE
        descriptor = adapter.descriptor
        if descriptor.kind != "score":
            _fail(node, "adapter", "this is a reference-image adapter; use Quality From Reference Image instead")
        problem = check_encode_inputs(quality, percentile, targets, mode, negative_scale)
        if problem:
            _fail(node, *problem)
        fallback = _slider_percentile(quality, percentile)
        limit = projection.max_rows_for(adapter.info, host_batch_cap())
        given = quality_module.parse_targets(targets, limit) if targets.strip() else [{}]
        try:
            rows = quality_module.complete_rows(descriptor, given, fallback, mode)
            vectors = quality_module.build_quality_vector(descriptor, rows, mode)
            labels = [quality_module.describe_target(descriptor, row, mode) for row in rows]
            tokens = iqa_adapter.encode_tokens(adapter, vectors, float(negative_scale), labels)
        except ValueError as error:
            _fail(node, "targets" if targets.strip() else "percentile", str(error))
        warnings = [w for row in given for value in row.values()
                    if (w := quality_module.target_warning(value, mode))]
        summary = encode_summary(descriptor, rows, given, mode, fallback, list(dict.fromkeys(warnings)))
        return io.NodeOutput(tokens, len(rows), ui=presentation.markdown(summary))


class IQAAdapterApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return presentation.schema(
            "IQAAdapterApply", presentation.GENERATE,
            description="Make the model follow the quality target while sampling (works beside IPAdapter and "
                        "other patches; the input model itself is left unchanged).",
            inputs=[
                io.Model.Input("model"),
                IQAAdapterType.Input("adapter", tooltip="From Load Quality Adapter."),
                QualityTokensType.Input("tokens", tooltip="From Quality Target: one row for every image, or one "
                                                          "row per image of the batch."),
                io.Float.Input("weight", default=1.0, min=-2.0, max=5.0, step=0.05,
                               tooltip="How strongly quality steers the image. 1 = as trained and the authors' "
                                       "default (with 30 steps, CFG 7.5 on SD1.5, 5.0 on SDXL; suggested "
                                       "0.8-1.2); 0 = off."),
                io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="When to start, as a fraction of the steps (0 = from the first step)."),
                io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="When to stop, as a fraction of the steps (1 = until the last step)."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def validate_inputs(cls, start_at=None, end_at=None):
        return presentation.check_schedule("IQAAdapterApply", start_at, end_at)

    @classmethod
    @errors.node_errors("IQAAdapterApply", "tokens")
    def execute(cls, model, adapter, tokens, weight, start_at, end_at) -> io.NodeOutput:
        return io.NodeOutput(adapter_patch.apply_iqa_adapter(model, adapter, tokens, weight, start_at, end_at,
                                                             host_batch_cap()))


def _resolve_inside(base: str, relative: str) -> pathlib.Path | None:
    base_path = pathlib.Path(base).resolve()
    path = (base_path / relative).resolve()
    return path if path.is_relative_to(base_path) else None


class IQAAdapterSaveTokens(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return presentation.schema(
            "IQAAdapterSaveTokens", presentation.TOKENS,
            description="Save quality tokens (with the targets they stand for) as .safetensors in the output "
                        "folder, to reuse them without the adapter's projection.",
            inputs=[
                QualityTokensType.Input("tokens"),
                io.String.Input("filename_prefix", default="iqa_tokens/tokens",
                                tooltip="Path prefix inside the output folder."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    @errors.node_errors("IQAAdapterSaveTokens", "filename_prefix")
    def execute(cls, tokens, filename_prefix) -> io.NodeOutput:
        check_user_path(filename_prefix, "filename_prefix")
        output_dir = folder_paths.get_output_directory()
        try:
            full_folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, output_dir)
        except Exception as error:  # noqa: BLE001 - the host raises a bare Exception for prefixes leaving output/
            _fail("IQAAdapterSaveTokens", "filename_prefix", str(error))
        name = f"{filename}_{counter:05}_{TOKENS_EXTENSION}"
        os.makedirs(full_folder, exist_ok=True)
        tokens.save(os.path.join(full_folder, name))
        return io.NodeOutput(ui={"tokens": [{"filename": name, "subfolder": subfolder, "type": "output"}]})


def _token_files() -> list[str]:
    """Candidates for the loader: safetensors in output/ (annotated ' [output]') and input/."""
    found = []
    for base, suffix in ((folder_paths.get_output_directory(), " [output]"), (folder_paths.get_input_directory(), "")):
        if not os.path.isdir(base):
            continue
        for root, _, files in os.walk(base, followlinks=False):
            for file in files:
                if file.endswith(TOKENS_EXTENSION):
                    rel = os.path.relpath(os.path.join(root, file), base).replace(os.sep, "/")
                    found.append(rel + suffix)
    return sorted(found)


def _token_path(file: str) -> pathlib.Path | None:
    relative, base = folder_paths.annotated_filepath(file)
    return _resolve_inside(base or folder_paths.get_input_directory(), relative)


class IQAAdapterLoadTokens(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return presentation.schema(
            "IQAAdapterLoadTokens", presentation.TOKENS,
            description="Load quality tokens saved by Save Quality Tokens (from the output or input folder).",
            inputs=[
                io.Combo.Input("file", options=_token_files(),
                               tooltip="A tokens .safetensors file; '[output]' marks files in the output folder."),
            ],
            outputs=[QualityTokensType.Output(display_name="tokens")],
        )

    @classmethod
    def fingerprint_inputs(cls, file):
        try:
            path = _token_path(check_user_path(file, "file"))
            return _file_fingerprint(str(path)) if path else None
        except (ValueError, OSError):
            return None  # execute reports it

    @classmethod
    @errors.node_errors("IQAAdapterLoadTokens", "file")
    def execute(cls, file) -> io.NodeOutput:
        path = _token_path(check_user_path(file, "file"))
        if path is None:
            _fail("IQAAdapterLoadTokens", "file", f"{presentation.quoted(file)} points outside the input/output folders")
        try:
            tokens = projection.QualityTokens.load(path, host_batch_cap())
        except ValueError as error:
            _fail("IQAAdapterLoadTokens", "file", str(error))
        return io.NodeOutput(tokens)


NODES = [IQAAdapterLoader, IQAAdapterEncodeTarget, IQAAdapterApply, IQAAdapterSaveTokens, IQAAdapterLoadTokens]
