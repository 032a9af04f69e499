"""pyiqa metrics offline: real pyiqa architectures with generated weights, safe loading, reference encoding.

No network and no real weights exist here: `write_random_weights` saves a freshly built network's state dict
under pyiqa's default file name and layout ('params' wrapper where pyiqa expects one), and the loader
must read it back through the real pyiqa code.
"""
from __future__ import annotations

import json
import os
import pathlib
import time

import pytest
import torch

pytest.importorskip("pyiqa", reason="SKIPPED LOUDLY: pyiqa is not installed (requirements.txt)")

from comfyui_iqa_adapter.adapter import iqa_adapter, iqa_models, metric_files, reference  # noqa: E402
from comfyui_iqa_adapter.adapter.layers import SD15_LAYER_WIDTHS  # noqa: E402
from comfyui_iqa_adapter.models import metrics as catalog  # noqa: E402
from comfyui_iqa_adapter.scripts import random_weights  # noqa: E402
from support.bad_files import RunsCode  # noqa: E402

pytestmark = pytest.mark.usefixtures("isolated_metric_caches")

CNNIQA_FILE = "CNNIQA_koniq10k-e6f14c91.pth"


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("iqa_weights")
    for name in ("cnniqa", "musiq", "topiq_nr"):
        random_weights.write_random_weights(name, str(folder), seed=1, noise=0.05)
    return folder


def direct_pyiqa(name: str, weight_file: pathlib.Path, **build_kwargs):
    """pyiqa itself, built without weights, then given the same tensors (weights_only read)."""
    import pyiqa

    model = pyiqa.create_metric(name, device="cpu", **build_kwargs)
    state = torch.load(weight_file, map_location="cpu", weights_only=True)
    state = state.get("params", state)
    model.net.load_state_dict(state, strict=True)
    return model.eval()


@pytest.mark.parametrize("name, build_kwargs", [
    ("cnniqa", {"pretrained": None}),
    ("musiq", {"pretrained": False}),
    ("topiq_nr", {"pretrained": False, "backbone_pretrain": False}),
])
def test_scores_equal_direct_pyiqa(weights_dir, name, build_kwargs):
    metric = iqa_models.load_metric(name, [str(weights_dir)], "cpu")
    assert [os.path.dirname(f) for f in metric.weight_files] == [str(weights_dir)]
    files = iqa_models.expected_weight_files(name)
    assert len(files) == 1
    baseline = direct_pyiqa(name, weights_dir / files[0], **build_kwargs)
    images = torch.rand(3, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    ours = iqa_models.score_in_chunks(metric, images, chunk_size=2)
    with torch.no_grad():
        theirs = baseline(images).reshape(-1)
    assert ours.shape == (3,)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    # the file's weights really were used: pyiqa's own random init (no file) scores differently
    import pyiqa
    with torch.no_grad():
        unloaded = pyiqa.create_metric(name, device="cpu", **build_kwargs)(images).reshape(-1)
    assert not torch.allclose(ours, unloaded)


def test_random_weights_change_the_scores(weights_dir, tmp_path):
    other = tmp_path / "other"
    random_weights.write_random_weights("cnniqa", str(other), seed=2, noise=0.5)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    first = iqa_models.load_metric("cnniqa", [str(weights_dir)], "cpu", use_cache=False).score(images)
    second = iqa_models.load_metric("cnniqa", [str(other)], "cpu", use_cache=False).score(images)
    assert not torch.allclose(first, second)


def test_differentiable_scores_match_and_carry_gradients(weights_dir):
    plain = iqa_models.load_metric("cnniqa", [str(weights_dir)], "cpu", differentiable=False)
    grad = iqa_models.load_metric("cnniqa", [str(weights_dir)], "cpu", differentiable=True)
    assert plain is not grad and grad.differentiable
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    scores = grad.score(images)
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    torch.testing.assert_close(scores.detach(), plain.score(images.detach()), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["cnniqa", "piqe"])
def test_an_indexed_device_name_is_the_same_device(weights_dir, name):
    """accelerate names devices with an index ('cpu:0', 'cuda:1'): the metric builds and scores as on 'cpu'."""
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    plain = iqa_models.load_metric(name, [str(weights_dir)], "cpu", use_cache=False).score(images)
    indexed = iqa_models.load_metric(name, [str(weights_dir)], "cpu:0", use_cache=False)
    assert indexed.current_device().type == "cpu"
    torch.testing.assert_close(indexed.score(images), plain, atol=0, rtol=0)


def test_weight_free_metric_equals_pyiqa():
    import pyiqa

    metric = iqa_models.load_metric("piqe", [], "cpu")
    assert metric.lower_better is True and metric.score_range == (0.0, 100.0)
    assert metric.weight_files == []
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(metric.score(images), pyiqa.create_metric("piqe", device="cpu")(images).reshape(-1),
                               atol=1e-6, rtol=0)


def test_full_reference_metric_needs_reference_and_same_size():
    psnr = iqa_models.load_metric("psnr", [], "cpu")
    assert psnr.is_full_reference
    images = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match="full-reference"):
        psnr.score(images)
    with pytest.raises(ValueError, match="differs"):
        psnr.score(images, torch.rand(2, 3, 32, 40))
    values = iqa_models.score_in_chunks(psnr, images, images[:1], chunk_size=1)
    assert values.shape == (2,) and torch.isfinite(values[1])


