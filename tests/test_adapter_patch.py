"""The attn2 patch on real host UNets: every cross-attention layer, cond/uncond and per-item targets,
chaining, weight 0 bit-identical, the start/end window, and clear errors for adapters that do not fit.

Forward passes call the host's own `BaseModel.apply_model` with the transformer options the sampler
would pass (cond_or_uncond, sigmas); full-depth SD1.5 / SDXL layouts are built with small channels.
"""
from __future__ import annotations

import copy

import pytest
import torch

from comfyui_iqa_adapter.adapter import checkpoint, iqa_adapter, projection
from comfyui_iqa_adapter.adapter.descriptor import Descriptor
from comfyui_iqa_adapter.scripts import random_weights

adapter_patch = None  # nodes/ imports the host: bound once the `comfy` fixture has put it on sys.path

TINY_ADAPTER_PATH = "models/iqa_adapter/tiny_sd15_iqa_adapter.safetensors"
DESCRIPTOR = Descriptor(metrics=("topiq_nr", "laion_aes"), source="test")

# Depth layouts of the host's detected configs (comfy/supported_models.py + model_detection), small channels.
SD15_SMALL = dict(random_weights.SD15_UNET_CONFIG, image_size=32, model_channels=64, context_dim=96)
SDXL_SMALL = dict(random_weights.SDXL_UNET_CONFIG, image_size=32, model_channels=64, context_dim=128,
                  adm_in_channels=64)
# SSD-1B-like: SDXL widths, fewer transformer blocks (the released 70-layer mapping does not apply).
SSD1B_SMALL = dict(SDXL_SMALL, transformer_depth=[0, 0, 2, 2, 4, 4],
                   transformer_depth_output=[0, 0, 0, 1, 1, 2, 10, 4, 4], transformer_depth_middle=-1)


def build_small_model(comfy, config_class: str, unet_config: dict, seed: int = 0):
    """A host ModelPatcher around a randomly initialised BaseModel of the given layout (CPU, fp32)."""
    import comfy.model_patcher
    import comfy.supported_models

    model_config = getattr(comfy.supported_models, config_class)(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    torch.manual_seed(seed)
    base = model_config.get_model({})
    with torch.no_grad():
        for name, param in base.diffusion_model.named_parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn_like(param) / param[0].numel() ** 0.5)
            elif name.endswith("bias"):
                param.copy_(torch.randn_like(param) * 0.02)
            else:  # norm scales: the model is built on empty memory, leaving them would leave garbage (NaN)
                param.fill_(1.0)
    base.eval()
    return comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def random_adapter(model, seed=1, num_tokens=2, input_dim=2):
    _, widths, context_dim = adapter_patch.unet_cross_attention_layers(model)
    sd = random_weights.random_adapter_state_dict(context_dim, widths, num_tokens=num_tokens, input_dim=input_dim,
                                                  seed=seed)
    weights = checkpoint.split_state_dict(sd)
    proj = projection.QualityProjection.from_weights(weights.image_proj, weights.info)
    return iqa_adapter.IQAAdapter("<random>", weights.info, DESCRIPTOR, proj, weights.to_k_ip, weights.to_v_ip)


def tokens_for(adapter, rows):
    return iqa_adapter.encode_tokens(adapter, torch.tensor(rows, dtype=torch.float32))


def forward(patcher, x, context, cond_or_uncond, sigma=1.0, y=None):
    """One UNet call as the sampler makes it (calc_cond_batch passes these transformer options)."""
    options = copy.copy(patcher.model_options["transformer_options"])
    sigmas = torch.full((x.shape[0],), float(sigma))
    options["cond_or_uncond"] = list(cond_or_uncond)
    options["sigmas"] = sigmas
    kwargs = {"y": y} if y is not None else {}
    with torch.no_grad():
        return patcher.model.apply_model(x, sigmas, c_crossattn=context, transformer_options=options, **kwargs)


