"""IQA-Adapter and IPAdapter_plus (the real pack, a test fixture) in either order, on SD1.5 (2-part keys) and
SDXL (3-part keys) layouts, in-process; the server test drives the same through the real graph.

What must hold: each adapter alone changes the UNet output; IQA->IPAdapter and IPAdapter->IQA both carry
both branches and agree within a rounding floor; the IQA-only model that IPAdapter was applied on (a clone
of it) is bit-identical before and after; an older fork's `set_new_condition` protocol works too.
"""
from __future__ import annotations

import json
import pathlib
import uuid

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from comfyui_iqa_adapter.adapter import checkpoint, iqa_adapter, layers, projection
from comfyui_iqa_adapter.adapter.descriptor import Descriptor
from comfyui_iqa_adapter.scripts import random_weights
from support import third_party
from support.graphs import TINY_CHECKPOINT, encode_target
from test_adapter_patch import SD15_SMALL, SDXL_SMALL, build_small_model, forward

# IPAdapter_plus decides SDXL (3-part keys) from a 2048-wide context; SD1.5 keys otherwise.
LAYOUTS = {"sd15": ("SD15", SD15_SMALL), "sdxl": ("SDXL", dict(SDXL_SMALL, context_dim=2048))}
# |IQA->IPA - IPA->IQA| on UNet outputs whose branches move them by ~1e-1: both orders sum text + IPAdapter
# branch + quality branch in the same order, so they agree to fp32 rounding; this bound is 1000x what we
# measured (0.0 on CPU), and far below the branches' effect.
ORDER_FLOOR = 1e-5


@pytest.fixture(scope="module")
def ipadapter_plus(comfy, host_dir):
    return third_party.import_ipadapter(host_dir)


@pytest.fixture(scope="module")
def adapter_patch(comfy):
    from comfyui_iqa_adapter.nodes import adapter_patch as module

    return module


def iqa_adapter_for(adapter_patch, model, seed=1):
    _, widths, context_dim = adapter_patch.unet_cross_attention_layers(model)
    weights = checkpoint.split_state_dict(random_weights.random_adapter_state_dict(context_dim, widths, seed=seed))
    proj = projection.QualityProjection.from_weights(weights.image_proj, weights.info)
    adapter = iqa_adapter.IQAAdapter("<random>", weights.info,
                                    Descriptor(metrics=("topiq_nr", "laion_aes"), source="test"),
                                    proj, weights.to_k_ip, weights.to_v_ip)
    return adapter, iqa_adapter.encode_tokens(adapter, torch.tensor([[2.0, -1.0]]))


class Setup:
    def __init__(self, comfy, adapter_patch, ipadapter_plus, layout):
        config_class, unet_config = LAYOUTS[layout]
        self.layout = layout
        self.model = build_small_model(comfy, config_class, unet_config)
        keys, widths, context_dim = adapter_patch.unet_cross_attention_layers(self.model)
        self.adapter, self.tokens = iqa_adapter_for(adapter_patch, self.model)
        self.adapter_patch, self.plus = adapter_patch, ipadapter_plus
        # IPAdapter_plus numbers its layers in the same order (input, output, middle) as the released files.
        self.ip_adapter = third_party.nested(third_party.random_ip_adapter(context_dim, widths))
        gen = torch.Generator().manual_seed(5)
        self.pos, self.neg = torch.randn(1, 64, generator=gen), torch.zeros(1, 64)
        self.x = torch.randn(2, 4, 8, 8, generator=gen)
        self.context = torch.randn(2, 5, context_dim, generator=gen)
        self.y = torch.randn(2, unet_config["adm_in_channels"], generator=gen) if config_class == "SDXL" else None

    def iqa(self, model, weight=1.0):
        return self.adapter_patch.apply_iqa_adapter(model, self.adapter, self.tokens, weight)

    def ipa(self, model, weight=1.0):
        return self.plus.ipadapter_execute(model.clone(), self.ip_adapter, None, pos_embed=self.pos,
                                           neg_embed=self.neg, weight=weight)[0]

    def run(self, model):
        return forward(model, self.x, self.context, [1, 0], y=self.y)


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def layout_setup(request, comfy, adapter_patch, ipadapter_plus):
    return Setup(comfy, adapter_patch, ipadapter_plus, request.param)


