"""IQA-Adapter nodes: load an adapter, encode quality targets into tokens, apply them to a model, save/load tokens.

Thin glue: reading/validating files is adapter/checkpoint.py, targets -> vectors adapter/quality.py,
tokens adapter/iqa_adapter.py, the attention patch nodes/adapter_patch.py.
"""
from __future__ import annotations

import os
import pathlib
import threading

import folder_paths
from comfy_api.latest import io

from ..adapter import checkpoint, errors, iqa_adapter, projection
from ..adapter import quality as quality_module  # 'quality' is also the encode node's input name
from ..adapter.errors import InputError
from ..adapter.files import check_user_path, file_signature
from . import adapter_patch, graph, inputs, presentation, types
from .limits import host_batch_cap
from .paths import ADAPTER_FOLDER

TOKENS_EXTENSION = ".safetensors"

# Loaded adapters by weights file and descriptor (checkpoint.adapter_cache_key): a replaced weights file or an
# edited, broken or deleted sidecar JSON is read again.
_ADAPTER_CACHE: dict[tuple, iqa_adapter.IQAAdapter] = {}
_ADAPTER_CACHE_LOCK = threading.Lock()
_ADAPTER_CACHE_SIZE = 4


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
            outputs=[types.Adapter.Output(display_name="adapter")],
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
                                    f"{errors.quote(adapter_name)} is not in {folders}; {listing}"
                                    f"{errors.did_you_mean(adapter_name, present)}")

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
            raise InputError(f"{errors.quote(adapter_name)} not found in models/{ADAPTER_FOLDER}", "adapter_name")
        return io.NodeOutput(load_adapter_cached(path))


ENCODE = "IQAAdapterEncodeTarget"


def encode_summary(descriptor, encoded: quality_module.EncodedTargets, mode: str) -> str:
    names, rows = list(descriptor.metrics), encoded.rows
    unit = {"percentile": "percentile", "zscore": "z-score", "raw": "raw score"}[mode]
    lines = [f"**Quality target** ({len(rows)} row{'s' if len(rows) != 1 else ''}, {unit})", "",
             "| row | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for number, (row, typed) in enumerate(zip(rows, encoded.typed), start=1):
        cells = [f"{row[m]:.4g}" + ("" if m in typed else " (slider)") for m in names]
        lines.append(f"| {number} | " + " | ".join(cells) + " |")
    if any(len(typed) < len(names) for typed in encoded.typed):
        lines += ["", f"(slider) = percentile {encoded.fallback:g} from quality/percentile"]
    lines += [""] + [f"- ⚠ {w}" for w in encoded.warnings]
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
                types.Adapter.Input("adapter", tooltip="From Load Quality Adapter."),
                io.Combo.Input("quality", options=list(quality_module.QUALITY_CHOICES), default="best",
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
                io.Combo.Input("mode", options=list(quality_module.TARGET_MODES), default="percentile",
                               tooltip="Units of the numbers typed in 'targets': percentile (1-99), zscore "
                                       "(about -3 to 3; beyond ±4 warns) or raw (the metric's own scale)."),
                io.Float.Input("negative_scale", default=0.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="0 (recommended; the authors' default) = neutral negative. Above 0 also "
                                       "pushes away from low quality: the authors use 0.5 when they turn it on "
                                       "(try 0.5-1); too high over-sharpens."),
            ],
            outputs=[types.QualityTokens.Output(display_name="tokens"),
                     io.Int.Output(display_name="count", tooltip="Number of target rows: wire into batch_size.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, quality=None, percentile=None, targets=None, mode=None, negative_scale=None):
        values = (quality, percentile, targets, mode, negative_scale)
        if any(v is None for v in values):  # wired from another node: checked when the node runs
            return True
        return presentation.validation(ENCODE, cls._check_queued, *values)

    @classmethod
    def _check_queued(cls, quality, percentile, targets, mode, negative_scale) -> None:
        rows = quality_module.check_target_inputs(quality, percentile, targets, mode, negative_scale)
        graph.check_batches(cls.hidden.unique_id if cls.hidden else None,
                            {"quality": quality, "percentile": percentile, "targets": targets, "mode": mode},
                            max(1, len(rows)), "targets")

    @classmethod
    @errors.node_errors(ENCODE, "targets")
    def execute(cls, adapter, quality, percentile, targets, mode, negative_scale) -> io.NodeOutput:
        encoded = quality_module.target_tokens(adapter, quality, percentile, targets, mode, negative_scale,
                                               projection.max_rows_for(adapter.info, host_batch_cap()))
        summary = encode_summary(adapter.descriptor, encoded, mode)
        return io.NodeOutput(encoded.tokens, len(encoded.rows), ui=presentation.markdown(summary))


class IQAAdapterApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return presentation.schema(
            "IQAAdapterApply", presentation.GENERATE,
            description="Make the model follow the quality target while sampling (works beside IPAdapter and "
                        "other patches; the input model itself is left unchanged).",
            inputs=[
                io.Model.Input("model"),
                types.Adapter.Input("adapter", tooltip="From Load Quality Adapter."),
                types.QualityTokens.Input("tokens", tooltip="From Quality Target: one row for every image, or one "
                                                          "row per image of the batch."),
                io.Float.Input("weight", default=1.0, min=-2.0, max=5.0, step=0.05,
                               tooltip="How strongly quality steers the image. 1 = as trained and the authors' "
                                       "default (with 30 steps, CFG 7.5 on SD1.5, 5.0 on SDXL; suggested "
                                       "0.8-1.2); 0 = off."),
                *inputs.schedule_inputs(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def validate_inputs(cls, start_at=None, end_at=None):
        return presentation.validation("IQAAdapterApply", inputs.check_schedule, start_at, end_at)

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
                types.QualityTokens.Input("tokens"),
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
            raise InputError(str(error), "filename_prefix") from None
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
            outputs=[types.QualityTokens.Output(display_name="tokens")],
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
            raise InputError(f"{errors.quote(file)} points outside the input/output folders", "file")
        return io.NodeOutput(projection.QualityTokens.load(path, host_batch_cap()))


NODES = [IQAAdapterLoader, IQAAdapterEncodeTarget, IQAAdapterApply, IQAAdapterSaveTokens, IQAAdapterLoadTokens]