class KeyRecorder:
    """Wraps an installed attn2 patch and records which keys the host actually calls."""

    def __init__(self, key, inner, seen):
        self.key, self.inner, self.seen = key, inner, seen

    def __call__(self, q, k, v, extra_options):
        block = extra_options["block"]
        self.seen.append((block[0], block[1], extra_options["block_index"]))
        return self.inner(q, k, v, extra_options)


def count_called_keys(patcher, x, context, y=None):
    replace = patcher.model_options["transformer_options"]["patches_replace"]["attn2"]
    seen: list = []
    for key in list(replace):
        replace[key] = KeyRecorder(key, replace[key], seen)
    forward(patcher, x, context, [0], y=y)
    return seen


@pytest.fixture(scope="module", autouse=True)
def _patch_module(comfy):
    global adapter_patch
    from comfyui_iqa_adapter.nodes import adapter_patch as module

    adapter_patch = module


@pytest.fixture(scope="module")
def tiny(comfy, tiny_checkpoint, host_dir):
    model, _clip, _ = tiny_checkpoint
    adapter = iqa_adapter.load_adapter(host_dir / TINY_ADAPTER_PATH)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 77, 768, generator=gen)
    return model, adapter, x, context


def test_tiny_layer_keys_follow_diffusers_order_and_adapter_widths(tiny):
    model, adapter, _, _ = tiny
    keys, widths, context_dim = adapter_patch.unet_cross_attention_layers(model)
    # down (input) blocks, then up (output) blocks, then the mid block LAST.
    assert keys == [("input", 1, 0), ("input", 3, 0), ("output", 0, 0), ("output", 1, 0), ("output", 2, 0),
                    ("output", 3, 0), ("middle", 0, 0)]
    assert widths == adapter.info.layer_widths == [320, 640, 640, 640, 320, 320, 640]
    assert context_dim == 768


def test_every_cross_attention_layer_is_patched_tiny(tiny):
    model, adapter, x, context = tiny
    patched = adapter_patch.apply_iqa_adapter(model, adapter, tokens_for(adapter, [[2.0, 2.0]]), 1.0)
    seen = count_called_keys(patched, x[:1], context[:1])
    assert len(set(seen)) == len(seen) == 7
    assert ("middle", 0, 0) in seen and ("middle", 1, 0) not in seen


@pytest.mark.parametrize("config_class,unet_config,expected", [("SD15", SD15_SMALL, 16), ("SDXL", SDXL_SMALL, 70)])
def test_every_cross_attention_layer_is_patched_full_depth(comfy, config_class, unet_config, expected):
    import comfy.model_detection

    # The layouts are the host's own SD1.5 / SDXL detections (at full width they match its configs).
    full = dict(unet_config, model_channels=320, context_dim=768 if config_class == "SD15" else 2048,
                adm_in_channels=None if config_class == "SD15" else 2816)
    detected = comfy.model_detection.model_config_from_unet_config(full)
    assert type(detected).__name__ == config_class

    model = build_small_model(comfy, config_class, unet_config)
    adapter = random_adapter(model)
    assert adapter.info.num_layers == expected
    keys, _widths, _ = adapter_patch.unet_cross_attention_layers(model)
    if config_class == "SDXL":  # docs/METHOD.md §1.6: k 0-3 input 4/5, 24 output 0, 60-69 middle 0
        assert keys[:4] == [("input", 4, 0), ("input", 4, 1), ("input", 5, 0), ("input", 5, 1)]
        assert keys[24] == ("output", 0, 0) and keys[60:] == [("middle", 0, j) for j in range(10)]
    else:
        assert keys[:2] == [("input", 1, 0), ("input", 2, 0)] and keys[6] == ("output", 3, 0)
        assert keys[15] == ("middle", 0, 0)
    patched = adapter_patch.apply_iqa_adapter(model, adapter, tokens_for(adapter, [[1.0, -1.0]]), 1.0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 5, unet_config["context_dim"], generator=gen)
    y = torch.randn(1, unet_config["adm_in_channels"], generator=gen) if config_class == "SDXL" else None
    base = forward(model, x, context, [0], y=y)
    seen = count_called_keys(patched, x, context, y=y)
    assert len(seen) == len(set(seen)) == expected
    assert set(seen) == set(keys)
    assert not torch.equal(forward(patched, x, context, [0], y=y), base)


