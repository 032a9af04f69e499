"""The bad adapter files, one matrix for every level: the core reader (test_adapter_core.py) and the Load
Quality Adapter node in the real server (test_reliability.py) read each and must give the same clear error.

Each case turns a valid adapter state dict (released layout, any widths) into the bytes of a broken file.
"""
from __future__ import annotations

import dataclasses
import io
import json
import pathlib
import pickle
import struct
from collections.abc import Callable

import torch
from safetensors.torch import save as safetensors_bytes

from comfyui_iqa_adapter.scripts import random_weights


class RunsCode:
    """Unpickling this touches `marker` (what a malicious .bin does, harmlessly): the file must stay absent."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@dataclasses.dataclass(frozen=True)
class BadFile:
    name: str
    ext: str
    build: Callable[[dict, str], bytes]  # (valid state dict, marker path for pickles) -> file bytes
    needles: tuple[str, ...]  # each appears in the error, whoever reads the file


def raw_safetensors(header: bytes, data: bytes = b"") -> bytes:
    """A safetensors file with exactly this header text (no padding, no checks)."""
    return struct.pack("<Q", len(header)) + header + data


def torch_bytes(payload) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def _edited(edit: Callable[[dict], None]) -> Callable[[dict, str], bytes]:
    """A builder: the state dict, changed in place by `edit`, as safetensors."""
    def build(state: dict, _marker: str) -> bytes:
        state = {key: value.clone() for key, value in state.items()}
        edit(state)
        return safetensors_bytes(state)
    return build


def _torch_file(edit: Callable[[dict], None]) -> Callable[[dict, str], bytes]:
    """A builder: the state dict in the authors' nested .bin layout, `edit` applied to it."""
    def build(state: dict, _marker: str) -> bytes:
        nested = random_weights.nested_bin_layout(state)
        edit(nested)
        return torch_bytes(nested)
    return build


def _set(key: str, make: Callable[[dict], torch.Tensor]) -> Callable[[dict], None]:
    return lambda state: state.__setitem__(key, make(state))


def _drop(*keys: str) -> Callable[[dict], None]:
    def edit(state: dict) -> None:
        for key in keys:
            del state[key]
    return edit


def _nan(state: dict) -> None:
    state["image_proj.proj.bias"][0] = float("nan")


def _even_layer(state: dict) -> None:
    for name in ("to_k_ip", "to_v_ip"):
        state[f"ip_adapter.2.{name}.weight"] = torch.zeros_like(state[f"ip_adapter.1.{name}.weight"])


def _other_context(state: dict) -> None:
    width, context = state["ip_adapter.1.to_k_ip.weight"].shape
    for name in ("to_k_ip", "to_v_ip"):
        state[f"ip_adapter.1.{name}.weight"] = torch.zeros(width, context - 4)


def _rows_not_tokens(state: dict) -> None:
    state["image_proj.proj.weight"] = torch.zeros(100, state["image_proj.proj.weight"].shape[1])
    state["image_proj.proj.bias"] = torch.zeros(100)


def _zero_stride(nested: dict) -> None:
    """Every tensor a view of one stored float; one claims 10 GB once expanded."""
    for part in nested.values():
        for key, value in part.items():
            part[key] = torch.zeros(1).expand(*value.shape)
    nested["ip_adapter"]["1.to_k_ip.weight"] = torch.zeros(1).expand(50_000, 50_000)


def _truncated(keep: Callable[[int], int]) -> Callable[[dict, str], bytes]:
    def build(state: dict, _marker: str) -> bytes:
        data = safetensors_bytes(state)
        return data[:keep(len(data))]
    return build


def _pickled_bin(state: dict, marker: str) -> bytes:
    nested = random_weights.nested_bin_layout(state)
    nested["image_proj"]["hook"] = RunsCode(marker)
    return torch_bytes(nested)