def test_ipadapter_and_iqa_adapter_in_either_order(layout_setup):
    s, layout = layout_setup, layout_setup.layout
    iqa_model = s.iqa(s.model)
    base, iqa_before = s.run(s.model), s.run(iqa_model)
    ipa_only = s.run(s.ipa(s.model))
    iqa_then_ipa = s.run(s.ipa(iqa_model))
    ipa_then_iqa = s.run(s.iqa(s.ipa(s.model)))
    iqa_after = s.run(iqa_model)

    def diff(a, b):
        return float((a - b).abs().max())

    effect_iqa, effect_ipa = diff(iqa_before, base), diff(ipa_only, base)
    print(f"[interop {layout}] effect IQA {effect_iqa:.3e}, IPAdapter {effect_ipa:.3e}; order gap "
          f"{diff(iqa_then_ipa, ipa_then_iqa):.3e}")
    assert effect_iqa > 1e-2 and effect_ipa > 1e-2, "each adapter alone must change the output"
    for combined in (iqa_then_ipa, ipa_then_iqa):
        assert diff(combined, iqa_before) > 1e-2, "IPAdapter's branch was dropped"
        assert diff(combined, ipa_only) > 1e-2, "IQA-Adapter's branch was dropped"
    assert diff(iqa_then_ipa, ipa_then_iqa) <= ORDER_FLOOR
    assert torch.equal(iqa_after, iqa_before), "IPAdapter applied on a clone changed the IQA-only model"
    installed = iqa_model.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert not any(patch.added for patch in installed.values())


def test_weight_zero_on_either_side_gives_the_other_alone(layout_setup):
    s = layout_setup
    ipa_only, iqa_only = s.run(s.ipa(s.model)), s.run(s.iqa(s.model))
    assert torch.equal(s.run(s.iqa(s.ipa(s.model), weight=0.0)), ipa_only)
    torch.testing.assert_close(s.run(s.ipa(s.iqa(s.model), weight=0.0)), iqa_only, atol=ORDER_FLOOR, rtol=0)
    torch.testing.assert_close(s.run(s.iqa(s.model, weight=0.0)), s.run(s.model), atol=0, rtol=0)
    torch.testing.assert_close(s.run(s.ipa(s.iqa(s.model, weight=0.0))), ipa_only, atol=ORDER_FLOOR, rtol=0)


# ---------------------------------------------------------------- an older fork's protocol (set_new_condition)

class CrossAttentionPatch:
    """The `set_new_condition` protocol of older IPAdapter_plus forks (InstantID, PuLID): one object per key
    holding lists of conditions; it computes the text attention itself. Written here from that protocol."""

    def __init__(self, weight=1.0, k_ip=None, v_ip=None):
        self.weights, self.k_ips, self.v_ips = [weight], [k_ip], [v_ip]

    def set_new_condition(self, weight=1.0, k_ip=None, v_ip=None):
        self.weights.append(weight)
        self.k_ips.append(k_ip)
        self.v_ips.append(v_ip)

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        heads = extra_options["n_heads"]
        out = optimized_attention(q, k, v, heads)
        for weight, k_ip, v_ip in zip(self.weights, self.k_ips, self.v_ips):
            n = q.shape[0]
            out = out + weight * optimized_attention(q, k_ip.expand(n, -1, -1), v_ip.expand(n, -1, -1), heads)
        return out


def old_fork_apply(model, conditions: dict, weight: float):
    """The older forks' `set_model_patch_replace`: a new CrossAttentionPatch on a free key, else
    `.set_new_condition(**kwargs)` on whatever object holds the key."""
    patched = model.clone()
    to = patched.model_options["transformer_options"].copy()
    to["patches_replace"] = dict(to.get("patches_replace", {}))
    attn2 = to["patches_replace"]["attn2"] = dict(to["patches_replace"].get("attn2", {}))
    for key, (k_ip, v_ip) in conditions.items():
        if key in attn2:
            attn2[key].set_new_condition(weight=weight, k_ip=k_ip, v_ip=v_ip)
        else:
            attn2[key] = CrossAttentionPatch(weight=weight, k_ip=k_ip, v_ip=v_ip)
    patched.model_options["transformer_options"] = to
    return patched


