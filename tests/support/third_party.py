"""Other packs as test fixtures (never part of the pack): IPAdapter_plus installed into the test host.

The archive lies in `../shared/third_party/` beside the checkout (in CI too); `IQA_SHARED_DIR` points
elsewhere (e.g. from a git worktree). Its code is only run, never copied into the pack.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import shutil
import sys
import tarfile
import tempfile

import pytest
import torch

PACK_ROOT = pathlib.Path(__file__).resolve().parents[2]
IPADAPTER_ARCHIVE = "ComfyUI_IPAdapter_plus-9d076a3.tar.gz"
IPADAPTER_SHA256 = "2a06bb31cbdf84531d39004d607dd636603c9f07efa1eb4f0b6e7c736809b4f9"
IPADAPTER_DIR = "ComfyUI_IPAdapter_plus"
STAMP = ".iqa_test_fixture_sha256"
# IPAdapter_plus's own SD1.5 key walk (IPAdapterPlus.py ipadapter_execute): module key 2k+1 for layer k.
IPADAPTER_SD15_KEYS = ([("input", i) for i in (1, 2, 4, 5, 7, 8)] + [("output", i) for i in range(3, 12)]
                       + [("middle", 1)])


def shared_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("IQA_SHARED_DIR") or PACK_ROOT.parent / "shared").resolve()


def ipadapter_archive() -> pathlib.Path | None:
    path = shared_dir() / "third_party" / IPADAPTER_ARCHIVE
    return path if path.is_file() else None


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def install_ipadapter(comfy_dir: pathlib.Path) -> pathlib.Path | None:
    """Unpack IPAdapter_plus into the host's custom_nodes (before the server starts); None without the archive."""
    archive = ipadapter_archive()
    if archive is None:
        return None
    target = comfy_dir / "custom_nodes" / IPADAPTER_DIR
    if (target / STAMP).is_file() and (target / STAMP).read_text() == IPADAPTER_SHA256:
        return target
    digest = _sha256(archive)
    if digest != IPADAPTER_SHA256:
        raise RuntimeError(f"{archive}: sha256 {digest}, expected {IPADAPTER_SHA256}")
    with tempfile.TemporaryDirectory(dir=comfy_dir / "custom_nodes", prefix=".unpack-") as scratch:
        with tarfile.open(archive) as tar:
            tar.extractall(scratch, filter="data")
        (pathlib.Path(scratch) / IPADAPTER_DIR / STAMP).write_text(IPADAPTER_SHA256)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(pathlib.Path(scratch) / IPADAPTER_DIR, target)
    return target


def require_ipadapter(comfy_dir: pathlib.Path) -> pathlib.Path:
    installed = install_ipadapter(comfy_dir)
    if installed is None:
        reason = (f"{IPADAPTER_ARCHIVE} not found in {shared_dir() / 'third_party'} (set IQA_SHARED_DIR to the "
                  "folder holding third_party/)")
        if os.environ.get("CI"):
            pytest.fail("in CI the third-party fixtures must be present: " + reason)
        pytest.skip("SKIPPED LOUDLY: " + reason)
    return installed


def import_ipadapter(comfy_dir: pathlib.Path):
    """IPAdapter_plus's IPAdapterPlus module, imported in this process (the host must be on sys.path)."""
    package = "iqa_test_ipadapter_plus"
    if package + ".IPAdapterPlus" in sys.modules:
        return sys.modules[package + ".IPAdapterPlus"]
    folder = require_ipadapter(comfy_dir)
    spec = importlib.util.spec_from_file_location(package, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[package] = module
    spec.loader.exec_module(module)
    return sys.modules[package + ".IPAdapterPlus"]


def random_ip_adapter(cross_attention_dim: int, layer_widths: list[int], clip_dim: int = 64,
                      seed: int = 7) -> dict[str, torch.Tensor]:
    """A random base IP-Adapter (ImageProjModel, 4 tokens) in the released `.safetensors` layout:
    `image_proj.proj.*`, `image_proj.norm.*`, `ip_adapter.<2k+1>.to_{k,v}_ip.weight`.
    The key layout is the IQA-Adapter one (it follows IP-Adapter), so the pack's generator writes it."""
    from comfyui_iqa_adapter.scripts import random_weights

    return random_weights.random_adapter_state_dict(cross_attention_dim, layer_widths, num_tokens=4,
                                                    input_dim=clip_dim, seed=seed)


def nested(state_dict: dict[str, torch.Tensor]) -> dict:
    """What IPAdapter_plus's loader makes of a `.safetensors` file: {"image_proj": ..., "ip_adapter": ...}."""
    from comfyui_iqa_adapter.scripts import random_weights

    return random_weights.nested_bin_layout(state_dict)