def test_missing_weights_fail_without_network_and_say_where(tmp_path, network_attempts):
    user = tmp_path / "models" / "iqa"
    user.mkdir(parents=True)
    for name, file_name in (("musiq", "musiq_koniq_ckpt-e95806b9.pth"), ("cnniqa", CNNIQA_FILE),
                            ("topiq_nr", "cfanet_nr_koniq_res50-9a73138b.pth")):
        with pytest.raises(metric_files.MissingMetricWeightsError) as caught:
            iqa_models.load_metric(name, [str(user)], "cpu")
        assert network_attempts == [], f"{name}: the missing-weights path tried the network"
        message = str(caught.value)
        assert name in message and file_name in message and str(user) in message


def test_a_build_patches_only_what_pyiqa_sees(tmp_path, monkeypatch, network_attempts):
    """While pyiqa builds a metric, its modules see a guarded torch (no unpickling, no TorchScript, no
    downloads); the process-wide torch.load / torch.jit.load / Module.load_state_dict / torch.hub stay the
    originals for every other thread, and pyiqa's globals are restored afterwards."""
    import datetime
    import pickle
    import threading

    import pyiqa.archs.cnniqa_arch as cnniqa_arch

    folder = tmp_path / "weights"
    random_weights.write_random_weights("cnniqa", str(folder), seed=1)
    tensors, code = tmp_path / "tensors.pt", tmp_path / "object.pt"
    torch.save({"w": torch.ones(2)}, tensors)
    torch.save(datetime.date(2020, 1, 1), code)  # unpickling needs a global that is not a tensor type

    def process_wide():
        return torch.load, torch.jit.load, torch.nn.Module.load_state_dict, torch.hub.load_state_dict_from_url
    originals = process_wide()
    seen = {}
    build_network = cnniqa_arch.CNNIQA.__init__

    def attempt(what, call):
        try:
            seen[what] = call()
        except Exception as error:  # noqa: BLE001 - the test inspects what was raised
            seen[what] = error

    def spying_init(self, *args, **kwargs):
        other = threading.Thread(target=lambda: seen.setdefault("other thread", process_wide()))
        other.start()
        other.join()
        guarded = cnniqa_arch.torch
        seen["pyiqa torch"] = guarded
        attempt("tensors, positional map_location", lambda: guarded.load(str(tensors), "cpu"))
        attempt("pickled object", lambda: guarded.load(str(code), "cpu"))
        attempt("torchscript", lambda: guarded.jit.load(str(tensors)))
        attempt("download",
                lambda: guarded.hub.download_url_to_file("https://example.invalid/x.pth", str(tmp_path / "x")))
        build_network(self, *args, **kwargs)

    monkeypatch.setattr(cnniqa_arch.CNNIQA, "__init__", spying_init)
    metric = iqa_models.load_metric("cnniqa", [str(folder)], "cpu", use_cache=False)
    assert metric.weight_files == [str(folder / CNNIQA_FILE)]
    assert all(a is b for a, b in zip(seen["other thread"], originals)), "a process-wide function was replaced"
    assert all(a is b for a, b in zip(process_wide(), originals))
    assert seen["pyiqa torch"] is not torch and cnniqa_arch.torch is torch  # guarded during the build only
    assert torch.equal(seen["tensors, positional map_location"]["w"], torch.ones(2))
    assert isinstance(seen["pickled object"], pickle.UnpicklingError)  # weights_only=True, whatever pyiqa asks
    assert isinstance(seen["torchscript"], metric_files.UnsafeWeightsError)
    assert isinstance(seen["download"], metric_files.MissingMetricWeightsError)
    assert network_attempts == []