def test_older_fork_set_new_condition_in_either_order(comfy, adapter_patch):
    model = build_small_model(comfy, "SD15", SD15_SMALL)
    keys, widths, context_dim = adapter_patch.unet_cross_attention_layers(model)
    adapter, tokens = iqa_adapter_for(adapter_patch, model)
    gen = torch.Generator().manual_seed(9)
    conditions = {key[:2]: (torch.randn(1, 3, width, generator=gen), torch.randn(1, 3, width, generator=gen))
                  for key, width in zip(keys, widths)}
    x, context = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, context_dim, generator=gen)

    def run(m):
        return forward(m, x, context, [1, 0])

    iqa_model = adapter_patch.apply_iqa_adapter(model, adapter, tokens, 1.0)
    iqa_before, fork_only = run(iqa_model), run(old_fork_apply(model, conditions, 0.5))
    fork_then_iqa = run(adapter_patch.apply_iqa_adapter(old_fork_apply(model, conditions, 0.5), adapter, tokens, 1.0))
    iqa_then_fork = run(old_fork_apply(iqa_model, conditions, 0.5))
    twice = run(old_fork_apply(old_fork_apply(iqa_model, conditions, 0.25), conditions, 0.25))
    assert float((fork_only - run(model)).abs().max()) > 1e-2 and float((iqa_before - fork_only).abs().max()) > 1e-2
    torch.testing.assert_close(iqa_then_fork, fork_then_iqa, atol=ORDER_FLOOR, rtol=0)
    torch.testing.assert_close(twice, iqa_then_fork, atol=1e-4, rtol=0)  # 0.25 + 0.25 = 0.5
    assert torch.equal(run(iqa_model), iqa_before)


# ---------------------------------------------------------------- through the real server

def _tiny_ip_adapter_file(host_dir: pathlib.Path, path: pathlib.Path) -> None:
    """A random SD1.5 IP-Adapter whose layers fit the tiny checkpoint where IPAdapter_plus's SD1.5 key walk
    meets it (input 1, output 3); the other layers keep SD1.5 widths (the host never calls them)."""

    unet = {k: v.shape for k, v in load_file(str(host_dir / "models" / "checkpoints" / TINY_CHECKPOINT)).items()
            if k.endswith("attn2.to_k.weight")}
    widths = list(layers.SD15_LAYER_WIDTHS)
    for k, (block, block_id) in enumerate(third_party.IPADAPTER_SD15_KEYS):
        name = f"model.diffusion_model.{block}_blocks.{block_id}.1.transformer_blocks.0.attn2.to_k.weight"
        if name in unet:
            widths[k] = unet[name][0]
    save_file(third_party.random_ip_adapter(768, widths), str(path))


