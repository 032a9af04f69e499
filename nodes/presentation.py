"""How the pack's nodes present themselves: sub-categories, display names, search aliases, and the text
a node shows on the canvas after Run (Markdown, rendered by web/js/iqa_scores.js).

Node class ids never change here (saved workflows name them); display names may.
"""
from __future__ import annotations

import dataclasses
import difflib

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
MAX_QUOTED = 60


def schema(node_id: str, category: str, **fields) -> io.Schema:
    """io.Schema with the pack's display name; fields this host's Schema lacks (search_aliases before
    0.4x) are left out instead of failing."""
    fields.setdefault("search_aliases", SEARCH_ALIASES)
    supported = {k: v for k, v in fields.items() if k in _SCHEMA_FIELDS}
    return io.Schema(node_id=node_id, display_name=DISPLAY_NAMES[node_id], category=category, **supported)


def quoted(value) -> str:
    """User input inside a message: quoted, truncated, never a Python repr of a container."""
    text = str(value)
    if len(text) > MAX_QUOTED:
        text = text[:MAX_QUOTED] + "…"
    return f"'{text}'"


def did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(quoted(c) for c in close)}?" if close else ""


def invalid(node_id: str, input_name: str, message: str) -> str:
    """'Display Name: input: what was expected' — for queue-time refusals (the host's HTTP 400 lists it under
    the node's id) and run-time errors alike."""
    return f"{DISPLAY_NAMES.get(node_id, node_id)}: {input_name}: {message}"


def check_schedule(node: str, start_at, end_at):
    """Queue-time check of a start/end fraction pair (the host skips its own range check for inputs a
    node validates itself)."""
    for name, value in (("start_at", start_at), ("end_at", end_at)):
        if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
            return invalid(node, name, f"expected a fraction from 0 to 1, got {quoted(value)}")
    if start_at is not None and end_at is not None and start_at > end_at:
        return invalid(node, "start_at", f"start_at ({start_at:g}) is after end_at ({end_at:g}); "
                                                      f"start must not be later than end")
    return True


def markdown(text: str) -> dict:
    """ui entry the frontend shows on the node (web/js/iqa_scores.js renders it as Markdown)."""
    return {"text": [text]}