def test_face_metric_names_its_detector_file_without_network(network_attempts):
    """topiq_nr-face builds facexlib's face detector, whose loader downloads: it is answered locally too."""
    pytest.importorskip("facexlib", reason="SKIPPED LOUDLY: facexlib (pyiqa dependency) is not installed")
    with pytest.raises(metric_files.MissingMetricWeightsError, match=r"detection_Resnet50_Final\.pth"):
        iqa_models.expected_weight_files("topiq_nr-face")
    assert network_attempts == []


def test_file_in_pyiqa_cache_dir_is_found(tmp_path):
    cache = metric_files.pyiqa_cache_dir()
    assert cache.startswith(str(tmp_path))  # TORCH_HOME isolation is effective
    random_weights.write_random_weights("cnniqa", cache, seed=3)
    metric = iqa_models.load_metric("cnniqa", [str(tmp_path / "empty")], "cpu")
    assert metric.weight_files == [os.path.join(cache, CNNIQA_FILE)]


def test_safetensors_copy_is_accepted(weights_dir, tmp_path):
    from safetensors.torch import save_file

    state = torch.load(weights_dir / CNNIQA_FILE, weights_only=True)["params"]
    save_file(state, str(tmp_path / CNNIQA_FILE.replace(".pth", ".safetensors")))
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    from_st = iqa_models.load_metric("cnniqa", [str(tmp_path)], "cpu").score(images)
    from_pth = iqa_models.load_metric("cnniqa", [str(weights_dir)], "cpu").score(images)
    torch.testing.assert_close(from_st, from_pth, atol=0, rtol=0)


def test_pickle_payload_is_never_executed(tmp_path):
    marker = tmp_path / "PWNED"
    user = tmp_path / "iqa"
    user.mkdir()
    torch.save({"params": {"conv1.weight": torch.zeros(1)}, "evil": RunsCode(str(marker))}, user / CNNIQA_FILE)
    with pytest.raises(metric_files.UnsafeWeightsError, match="could not be read safely"):
        iqa_models.load_metric("cnniqa", [str(user)], "cpu")
    assert not marker.exists()


def test_cache_reuses_and_reloads_when_the_file_changes(tmp_path):
    random_weights.write_random_weights("cnniqa", str(tmp_path), seed=4)
    first = iqa_models.load_metric("cnniqa", [str(tmp_path)], "cpu")
    assert iqa_models.load_metric("cnniqa", [str(tmp_path)], "cpu") is first
    path = tmp_path / CNNIQA_FILE
    random_weights.write_random_weights("cnniqa", str(tmp_path), seed=5, noise=0.5)
    os.utime(path, (time.time() + 5, time.time() + 5))
    second = iqa_models.load_metric("cnniqa", [str(tmp_path)], "cpu")
    assert second is not first
    assert iqa_models.clear_metric_cache() == 1


def test_catalog_order_and_directions():
    offered = catalog.offered_metric_names()
    assert tuple(offered[:21]) == catalog.PAPER_METRICS
    assert {"piqe", "psnr", "ssim", "lpips"} <= set(offered)
    assert catalog.metric_info("musiq").score_range == (0.0, 100.0)
    assert catalog.metric_info("liqe").score_range == (1.0, 5.0)
    assert catalog.metric_info("lpips").lower_better and catalog.metric_info("lpips").is_full_reference
    assert not any(catalog.metric_info(name).lower_better for name in catalog.PAPER_METRICS)


