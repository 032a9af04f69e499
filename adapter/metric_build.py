"""Building a pyiqa metric offline and without unpickling, with pyiqa's own code.

pyiqa 0.1.16 downloads weights while a network is being built and reads them with
`torch.load(weights_only=False)`, which runs arbitrary code from the file. Here `pyiqa.create_metric` runs
inside `_SafeBuild`, which, for the duration of the build and only in the globals of the loaded pyiqa and
clip modules (what pyiqa's code sees; the rest of the process keeps the real functions):
  * replaces `load_pretrained_network` by a recorder: the (module, file) pairs are loaded after the build,
    by us, with safetensors or `torch.load(weights_only=True)` (pyiqa's key conventions: optional 'params'
    wrapper, 'module.' prefix), skipping loads whose tensors a later strict load overwrites (e.g. DBCNN's
    SCNN pre-load, torchvision/timm backbones inside a full checkpoint);
  * gives pyiqa views of `torch`, `torchvision`, `timm`: `torch.load` forces `weights_only=True`,
    `torch.jit.load` is refused (TorchScript archives, e.g. ARNIQA's regressor, are code), torch hub
    downloads are resolved locally, torchvision backbones are built without weights and their ImageNet
    file is recorded as a deferred load, `timm.create_model` gets `pretrained=False` (the metric checkpoint
    carries the backbone), and timm's `build_model_with_cfg` reads its pretrained file locally;
  * resolves every other file pyiqa asks for (`load_file_from_url`) with adapter/metric_files.py; a missing
    file raises `MissingMetricWeightsError` at once, naming the metric, the file name and the folder;
  * replaces the CLIP loaders (`clip.load`, pyiqa's `clip_model.load` / `afineclip_model.load`) by
    adapter/clip_weights.py's local, tensors-only loading.
The process-wide `torch.load`, `torch.jit.load`, `torch.hub` and `nn.Module.load_state_dict` are never
replaced; a lock serialises builds, and everything is restored when the build ends.
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from .clip_weights import (
    CLIP_LOADER_MODULES,
    build_clip_from_file,
    clip_cache_dirs,
    clip_conversion_hint,
    clip_file_name,
    official_clip,
)
from .metric_files import (
    MissingMetricWeightsError,
    UnsafeWeightsError,
    file_name_of,
    find_weight_file,
    read_state_dict,
    search_folders,
    unwrap_state_dict,
)

PATCHED_PACKAGES = ("pyiqa", "clip", "facexlib")  # modules whose globals a build replaces (facexlib: face metrics)
_SCRATCH_CACHE_MODULES = ("pyiqa.archs.liqe_arch",)
_BUILD_LOCK = threading.RLock()

# (loader module, clip name) -> a CLIP network, for CLIP files that are not read
ClipMaker = Callable[[types.ModuleType, str], torch.nn.Module]


@dataclass
class PendingLoad:
    """A weight file pyiqa asked to load into `module`, loaded (or skipped) after the build."""
    module: torch.nn.Module
    file_name: str
    strict: bool
    weight_keys: str | None


@dataclass
class ClipLoad:
    clip_name: str                # e.g. 'ViT-L/14'
    file_name: str                # e.g. 'ViT-L-14.pt'
    path: str | None              # None: made by the build's ClipMaker, not read from a file
    model: torch.nn.Module


class _ModuleView(types.ModuleType):
    """`real` as pyiqa's modules see it during a build: the attributes in `overrides`, the rest real."""

    def __init__(self, real: types.ModuleType, overrides: dict):
        super().__init__(real.__name__, real.__doc__)
        self.__dict__.update(overrides)
        self.__dict__["_real_module"] = real

    def __getattr__(self, name):
        return getattr(self.__dict__["_real_module"], name)


