"""Metric networks are visible to the host's model manager while scoring, and it can offload them."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("pyiqa", reason="SKIPPED LOUDLY: pyiqa is not installed (requirements.txt)")

from comfyui_iqa_adapter.adapter import iqa_models  # noqa: E402
from comfyui_iqa_adapter.scripts import random_weights  # noqa: E402


@pytest.fixture
def metric_nodes(comfy, host_dir):
    import folder_paths  # noqa: F401  (the host's, on sys.path through the `comfy` fixture)

    from comfyui_iqa_adapter.nodes import metric_nodes as module

    return module


def _managed_nets(comfy):
    return [loaded.model.model for loaded in comfy.model_management.current_loaded_models
            if loaded.model is not None]


def test_scoring_hands_the_metric_to_the_model_manager(comfy, metric_nodes, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    iqa_models.clear_metric_cache()
    random_weights.write_random_weights("cnniqa", str(tmp_path), seed=7, noise=0.05)
    metric = iqa_models.load_metric("cnniqa", [str(tmp_path)], device="cpu")
    images = torch.rand(3, 48, 40, 3, generator=torch.Generator().manual_seed(0))  # ComfyUI IMAGE layout

    first = metric_nodes.score_images([metric], images, None, chunk_size=2).scores["cnniqa"]
    assert any(net is metric.net for net in _managed_nets(comfy)), "the metric is not known to the model manager"
    assert metric_nodes.memory_managed(metric) is metric_nodes.memory_managed(metric), "one patcher per metric"

    comfy.model_management.unload_all_models()
    assert not any(net is metric.net for net in _managed_nets(comfy)), "the manager could not unload the metric"
    again = metric_nodes.score_images([metric], images, None, chunk_size=3).scores["cnniqa"]
    assert again == pytest.approx(first, abs=1e-6), "scores changed after the manager unloaded and reloaded it"
    # the node scores as the CC3M statistics were made (512x512 squash) by default
    direct = metric.score(iqa_models.resize_for_scoring(images.permute(0, 3, 1, 2), "cc3m")).tolist()
    assert first == pytest.approx(direct, abs=1e-6)
    iqa_models.clear_metric_cache()


def test_metric_cache_cap_counts_gradient_variants(tmp_path, monkeypatch):
    """The same metrics with and without gradients are separate entries; the cap holds over all of them."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    iqa_models.clear_metric_cache()
    random_weights.write_random_weights("cnniqa", str(tmp_path), seed=7, noise=0.05)
    for name in ("cnniqa", "piqe", "psnr"):
        for differentiable in (False, True):
            iqa_models.load_metric(name, [str(tmp_path)], device="cpu", differentiable=differentiable)
            assert len(iqa_models._CACHE) <= iqa_models.METRIC_CACHE_SIZE, list(iqa_models._CACHE)
    assert len(iqa_models._CACHE) == iqa_models.METRIC_CACHE_SIZE
    iqa_models.clear_metric_cache()


def test_replaced_metric_weights_with_preserved_mtime_are_read_again(tmp_path, monkeypatch):
    """`cp -p` / `rsync -t` keep size and mtime: the cache must still notice other weights."""
    import os

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    iqa_models.clear_metric_cache()
    (path,) = random_weights.write_random_weights("cnniqa", str(tmp_path), seed=7, noise=0.05)
    first = iqa_models.load_metric("cnniqa", [str(tmp_path)], device="cpu")
    assert iqa_models.load_metric("cnniqa", [str(tmp_path)], device="cpu") is first
    stat = os.stat(path)
    random_weights.write_random_weights("cnniqa", str(tmp_path), seed=8, noise=0.05)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size and os.stat(path).st_mtime_ns == stat.st_mtime_ns
    second = iqa_models.load_metric("cnniqa", [str(tmp_path)], device="cpu")
    assert second is not first, "other weights with the same size and mtime were served from the cache"
    images = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(first.score(images), second.score(images))
    iqa_models.clear_metric_cache()
