"""pyiqa metrics without internet and without unpickling: build, load weights safely, score in chunks.

pyiqa 0.1.16 downloads weights while a network is being built and reads them with
`torch.load(weights_only=False)`, which runs arbitrary code from the file. Here a metric is built by
pyiqa's own code inside `_SafeBuild`, which for the duration of the build:
  * replaces pyiqa's `load_pretrained_network` by a recorder: the (module, file) pairs are loaded after the
    build, by us, with safetensors or `torch.load(weights_only=True)` (pyiqa's key conventions: optional
    'params' wrapper, 'module.' prefix), skipping loads whose tensors a later strict load overwrites
    (e.g. DBCNN's SCNN pre-load, torchvision/timm backbones inside a full checkpoint);
  * resolves every other file pyiqa asks for (`load_file_from_url`, `torch.hub.load_state_dict_from_url`)
    locally: first the user folders (models/iqa), then pyiqa's cache dir (`torch.hub.get_dir()/pyiqa`),
    then torch hub's `checkpoints/`; a missing file raises `MissingMetricWeightsError` at once, naming the
    metric, the file name and the folder; nothing is ever downloaded;
  * forces `timm.create_model(pretrained=False)` (the metric checkpoint carries the backbone) and
    `torch.load(weights_only=True)`; refuses `torch.jit.load` (TorchScript archives, e.g. ARNIQA's
    regressor, are code);
  * replaces the CLIP loaders (`clip.load`, pyiqa's `clip_model.load` / `afineclip_model.load`), which would
    download OpenAI's TorchScript file with urllib and `torch.jit.load` it: the same file name (e.g.
    'ViT-L-14.pt', or 'ViT-L-14.safetensors') is looked up in the folders above plus clip's caches
    (~/.cache/clip, torch hub dir/clip), read as tensors only, and rebuilt with the module's own
    `build_model(state_dict)`. OpenAI's TorchScript files are refused with a one-line conversion command.
The patches are process-wide while a build runs (guarded by a lock) and restored afterwards.

Loaded metrics are cached (module level) by id + device + differentiable + user folders, and the cache
entry is dropped when one of the weight files it used changes (path, mtime, size). `clear_metric_cache()`
frees it; the ComfyUI layer calls that when the host frees memory.
"""
from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable
from urllib.parse import quote, unquote, urlparse

import torch

from ..models.metrics import metric_info
from . import tensor_files
from .files import file_signature

SAFE_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


class MissingMetricWeightsError(FileNotFoundError):
    def __init__(self, metric: str, file_name: str, folders: list[str], hint: str = ""):
        self.metric, self.file_name, self.folders = metric, file_name, list(folders)
        first = folders[0] if folders else "models/iqa"
        stem, suffix = os.path.splitext(file_name)
        alternative = f" (or '{stem}.safetensors' with the same tensors)" if suffix in SAFE_WEIGHT_SUFFIXES else ""
        super().__init__(
            f"IQA metric '{metric}' needs the file '{file_name}', which was not found (nothing is "
            f"downloaded). Put it in {first}{alternative}. Searched: {', '.join(folders)}."
            + (f" {hint}" if hint else ""))


class UnsafeWeightsError(ValueError):
    pass


# ----------------------------------------------------------------------------------------------------
# Safe reading of state dicts
# ----------------------------------------------------------------------------------------------------

def read_state_dict(path: str) -> dict:
    """Tensors of a weight file without unpickling code, through the bounded reader (tensor_files)."""
    try:
        if path.endswith(".safetensors"):
            return tensor_files.read_safetensors(path)[0]
        return tensor_files.read_torch(path)
    except tensor_files.TensorFileError as error:
        raise UnsafeWeightsError(
            f"weight file '{path}' could not be read safely: {error.reason}. Files that need full unpickling "
            f"are not loaded; convert it to .safetensors (tensors only).") from None


def unwrap_state_dict(raw, weight_keys: str | None) -> dict[str, torch.Tensor]:
    """pyiqa conventions: optional `weight_keys` wrapper ('params'), 'module.' prefixes from DataParallel."""
    state = raw
    if weight_keys is not None and isinstance(state, dict) and weight_keys in state \
            and isinstance(state[weight_keys], dict):
        state = state[weight_keys]
    elif weight_keys is not None and isinstance(state, dict):
        # a flat file (e.g. safetensors) of a wrapped checkpoint: keys 'params.<name>'
        prefix = weight_keys + "."
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    if not isinstance(state, dict):
        raise UnsafeWeightsError(f"weight file holds a {type(state).__name__}, expected a dict of tensors")
    return {(key[7:] if key.startswith("module.") else key): value for key, value in state.items()}


# ----------------------------------------------------------------------------------------------------
# File lookup
# ----------------------------------------------------------------------------------------------------

