"""CLIP-based pyiqa metrics offline: real pyiqa + real `clip` package code, generated CLIP weights, no network.

The CLIP loaders (clip.load, pyiqa's clip_model.load) would download OpenAI's TorchScript file and
torch.jit.load it. The pack replaces them during a guarded build: the same file name is looked up locally,
read as tensors only, and rebuilt by the module's own build_model(state_dict). RN50 (clipiqa, ~100M
parameters) is cheap enough to generate at its real size; laion_aes (ViT-L/14, ~430M) and LIQE (ViT-B/32)
run on CLIPs with the official layout but a tiny width (build_model infers the architecture from shapes).
"""
from __future__ import annotations

import pathlib
import time

import pytest
import torch

pytest.importorskip("pyiqa", reason="SKIPPED LOUDLY: pyiqa is not installed (requirements.txt)")
pytest.importorskip("clip", reason="SKIPPED LOUDLY: the openai 'clip' package (pyiqa dependency) is not installed")

from comfyui_iqa_adapter.adapter import iqa_models, metric_files  # noqa: E402
from comfyui_iqa_adapter.scripts import random_weights  # noqa: E402
from support.bad_files import RunsCode  # noqa: E402

pytestmark = pytest.mark.usefixtures("isolated_metric_caches")

LAION_HEAD = "sac+logos+ava1-l14-linearMSE.pth"
CLIPIQA_PLUS_PROMPTS = "CLIP-IQA+_learned_prompts-603f3273.pth"
# official layout (embed 768 for laion_aes' head), tiny widths: seconds instead of minutes
TINY_VIT_L14 = dict(vision_width=64, vision_layers=2, transformer_width=64, transformer_heads=1, transformer_layers=1)
TINY_VIT_B32 = dict(vision_width=64, vision_layers=2, transformer_width=64, transformer_heads=1, transformer_layers=1)


@pytest.fixture(scope="module")
def rn50_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_rn50")
    start = time.monotonic()
    path = random_weights.write_random_clip_weights("RN50", str(folder), seed=1)
    print(f"\nrandom RN50 CLIP written in {time.monotonic() - start:.1f} s")
    assert pathlib.Path(path).name == "RN50.pt"
    return folder


def images(count=2, size=224, seed=0):
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def pyiqa_with_local_clip(monkeypatch, arch_module, loader_module, clip_path, name, returns_preprocess, **kwargs):
    """pyiqa itself, its CLIP loader replaced by the non-JIT branch of that loader on the local tensors
    (build_model(state_dict), fp32 on CPU): the reference the pack must reproduce."""
    import pyiqa

    def local_load(clip_name, *args, **kw):
        model = loader_module.build_model(torch.load(clip_path, map_location="cpu", weights_only=True)).float()
        return (model, None) if returns_preprocess else model

    with monkeypatch.context() as patch:
        patch.setattr(arch_module, "load", local_load)
        return pyiqa.create_metric(name, device="cpu", **kwargs).eval()


def test_clipiqa_scores_equal_pyiqa_with_the_same_clip(rn50_dir, network_attempts, monkeypatch):
    start = time.monotonic()
    metric = iqa_models.load_metric("clipiqa", [str(rn50_dir)], "cpu")
    print(f"\nclipiqa built from RN50.pt in {time.monotonic() - start:.1f} s")
    assert metric.weight_files == [str(rn50_dir / "RN50.pt")]
    ours = iqa_models.score_in_chunks(metric, images(3), chunk_size=2)

    import pyiqa.archs.clip_model as clip_model
    import pyiqa.archs.clipiqa_arch as clipiqa_arch
    baseline = pyiqa_with_local_clip(monkeypatch, clipiqa_arch, clip_model, rn50_dir / "RN50.pt", "clipiqa", False)
    with torch.no_grad():
        theirs = baseline(images(3)).reshape(-1)
    assert torch.isfinite(ours).all() and ours.shape == (3,)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    assert network_attempts == []