def test_weight_zero_is_bit_identical_and_weight_one_changes(tiny):
    model, adapter, x, context = tiny
    tokens = tokens_for(adapter, [[2.0, 2.0]])
    base = forward(model, x, context, [1, 0])
    zero = forward(adapter_patch.apply_iqa_adapter(model, adapter, tokens, 0.0), x, context, [1, 0])
    assert torch.equal(zero, base)
    one = forward(adapter_patch.apply_iqa_adapter(model, adapter, tokens, 1.0), x, context, [1, 0])
    assert (one - base).abs().max() > 1e-3


def test_original_patcher_is_untouched(tiny):
    model, adapter, x, context = tiny
    options_before = copy.deepcopy(model.model_options)
    state_before = {k: v.clone() for k, v in model.model.state_dict().items()}
    patched = adapter_patch.apply_iqa_adapter(model, adapter, tokens_for(adapter, [[2.0, 2.0]]), 1.0)
    forward(patched, x, context, [1, 0])
    assert patched is not model
    assert model.model_options == options_before
    assert "patches_replace" not in model.model_options["transformer_options"]
    state_after = model.model.state_dict()
    assert state_before.keys() == state_after.keys()
    assert all(torch.equal(state_before[k], state_after[k]) for k in state_before)


def test_cond_uncond_selection_and_per_item_targets(tiny):
    model, adapter, x, context = tiny
    xs, cs = x[:1].repeat(2, 1, 1, 1), context[:1].repeat(2, 1, 1)
    patched = adapter_patch.apply_iqa_adapter(model, adapter, tokens_for(adapter, [[2.0, 2.0]]), 1.0)
    # CFG batch [uncond, cond] with identical inputs: the halves differ only by the quality tokens.
    both = forward(patched, xs, cs, [1, 0])
    assert (both[0] - both[1]).abs().max() > 1e-3
    only_cond = forward(patched, xs[:1], cs[:1], [0])
    only_uncond = forward(patched, xs[:1], cs[:1], [1])
    torch.testing.assert_close(both[1:], only_cond, atol=1e-5, rtol=0)
    torch.testing.assert_close(both[:1], only_uncond, atol=1e-5, rtol=0)

    # Two targets, latent batch 2: item i gets target i, in both CFG halves.
    rows = [[2.0, 2.0], [-2.0, -2.0]]
    per_item = adapter_patch.apply_iqa_adapter(model, adapter, tokens_for(adapter, rows), 1.0)
    out = forward(per_item, torch.cat([x, x]), torch.cat([context, context]), [1, 0])
    for i, row in enumerate(rows):
        single = adapter_patch.apply_iqa_adapter(model, adapter, tokens_for(adapter, [row]), 1.0)
        ref = forward(single, x[i:i + 1].repeat(2, 1, 1, 1), context[i:i + 1].repeat(2, 1, 1), [1, 0])
        torch.testing.assert_close(out[[i, 2 + i]], ref, atol=1e-5, rtol=0)
    assert (out[2] - out[3]).abs().max() > 1e-3


def test_target_count_mismatch_names_both_sizes(tiny):
    model, adapter, x, context = tiny
    patched = adapter_patch.apply_iqa_adapter(model, adapter, tokens_for(adapter, [[1, 1], [2, 2], [3, 3]]), 1.0)
    with pytest.raises(ValueError, match=r"Apply Quality Adapter: tokens: .*3 targets.*latent batch is 2"):
        forward(patched, x, context, [0])