def pyiqa_cache_dir() -> str:
    # pyiqa.utils.download_util.DEFAULT_CACHE_DIR = os.path.join(torch.hub.get_dir(), 'pyiqa')
    return os.path.join(torch.hub.get_dir(), "pyiqa")


def search_folders(user_folders: Iterable[str]) -> list[str]:
    folders = [os.path.abspath(f) for f in user_folders]
    for extra in (pyiqa_cache_dir(), os.path.join(torch.hub.get_dir(), "checkpoints")):
        if extra not in folders:
            folders.append(extra)
    return folders


def find_weight_file(file_name: str, folders: list[str]) -> str | None:
    """`file_name` or the same stem with .safetensors, first folder wins. pyiqa's own cache keeps the
    percent-encoded URL name ('sac%2Blogos...'): that spelling is accepted too."""
    candidates = []
    for name in dict.fromkeys((file_name, quote(file_name))):
        stem = os.path.splitext(name)[0]
        candidates += [name, stem + ".safetensors"]
    for folder in folders:
        for candidate in candidates:
            path = os.path.join(folder, candidate)
            if os.path.isfile(path):
                return path
    return None


def _file_name_of(url_or_path: str) -> str:
    # URLs are percent-encoded ('sac%2Blogos...'): users see and save the plain name ('sac+logos...')
    return unquote(os.path.basename(urlparse(url_or_path).path)) if "://" in url_or_path \
        else os.path.basename(url_or_path)


def _signature(path: str) -> tuple:
    return file_signature(path)


# ----------------------------------------------------------------------------------------------------
# CLIP backbones (laion_aes, clipiqa / clipiqa+, liqe, qualiclip, maclip, clipscore, afine, ...)
# ----------------------------------------------------------------------------------------------------
# The CLIP loaders of the `clip` package and of pyiqa (archs/clip_model.py, archs/afineclip_model.py) fetch
# OpenAI's file with urllib and open it with torch.jit.load (TorchScript: code), falling back to an
# unrestricted torch.load. Inside a guarded build they are replaced by `_SafeBuild.clip_loader`: the same
# file name is looked up locally, read as plain tensors, and the CLIP is rebuilt by that module's own
# `build_model(state_dict)` (which infers the architecture from the tensor shapes).

# Official architectures: CLIP(embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
# context_length, vocab_size, transformer_width, transformer_heads, transformer_layers). Used to generate
# random weights (tests) and to warn when a file does not have the official shapes.
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
_CLIP_LOADER_MODULES = {
    "clip.clip": (True, False),
    "pyiqa.archs.clip_model": (False, False),
    "pyiqa.archs.afineclip_model": (True, True),
}


def clip_file_name(clip_name: str) -> str:
    """The file OpenAI's loader would download for `clip_name`, e.g. 'ViT-L/14' -> 'ViT-L-14.pt'."""
    _import_clip_package()
    for module_name in _CLIP_LOADER_MODULES:
        module = sys.modules.get(module_name)
        urls = getattr(module, "_MODELS", None) or {}
        if clip_name in urls:
            return _file_name_of(urls[clip_name])
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
    import zipfile
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


def _clip_class(module):
    return module.CLIP if module is not None and hasattr(module, "CLIP") else _import_clip_package().model.CLIP


def _import_clip_package():
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        import clip
        import clip.model  # noqa: F401
    return clip


def random_clip_model(clip_name: str, seed: int = 0, module=None, **architecture) -> torch.nn.Module:
    """A CLIP of `clip_name`'s official architecture (fields of CLIP_ARCHITECTURES can be overridden, e.g. a
    tiny width for tests) with the constructor's seeded random init, fp16 where OpenAI's files are fp16."""
    if clip_name not in CLIP_ARCHITECTURES and not architecture:
        raise ValueError(f"no known architecture for CLIP '{clip_name}' (known: {', '.join(CLIP_ARCHITECTURES)})")
    config = {**CLIP_ARCHITECTURES.get(clip_name, {}), **architecture}
    clip_class = _clip_class(module)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = clip_class(**config)
    convert = getattr(module, "convert_weights", None) or _import_clip_package().model.convert_weights
    convert(model)
    return model.eval()


def write_random_clip_weights(clip_name: str, folder: str, seed: int = 0, **architecture) -> str:
    """Random CLIP weights saved as a plain state dict under OpenAI's file name (e.g. 'RN50.pt'); the keys
    and dtypes of the official files. Returns the path."""
    os.makedirs(folder, exist_ok=True)
    model = random_clip_model(clip_name, seed, **architecture)
    path = os.path.join(folder, clip_file_name(clip_name))
    torch.save({key: value.contiguous() for key, value in model.state_dict().items()}, path)
    return path


