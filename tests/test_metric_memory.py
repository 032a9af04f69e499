"""Metric networks are visible to the host's model manager while scoring, and it can offload them."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("pyiqa", reason="SKIPPED LOUDLY: pyiqa is not installed (requirements.txt)")

from comfyui_iqa_adapter.adapter import iqa_models  # noqa: E402


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
    iqa_models.write_random_weights("cnniqa", str(tmp_path), seed=7, noise=0.05)
    metric = iqa_models.load_metric("cnniqa", [str(tmp_path)], device="cpu")
    images = torch.rand(3, 48, 40, 3, generator=torch.Generator().manual_seed(0))  # ComfyUI IMAGE layout

    first = metric_nodes.score_images([metric], images, None, chunk_size=2).scores["cnniqa"]
    assert any(net is metric.net for net in _managed_nets(comfy)), "the metric is not known to the model manager"
    assert metric_nodes.memory_managed(metric) is metric_nodes.memory_managed(metric), "one patcher per metric"

    comfy.model_management.unload_all_models()
    assert not any(net is metric.net for net in _managed_nets(comfy)), "the manager could not unload the metric"
    again = metric_nodes.score_images([metric], images, None, chunk_size=3).scores["cnniqa"]
    assert again == pytest.approx(first, abs=1e-6), "scores changed after the manager unloaded and reloaded it"
    direct = metric.score(images.permute(0, 3, 1, 2)).tolist()
    assert first == pytest.approx(direct, abs=1e-6)
    iqa_models.clear_metric_cache()
