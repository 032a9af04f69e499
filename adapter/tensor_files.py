"""The one bounded reader of tensor files (IQA-Adapter weights, quality tokens, IQA metric weights).

A small file must not make the server hold gigabytes. Everything a file claims is checked before any
tensor is materialised:
- safetensors: the header (size, JSON nesting, dtypes, shapes, byte ranges inside the file) is validated
  here, and callers may check the shapes (`check`) before a single tensor is read;
- torch zip files (`torch.save`): every record must be stored uncompressed inside the file (no zip bombs),
  the file is read with `weights_only=True` (nothing but tensors is rebuilt), and every tensor
  must be a plain dense CPU tensor whose elements its storage really holds (no sparse/meta tensors, no
  zero-stride views claiming gigabytes). The pre-zip legacy format cannot be checked this way: refused.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import pickle
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import InputError, quote

SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
MAX_DIMS = 8


class TensorFileError(InputError):
    """A tensor file that cannot be read safely; the message names the file (and the key)."""

    def __init__(self, path, message: str, input_name: str | None = None):
        self.path, self.reason = str(path), message
        super().__init__(f"{_short_path(path)}: {message}", input_name)


def _short_path(path) -> str:
    text = str(path)
    return text if len(text) <= 200 else f"...{text[-200:]}"


@dataclass(frozen=True)
class TensorEntry:
    dtype: str  # safetensors dtype name ('F32', ...)
    shape: tuple[int, ...]


def _loads_json(raw: bytes, path, what: str):
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError):
        raise TensorFileError(path, f"corrupt {what} (not JSON)") from None
    except RecursionError:
        raise TensorFileError(path, f"corrupt {what} (JSON nested too deeply)") from None


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """(entries by key, metadata) of a safetensors file, every claim checked against the file's size."""
    path = pathlib.Path(path)
    size = path.stat().st_size
    if size < 8:
        raise TensorFileError(path, f"truncated safetensors file ({size} bytes, the 8-byte header length is missing)")
    with path.open("rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > size - 8:
            raise TensorFileError(path, f"truncated or corrupt safetensors file: header claims {header_len} bytes "
                                        f"but only {size - 8} follow")
        if header_len > MAX_HEADER_BYTES:
            raise TensorFileError(path, f"safetensors header of {header_len} bytes exceeds {MAX_HEADER_BYTES}")
        raw = handle.read(header_len)
    header = _loads_json(raw, path, "safetensors header")
    if not isinstance(header, dict):
        raise TensorFileError(path, "corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise TensorFileError(path, "corrupt safetensors header: __metadata__ must map strings to strings")
    data_len = size - 8 - header_len
    entries = {}
    for key, entry in header.items():
        try:
            dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = (dtype in SAFETENSORS_DTYPES and isinstance(shape, list) and len(shape) <= MAX_DIMS
                  and all(type(d) is int and d >= 0 for d in shape)
                  and isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets))
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise TensorFileError(path, f"key {quote(key)}: corrupt safetensors header entry {quote(entry)}")
        begin, end = offsets
        expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
        if not (0 <= begin <= end <= data_len) or end - begin != expected:
            raise TensorFileError(path, f"key {quote(key)}: header says bytes {begin}..{end} for {dtype}{shape} "
                                        f"({expected} bytes) but the data section has {data_len} bytes "
                                        "(truncated or corrupt file)")
        entries[key] = TensorEntry(dtype, tuple(shape))
    return entries, metadata


def read_safetensors(path: str | os.PathLike,
                     check: Callable[[dict[str, TensorEntry], dict[str, str]], None] | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Validated header, then `check(entries, metadata)` (shape limits), then the tensors (CPU)."""
    from safetensors import safe_open

    path = pathlib.Path(path)
    entries, metadata = read_safetensors_header(path)
    if check is not None:
        check(entries, metadata)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in entries}, metadata
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise TensorFileError(path, f"cannot read safetensors: {type(error).__name__}: {error}") from None


def _check_torch_zip(path: pathlib.Path, size: int) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise TensorFileError(path, f"cannot read torch file (truncated or corrupt zip: {error})") from None
    stored = 0
    for member in members:
        if member.compress_type != zipfile.ZIP_STORED:
            raise TensorFileError(path, f"record {quote(member.filename)} is compressed; torch.save never compresses, "
                                        "so this file was not written by torch (refused, it could expand in memory)")
        stored += member.file_size
    if stored > size:
        raise TensorFileError(path, f"records claim {stored} bytes but the file has {size} (corrupt file)")


def check_tensor(path, key: str, tensor) -> None:
    """A plain dense CPU tensor whose elements its storage really holds."""
    if not isinstance(tensor, torch.Tensor):
        raise TensorFileError(path, f"key {quote(key)}: expected a tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise TensorFileError(path, f"key {quote(key)}: {tensor.layout} tensors are not supported (dense tensors only)")
    if tensor.device.type != "cpu":
        raise TensorFileError(path, f"key {quote(key)}: a tensor on device {tensor.device.type!r} holds no data "
                                    "(dense CPU tensors only)")
    if tensor.is_quantized or tensor.is_nested:
        raise TensorFileError(path, f"key {quote(key)}: quantized/nested tensors are not supported")
    needed = tensor.numel() * tensor.element_size()
    held = tensor.untyped_storage().nbytes()
    if needed > held or any(stride == 0 and dim > 1 for stride, dim in zip(tensor.stride(), tensor.shape)):
        raise TensorFileError(path, f"key {quote(key)}: shape {list(tensor.shape)} claims {needed} bytes but the "
                                    f"file stores {held} for it (an expanded view; refused before allocating)")


def _walk(path, value, prefix: str = "", depth: int = 0):
    if depth > 8:
        raise TensorFileError(path, "nested too deeply (expected a dict of tensors)")
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(path, item, f"{prefix}{key}.", depth + 1)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _walk(path, item, f"{prefix}{index}.", depth + 1)
    elif isinstance(value, torch.Tensor):
        yield prefix[:-1], value


def read_torch(path: str | os.PathLike):
    """`torch.load(weights_only=True)` of a torch zip file after the zip and every tensor are checked."""
    path = pathlib.Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(4)
    if head != b"PK\x03\x04":
        raise TensorFileError(path, "cannot read torch file: not a torch zip file (torch.save since torch 1.6); "
                                    "the legacy format cannot be "
                                    "checked before loading, so it is refused: re-save it with a current torch or "
                                    "convert it to .safetensors")
    _check_torch_zip(path, size)
    try:
        # weights_only: only tensors/containers are rebuilt, any other global is refused unexecuted. The
        # storages read are the zip's stored records, so at most the file's size is allocated here.
        # A file object, not the path: torch.load would pick a loader by extension (.safetensors).
        with path.open("rb") as handle:
            loaded = torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TensorFileError(path, f"refused: the pickle holds more than tensors (it could run code), so it was "
                                    f"not loaded ({first[:300]})") from None
    except RecursionError:
        raise TensorFileError(path, "cannot read torch file (nested too deeply)") from None
    except Exception as error:  # truncated zip, garbage bytes, ...
        raise TensorFileError(path, f"cannot read torch file (truncated or corrupt?): {type(error).__name__}: "
                                    f"{str(error)[:300]}") from None
    for key, tensor in _walk(path, loaded):
        check_tensor(path, key, tensor)
    return loaded