BAD_FILES = [
    BadFile("truncated_half", ".safetensors", _truncated(lambda n: n // 2), ("truncated",)),
    BadFile("truncated_5_bytes", ".safetensors", _truncated(lambda n: 5), ("truncated",)),
    BadFile("empty", ".safetensors", lambda state, marker: b"", ("empty",)),
    BadFile("header_lies_about_sizes", ".safetensors", lambda state, marker: raw_safetensors(json.dumps(
        {"image_proj.proj.weight": {"dtype": "F32", "shape": [1536, 2], "data_offsets": [0, 1536 * 2 * 4]}}).encode(),
        b"\0" * 16), ("image_proj.proj.weight", "data section has 16 bytes")),
    BadFile("header_longer_than_file", ".safetensors", lambda state, marker: struct.pack("<Q", 10 ** 12) + b"{}",
            ("header claims",)),
    BadFile("header_not_json", ".safetensors", lambda state, marker: raw_safetensors(b"\xff" * 16), ("not JSON",)),
    BadFile("header_nested_too_deeply", ".safetensors",
            lambda state, marker: raw_safetensors(b"[" * 100_000 + b"]" * 100_000), ("nested too deeply",)),
    BadFile("offsets_disagree_with_shape", ".safetensors", lambda state, marker: raw_safetensors(json.dumps(
        {"w": {"dtype": "F32", "shape": [8], "data_offsets": [0, 16]}}).encode(), b"\0" * 16), ("'w'",)),
    BadFile("infinite_dimension", ".safetensors", lambda state, marker: raw_safetensors(
        b'{"image_proj.proj.weight": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}}', b"\0" * 8),
        ("corrupt",)),
    BadFile("integer_dtype", ".safetensors",
            _edited(_set("ip_adapter.3.to_k_ip.weight", lambda s: s["ip_adapter.3.to_k_ip.weight"].to(torch.int32))),
            ("ip_adapter.3.to_k_ip.weight", "int32")),
    BadFile("nan_weight", ".safetensors", _edited(_nan), ("image_proj.proj.bias", "NaN")),
    BadFile("layer_missing", ".safetensors",
            _edited(_drop("ip_adapter.3.to_k_ip.weight", "ip_adapter.3.to_v_ip.weight")),
            ("ip_adapter.3.to_k_ip.weight", "missing")),
    BadFile("half_a_layer", ".safetensors", _edited(_drop("ip_adapter.5.to_v_ip.weight")),
            ("ip_adapter.5.to_v_ip.weight",)),
    BadFile("even_layer_index", ".safetensors", _edited(_even_layer), ("ip_adapter.2",)),
    BadFile("unknown_layer_key", ".safetensors",
            _edited(_set("ip_adapter.1.to_out_ip.weight", lambda s: torch.zeros(4, 4))),
            ("ip_adapter.1.to_out_ip.weight",)),
    BadFile("unknown_projection_key", ".safetensors", _edited(_set("image_proj.extra", lambda s: torch.zeros(3))),
            ("image_proj.extra",)),
    BadFile("foreign_key", ".safetensors", _edited(_set("text_encoder.weight", lambda s: torch.zeros(3))),
            ("text_encoder.weight",)),
    BadFile("key_value_widths_differ", ".safetensors", _edited(_set(
        "ip_adapter.3.to_v_ip.weight", lambda s: torch.zeros(s["ip_adapter.3.to_v_ip.weight"].shape[0] - 8,
                                                             s["ip_adapter.3.to_v_ip.weight"].shape[1]))),
            ("ip_adapter.3.to_v_ip.weight", "differs")),
    BadFile("layer_context_differs", ".safetensors", _edited(_other_context), ("ip_adapter.1.to_k_ip.weight", "C=")),
    BadFile("projection_rows_not_tokens", ".safetensors", _edited(_rows_not_tokens),
            ("image_proj.proj.weight", "multiple of C=")),
    BadFile("not_a_torch_file", ".bin", lambda state, marker: b"this is not a torch file at all",
            ("cannot read torch file",)),
    BadFile("pickle_in_torch_file", ".bin", _pickled_bin, ("refused",)),
    BadFile("plain_pickle", ".bin", lambda state, marker: pickle.dumps({"image_proj": RunsCode(marker)}),
            ("not a torch zip file", "refused")),
    BadFile("zero_stride_views", ".bin", _torch_file(_zero_stride), ("expanded view", "refused before allocating")),
    BadFile("sparse_tensor", ".bin", _torch_file(lambda nested: nested["image_proj"].__setitem__(
        "norm.bias", torch.sparse_coo_tensor([[0]], [1.0], (4,), check_invariants=False))), ("sparse",)),
    BadFile("meta_tensor", ".bin", _torch_file(
        lambda nested: nested["image_proj"].__setitem__("norm.bias", torch.empty(4, device="meta"))), ("meta",)),
]
BAD_FILES_BY_NAME = {case.name: case for case in BAD_FILES}