class _SafeBuild:
    """Context for one metric build; see the module docstring."""

    def __init__(self, metric: str, folders: list[str], make_clip: ClipMaker | None = None,
                 read_clip_files: bool = True, clip_folders: list[str] | None = None):
        # make_clip: makes the CLIPs whose file is not read (absent, or read_clip_files=False); without
        # it a missing CLIP file is a MissingMetricWeightsError
        self.metric = metric
        self.folders = folders
        self.make_clip = make_clip
        self.read_clip_files = read_clip_files
        self.clip_folders = clip_folders
        self.pending: list[PendingLoad] = []
        self.clip_loads: list[ClipLoad] = []
        self.files_used: list[str] = []
        self._restore: list[tuple[object, str, object]] = []
        self._scratch = None

    # -- replacements ------------------------------------------------------------------------------
    def _resolve(self, url_or_path: str) -> str:
        name = file_name_of(url_or_path)
        path = find_weight_file(name, self.folders)
        if path is None:
            raise MissingMetricWeightsError(self.metric, name, self.folders)
        if path not in self.files_used:
            self.files_used.append(path)
        return path

    def load_pretrained_network(self, net, model_path, strict=True, weight_keys=None):
        self.pending.append(PendingLoad(net, file_name_of(model_path), bool(strict), weight_keys))

    def load_file_from_url(self, url, model_dir=None, progress=True, file_name=None):
        return self._resolve(file_name or url)

    def hub_load_state_dict_from_url(self, url, model_dir=None, map_location=None, progress=True,
                                     check_hash=False, file_name=None, weights_only=True):
        return read_state_dict(self._resolve(file_name or url))

    def refuse_download(self, url, *args, **kwargs):
        raise MissingMetricWeightsError(self.metric, file_name_of(url), self.folders)

    @staticmethod
    def torch_load(original):
        def load(*args, **kwargs):
            kwargs["weights_only"] = True
            return original(*args, **kwargs)
        return load

    def jit_load(self, *args, **kwargs):
        raise UnsafeWeightsError(
            f"IQA metric '{self.metric}' loads a TorchScript archive (it contains code); the pack does not "
            f"load such files. Use another metric.")

    def torchvision_builder(self, builder, weights_class):
        """A torchvision model builder that builds without weights; requested ImageNet weights (`weights=`,
        or the legacy `pretrained=True`, IMAGENET1K_V1) become a deferred load of their file."""
        def build(*args, weights=None, pretrained=False, **kwargs):
            if pretrained and weights is None:
                weights = "IMAGENET1K_V1"
            model = builder(*args, **kwargs)
            if weights is not None:
                url = weights_class.verify(weights).url
                self.pending.append(PendingLoad(model, file_name_of(url), True, None))
            return model
        return build

    @staticmethod
    def timm_create_model(original):
        def create_model(*args, pretrained=False, **kwargs):
            return original(*args, pretrained=False, **kwargs)
        return create_model

    def timm_build_model_with_cfg(self, original):
        """timm's builder with `pretrained`: its file is found locally and read as tensors."""
        def build_model_with_cfg(model_cls, variant, pretrained=False, *args, **kwargs):
            if not pretrained:
                return original(model_cls, variant, False, *args, **kwargs)
            cfg = kwargs.get("pretrained_cfg")
            url = cfg.get("url") if isinstance(cfg, dict) else getattr(cfg, "url", None)
            path = self._resolve(url or f"{variant}.pth")
            model = original(model_cls, variant, False, *args, **kwargs)
            state = read_state_dict(path)
            filter_fn = kwargs.get("pretrained_filter_fn")
            model.load_state_dict(filter_fn(state, model) if filter_fn else state,
                                  strict=kwargs.get("pretrained_strict", True))
            return model
        return build_model_with_cfg

    def _clip_search_folders(self, download_root: str | None) -> list[str]:
        if self.clip_folders is not None:
            return list(self.clip_folders)
        folders = list(self.folders)
        folders += [f for f in clip_cache_dirs(download_root) if f not in folders]
        return folders

    def clip_loader(self, module, returns_preprocess: bool, always_float: bool):
        """Replacement for `module.load(name, device, jit, download_root)`: local file, tensors only."""
        def load(name, device="cpu", jit=False, download_root=None):
            clip_name = str(name)
            file_name = clip_file_name(clip_name, module)
            folders = self._clip_search_folders(download_root)
            path = find_weight_file(file_name, folders) if self.read_clip_files else None
            if path is not None:
                model = build_clip_from_file(module, clip_name, path, self.metric)
                if path not in self.files_used:
                    self.files_used.append(path)
            elif self.make_clip is not None:
                model = self.make_clip(module, clip_name)
            else:
                raise MissingMetricWeightsError(self.metric, file_name, folders,
                                                hint=clip_conversion_hint(clip_name, file_name))
            model = model.to(device)
            if always_float or str(device) == "cpu":
                model.float()
            self.clip_loads.append(ClipLoad(clip_name, file_name, path, model))
            if returns_preprocess:
                return model, module._transform(model.visual.input_resolution)
            return model
        return load

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

    def _substitutes(self) -> dict[int, tuple[object, object]]:
        """id(original) -> (original, what pyiqa's modules see instead) for every replaced global."""
        import pyiqa.archs.arch_util as arch_util
        import pyiqa.utils.download_util as download_util

        torch_view = _ModuleView(torch, {
            "load": self.torch_load(torch.load),
            "jit": _ModuleView(torch.jit, {"load": self.jit_load}),
            "hub": _ModuleView(torch.hub, {"load_state_dict_from_url": self.hub_load_state_dict_from_url,
                                           "download_url_to_file": self.refuse_download}),
        })
        pairs = [(torch, torch_view), (torch.load, torch_view.load), (torch.jit, torch_view.jit),
                 (torch.jit.load, self.jit_load), (torch.hub, torch_view.hub),
                 (torch.hub.load_state_dict_from_url, self.hub_load_state_dict_from_url),
                 (torch.hub.download_url_to_file, self.refuse_download),
                 (arch_util.load_pretrained_network, self.load_pretrained_network),
                 (download_util.load_file_from_url, self.load_file_from_url)]
        try:
            import torchvision
            import torchvision.models as tv_models
        except ImportError:
            pass
        else:
            builders = {}
            for name in tv_models.list_models(module=tv_models):
                builder = getattr(tv_models, name, None)
                if builder is not None:
                    builders[name] = self.torchvision_builder(builder, tv_models.get_model_weights(name))
                    pairs.append((builder, builders[name]))
            models_view = _ModuleView(tv_models, builders)
            pairs += [(tv_models, models_view), (torchvision, _ModuleView(torchvision, {"models": models_view}))]
        try:
            import timm
            from timm.models import _builder as timm_builder
        except ImportError:
            pass
        else:
            create_model = self.timm_create_model(timm.create_model)
            pairs += [(timm, _ModuleView(timm, {"create_model": create_model})), (timm.create_model, create_model),
                      (timm_builder.build_model_with_cfg,
                       self.timm_build_model_with_cfg(timm_builder.build_model_with_cfg))]
        for loader_name, (returns_preprocess, always_float) in CLIP_LOADER_MODULES.items():
            loader = sys.modules.get(loader_name)
            if loader is not None and callable(getattr(loader, "load", None)):
                pairs.append((loader.load, self.clip_loader(loader, returns_preprocess, always_float)))
        for module in self._patched_modules():
            # CLIP downloads go through urllib in `_download(url, root)`: never reach it (defence in depth,
            # the loaders above do not call it)
            if callable(getattr(module, "_download", None)):
                pairs.append((module._download, lambda url, root=None: self._resolve(url)))
        return {id(original): (original, substitute) for original, substitute in pairs}

    @staticmethod
    def _patched_modules() -> list[types.ModuleType]:
        return [module for name, module in list(sys.modules.items())
                if module is not None and name.split(".")[0] in PATCHED_PACKAGES]

    def _install(self) -> None:
        substitutes = self._substitutes()
        for module in self._patched_modules():
            for name, value in list(vars(module).items()):
                original, substitute = substitutes.get(id(value), (None, None))
                if original is value:
                    self._patch(module, name, substitute)
        # LIQE caches text features computed by its CLIP in pyiqa's cache dir and reuses them whatever the
        # weights: give it a scratch dir (features are recomputed after the weights are loaded, see
        # `_recompute_derived_features`)
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
        try:
            import huggingface_hub.constants as hf_constants
            self._patch(hf_constants, "HF_HUB_OFFLINE", True)
        except ImportError:
            pass

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
    def needed_loads(self, top: torch.nn.Module) -> list[PendingLoad]:
        """Recorded loads that matter for `top`, in build order."""
        reachable = {id(t) for t in top.state_dict(keep_vars=True).values()}
        covered: set[int] = set()
        needed: list[PendingLoad] = []
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