def test_chains_existing_patch_and_two_adapters_add(tiny):
    model, adapter, x, context = tiny
    tokens = tokens_for(adapter, [[2.0, 2.0]])
    calls = []

    def foreign(q, k, v, extra_options):  # stands in for e.g. IPAdapter_plus: its own text-part result
        from comfy.ldm.modules.attention import optimized_attention

        calls.append(extra_options["block"])
        return optimized_attention(q, k, v, extra_options["n_heads"]) * 0.5

    for key3 in (True, False):  # the host also looks up (block_name, block_id) keys
        other = model.clone()
        for key in adapter_patch.unet_cross_attention_layers(model)[0]:
            other.set_model_attn2_replace(foreign, key[0], key[1], key[2] if key3 else None)
        foreign_only = forward(other, x, context, [1, 0])
        calls.clear()
        chained_zero = forward(adapter_patch.apply_iqa_adapter(other, adapter, tokens, 0.0), x, context, [1, 0])
        assert torch.equal(chained_zero, foreign_only) and len(calls) == 7
        chained = forward(adapter_patch.apply_iqa_adapter(other, adapter, tokens, 1.0), x, context, [1, 0])
        assert (chained - foreign_only).abs().max() > 1e-3

    # Two IQA adapters stack: 0.5 + 0.5 = 1.0 (the quality attention is added before to_out).
    half_twice = adapter_patch.apply_iqa_adapter(adapter_patch.apply_iqa_adapter(model, adapter, tokens, 0.5),
                                                 adapter, tokens, 0.5)
    once = adapter_patch.apply_iqa_adapter(model, adapter, tokens, 1.0)
    torch.testing.assert_close(forward(half_twice, x, context, [1, 0]), forward(once, x, context, [1, 0]),
                               atol=1e-4, rtol=1e-5)


def test_chained_patches_keep_their_models_and_device_moves(comfy, tiny):
    """A patch we take off a key may hold a module the host must load (`.models()`, as the host asks every
    patch on a key) and may return a new object from `.to` (the host keeps the result): both still hold."""
    import comfy.model_patcher

    model, adapter, x, context = tiny
    held = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), torch.device("cpu"), torch.device("cpu"))

    class ForeignPatch:  # another pack's attn2 patch that owns a module
        def __init__(self, moved_to=None):
            self.moved_to = moved_to

        def __call__(self, q, k, v, extra_options):
            from comfy.ldm.modules.attention import optimized_attention
            return optimized_attention(q, k, v, extra_options["n_heads"])

        def models(self):
            return [held]

        def to(self, device):
            return ForeignPatch(moved_to=device)

    other = model.clone()
    keys = adapter_patch.unet_cross_attention_layers(model)[0]
    for key in keys:
        other.set_model_attn2_replace(ForeignPatch(), *key)
    assert other.model_patches_models() == [held] * len(keys)
    patched = adapter_patch.apply_iqa_adapter(other, adapter, tokens_for(adapter, [[2.0, 2.0]]), 1.0)
    ours = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert all(isinstance(patch, adapter_patch.IQAAttn2Patch) for patch in ours.values())
    assert held in patched.model_patches_models()
    alone = adapter_patch.apply_iqa_adapter(model, adapter, tokens_for(adapter, [[2.0, 2.0]]), 1.0)
    assert alone.model_patches_models() == []
    patched.model_patches_to(torch.device("cpu"))
    assert {patch.previous.moved_to for patch in ours.values()} == {torch.device("cpu")}
    forward(patched, x, context, [1, 0])  # the moved foreign patches still run