def _official_shape_mismatch(module, clip_name: str, state: dict) -> str | None:
    """A short description of how `state` differs from the official architecture, or None."""
    if clip_name not in CLIP_ARCHITECTURES:
        return None
    with torch.device("meta"):
        reference = _clip_class(module)(**CLIP_ARCHITECTURES[clip_name]).state_dict()
    for key, tensor in reference.items():
        if key not in state:
            return f"key '{key}' is missing"
        if tuple(state[key].shape) != tuple(tensor.shape):
            return f"'{key}' has shape {tuple(state[key].shape)}, official {tuple(tensor.shape)}"
    return None


# ----------------------------------------------------------------------------------------------------
# Building pyiqa networks under guard
# ----------------------------------------------------------------------------------------------------

@dataclass
class _PendingLoad:
    module: torch.nn.Module
    file_name: str
    strict: bool
    weight_keys: str | None
    key_filter: Callable[[dict], dict] | None = None


@dataclass
class _ClipLoad:
    clip_name: str                # e.g. 'ViT-L/14'
    file_name: str                # e.g. 'ViT-L-14.pt'
    path: str | None              # None: generated (random / meta), not read from a file
    model: torch.nn.Module


_BUILD_LOCK = threading.RLock()
_SCRATCH_CACHE_MODULES = ("pyiqa.archs.liqe_arch",)