def test_catalog_file_agrees_with_the_installed_pyiqa():
    """models/metric_catalog.json stands in for pyiqa's registry at server start: it must say what pyiqa says
    (rebuild it with scripts/metric_catalog.py after a pyiqa upgrade)."""
    import pyiqa

    from comfyui_iqa_adapter.scripts import metric_catalog

    stored = json.loads(catalog.CATALOG_FILE.read_text())
    assert stored["pyiqa"] == pyiqa.__version__
    live = metric_catalog.registry()
    assert list(stored["metrics"]) == list(live)
    for name, entry in live.items():
        assert {key: stored["metrics"][name][key] for key in entry} == entry, name
    # the weight files of the paper's default metric, as pyiqa names them
    assert stored["metrics"]["topiq_nr"]["files"] == iqa_models.expected_weight_files("topiq_nr", [])


# ---------------------------------------------------------------- reference encoding

def make_reference_adapter(folder: pathlib.Path, dim: int, model="cnniqa", layers=("conv1",), seed=0,
                           name="tiny_reference_adapter") -> pathlib.Path:
    from safetensors.torch import save_file

    state = random_weights.random_adapter_state_dict(768, SD15_LAYER_WIDTHS, num_tokens=2, input_dim=dim,
                                                seed=seed)
    path = folder / f"{name}.safetensors"
    save_file(state, str(path))
    (folder / f"{name}.json").write_text(json.dumps({
        "kind": "reference", "extractor": {"model": model, "layers": list(layers), "pooling": "avg", "dim": dim}}))
    return path


def test_reference_tokens_follow_the_reference(weights_dir, tmp_path):
    metric = iqa_models.load_metric("cnniqa", [str(weights_dir)], "cpu")
    adapter = iqa_adapter.load_adapter(make_reference_adapter(tmp_path, 50))
    gen = torch.Generator().manual_seed(5)
    sharp, blurry = torch.rand(1, 3, 64, 64, generator=gen), torch.full((1, 3, 64, 64), 0.5)
    vectors = reference.reference_vectors(adapter, metric, torch.cat([sharp, blurry]))
    # independent check of the hook: conv1's output, averaged over space
    with torch.no_grad():
        expected = metric.arch.conv1(torch.cat([sharp, blurry])).mean(dim=(2, 3))
    torch.testing.assert_close(vectors, expected)
    tokens = reference.encode_reference(adapter, metric, torch.cat([sharp, blurry]))
    assert tokens.cond.shape == (2, 2, 768)
    assert not torch.allclose(tokens.cond[0], tokens.cond[1])
    zero = adapter.projection(torch.zeros(1, 50))
    torch.testing.assert_close(tokens.uncond, zero.expand(2, -1, -1))
    negative = reference.encode_reference(adapter, metric, sharp, negative_bchw_01=blurry)
    torch.testing.assert_close(negative.uncond, tokens.cond[1:2])


def test_reference_errors(weights_dir, tmp_path):
    metric = iqa_models.load_metric("cnniqa", [str(weights_dir)], "cpu")
    wrong_dim = iqa_adapter.load_adapter(make_reference_adapter(tmp_path, 64, name="wrong_dim"))
    with pytest.raises(ValueError, match=r"50 values.*input_dim is 64"):
        reference.encode_reference(wrong_dim, metric, torch.rand(1, 3, 32, 32))
    wrong_layer = iqa_adapter.load_adapter(make_reference_adapter(tmp_path, 50, layers=("nope",), name="wrong_layer"))
    with pytest.raises(ValueError, match="'nope' does not exist"):
        reference.encode_reference(wrong_layer, metric, torch.rand(1, 3, 32, 32))
    other_model = iqa_adapter.load_adapter(make_reference_adapter(tmp_path, 50, model="musiq", name="other_model"))
    with pytest.raises(ValueError, match="trained on activations of 'musiq'"):
        reference.encode_reference(other_model, metric, torch.rand(1, 3, 32, 32))
    from safetensors.torch import save_file
    save_file(random_weights.random_adapter_state_dict(768, SD15_LAYER_WIDTHS, input_dim=2),
              str(tmp_path / "score.safetensors"))
    (tmp_path / "score.json").write_text(json.dumps({"kind": "score", "metrics": ["topiq_nr", "laion_aes"]}))
    score_adapter = iqa_adapter.load_adapter(tmp_path / "score.safetensors")
    with pytest.raises(ValueError, match="this adapter is score-conditioned"):
        reference.encode_reference(score_adapter, metric, torch.rand(1, 3, 32, 32))