def test_clone_gets_views_sharing_tensors(tiny):
    """A clone's patches share the precomputed tensors and caches (nothing duplicated) but are their own
    objects, so a pack adding a branch to the clone's patch leaves the original model alone."""
    model, adapter, _, _ = tiny
    patched = adapter_patch.apply_iqa_adapter(model, adapter, tokens_for(adapter, [[2.0, 2.0]]), 1.0)
    again = patched.clone()
    a = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    b = again.model_options["transformer_options"]["patches_replace"]["attn2"]
    # 7 layers, each one transformer per block: under (block, id, 0) and (block, id).
    assert a.keys() == b.keys() and len(a) == 14 and len({id(p) for p in a.values()}) == 7
    assert all(isinstance(p, adapter_patch.IQAAttn2Patch) for p in a.values())
    for key in a:
        assert a[key] is a[key[:2]] and b[key] is b[key[:2]]
        assert a[key] is not b[key]
        assert a[key].kv_cpu is b[key].kv_cpu and a[key]._device_cache is b[key]._device_cache
    b[("input", 1)].add(lambda out, q, k, v, extra_options, **kw: out, sigma_start=1e9, sigma_end=0.0)
    assert len(b[("input", 1, 0)].added) == 1 and not a[("input", 1, 0)].added


def test_start_end_window(tiny):
    model, adapter, x, context = tiny
    tokens = tokens_for(adapter, [[2.0, 2.0]])
    sampling = model.get_model_object("model_sampling")
    sigma_early, sigma_late = float(sampling.sigma_max), float(sampling.sigma_min) * 2
    late_only = adapter_patch.apply_iqa_adapter(model, adapter, tokens, 1.0, start_at=0.5, end_at=1.0)
    early_only = adapter_patch.apply_iqa_adapter(model, adapter, tokens, 1.0, start_at=0.0, end_at=0.5)
    for sigma, off, on in ((sigma_early, late_only, early_only), (sigma_late, early_only, late_only)):
        base = forward(model, x, context, [1, 0], sigma=sigma)
        assert torch.equal(forward(off, x, context, [1, 0], sigma=sigma), base)
        assert (forward(on, x, context, [1, 0], sigma=sigma) - base).abs().max() > 1e-4
    with pytest.raises(ValueError, match="Apply Quality Adapter: start_at:"):
        adapter_patch.apply_iqa_adapter(model, adapter, tokens, 1.0, start_at=0.8, end_at=0.2)


def test_adapter_for_another_base_model_is_refused(comfy, tiny):
    _model, sd15_adapter, _, _ = tiny
    sdxl_model = build_small_model(comfy, "SDXL", SDXL_SMALL)
    tokens = tokens_for(sd15_adapter, [[1.0, 1.0]])
    with pytest.raises(ValueError, match=r"Apply Quality Adapter: adapter: .*7 cross-attention layers.*model has 70"):
        adapter_patch.apply_iqa_adapter(sdxl_model, sd15_adapter, tokens, 1.0)
    # SSD-1B-like: same widths and context size as SDXL, different depth layout.
    sdxl_adapter = random_adapter(sdxl_model)
    ssd = build_small_model(comfy, "SDXL", SSD1B_SMALL)
    with pytest.raises(ValueError, match=r"Apply Quality Adapter: adapter: .*70 cross-attention layers.*model has 34"):
        adapter_patch.apply_iqa_adapter(ssd, sdxl_adapter, tokens_for(sdxl_adapter, [[1.0, 1.0]]), 1.0)
    with pytest.raises(ValueError, match="Apply Quality Adapter: tokens: quality tokens have width 768"):
        adapter_patch.apply_iqa_adapter(sdxl_model, sdxl_adapter, tokens, 1.0)


def test_cleanup_drops_device_caches_and_changes_nothing(tiny):
    """Hosts >= 0.17 call cleanup() on patch objects after sampling; older hosts never do (harmless there)."""
    model, adapter, x, context = tiny
    patched = adapter_patch.apply_iqa_adapter(model, adapter, tokens_for(adapter, [[2.0, 2.0]]), 1.0)
    first = forward(patched, x, context, [1, 0])
    patches = set(patched.model_options["transformer_options"]["patches_replace"]["attn2"].values())
    assert all(patch._device_cache for patch in patches)
    patched.cleanup()  # the host's own call (0.33.0 forwards it to the patches)
    for patch in patches:
        patch.cleanup()
        assert not patch._device_cache and patch.window._last[0] is None
    assert torch.equal(forward(patched, x, context, [1, 0]), first)