class _SafeBuild:
    """Context for one metric build; see the module docstring."""

    def __init__(self, metric: str, folders: list[str], clip_mode: str = "load",
                 clip_folders: list[str] | None = None):
        # clip_mode: 'load' (files only), 'random' (a missing CLIP is generated: write_random_weights),
        # 'plan' (CLIP files are never read, always generated: expected_weight_files)
        self.metric = metric
        self.folders = folders
        self.clip_mode = clip_mode
        self.clip_folders = clip_folders
        self.clip_seed = 0
        self.pending: list[_PendingLoad] = []
        self.clip_loads: list[_ClipLoad] = []
        self.files_used: list[str] = []
        self._restore: list[tuple[object, str, object]] = []
        self._scratch = None

    # -- replacements ------------------------------------------------------------------------------
    def _resolve(self, url_or_path: str) -> str:
        name = _file_name_of(url_or_path)
        path = find_weight_file(name, self.folders)
        if path is None:
            raise MissingMetricWeightsError(self.metric, name, self.folders)
        if path not in self.files_used:
            self.files_used.append(path)
        return path

    def load_pretrained_network(self, net, model_path, strict=True, weight_keys=None):
        self.pending.append(_PendingLoad(net, _file_name_of(model_path), bool(strict), weight_keys))

    def load_file_from_url(self, url, model_dir=None, progress=True, file_name=None):
        return self._resolve(file_name or url)

    def hub_load_state_dict_from_url(self, url, model_dir=None, map_location=None, progress=True,
                                     check_hash=False, file_name=None, weights_only=True):
        return read_state_dict(self._resolve(file_name or url))

    def torchvision_get_state_dict(self, weights_enum, *args, **kwargs):
        return _DeferredTorchvisionWeights(_file_name_of(weights_enum.url))

    def torch_load(self, original):
        def safe_load(f, map_location=None, *args, weights_only=True, **kwargs):
            return original(f, map_location=map_location, weights_only=True, **kwargs)
        return safe_load

    def _clip_search_folders(self, download_root: str | None) -> list[str]:
        if self.clip_folders is not None:
            return list(self.clip_folders)
        folders = list(self.folders)
        folders += [f for f in clip_cache_dirs(download_root) if f not in folders]
        return folders

    def clip_loader(self, module, returns_preprocess: bool, always_float: bool):
        """Replacement for `module.load(name, device, jit, download_root)`: local file, tensors only."""
        build = self

        def load(name, device="cpu", jit=False, download_root=None):
            clip_name = str(name)
            urls = getattr(module, "_MODELS", {})
            file_name = _file_name_of(urls[clip_name]) if clip_name in urls else os.path.basename(clip_name)
            folders = build._clip_search_folders(download_root)
            path = None if build.clip_mode == "plan" else find_weight_file(file_name, folders)
            if path is not None:
                state = read_clip_state_dict(path, clip_name, build.metric)
                mismatch = _official_shape_mismatch(module, clip_name, state)
                if mismatch:
                    import warnings
                    warnings.warn(f"IQA metric '{build.metric}': '{path}' is not the official CLIP {clip_name} "
                                  f"({mismatch}); its scores will not match the published metric.")
                try:
                    model = module.build_model(state)
                except (KeyError, RuntimeError, AssertionError, IndexError) as error:
                    raise ValueError(
                        f"IQA metric '{build.metric}': '{path}' is not a CLIP state dict that "
                        f"build_model can read ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                        f"). Expected the tensors of OpenAI's CLIP {clip_name}.") from error
                if path not in build.files_used:
                    build.files_used.append(path)
            elif build.clip_mode in ("random", "plan"):
                model = random_clip_model(clip_name, seed=build.clip_seed, module=module)
            else:
                raise MissingMetricWeightsError(build.metric, file_name, folders,
                                                hint=clip_conversion_hint(clip_name, file_name))
            model = model.to(device)
            if always_float or str(device) == "cpu":
                model.float()
            build.clip_loads.append(_ClipLoad(clip_name, file_name, path, model))
            if returns_preprocess:
                return model, module._transform(model.visual.input_resolution)
            return model
        return load

    def jit_load(self, *args, **kwargs):
        raise UnsafeWeightsError(
            f"IQA metric '{self.metric}' loads a TorchScript archive (it contains code); the pack does not "
            f"load such files. Use another metric.")

    def module_load_state_dict(self, original):
        build = self

        def load_state_dict(module, state_dict, strict=True, assign=False):
            if isinstance(state_dict, _DeferredTorchvisionWeights):
                build.pending.append(_PendingLoad(module, state_dict.file_name, bool(strict), None))
                return torch.nn.modules.module._IncompatibleKeys([], [])
            return original(module, state_dict, strict=strict, assign=assign)
        return load_state_dict

    # -- patching ----------------------------------------------------------------------------------
    def _patch(self, owner, attribute: str, value) -> None:
        self._restore.append((owner, attribute, getattr(owner, attribute)))
        setattr(owner, attribute, value)

    def __enter__(self):
        _BUILD_LOCK.acquire()
        try:
            self._install()
        except BaseException:
            self._uninstall()
            _BUILD_LOCK.release()
            raise
        return self

    def _install(self) -> None:
        import pyiqa.archs.arch_util as arch_util
        import pyiqa.utils.download_util as download_util

        originals = {
            "load_pretrained_network": arch_util.load_pretrained_network,
            "load_file_from_url": download_util.load_file_from_url,
        }
        replacements = {
            "load_pretrained_network": self.load_pretrained_network,
            "load_file_from_url": self.load_file_from_url,
        }
        # pyiqa modules bind these names at import: patch every loaded pyiqa module's global.
        for module_name, module in list(sys.modules.items()):
            if not module_name.startswith("pyiqa") or module is None:
                continue
            for name, original in originals.items():
                if getattr(module, name, None) is original:
                    self._patch(module, name, replacements[name])
        # CLIP loaders (see the CLIP section): replace `load` where it is defined and wherever it was imported
        for loader_module_name, (returns_preprocess, always_float) in _CLIP_LOADER_MODULES.items():
            loader_module = sys.modules.get(loader_module_name)
            if loader_module is None or not callable(getattr(loader_module, "load", None)):
                continue
            original_load = loader_module.load
            safe_load = self.clip_loader(loader_module, returns_preprocess, always_float)
            for module_name, module in list(sys.modules.items()):
                if module is not None and module_name.split(".")[0] in ("pyiqa", "clip") \
                        and getattr(module, "load", None) is original_load:
                    self._patch(module, "load", safe_load)
        for module_name, module in list(sys.modules.items()):
            # CLIP downloads go through urllib in `_download(url, root)`: never reach it (defence in depth,
            # the loaders above do not call it)
            if module is not None and module_name.split(".")[0] in ("pyiqa", "clip") \
                    and callable(getattr(module, "_download", None)):
                self._patch(module, "_download", lambda url, root=None: self._resolve(url))
        # LIQE caches text features computed by its CLIP in pyiqa's cache dir and reuses them whatever the
        # weights: give it a scratch dir (features are recomputed after the weights are loaded, see
        # `_recompute_derived_features`)
        import tempfile
        self._scratch = tempfile.TemporaryDirectory(prefix="iqa-build-")
        for module_name in _SCRATCH_CACHE_MODULES:
            module = sys.modules.get(module_name)
            if module is not None and hasattr(module, "DEFAULT_CACHE_DIR"):
                self._patch(module, "DEFAULT_CACHE_DIR", self._scratch.name)
        # ... and computing them during the build is wasted work (LIQE-mix: ~30 s of text encoding on CPU):
        # a placeholder of the right shape now, the real features once the weights are in
        liqe_module = sys.modules.get("pyiqa.archs.liqe_arch")
        if liqe_module is not None and hasattr(liqe_module, "LIQE"):
            self._patch(liqe_module.LIQE, "get_text_features", _placeholder_text_features)
        self._patch(torch.hub, "load_state_dict_from_url", self.hub_load_state_dict_from_url)
        self._patch(torch.hub, "download_url_to_file", self._refuse_download)
        self._patch(download_util, "download_url_to_file", self._refuse_download)
        self._patch(torch, "load", self.torch_load(torch.load))
        self._patch(torch.jit, "load", self.jit_load)
        self._patch(torch.nn.Module, "load_state_dict", self.module_load_state_dict(torch.nn.Module.load_state_dict))
        try:
            import torchvision.models._api as tv_api
            self._patch(tv_api.WeightsEnum, "get_state_dict",
                        lambda weights_enum, *a, **k: self.torchvision_get_state_dict(weights_enum))
        except ImportError:
            pass
        try:
            import timm
            original_create = timm.create_model

            def create_model(*args, pretrained=False, **kwargs):
                # The metric checkpoint holds the backbone; never fetch ImageNet weights from the hub.
                return original_create(*args, pretrained=False, **kwargs)
            self._patch(timm, "create_model", create_model)
        except ImportError:
            pass
        try:
            import huggingface_hub.constants as hf_constants
            self._patch(hf_constants, "HF_HUB_OFFLINE", True)
        except ImportError:
            pass

    def _refuse_download(self, url, *args, **kwargs):
        raise MissingMetricWeightsError(self.metric, _file_name_of(url), self.folders)

    def _uninstall(self) -> None:
        while self._restore:
            owner, attribute, value = self._restore.pop()
            setattr(owner, attribute, value)
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None

    def __exit__(self, *exc):
        self._uninstall()
        _BUILD_LOCK.release()
        return False

    # -- deferred loads ----------------------------------------------------------------------------
    def needed_loads(self, top: torch.nn.Module) -> list[_PendingLoad]:
        """Recorded loads that matter for `top`, in build order."""
        reachable = {id(t) for t in top.state_dict(keep_vars=True).values()}
        covered: set[int] = set()
        needed: list[_PendingLoad] = []
        for load in reversed(self.pending):
            ids = {id(t) for t in load.module.state_dict(keep_vars=True).values()}
            relevant = ids & reachable
            if not relevant or relevant <= covered:
                continue  # overwritten by a later strict load, or not part of the final network
            needed.append(load)
            if load.strict:
                covered |= ids
        return list(reversed(needed))

    def apply_pending_loads(self, top: torch.nn.Module) -> None:
        """Run the needed recorded loads, reading files safely."""
        for load in self.needed_loads(top):
            path = self._resolve(load.file_name)
            state = unwrap_state_dict(read_state_dict(path), load.weight_keys)
            try:
                load.module.load_state_dict(state, strict=load.strict)
            except RuntimeError as error:
                raise ValueError(
                    f"IQA metric '{self.metric}': weight file '{path}' does not fit the network "
                    f"({str(error).splitlines()[0]} ...). Expected pyiqa's '{load.file_name}' layout.") from error


