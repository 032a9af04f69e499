"""CLIP backbones (laion_aes, clipiqa / clipiqa+, liqe, qualiclip, maclip, clipscore, afine, ...) from local
tensor files.

The CLIP loaders of the `clip` package and of pyiqa (archs/clip_model.py, archs/afineclip_model.py) fetch
OpenAI's file with urllib and open it with torch.jit.load (TorchScript: code), falling back to an
unrestricted torch.load. During a metric build (adapter/metric_build.py) their `load` is replaced: the same
file name (e.g. 'ViT-L-14.pt', or 'ViT-L-14.safetensors') is looked up in the metric folders plus clip's
caches, read as plain tensors, and the CLIP is rebuilt by that module's own `build_model(state_dict)`
(which infers the architecture from the tensor shapes). OpenAI's TorchScript files are refused with a
one-line conversion command.
"""
from __future__ import annotations

import os
import sys
import warnings
import zipfile

import torch

from .metric_files import SAFE_WEIGHT_SUFFIXES, UnsafeWeightsError, file_name_of, read_state_dict, unwrap_state_dict

# Official architectures: CLIP(embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
# context_length, vocab_size, transformer_width, transformer_heads, transformer_layers). Used to plan a
# metric without its files and to warn when a file does not have the official shapes.
CLIP_ARCHITECTURES: dict[str, dict] = {
    name: dict(zip(("embed_dim", "image_resolution", "vision_layers", "vision_width", "vision_patch_size",
                    "context_length", "vocab_size", "transformer_width", "transformer_heads",
                    "transformer_layers"), values))
    for name, values in {
        "RN50": (1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12),
        "RN101": (512, 224, (3, 4, 23, 3), 64, None, 77, 49408, 512, 8, 12),
        "RN50x4": (640, 288, (4, 6, 10, 6), 80, None, 77, 49408, 640, 10, 12),
        "RN50x16": (768, 384, (6, 8, 18, 8), 96, None, 77, 49408, 768, 12, 12),
        "RN50x64": (1024, 448, (3, 15, 36, 10), 128, None, 77, 49408, 1024, 16, 12),
        "ViT-B/32": (512, 224, 12, 768, 32, 77, 49408, 512, 8, 12),
        "ViT-B/16": (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12),
        "ViT-L/14": (768, 224, 24, 1024, 14, 77, 49408, 768, 12, 12),
        "ViT-L/14@336px": (768, 336, 24, 1024, 14, 77, 49408, 768, 12, 12),
    }.items()
}

# Run once, in a trusted environment, next to the official file (or let clip download it there).
CLIP_CONVERSION_COMMAND = (
    "python -c \"import clip, safetensors.torch as s; m, _ = clip.load('{name}', device='cpu', jit=False); "
    "s.save_file(m.state_dict(), '{stem}.safetensors')\"")

# (module, does its load() return (model, preprocess)?, does it always cast to fp32?)
CLIP_LOADER_MODULES = {
    "clip.clip": (True, False),
    "pyiqa.archs.clip_model": (False, False),
    "pyiqa.archs.afineclip_model": (True, True),
}


def import_clip_package():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        import clip
        import clip.model  # noqa: F401
    return clip


def clip_file_name(clip_name: str, module=None) -> str:
    """The file OpenAI's loader would download for `clip_name`, e.g. 'ViT-L/14' -> 'ViT-L-14.pt'; `module`:
    the loader module asked (its own `_MODELS` table first)."""
    if module is None:
        import_clip_package()
    modules = [module] if module is not None else [sys.modules.get(name) for name in CLIP_LOADER_MODULES]
    for loader in modules:
        urls = getattr(loader, "_MODELS", None) or {}
        if clip_name in urls:
            return file_name_of(urls[clip_name])
    if module is not None:
        return os.path.basename(clip_name)
    return os.path.basename(clip_name.replace("/", "-")) + ("" if clip_name.endswith(SAFE_WEIGHT_SUFFIXES) else ".pt")


