"""How the pack's nodes present themselves: sub-categories, display names, search aliases, and the text
a node shows on the canvas after Run (Markdown, rendered by web/js/iqa_scores.js).

Node class ids never change here (saved workflows name them); display names may.
"""
from __future__ import annotations

import dataclasses

from comfy_api.latest import io

from ..adapter import errors

ROOT = "IQA-Adapter"
GENERATE, TOKENS, SCORE, SWEEP, GUIDANCE = (f"{ROOT}/{part}" for part in ("generate", "tokens", "score", "sweep",
                                                                          "guidance"))

DISPLAY_NAMES = {
    "IQAAdapterLoader": "Load Quality Adapter",
    "IQAAdapterEncodeTarget": "Quality Target",
    "IQAAdapterApply": "Apply Quality Adapter",
    "IQAAdapterEncodeReference": "Quality From Reference Image",
    "IQAAdapterSaveTokens": "Save Quality Tokens",
    "IQAAdapterLoadTokens": "Load Quality Tokens",
    "IQAMetricLoader": "Load Quality Metric",
    "IQAScore": "Quality Score",
    "IQAGradientGuidance": "Quality Guidance (gradient)",
    "IQATargetSweep": "Quality Target Sweep",
    "IQASweepReport": "Quality Sweep Report",
}
errors.NODE_NAMES.update(DISPLAY_NAMES)  # run-time errors name nodes as users see them
SEARCH_ALIASES = ["quality", "iqa", "aesthetic", "image quality", "iqa-adapter", "ip-adapter quality"]
_SCHEMA_FIELDS = {field.name for field in dataclasses.fields(io.Schema)}


def schema(node_id: str, category: str, **fields) -> io.Schema:
    """io.Schema with the pack's display name; fields this host's Schema lacks (search_aliases before
    0.4x) are left out instead of failing."""
    fields.setdefault("search_aliases", SEARCH_ALIASES)
    supported = {k: v for k, v in fields.items() if k in _SCHEMA_FIELDS}
    return io.Schema(node_id=node_id, display_name=DISPLAY_NAMES[node_id], category=category, **supported)


def invalid(node_id: str, input_name: str, message: str) -> str:
    """A queue-time refusal (the host's HTTP 400 lists it under the node's id), worded as run-time errors are:
    'Display Name: input: what was expected'."""
    return str(errors.NodeInputError(node_id, input_name, message))


def validation(node_id: str, check, *args, **kwargs) -> bool | str:
    """validate_inputs' answer from a check that raises InputError: True, or the refusal naming its input.
    The host skips its own range checks for inputs a node validates itself, so checks cover ranges too."""
    try:
        check(*args, **kwargs)
    except errors.InputError as error:
        return invalid(node_id, error.input_name or "inputs", str(error))
    return True


def markdown(text: str) -> dict:
    """ui entry the frontend shows on the node (web/js/iqa_scores.js renders it as Markdown)."""
    return {"text": [text]}