class _DeferredTorchvisionWeights(dict):
    """Marker returned instead of torchvision ImageNet weights; its load is decided after the build."""

    def __init__(self, file_name: str):
        super().__init__()
        self.file_name = file_name


def _set_offline_environment() -> None:
    # Effective for hub libraries imported after this; the build context also patches the constant.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def resolve_device(device: str) -> torch.device:
    """An explicit device. 'auto' is the host's choice and is resolved by the node layer (ComfyUI's
    model management); host-free callers (scripts, tests) without one get the CPU."""
    if device in (None, "", "auto"):
        return torch.device("cpu")
    return torch.device(device)


# ----------------------------------------------------------------------------------------------------
# Scoring size: how a measured score is made comparable with the CC3M statistics
# ----------------------------------------------------------------------------------------------------

# 'cc3m': the image squashed to 512x512 as the authors made the CC3M statistics (reference README 1.8/8:
# torchvision `Resize((512, 512))` after `ToTensor`: bilinear with antialiasing, aspect ratio not kept, no
# crop; then clamped to [0, 1]); percentiles and z-scores of such a score mean what the paper's mean.
# 'native': the image as it is (the number pyiqa gives on the tensor you have).
SCORE_SIZES = ("cc3m", "native")
CC3M_SCORE_SIZE = (512, 512)
SCORE_SIZE_NOTES = {
    "cc3m": "squashed to 512x512 (bilinear, antialiased, no crop, clamped to [0, 1]) as the CC3M statistics were made",
    "native": "at the image's own size (not comparable with the CC3M percentiles)",
}


