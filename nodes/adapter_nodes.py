"""IQA-Adapter nodes: load an adapter, encode quality targets into tokens, apply them to a model, save/load tokens.

Thin glue: reading/validating files is adapter/checkpoint.py, targets -> vectors adapter/quality.py,
tokens adapter/projection.py, the attention patch nodes/adapter_patch.py.
"""
from __future__ import annotations

import math
import os
import pathlib
import threading

import folder_paths
from comfy_api.latest import io

from ..adapter import checkpoint, errors, projection, quality
from ..adapter.errors import quote
from ..adapter.files import check_user_path, file_signature
from . import adapter_patch
from .limits import host_batch_cap
from .paths import ADAPTER_FOLDER

CATEGORY = "IQA-Adapter"
IQAAdapterType = io.Custom("IQA_ADAPTER")
QualityTokensType = io.Custom("QUALITY_TOKENS")
TOKENS_EXTENSION = ".safetensors"

# Loaded adapters by file signature (files.file_signature): a replaced file is read again.
_ADAPTER_CACHE: dict[tuple, checkpoint.IQAAdapter] = {}
_ADAPTER_CACHE_LOCK = threading.Lock()
_ADAPTER_CACHE_SIZE = 4


_fail = errors.fail  # raises `Node: input: message` (errors.NodeInputError, a ValueError)


def load_adapter_cached(path: str) -> checkpoint.IQAAdapter:
    """Keyed by the weights' and the sidecar's signatures: a changed descriptor is read again too."""
    sidecar = os.path.splitext(path)[0] + ".json"
    key = (checkpoint.adapter_cache_key(path), _file_fingerprint(sidecar))
    with _ADAPTER_CACHE_LOCK:
        cached = _ADAPTER_CACHE.get(key)
    if cached is not None:
        return cached
    adapter = checkpoint.load_adapter(path)
    with _ADAPTER_CACHE_LOCK:
        for stale in [k for k in _ADAPTER_CACHE if k[0][0] == key[0][0]]:
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
        return io.Schema(
            node_id="IQAAdapterLoader",
            display_name="IQA-Adapter Loader",
            category=CATEGORY,
            description="Load an IQA-Adapter checkpoint (.safetensors or .bin) from models/iqa_adapter. "
                        "Its metrics come from a sidecar JSON next to the file or the built-in catalog.",
            inputs=[
                io.Combo.Input("adapter_name", options=folder_paths.get_filename_list(ADAPTER_FOLDER),
                               tooltip="Adapter weights in models/iqa_adapter (+ optional <name>.json descriptor)."),
            ],
            outputs=[IQAAdapterType.Output(display_name="adapter")],
        )

    @classmethod
    def fingerprint_inputs(cls, adapter_name):
        try:
            path = folder_paths.get_full_path(ADAPTER_FOLDER, check_user_path(adapter_name, "adapter_name"))
            sidecar = os.path.splitext(path)[0] + ".json" if path else None
            return (_file_fingerprint(path), _file_fingerprint(sidecar))
        except (ValueError, OSError):
            return None  # execute reports it

    @classmethod
    @errors.node_errors("IQAAdapterLoader", "adapter_name")
    def execute(cls, adapter_name) -> io.NodeOutput:
        check_user_path(adapter_name, "adapter_name")
        path = folder_paths.get_full_path(ADAPTER_FOLDER, adapter_name)
        if path is None:
            _fail("IQAAdapterLoader", "adapter_name", f"{quote(adapter_name)} not found in models/{ADAPTER_FOLDER}")
        try:
            adapter = load_adapter_cached(path)
        except ValueError as error:
            _fail("IQAAdapterLoader", "adapter_name", str(error))
        return io.NodeOutput(adapter)