def _set_offline_environment() -> None:
    # Effective for hub libraries imported after this; the build context also patches the constant.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _placeholder_text_features(arch, texts: torch.Tensor) -> torch.Tensor:
    return torch.zeros(texts.shape[0], arch.clip_model.text_projection.shape[1])


def _recompute_derived_features(arch: torch.nn.Module, device: torch.device) -> None:
    """pyiqa computes LIQE's prompt features while building, i.e. before our deferred weight load (during
    the build they are placeholders): compute them with the loaded (fine-tuned) CLIP, as pyiqa's own order
    would have, on the metric's device."""
    if hasattr(arch, "joint_texts") and callable(getattr(arch, "get_text_features", None)):
        with torch.no_grad():
            arch.text_features = arch.get_text_features(arch.joint_texts.to(device))


def _create(name: str, build: _SafeBuild):
    """pyiqa.create_metric under `build`; returns pyiqa's model on CPU."""
    _set_offline_environment()
    import pyiqa
    from pyiqa.default_model_configs import DEFAULT_CONFIGS
    if name not in DEFAULT_CONFIGS:
        raise ValueError(f"unknown IQA metric {name!r}: not in pyiqa's registry (pyiqa.list_models())")
    from pyiqa.archs import _lazy_import_arch  # import the arch module first so its globals can be patched
    _lazy_import_arch(DEFAULT_CONFIGS[name]["metric_opts"]["type"])
    with build:
        return pyiqa.create_metric(name, as_loss=False, device=torch.device("cpu"))