def resize_for_scoring(images_bchw: torch.Tensor, score_size: str) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> what the metric sees under `score_size` (differentiable)."""
    if score_size not in SCORE_SIZES:
        raise ValueError(f"score size must be one of {list(SCORE_SIZES)}, got {score_size!r}")
    if score_size == "native":
        return images_bchw
    if tuple(images_bchw.shape[-2:]) != CC3M_SCORE_SIZE:
        # = torchvision.transforms.Resize((512, 512)) on a float tensor (bilinear, antialias=True)
        images_bchw = torch.nn.functional.interpolate(images_bchw, size=CC3M_SCORE_SIZE, mode="bilinear",
                                                      align_corners=False, antialias=True)
    return images_bchw.clamp(0.0, 1.0)


# ----------------------------------------------------------------------------------------------------
# LoadedMetric
# ----------------------------------------------------------------------------------------------------

@dataclass
class LoadedMetric:
    """IQA_METRIC: one pyiqa metric with its weights, ready to score (B, C, H, W) images in [0, 1]."""
    name: str
    lower_better: bool
    score_range: tuple[float, float] | None
    differentiable: bool
    is_full_reference: bool
    device: torch.device
    net: torch.nn.Module                     # pyiqa's InferenceModel (its `.net` is the architecture)
    weight_files: list[str] = field(default_factory=list)

    @property
    def arch(self) -> torch.nn.Module:
        return self.net.net

    def current_device(self) -> torch.device:
        for tensor in self.arch.parameters():
            return tensor.device
        return self.device

    def score(self, images_bchw_01: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
        """Scores (B,). Non-differentiable: exactly pyiqa's `metric(x)`; differentiable: the
        architecture's forward with gradients (pyiqa's as_loss path without its loss reduction)."""
        validate_images(images_bchw_01, self.name, "images")
        if self.is_full_reference:
            if ref is None:
                raise ValueError(f"IQA metric '{self.name}' is full-reference: it needs reference images")
            validate_images(ref, self.name, "reference")
            if ref.shape != images_bchw_01.shape:
                raise ValueError(f"IQA metric '{self.name}': reference shape {tuple(ref.shape)} differs from "
                                 f"image shape {tuple(images_bchw_01.shape)}")
        device = self.current_device()
        if self.differentiable:
            args = (images_bchw_01.to(device),) + ((ref.to(device),) if self.is_full_reference else ())
            with torch.enable_grad():
                output = self.arch(*args)
        else:
            with torch.no_grad():
                output = self.net(images_bchw_01, ref) if self.is_full_reference else self.net(images_bchw_01)
        if isinstance(output, (tuple, list)):
            output = output[0]
        output = output.reshape(-1)
        if output.numel() != images_bchw_01.shape[0]:
            raise ValueError(f"IQA metric '{self.name}' returned {output.numel()} values for "
                             f"{images_bchw_01.shape[0]} images")
        return output


def validate_images(images: torch.Tensor, metric: str, what: str) -> None:
    if not torch.is_tensor(images) or images.dim() != 4:
        raise ValueError(f"IQA metric '{metric}': {what} must be a (B, C, H, W) tensor, got "
                         f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
    if images.shape[1] != 3:
        raise ValueError(f"IQA metric '{metric}': {what} must have 3 (RGB) channels, got {images.shape[1]}")
    if images.shape[2] < 2 or images.shape[3] < 2:
        raise ValueError(f"IQA metric '{metric}': {what} are {images.shape[3]}x{images.shape[2]} pixels; "
                         f"at least 2x2 is needed (most metrics need 32x32 or more)")


# ----------------------------------------------------------------------------------------------------
# Loading + cache
# ----------------------------------------------------------------------------------------------------

_CACHE: dict[tuple, tuple[LoadedMetric, list[tuple]]] = {}  # insertion order = least recently used first
_CACHE_LOCK = threading.RLock()
METRIC_CACHE_SIZE = 4  # cached metrics, counting each (device, differentiable) variant: the cap holds on every path


def _guarded_create(name: str, folders: list[str], clip_mode: str = "load", clip_folders: list[str] | None = None,
                    clip_seed: int = 0):
    """pyiqa.create_metric under `_SafeBuild`; returns (model on CPU, the build with its pending loads)."""
    _set_offline_environment()
    import pyiqa
    from pyiqa.default_model_configs import DEFAULT_CONFIGS
    if name not in DEFAULT_CONFIGS:
        raise ValueError(f"unknown IQA metric {name!r}: not in pyiqa's registry (pyiqa.list_models())")
    arch_type = DEFAULT_CONFIGS[name]["metric_opts"]["type"]
    from pyiqa.archs import _lazy_import_arch  # import the arch module first so its globals can be patched
    _lazy_import_arch(arch_type)
    build = _SafeBuild(name, folders, clip_mode=clip_mode, clip_folders=clip_folders)
    build.clip_seed = clip_seed
    with build:
        model = pyiqa.create_metric(name, as_loss=False, device=torch.device("cpu"))
    return model, build


def _placeholder_text_features(arch, texts: torch.Tensor) -> torch.Tensor:
    return torch.zeros(texts.shape[0], arch.clip_model.text_projection.shape[1])


def _recompute_derived_features(arch: torch.nn.Module, device: torch.device) -> None:
    """pyiqa computes LIQE's prompt features while building, i.e. before our deferred weight load (during
    the build they are placeholders): compute them with the loaded (fine-tuned) CLIP, as pyiqa's own order
    would have, on the metric's device."""
    if hasattr(arch, "joint_texts") and callable(getattr(arch, "get_text_features", None)):
        with torch.no_grad():
            arch.text_features = arch.get_text_features(arch.joint_texts.to(device))