class IQAAdapterEncodeTarget(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IQAAdapterEncodeTarget",
            display_name="IQA-Adapter Encode Target",
            category=CATEGORY,
            description="Turn quality targets into the adapter's quality tokens. One row = one target; "
                        "several rows make a batch (row i conditions latent i).",
            inputs=[
                IQAAdapterType.Input("adapter"),
                io.String.Input("targets", default="", multiline=True,
                                tooltip="metric=value pairs, e.g. 'topiq_nr=99, laion_aes=90'. Rows separated by ';' "
                                        "or new lines form a batch. Empty: every metric gets 'target'."),
                io.Float.Input("target", default=99.0, min=-1000.0, max=1000.0, step=0.5,
                               tooltip="Used for every metric when 'targets' is empty."),
                io.Combo.Input("mode", options=list(quality.TARGET_MODES), default="percentile",
                               tooltip="percentile: CC3M percentile in (0, 100); zscore: normalised value; "
                                       "raw: the metric's own units."),
                io.Float.Input("negative_scale", default=0.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="0: unconditional tokens = projection(0) (default). k > 0: projection(-k * v), "
                                       "negative quality guidance (pushes scores, may over-stylise)."),
            ],
            outputs=[QualityTokensType.Output(display_name="tokens")],
        )

    @classmethod
    @errors.node_errors("IQAAdapterEncodeTarget", "targets")
    def execute(cls, adapter, targets, target, mode, negative_scale) -> io.NodeOutput:
        node = "IQAAdapterEncodeTarget"
        descriptor = adapter.descriptor
        if descriptor.kind != "score":
            _fail(node, "adapter", "this is a reference-image adapter; encode a reference image with "
                                   "IQAAdapterEncodeReference instead")
        if mode not in quality.TARGET_MODES:
            _fail(node, "mode", f"must be one of {list(quality.TARGET_MODES)}, got {quote(mode)}")
        if not math.isfinite(negative_scale):
            _fail(node, "negative_scale", f"expected a finite number, got {negative_scale}")
        if targets.strip():
            source = "targets"
            try:
                rows = quality.parse_targets(targets, projection.max_rows_for(adapter.info, host_batch_cap()))
            except ValueError as error:
                _fail(node, source, str(error))
        else:
            source = "target"
            rows = [{metric: float(target) for metric in descriptor.metrics}]
        for row_number, row in enumerate(rows, start=1):
            for metric, value in row.items():
                if mode == "percentile" and not 0.0 < value < 100.0:
                    where = f" ({metric}, row {row_number})" if source == "targets" else ""
                    _fail(node, source, f"percentile must be in (0, 100), got {value:g}{where}")
        try:
            vectors = quality.build_quality_vector(descriptor, rows, mode)
            labels = [quality.describe_target(descriptor, row, mode) for row in rows]
            tokens = projection.encode_tokens(adapter, vectors, float(negative_scale), labels)
        except ValueError as error:
            _fail(node, source, str(error))
        return io.NodeOutput(tokens)


class IQAAdapterApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IQAAdapterApply",
            display_name="IQA-Adapter Apply",
            category=CATEGORY,
            description="Patch every cross-attention layer of the model with the adapter's decoupled attention "
                        "(returns a patched copy; the input model is untouched).",
            inputs=[
                io.Model.Input("model"),
                IQAAdapterType.Input("adapter"),
                QualityTokensType.Input("tokens", tooltip="1 target for every image, or one per latent in the batch."),
                io.Float.Input("weight", default=1.0, min=-2.0, max=5.0, step=0.05,
                               tooltip="Adapter scale (lambda). 1 = as trained; 0 = no effect."),
                io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule where the adapter starts acting."),
                io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule where the adapter stops acting."),
            ],
            outputs=[io.Model.Output()],
        )

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
        return io.Schema(
            node_id="IQAAdapterSaveTokens",
            display_name="IQA-Adapter Save Tokens",
            category=CATEGORY,
            description="Save quality tokens (cond + uncond, with their target labels) as .safetensors in the "
                        "output folder.",
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
        return io.Schema(
            node_id="IQAAdapterLoadTokens",
            display_name="IQA-Adapter Load Tokens",
            category=CATEGORY,
            description="Load quality tokens saved by IQA-Adapter Save Tokens (from the output or input folder).",
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
            _fail("IQAAdapterLoadTokens", "file", f"{quote(file)} points outside the input/output folders")
        try:
            tokens = projection.QualityTokens.load(path, host_batch_cap())
        except ValueError as error:
            _fail("IQAAdapterLoadTokens", "file", str(error))
        return io.NodeOutput(tokens)


NODES = [IQAAdapterLoader, IQAAdapterEncodeTarget, IQAAdapterApply, IQAAdapterSaveTokens, IQAAdapterLoadTokens]