def test_other_clip_weights_give_other_scores_and_the_cache_follows_the_file(rn50_dir, tmp_path):
    # (two separate builds from the same tensors score identically: test_safetensors_clip_is_accepted)
    first = iqa_models.load_metric("clipiqa", [str(rn50_dir)], "cpu").score(images())
    other = tmp_path / "other"
    random_weights.write_random_clip_weights("RN50", str(other), seed=2)
    cached = iqa_models.load_metric("clipiqa", [str(other)], "cpu")
    assert not torch.allclose(first, cached.score(images()))
    # overwrite the CLIP file: the cached metric is rebuilt from the new tensors
    random_weights.write_random_clip_weights("RN50", str(other), seed=3)
    rebuilt = iqa_models.load_metric("clipiqa", [str(other)], "cpu")
    assert rebuilt is not cached


def test_safetensors_clip_is_accepted(rn50_dir, tmp_path):
    from safetensors.torch import save_file

    state = torch.load(rn50_dir / "RN50.pt", weights_only=True)
    save_file(state, str(tmp_path / "RN50.safetensors"))
    from_st = iqa_models.load_metric("clipiqa", [str(tmp_path)], "cpu")
    assert from_st.weight_files == [str(tmp_path / "RN50.safetensors")]
    from_pt = iqa_models.load_metric("clipiqa", [str(rn50_dir)], "cpu")
    torch.testing.assert_close(from_st.score(images()), from_pt.score(images()), atol=0, rtol=0)


def test_clipiqa_plus_reads_its_prompt_file(rn50_dir, tmp_path):
    user = tmp_path / "iqa"
    user.mkdir()
    with pytest.raises(metric_files.MissingMetricWeightsError, match=r"CLIP-IQA\+_learned_prompts"):
        iqa_models.load_metric("clipiqa+", [str(rn50_dir), str(user)], "cpu")
    prompts = torch.randn(2, 16, 512, generator=torch.Generator().manual_seed(7))
    torch.save(prompts, user / CLIPIQA_PLUS_PROMPTS)
    metric = iqa_models.load_metric("clipiqa+", [str(rn50_dir), str(user)], "cpu")
    torch.testing.assert_close(metric.arch.prompt_learner.ctx.detach(), prompts, atol=0, rtol=0)
    assert str(user / CLIPIQA_PLUS_PROMPTS) in metric.weight_files
    first = metric.score(images())
    torch.save(prompts * -1.0, user / CLIPIQA_PLUS_PROMPTS)
    second = iqa_models.load_metric("clipiqa+", [str(rn50_dir), str(user)], "cpu", use_cache=False).score(images())
    assert torch.isfinite(first).all() and not torch.allclose(first, second)


def test_laion_aes_missing_clip_fails_fast_without_network(tmp_path, network_attempts):
    user = tmp_path / "models" / "iqa"
    user.mkdir(parents=True)
    with pytest.raises(metric_files.MissingMetricWeightsError) as caught:
        iqa_models.load_metric("laion_aes", [str(user)], "cpu")
    message = str(caught.value)
    assert "laion_aes" in message and "'ViT-L-14.pt'" in message and str(user) in message
    assert "ViT-L-14.safetensors" in message and "clip.load('ViT-L/14'" in message  # the conversion line
    assert network_attempts == []