def build_pyiqa_metric(name: str, user_folders: Iterable[str] = (), device: str | torch.device = "cpu"):
    """pyiqa's InferenceModel for `name`, its weights read safely from local files only.
    Returns (model, weight files used)."""
    folders = search_folders(user_folders)
    model, build = _guarded_create(name, folders)
    with build:
        build.apply_pending_loads(model.net)
    device = torch.device(device)
    model = model.to(device)
    model.dummy_param = model.dummy_param.to(device)  # pyiqa reads the device from this plain tensor
    _recompute_derived_features(model.net, device)
    model.eval()
    return model, list(build.files_used)


def load_metric(name: str, user_folders: Iterable[str] = (), device: str = "auto",
                differentiable: bool = False, use_cache: bool = True) -> LoadedMetric:
    """Build (or reuse) a metric. Fails within seconds with MissingMetricWeightsError when a file is absent."""
    user_folders = tuple(os.path.abspath(f) for f in user_folders)
    torch_device = resolve_device(device)
    key = (name, str(torch_device), bool(differentiable), user_folders)
    with _CACHE_LOCK:
        if use_cache and key in _CACHE:
            metric, signatures = _CACHE[key]
            try:
                if [_signature(path) for path, *_ in signatures] == signatures:
                    _CACHE[key] = _CACHE.pop(key)  # most recently used
                    return metric  # same files, unchanged
            except OSError:
                pass  # a weight file vanished: rebuild (and fail clearly if it is really gone)
            _CACHE.pop(key, None)
        info = metric_info(name)
        model, files = build_pyiqa_metric(name, user_folders, torch_device)
        if differentiable:
            for parameter in model.parameters():
                parameter.requires_grad_(False)  # gradients flow to the image, not into the metric
        metric = LoadedMetric(
            name=name, lower_better=bool(getattr(model, "lower_better", info.lower_better)),
            score_range=info.score_range, differentiable=bool(differentiable),
            is_full_reference=getattr(model, "metric_mode", None) == "FR", device=torch_device,
            net=model, weight_files=files)
        if use_cache:
            while len(_CACHE) >= METRIC_CACHE_SIZE:
                del _CACHE[next(iter(_CACHE))]
            _CACHE[key] = (metric, [_signature(path) for path in files])
        return metric


def clear_metric_cache(name: str | None = None) -> int:
    """Drop cached metrics (all, or one id); returns how many were dropped."""
    with _CACHE_LOCK:
        keys = [key for key in _CACHE if name is None or key[0] == name]
        for key in keys:
            del _CACHE[key]
    return len(keys)


def cached_metric_names() -> list[str]:
    with _CACHE_LOCK:
        return [key[0] for key in _CACHE]


@dataclass
class IQAScores:
    """IQA_SCORES: {metric: [one float per image]} plus each metric's direction and range."""
    scores: dict[str, list[float]] = field(default_factory=dict)
    lower_better: dict[str, bool] = field(default_factory=dict)
    score_range: dict[str, tuple[float, float] | None] = field(default_factory=dict)
    score_size: str = "native"             # SCORE_SIZES: how the images were sized for the metric

    def add(self, metric: LoadedMetric, values: list[float]) -> None:
        self.scores[metric.name] = [float(v) for v in values]
        self.lower_better[metric.name] = bool(metric.lower_better)
        self.score_range[metric.name] = metric.score_range

    def table(self) -> str:
        """Plain-text table: one row per image, one column per metric, then the mean."""
        names = list(self.scores)
        count = max((len(v) for v in self.scores.values()), default=0)
        heads = [f"{n} ({'lower' if self.lower_better[n] else 'higher'} better)" for n in names]
        widths = [max(len(h), 12) for h in heads]
        lines = ["image  " + "  ".join(h.rjust(w) for h, w in zip(heads, widths))]
        for i in range(count):
            cells = [f"{self.scores[n][i]:.6g}".rjust(w) for n, w in zip(names, widths)]
            lines.append(f"{i:>5}  " + "  ".join(cells))
        means = [f"{sum(self.scores[n]) / len(self.scores[n]):.6g}".rjust(w) if self.scores[n] else "-".rjust(w)
                 for n, w in zip(names, widths)]
        lines.append(" mean  " + "  ".join(means))
        lines.append(f"scored {SCORE_SIZE_NOTES.get(self.score_size, self.score_size)}")
        return "\n".join(lines)

    def rows(self, **extra) -> list[dict]:
        return [{**extra, "image": i, "metric": name, "lower_better": self.lower_better[name],
                 "score_size": self.score_size, "score": value}
                for name, values in self.scores.items() for i, value in enumerate(values)]


# ----------------------------------------------------------------------------------------------------
# Chunked scoring
# ----------------------------------------------------------------------------------------------------