def build_metric(name: str, user_folders: Iterable[str] = (), device: str | torch.device = "cpu"):
    """pyiqa's InferenceModel for `name`, its weights read safely from local files only.
    Returns (model, weight files used)."""
    build = _SafeBuild(name, search_folders(user_folders))
    model = _create(name, build)
    with build:
        build.apply_pending_loads(model.net)
    device = torch.device(device)
    model = model.to(device)
    if not isinstance(model.dummy_param, torch.nn.Parameter):  # a registered one moved with the module
        model.dummy_param = model.dummy_param.to(device)  # pyiqa reads the device from this tensor
    _recompute_derived_features(model.net, device)
    model.eval()
    return model, list(build.files_used)


@dataclass
class MetricPlan:
    """A metric's network built without its weights, and the files a load would read."""
    model: torch.nn.Module                          # pyiqa's InferenceModel, CPU, constructor init
    clip_loads: list[ClipLoad] = field(default_factory=list)
    weight_loads: list[PendingLoad] = field(default_factory=list)   # the needed ones, in build order


def plan_metric(name: str, user_folders: Iterable[str] = (), make_clip: ClipMaker | None = None,
                clip_folders: list[str] | None = None) -> MetricPlan:
    """Build `name`'s architecture without reading its weight files. CLIP backbones: without `make_clip`
    no CLIP file is read (the official architecture); with it, a CLIP file found in `clip_folders` is
    read and a missing one is made by `make_clip`. Files read during the build itself (e.g. NIQE's .mat)
    raise MissingMetricWeightsError when absent."""
    if make_clip is None:
        build = _SafeBuild(name, search_folders(user_folders), make_clip=_official_clip, read_clip_files=False)
    else:
        build = _SafeBuild(name, search_folders(user_folders), make_clip=make_clip, clip_folders=clip_folders)
    model = _create(name, build)
    return MetricPlan(model, list(build.clip_loads), build.needed_loads(model.net))


def _official_clip(module, clip_name: str) -> torch.nn.Module:
    return official_clip(clip_name, module)