def test_laion_aes_end_to_end_equals_pyiqa(tmp_path, network_attempts, monkeypatch):
    user = tmp_path / "iqa"
    clip_path = pathlib.Path(random_weights.write_random_clip_weights("ViT-L/14", str(user), seed=4, **TINY_VIT_L14))
    assert clip_path.name == "ViT-L-14.pt"
    # the CLIP is there, the head is not: the error names the head file
    with pytest.warns(UserWarning, match="not the official CLIP ViT-L/14"):
        with pytest.raises(metric_files.MissingMetricWeightsError, match=r"sac\+logos\+ava1-l14-linearMSE\.pth"):
            iqa_models.load_metric("laion_aes", [str(user)], "cpu")
    with pytest.warns(UserWarning, match="not the official CLIP ViT-L/14"):
        written = random_weights.write_random_weights("laion_aes", str(user), seed=5, noise=0.1)
    assert [pathlib.Path(p).name for p in written] == [LAION_HEAD]  # the existing CLIP file is kept
    with pytest.warns(UserWarning, match="not the official CLIP ViT-L/14"):
        metric = iqa_models.load_metric("laion_aes", [str(user)], "cpu")
    assert sorted(pathlib.Path(p).name for p in metric.weight_files) == sorted(["ViT-L-14.pt", LAION_HEAD])
    ours = metric.score(images(2))

    import clip
    import clip.model
    baseline = pyiqa_with_local_clip(monkeypatch, clip, clip.model, clip_path, "laion_aes", True, pretrained=False)
    head = torch.load(user / LAION_HEAD, weights_only=True)
    baseline.net.mlp.load_state_dict(head, strict=True)
    with torch.no_grad():
        theirs = baseline(images(2)).reshape(-1)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-6)
    assert network_attempts == []


def test_expected_weight_files_name_the_clip():
    assert iqa_models.expected_weight_files("clipiqa") == ["RN50.pt"]
    assert iqa_models.expected_weight_files("laion_aes") == ["ViT-L-14.pt", LAION_HEAD]


def test_liqe_text_features_come_from_the_loaded_weights(tmp_path):
    import pyiqa.archs.liqe_arch as liqe_arch

    feature_cache = pathlib.Path(liqe_arch.DEFAULT_CACHE_DIR) / "liqe_text_feat.pt"  # fixed at pyiqa's import
    cache_before = feature_cache.stat().st_mtime if feature_cache.exists() else None
    user = tmp_path / "iqa"
    random_weights.write_random_clip_weights("ViT-B/32", str(user), seed=6, **TINY_VIT_B32)
    with pytest.warns(UserWarning):
        written = random_weights.write_random_weights("liqe", str(user), seed=6, noise=0.2)
    assert [pathlib.Path(p).name for p in written] == ["liqe_koniq.pt"]
    with pytest.warns(UserWarning):
        metric = iqa_models.load_metric("liqe", [str(user)], "cpu")
    arch = metric.arch
    # pyiqa computes the prompt features during the build; they must be those of the loaded (fine-tuned) CLIP
    with torch.no_grad():
        torch.testing.assert_close(arch.text_features, arch.get_text_features(arch.joint_texts))
    scores = metric.score(images(1, size=224))
    assert torch.isfinite(scores).all()
    # pyiqa would cache these features (from whatever CLIP came first) and reuse them: nothing was written
    assert (feature_cache.stat().st_mtime if feature_cache.exists() else None) == cache_before


def test_malicious_clip_pickle_is_never_executed(tmp_path, network_attempts):
    marker = tmp_path / "PWNED"
    user = tmp_path / "iqa"
    user.mkdir()
    torch.save({"visual.proj": torch.zeros(1), "evil": RunsCode(str(marker))}, user / "ViT-L-14.pt")
    with pytest.raises(metric_files.UnsafeWeightsError, match="could not be read safely"):
        iqa_models.load_metric("laion_aes", [str(user)], "cpu")
    assert not marker.exists()
    assert network_attempts == []


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_clip_is_refused_with_the_conversion_line(tmp_path, monkeypatch):
    user = tmp_path / "iqa"
    user.mkdir()
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(user / "RN50.pt"))  # what OpenAI ships: a TorchScript zip
    jit_calls = []
    original_jit_load = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: jit_calls.append(a) or original_jit_load(*a, **k))
    with pytest.raises(metric_files.UnsafeWeightsError) as caught:
        iqa_models.load_metric("clipiqa", [str(user)], "cpu")
    message = str(caught.value)
    assert "TorchScript" in message and "clip.load('RN50'" in message and "RN50.safetensors" in message
    assert jit_calls == []