def score_in_chunks(metric: LoadedMetric, images_bchw: torch.Tensor, ref_bchw: torch.Tensor | None = None,
                    chunk_size: int = 8, progress: Callable[[int, int], None] | None = None,
                    score_size: str = "native") -> torch.Tensor:
    """Scores (B,) on CPU, `chunk_size` images per forward; `progress(done, total)` after each chunk
    (it may raise to interrupt). `score_size` (SCORE_SIZES) resizes each chunk (and its reference) first."""
    if score_size not in SCORE_SIZES:
        raise ValueError(f"score size must be one of {list(SCORE_SIZES)}, got {score_size!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    total = images_bchw.shape[0]
    if ref_bchw is not None and metric.is_full_reference and ref_bchw.shape[0] not in (1, total):
        raise ValueError(f"IQA metric '{metric.name}': {ref_bchw.shape[0]} reference images for {total} "
                         f"images (give 1 or {total})")
    results = []
    for start in range(0, total, chunk_size):
        chunk = images_bchw[start:start + chunk_size]
        ref = None
        if metric.is_full_reference and ref_bchw is not None:
            ref = ref_bchw.expand(total, *ref_bchw.shape[1:]) if ref_bchw.shape[0] == 1 else ref_bchw
            ref = ref[start:start + chunk_size]
        chunk = resize_for_scoring(chunk, score_size)
        ref = resize_for_scoring(ref, score_size) if ref is not None else None
        scores = metric.score(chunk, ref)
        results.append(scores.detach().float().cpu() if not metric.differentiable else scores)
        if progress is not None:
            progress(min(start + chunk_size, total), total)
    return torch.cat(results) if results else torch.zeros(0)


def expected_weight_files(name: str, user_folders: Iterable[str] = ()) -> list[str]:
    """File names (pyiqa's default names) the metric's network reads at load time; [] = weight-free.
    CLIP backbones come first, under OpenAI's names (e.g. 'ViT-L-14.pt'; '.safetensors' is accepted too).
    Other files read during the build itself (e.g. NIQE's .mat) are only reported when missing, by the error."""
    folders = search_folders(user_folders)
    model, build = _guarded_create(name, folders, clip_mode="plan")
    clip_files = list(dict.fromkeys(load.file_name for load in build.clip_loads))
    return clip_files + [load.file_name for load in build.needed_loads(model.net)]


def write_random_weights(name: str, folder: str, seed: int = 0, noise: float = 0.0) -> list[str]:
    """Write random weights for `name` into `folder` under pyiqa's default file names, in the layout pyiqa
    expects ('params' wrapper where the arch uses one). For tests and benchmarks: no real weights exist
    offline. `noise` > 0 perturbs the constructor's init (seeded) so two seeds give different networks.
    CLIP backbones: a CLIP file already in `folder` is kept and used (they are large; see
    `write_random_clip_weights` for small test-sized ones); a missing one is generated with the official
    architecture. Files pyiqa reads during the build (e.g. clipiqa+'s prompt tensor) are not generated."""
    os.makedirs(folder, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    model, build = _guarded_create(name, search_folders([]), clip_mode="random",
                                   clip_folders=[os.path.abspath(folder)], clip_seed=seed)
    written = []
    for clip_load in build.clip_loads:
        if clip_load.path is None:
            path = os.path.join(folder, clip_load.file_name)
            state = random_clip_model(clip_load.clip_name, seed).state_dict()
            torch.save({key: value.contiguous() for key, value in state.items()}, path)
            written.append(path)
    for load in build.needed_loads(model.net):
        state = {}
        for key, tensor in load.module.state_dict().items():
            tensor = tensor.detach().clone()
            if noise > 0 and tensor.is_floating_point() and tensor.numel() > 1:
                tensor = tensor + noise * tensor.std().nan_to_num(0.0) * torch.randn(tensor.shape, generator=generator)
            state[key] = tensor.contiguous()
        payload = {load.weight_keys: state} if load.weight_keys else state
        path = os.path.join(folder, load.file_name)
        torch.save(payload, path)
        written.append(path)
    return written


_EXPECTED_FILES: dict[str, list[str] | None] = {}


def missing_weight_files(name: str, user_folders: Iterable[str] = (), plan: bool = True) -> list[str] | None:
    """Weight files `name` needs that are in none of the searched folders ([] = ready to load; None =
    not known). Reads the catalog (models/metric_catalog.json); with `plan`, a metric it does not list is
    planned once (architecture only, no weights read) and remembered."""
    from ..models.metrics import catalog_weight_files
    files = catalog_weight_files(name)
    if files is None:
        if not plan:
            return None
        if name not in _EXPECTED_FILES:
            try:
                _EXPECTED_FILES[name] = expected_weight_files(name, user_folders)
            except MissingMetricWeightsError as error:
                _EXPECTED_FILES[name] = [error.file_name]
            except Exception:  # noqa: BLE001 - not buildable offline: the loader says why when it runs
                _EXPECTED_FILES[name] = None
        files = _EXPECTED_FILES[name]
        if files is None:
            return None
    folders = search_folders(user_folders)
    clip_folders = folders + [f for f in clip_cache_dirs() if f not in folders]
    return [file for file in files if find_weight_file(file, clip_folders) is None]
