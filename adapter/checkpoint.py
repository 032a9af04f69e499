"""Read and validate IQA-Adapter weight files; infer the architecture from tensor shapes.

Release layouts (IP-Adapter convention):
- `.safetensors`: flat keys `image_proj.<name>` and `ip_adapter.<2k+1>.to_{k,v}_ip.weight`;
- `.bin` / `.pt` / `.pth`: a torch pickle `{"image_proj": {...}, "ip_adapter": {...}}` (a flat dict with
  the prefixes is accepted too). Read with `torch.load(weights_only=True)` only: a pickle that would
  run code is refused by torch before anything runs.

Nothing but tensors is stored: projection kind, N (tokens), D_in, C (cross-attention dim), the MLP
width and every layer's width are read off the shapes. Layer k (diffusers attn_processors order)
is checkpoint key 2k+1. Everything here is pure: caching is the caller's business (`adapter_cache_key`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import re
import struct
from dataclasses import dataclass

import torch

from . import tensor_files, training_layout
from .descriptor import check_input_dim, descriptor_from_dict, sidecar_path
from .errors import InputError, quote
from .files import file_signature
from .layers import SD15_LAYER_WIDTHS, SDXL_LAYER_WIDTHS

PICKLE_EXTENSIONS = {".bin", ".pt", ".pth", ".ckpt"}
SAFETENSORS_EXTENSIONS = {".safetensors", ".sft"}
LINEAR_KEYS = {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}
MLP_KEYS = {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias", "norm.weight", "norm.bias"}
LAYER_KEY = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip)\.weight$")


class AdapterFileError(InputError):
    """A weights file that is not a valid IQA-Adapter checkpoint; the message names the file and the key."""

    def __init__(self, path: str | os.PathLike, message: str):
        self.path = str(path)
        shown = self.path if len(self.path) <= 300 else "..." + self.path[-300:]
        super().__init__(f"IQA-Adapter file {shown}: {message}")


@dataclass(frozen=True)
class AdapterInfo:
    projection_kind: str  # 'linear' | 'mlp'
    num_tokens: int  # N
    input_dim: int  # D_in
    cross_attention_dim: int  # C
    num_layers: int
    layer_widths: list[int]  # hidden size of cross-attention layer k (diffusers order)
    mlp_hidden_dim: int | None  # H for 'mlp', None for 'linear'
    base: str  # 'sd15' | 'sdxl' | 'custom'
    dtype: str = "float32"  # dtype stored in the file (tensors are returned as fp32)


@dataclass
class AdapterWeights:
    info: AdapterInfo
    image_proj: dict[str, torch.Tensor]  # keys without the `image_proj.` prefix, fp32 CPU
    to_k_ip: list[torch.Tensor]  # by layer position k, fp32 CPU, (hidden_k, C)
    to_v_ip: list[torch.Tensor]


def adapter_cache_key(path: str | os.PathLike) -> tuple:
    """What a loaded adapter depends on: the weights' file signature (files.file_signature: size, mtime,
    ctime, inode, head/tail hash, so a copy with a preserved mtime is noticed) + the descriptor signature.

    The descriptor signature is the sidecar JSON's content hash (None without a sidecar), so an edited,
    broken or deleted sidecar changes the key even when its mtime and size do not.
    """
    return (*file_signature(path), _sidecar_signature(sidecar_path(path)))


def _sidecar_signature(side: pathlib.Path) -> str | None:
    try:
        return hashlib.sha256(side.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None
    except OSError as error:  # unreadable: keyed by the error, the load reports it
        return f"unreadable: {error}"


# ---------------------------------------------------------------- reading

def _read_tensors(path: pathlib.Path, safetensors: bool):
    try:
        return tensor_files.read_safetensors(path)[0] if safetensors else tensor_files.read_torch(path)
    except tensor_files.TensorFileError as error:
        raise AdapterFileError(path, error.reason) from None


def read_adapter_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Flat state dict with `image_proj.` / `ip_adapter.` prefixes, tensors as stored (CPU)."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise AdapterFileError(path, "is a directory, expected a .safetensors or .bin file")
    if not path.is_file():
        raise AdapterFileError(path, "file not found")
    size = path.stat().st_size
    if size == 0:
        raise AdapterFileError(path, "empty file (0 bytes)")
    with path.open("rb") as handle:
        head = handle.read(9)
    ext = path.suffix.lower()
    if ext not in SAFETENSORS_EXTENSIONS | PICKLE_EXTENSIONS:
        raise AdapterFileError(path, f"unknown extension {ext!r}; expected .safetensors, .bin, .pt or .pth")
    # Mis-named files are common (a .bin that is really safetensors): look at the content.
    # safetensors = u64 header length + '{'; torch = zip ("PK\x03\x04") or a raw pickle (0x80, protocol).
    looks_safetensors = len(head) == 9 and struct.unpack("<Q", head[:8])[0] <= size - 8 and head[8:9] == b"{"
    looks_torch = head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05")
    loaded = _read_tensors(path, looks_safetensors or (ext in SAFETENSORS_EXTENSIONS and not looks_torch))
    return _flatten(path, loaded)


def _flatten(path: pathlib.Path, loaded) -> dict[str, torch.Tensor]:
    if not isinstance(loaded, dict):
        raise AdapterFileError(path, f"expected a dict of tensors, got {type(loaded).__name__}")
    flat: dict[str, torch.Tensor] = {}
    for key, value in loaded.items():
        if key in ("image_proj", "ip_adapter") and isinstance(value, dict):
            for sub, tensor in value.items():
                flat[f"{key}.{sub}"] = tensor
        else:
            flat[str(key)] = value
    for key, value in flat.items():
        if not isinstance(value, torch.Tensor):
            raise AdapterFileError(path, f"key {quote(key)}: expected a tensor, got {type(value).__name__}")
    return flat


# ---------------------------------------------------------------- validation / inference

def _infer_base(cross_attention_dim: int, layer_widths: list[int]) -> str:
    if cross_attention_dim == 768 and layer_widths == SD15_LAYER_WIDTHS:
        return "sd15"
    if cross_attention_dim == 2048 and layer_widths == SDXL_LAYER_WIDTHS:
        return "sdxl"
    return "custom"


def split_state_dict(state_dict: dict[str, torch.Tensor], path: str | os.PathLike = "<state dict>") -> AdapterWeights:
    """Validate a flat adapter state dict strictly and return fp32 CPU weights + inferred info."""
    proj: dict[str, torch.Tensor] = {}
    layers: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key.startswith("image_proj."):
            proj[key[len("image_proj."):]] = tensor
        elif key.startswith("ip_adapter."):
            layers[key[len("ip_adapter."):]] = tensor
        else:
            raise AdapterFileError(path, f"unexpected key {quote(key)} (expected only image_proj.* and ip_adapter.*)")
    if not proj:
        raise AdapterFileError(path, "no image_proj.* keys (not an IQA-Adapter / IP-Adapter file?)")
    if not layers:
        raise AdapterFileError(path, "no ip_adapter.* keys (not an IQA-Adapter / IP-Adapter file?)")

    dtypes = set()
    for key, tensor in list(state_dict.items()):
        if not tensor.is_floating_point():
            raise AdapterFileError(path, f"key {quote(key)}: dtype {tensor.dtype} is not a floating-point type")
        dtypes.add(str(tensor.dtype).replace("torch.", ""))
    # Everything becomes fp32 once, here; finiteness is checked on the fp32 copy (aminmax propagates
    # NaN and shows +-inf, and is much faster than isfinite on half-precision CPU tensors).
    proj = {k: v.detach().to(device="cpu", dtype=torch.float32).contiguous() for k, v in proj.items()}
    layers = {k: v.detach().to(device="cpu", dtype=torch.float32).contiguous() for k, v in layers.items()}
    for prefix, group in (("image_proj.", proj), ("ip_adapter.", layers)):
        for key, tensor in group.items():
            if tensor.numel() and not all(math.isfinite(x) for x in torch.aminmax(tensor)):
                raise AdapterFileError(path, f"key {prefix + key!r}: contains NaN or infinite values")

    # Projection.
    keys = set(proj)
    if keys == LINEAR_KEYS:
        kind, first, last = "linear", "proj.weight", "proj.weight"
    elif keys == MLP_KEYS:
        kind, first, last = "mlp", "proj.0.weight", "proj.2.weight"
    else:
        expected_any = sorted(LINEAR_KEYS) if any(k.startswith("proj.w") for k in keys) else sorted(MLP_KEYS)
        missing = sorted(set(expected_any) - keys)
        extra = sorted(keys - set(expected_any))
        raise AdapterFileError(path, f"image_proj keys do not match a linear or mlp projection: "
                                     f"missing {['image_proj.' + k for k in missing]}, "
                                     f"extra {['image_proj.' + k for k in extra]}")
    norm_w, norm_b = proj["norm.weight"], proj["norm.bias"]
    if norm_w.dim() != 1 or norm_b.shape != norm_w.shape:
        raise AdapterFileError(path, f"key 'image_proj.norm.weight'/'bias': expected two vectors of length C, "
                                     f"got {list(norm_w.shape)} and {list(norm_b.shape)}")
    c = norm_w.shape[0]
    w_first, w_last = proj[first], proj[last]
    for name in (first, last):
        if proj[name].dim() != 2:
            raise AdapterFileError(
                path, f"key 'image_proj.{name}': expected a matrix, got shape {list(proj[name].shape)}")
    out_features = w_last.shape[0]
    if out_features % c != 0:
        raise AdapterFileError(path, f"key 'image_proj.{last}': {out_features} output features is not a multiple of "
                                     f"C={c} (from image_proj.norm.weight)")
    input_dim = w_first.shape[1]
    hidden = None
    if kind == "linear":
        bias_checks = [("proj.bias", out_features)]
    else:
        hidden = w_first.shape[0]
        if w_last.shape[1] != hidden:
            raise AdapterFileError(path, f"key 'image_proj.proj.2.weight': takes {w_last.shape[1]} inputs but "
                                         f"image_proj.proj.0 gives {hidden}")
        bias_checks = [("proj.0.bias", hidden), ("proj.2.bias", out_features)]
    for name, length in bias_checks:
        if list(proj[name].shape) != [length]:
            raise AdapterFileError(
                path, f"key 'image_proj.{name}': expected shape [{length}], got {list(proj[name].shape)}")

    # Cross-attention layers: exactly keys 1, 3, ..., 2L-1, each with to_k_ip and to_v_ip.
    by_index: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in layers.items():
        match = LAYER_KEY.match(key)
        if not match:
            raise AdapterFileError(path, f"unexpected key 'ip_adapter.{key}' "
                                         "(expected ip_adapter.<odd index>.to_k_ip.weight / to_v_ip.weight)")
        by_index.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
    num_layers = len(by_index)
    expected = [2 * k + 1 for k in range(num_layers)]
    found = sorted(by_index)
    if found != expected:
        odd_missing = sorted(set(range(1, 2 * max(found) + 2, 2)) - set(found))
        stray = [i for i in found if i % 2 == 0]
        detail = []
        if stray:
            detail.append(f"even (non cross-attention) index {[f'ip_adapter.{i}' for i in stray]}")
        if odd_missing:
            detail.append(f"missing {[f'ip_adapter.{i}.to_k_ip.weight' for i in odd_missing]}")
        raise AdapterFileError(path, "cross-attention layer keys must be exactly ip_adapter.1, 3, ..., 2L-1: "
                                     + "; ".join(detail))
    to_k, to_v, widths = [], [], []
    for index in expected:
        pair = by_index[index]
        for name in ("to_k_ip", "to_v_ip"):
            if name not in pair:
                raise AdapterFileError(path, f"missing key 'ip_adapter.{index}.{name}.weight'")
        wk, wv = pair["to_k_ip"], pair["to_v_ip"]
        if wk.dim() != 2 or wk.shape[1] != c:
            raise AdapterFileError(path, f"key 'ip_adapter.{index}.to_k_ip.weight': expected shape (hidden, C={c}), "
                                         f"got {list(wk.shape)}")
        if wv.shape != wk.shape:
            raise AdapterFileError(path, f"key 'ip_adapter.{index}.to_v_ip.weight': shape {list(wv.shape)} "
                                         f"differs from to_k_ip {list(wk.shape)}")
        widths.append(int(wk.shape[0]))
        to_k.append(wk)
        to_v.append(wv)

    info = AdapterInfo(
        projection_kind=kind, num_tokens=out_features // c, input_dim=int(input_dim), cross_attention_dim=int(c),
        num_layers=num_layers, layer_widths=widths, mlp_hidden_dim=hidden, base=_infer_base(c, widths),
        dtype="/".join(sorted(dtypes)),
    )
    return AdapterWeights(info=info, image_proj=proj, to_k_ip=to_k, to_v_ip=to_v)


def load_adapter_weights(path: str | os.PathLike) -> AdapterWeights:
    """Released layout, or a training state (the authors' `accelerate` module state, the pack trainer's
    module) renamed to it by adapter/training_layout.py."""
    state = read_adapter_file(path)
    try:
        state = training_layout.to_released(state)
    except ValueError as error:
        raise AdapterFileError(path, str(error)) from None
    return split_state_dict(state, path)


# ---------------------------------------------------------------- training output -> released file

def convert_training_output(source, target, descriptor: dict) -> dict[str, torch.Tensor]:
    """Read a training output (the authors' accelerate state, the pack trainer's checkpoint, or a released
    file), write `target` (.safetensors, released layout, tensors as stored) and its sidecar descriptor.
    The result is validated by the loader's own strict checks before anything is written."""
    from safetensors.torch import save_file

    source_file = training_layout.training_output_file(source)
    released = {k: v.contiguous() for k, v in training_layout.to_released(read_adapter_file(source_file)).items()}
    weights = split_state_dict(released, source_file)
    target = pathlib.Path(target)
    check_input_dim(descriptor_from_dict(descriptor, source="descriptor"), weights.info.input_dim, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    save_file(released, str(tmp), metadata={"format": "iqa_adapter", "converted_from": source_file.name})
    os.replace(tmp, target)
    target.with_suffix(".json").write_text(json.dumps(descriptor, indent=2) + "\n")
    return released