def _graph(txt2img, ip_file, pos, neg, prefix, orders):
    """One prompt: text-to-image samplers sharing one seed, one per model in `orders` (each a tuple of
    'iqa' / 'ipa' applied left to right); every sampler's latent is saved."""
    graph = txt2img(prefix=prefix, steps=2)
    for node in ("6", "7", "5"):
        del graph[node]
    graph.update(encode_target(targets="topiq_nr=95, laion_aes=5", target=99.0))
    graph["20"] = {"class_type": "IPAdapterModelLoader", "inputs": {"ipadapter_file": ip_file}}
    graph["21"] = {"class_type": "IPAdapterLoadEmbeds", "inputs": {"embeds": pos}}
    graph["22"] = {"class_type": "IPAdapterLoadEmbeds", "inputs": {"embeds": neg}}
    for index, order in enumerate(orders):
        model, latent = ["1", 0], ["4", 0]
        for step, kind in enumerate(order):
            node = f"{100 + 10 * index + step}"
            if kind == "iqa":
                graph[node] = {"class_type": "IQAAdapterApply", "inputs": {
                    "model": model, "adapter": ["10", 0], "tokens": ["11", 0], "weight": 1.0, "start_at": 0.0,
                    "end_at": 1.0}}
            elif kind == "ipa":
                graph[node] = {"class_type": "IPAdapterEmbeds", "inputs": {
                    "model": model, "ipadapter": ["20", 0], "pos_embed": ["21", 0], "neg_embed": ["22", 0],
                    "weight": 1.0, "weight_type": "linear", "start_at": 0.0, "end_at": 1.0,
                    "embeds_scaling": "V only"}}
            else:  # 'repeat': an identity on the latent, so a sampler's cache key differs from an earlier prompt's
                graph[node] = {"class_type": "RepeatLatentBatch", "inputs": {"samples": latent, "amount": 1}}
                latent = [node, 0]
                continue
            model = [node, 0]
        graph[f"{500 + index}"] = {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["2", 0], "negative": ["3", 0], "latent_image": latent, "seed": 11,
            "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
        graph[f"{600 + index}"] = {"class_type": "SaveLatent", "inputs": {
            "samples": [f"{500 + index}", 0], "filename_prefix": f"{prefix}/{'-'.join(order) or 'plain'}"}}
    return graph


def _latents(server, result, count):
    assert result.ok, result.error_message()
    out = []
    for index in range(count):
        (entry,) = result.outputs[f"{600 + index}"]["latents"]
        path = pathlib.Path(server.output_dir) / entry["subfolder"] / entry["filename"]
        out.append(load_file(str(path))["latent_tensor"].numpy().astype(np.float64))
    return out


def test_ipadapter_and_iqa_adapter_through_the_server(comfy_server, txt2img, host_dir):
    if "IPAdapterEmbeds" not in comfy_server.object_info():
        pytest.fail("IPAdapter_plus is not loaded by the test server (see the server log): "
                    + comfy_server.log_tail(30))
    stem = f"iqa_test_{uuid.uuid4().hex[:8]}"
    ip_folder = pathlib.Path(comfy_server.models_dir) / "ipadapter"
    ip_folder.mkdir(exist_ok=True)
    ip_file = ip_folder / f"{stem}.safetensors"
    _tiny_ip_adapter_file(host_dir, ip_file)
    gen = torch.Generator().manual_seed(3)
    pos, neg = f"{stem}_pos.ipadpt", f"{stem}_neg.ipadpt"
    torch.save(torch.randn(1, 64, generator=gen), pathlib.Path(comfy_server.input_dir) / pos)
    torch.save(torch.zeros(1, 64), pathlib.Path(comfy_server.input_dir) / neg)
    try:
        reference = _latents(comfy_server, comfy_server.run(_graph(
            txt2img, ip_file.name, pos, neg, stem + "_ref", [(), ("iqa",)])), 2)
        orders = [("ipa",), ("iqa", "ipa"), ("ipa", "iqa"), ("repeat", "iqa")]
        plain, iqa_only = reference
        ipa_only, iqa_then_ipa, ipa_then_iqa, iqa_in_graph = _latents(comfy_server, comfy_server.run(_graph(
            txt2img, ip_file.name, pos, neg, stem + "_both", orders)), len(orders))
        # After the prompt above, IPAdapter's patching of the cached IQA model's clone is done: sample again.
        (iqa_after,) = _latents(comfy_server, comfy_server.run(_graph(
            txt2img, ip_file.name, pos, neg, stem + "_after", [("repeat", "repeat", "iqa")])), 1)
    finally:
        for path in (ip_file, pathlib.Path(comfy_server.input_dir) / pos, pathlib.Path(comfy_server.input_dir) / neg):
            path.unlink(missing_ok=True)

    def diff(a, b):
        return float(np.abs(a - b).max())

    gap = diff(iqa_then_ipa, ipa_then_iqa)
    report = {"effect_iqa": diff(iqa_only, plain), "effect_ipa": diff(ipa_only, plain), "order_gap": gap,
              "iqa_vs_both": diff(iqa_then_ipa, iqa_only), "ipa_vs_both": diff(iqa_then_ipa, ipa_only)}
    print("[interop server]", json.dumps(report))
    assert report["effect_iqa"] > 1e-2 and report["effect_ipa"] > 1e-2, report
    assert report["iqa_vs_both"] > 1e-2 and report["ipa_vs_both"] > 1e-2, report
    assert diff(ipa_then_iqa, iqa_only) > 1e-2 and diff(ipa_then_iqa, ipa_only) > 1e-2, report
    assert gap <= ORDER_FLOOR, report
    assert np.array_equal(iqa_in_graph, iqa_only), "the IQA-only branch changed beside IPAdapter"
    assert np.array_equal(iqa_after, iqa_only), "IPAdapter's patch leaked into the cached IQA-only model"
