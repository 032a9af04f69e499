"""Names of the adapter's weights in training modules <-> the released layout (one place for both ways).

Released layout (what IQAAdapterLoader reads): `image_proj.<name>` and `ip_adapter.<2k+1>.to_{k,v}_ip.weight`,
k = cross-attention layer position in diffusers `attn_processors` order (adapter/layers.py).

- The pack's trainer (adapter/training.py) builds its trainable module from these names: attribute
  `image_proj` and a ModuleDict `ip_adapter` keyed by the released index, so its state dict *is* the
  released layout (plus wrapper prefixes such as DDP's `module.`).
- The authors' trainer saves `accelerator.save_state` of its whole training module (docs/METHOD.md
  §5.4): `qual_proj_model.<name>` (= `image_proj.<name>`), `adapter_modules.<i>.to_{k,v}_ip.weight`
  (a ModuleList of *all* attention processors in `unet.attn_processors` order, so attn1 processors,
  which have no weights, take the even positions and `<i>` is already the released odd index) and the
  whole `unet.*`, where the same adapter weights appear a second time as
  `unet.<diffusers attn2 path>.processor.to_{k,v}_ip.weight`. Both copies are read and must agree.
"""
from __future__ import annotations

import pathlib
import re

import torch

RELEASED_PROJ = "image_proj."
RELEASED_LAYERS = "ip_adapter."
AUTHORS_PROJ = "qual_proj_model."
AUTHORS_LAYERS = "adapter_modules."
AUTHORS_UNET = "unet."
# Prefixes a wrapper adds to every key: DistributedDataParallel (`module.`), torch.compile (`_orig_mod.`).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
LAYER_NAMES = ("to_k_ip", "to_v_ip")

_AUTHORS_LAYER_KEY = re.compile(r"^adapter_modules\.(\d+)\.(to_k_ip|to_v_ip)\.weight$")
_UNET_PROCESSOR_KEY = re.compile(r"^unet\.(.+)\.processor\.(to_k_ip|to_v_ip)\.weight$")
_DIFFUSERS_ATTN2 = re.compile(
    r"^(down_blocks|up_blocks|mid_block)(?:\.(\d+))?\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn2$")
_DIFFUSERS_BLOCK_ORDER = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}  # the UNet's registration order


def released_index(position: int) -> int:
    """Checkpoint index of cross-attention layer `position` (diffusers order): 2k+1."""
    return 2 * position + 1


def released_layer_key(position: int, name: str) -> str:
    return f"{RELEASED_LAYERS}{released_index(position)}.{name}.weight"


def strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a prefix that every key carries (`module.` from DDP, `_orig_mod.` from torch.compile)."""
    changed = True
    while changed and state_dict:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in state_dict):
                state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
                changed = True
    return state_dict


def diffusers_attn2_order(path: str) -> tuple[int, int, int, int]:
    """Sort key of a diffusers attn2 module path in `unet.attn_processors` order (down, up, mid last)."""
    match = _DIFFUSERS_ATTN2.match(path)
    if not match:
        raise ValueError(f"not a diffusers cross-attention path: {path!r} (expected e.g. "
                         "'down_blocks.1.attentions.0.transformer_blocks.0.attn2')")
    group, block, attention, transformer = match.groups()
    return _DIFFUSERS_BLOCK_ORDER[group], int(block or 0), int(attention), int(transformer)


def detect_layout(state_dict: dict[str, torch.Tensor]) -> str:
    """'released' (also the pack trainer's module), 'authors' (their accelerate state) or 'unknown'."""
    keys = strip_wrapper_prefixes(dict(state_dict)).keys()
    if any(k.startswith(AUTHORS_PROJ) or k.startswith(AUTHORS_LAYERS) for k in keys):
        return "authors"
    if any(k.startswith(RELEASED_PROJ) for k in keys) and any(k.startswith(RELEASED_LAYERS) for k in keys):
        return "released"
    return "unknown"


def _unet_processor_copies(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter weights kept inside the UNet's attn2 processors, renamed to released keys."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        match = _UNET_PROCESSOR_KEY.match(key)
        if match:
            found.setdefault(match.group(1), {})[match.group(2)] = tensor
    out = {}
    for position, path in enumerate(sorted(found, key=diffusers_attn2_order)):
        for name in LAYER_NAMES:
            if name not in found[path]:
                raise ValueError(f"key 'unet.{path}.processor.{name}.weight' is missing")
            out[released_layer_key(position, name)] = found[path][name]
    return out


def authors_to_released(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The authors' training module state -> released keys (values untouched, nothing else kept).

    Raises ValueError when a key is unknown or when the `adapter_modules` copy and the copy inside the
    UNet's processors disagree (then the index mapping would be ambiguous).
    """
    state_dict = strip_wrapper_prefixes(dict(state_dict))
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key.startswith(AUTHORS_PROJ):
            out[RELEASED_PROJ + key[len(AUTHORS_PROJ):]] = tensor
        elif key.startswith(AUTHORS_LAYERS):
            match = _AUTHORS_LAYER_KEY.match(key)
            if not match:
                raise ValueError(f"unexpected key {key!r} "
                                 "(expected adapter_modules.<i>.to_k_ip.weight / to_v_ip.weight)")
            out[f"{RELEASED_LAYERS}{int(match.group(1))}.{match.group(2)}.weight"] = tensor
        elif not key.startswith(AUTHORS_UNET):
            raise ValueError(f"unexpected key {key!r} in a training state (expected unet.*, qual_proj_model.*, "
                             "adapter_modules.*)")
    if not any(k.startswith(RELEASED_PROJ) for k in out):
        raise ValueError("no qual_proj_model.* keys: not an IQA-Adapter training state")
    unet_copies = _unet_processor_copies(state_dict)
    listed = {k: v for k, v in out.items() if k.startswith(RELEASED_LAYERS)}
    if not listed:
        if not unet_copies:
            raise ValueError("no adapter_modules.* keys and no unet.*.processor.to_k_ip weights")
        out.update(unet_copies)
    elif unet_copies:
        if sorted(unet_copies) != sorted(listed):
            raise ValueError(f"adapter_modules holds {len(listed)} tensors at indices "
                             f"{sorted({int(k.split('.')[1]) for k in listed})} but the UNet's processors hold "
                             f"{len(unet_copies)} (expected the same odd indices)")
        for key, tensor in unet_copies.items():
            if not torch.equal(tensor, listed[key]):
                raise ValueError(f"{key}: the adapter_modules copy differs from the copy in the UNet's attention "
                                 "processor (not one training state?)")
    return out


def to_released(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any known layout -> released keys; released input is returned with wrapper prefixes stripped."""
    layout = detect_layout(state_dict)
    if layout == "authors":
        return authors_to_released(state_dict)
    return strip_wrapper_prefixes(dict(state_dict))


# ---------------------------------------------------------------- files

ACCELERATE_MODEL_FILES = ("model.safetensors", "pytorch_model.bin")  # accelerate's save_state names, model 0


def training_output_file(path) -> pathlib.Path:
    """A weights file, or an `accelerate` checkpoint folder (its first model's file)."""

    path = pathlib.Path(path)
    if path.is_dir():
        for name in ACCELERATE_MODEL_FILES + ("adapter.safetensors",):
            if (path / name).is_file():
                return path / name
        raise ValueError(f"{path}: no {', '.join(ACCELERATE_MODEL_FILES)} or adapter.safetensors in this folder")
    return path
