"""Where a pyiqa metric's weight files are found offline, and how they are read without unpickling.

Search order: the user folders (models/iqa), then pyiqa's cache dir (`torch.hub.get_dir()/pyiqa`), then
torch hub's `checkpoints/`. A file is accepted under its own name, under the same stem with `.safetensors`,
and under the percent-encoded spelling pyiqa's cache keeps. Reading goes through the bounded reader
(tensor_files): safetensors, or a torch zip read with `weights_only=True`; nothing is ever downloaded.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from urllib.parse import quote, unquote, urlparse

import torch

from . import tensor_files

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


def file_name_of(url_or_path: str) -> str:
    """The file name a URL or path stands for. URLs are percent-encoded ('sac%2Blogos...'): users see and
    save the plain name ('sac+logos...')."""
    return unquote(os.path.basename(urlparse(url_or_path).path)) if "://" in url_or_path \
        else os.path.basename(url_or_path)