def clip_conversion_hint(clip_name: str, file_name: str) -> str:
    command = CLIP_CONVERSION_COMMAND.format(name=clip_name, stem=os.path.splitext(file_name)[0])
    return (f"OpenAI's '{file_name}' is a TorchScript archive (it contains code) and is not loaded; convert it "
            f"once, in a trusted environment, with: {command}")


def clip_cache_dirs(download_root: str | None = None) -> list[str]:
    """Where the clip package (~/.cache/clip) and pyiqa's copy (torch hub dir/clip) keep their downloads."""
    folders = [download_root] if download_root else []
    folders += [os.path.expanduser(os.path.join("~", ".cache", "clip")), os.path.join(torch.hub.get_dir(), "clip")]
    return [os.path.abspath(f) for f in folders]


def is_torchscript_archive(path: str) -> bool:
    """TorchScript zips carry compiled code (`<root>/code/`) and `constants.pkl`; state-dict zips do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(entry.endswith("/constants.pkl") or "/code/" in entry for entry in archive.namelist())


def read_clip_state_dict(path: str, clip_name: str, metric: str) -> dict[str, torch.Tensor]:
    if not path.endswith(".safetensors") and is_torchscript_archive(path):
        raise UnsafeWeightsError(
            f"IQA metric '{metric}': '{path}' is a TorchScript archive. "
            f"{clip_conversion_hint(clip_name, os.path.basename(path))}; put the .safetensors file next to it.")
    state = unwrap_state_dict(read_state_dict(path), None)
    # clip's build_model expects the bare CLIP keys; strip a 'model.' / 'state_dict' style wrapper if present
    if "visual.conv1.weight" not in state and isinstance(state.get("state_dict"), dict):
        state = unwrap_state_dict(state["state_dict"], None)
    return dict(state)


def clip_class(module=None):
    """The CLIP class of a loader module (pyiqa keeps its own copies), else the clip package's."""
    return module.CLIP if module is not None and hasattr(module, "CLIP") else import_clip_package().model.CLIP


def official_clip(clip_name: str, module=None, **architecture) -> torch.nn.Module:
    """A CLIP of `clip_name`'s official architecture (fields of CLIP_ARCHITECTURES can be overridden) with
    the constructor's init: the shape of the network, for planning a metric without reading its files."""
    if clip_name not in CLIP_ARCHITECTURES and not architecture:
        raise ValueError(f"no known architecture for CLIP '{clip_name}' (known: {', '.join(CLIP_ARCHITECTURES)})")
    return clip_class(module)(**{**CLIP_ARCHITECTURES.get(clip_name, {}), **architecture}).eval()


def official_shape_mismatch(module, clip_name: str, state: dict) -> str | None:
    """A short description of how `state` differs from the official architecture, or None."""
    if clip_name not in CLIP_ARCHITECTURES:
        return None
    with torch.device("meta"):
        reference = clip_class(module)(**CLIP_ARCHITECTURES[clip_name]).state_dict()
    for key, tensor in reference.items():
        if key not in state:
            return f"key '{key}' is missing"
        if tuple(state[key].shape) != tuple(tensor.shape):
            return f"'{key}' has shape {tuple(state[key].shape)}, official {tuple(tensor.shape)}"
    return None


def build_clip_from_file(module, clip_name: str, path: str, metric: str) -> torch.nn.Module:
    """The loader module's CLIP rebuilt from the tensors of `path` (its `build_model`)."""
    state = read_clip_state_dict(path, clip_name, metric)
    mismatch = official_shape_mismatch(module, clip_name, state)
    if mismatch:
        warnings.warn(f"IQA metric '{metric}': '{path}' is not the official CLIP {clip_name} "
                      f"({mismatch}); its scores will not match the published metric.", stacklevel=2)
    try:
        return module.build_model(state)
    except (KeyError, RuntimeError, AssertionError, IndexError) as error:
        raise ValueError(
            f"IQA metric '{metric}': '{path}' is not a CLIP state dict that "
            f"build_model can read ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            f"). Expected the tensors of OpenAI's CLIP {clip_name}.") from error
