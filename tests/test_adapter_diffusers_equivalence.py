"""Proof against an independent implementation: diffusers' own IP-Adapter attention processors.

The same random UNet weights run in diffusers (UNet2DConditionModel + IPAdapterAttnProcessor2_0, weights
loaded by processor position exactly as the authors' loader does: ip_adapter.<i> = the i-th entry of
`unet.attn_processors`) and in the host (weights converted with comfy.utils.unet_to_diffusers, our
attn2 patches from nodes/adapter_patch.py). Noise predictions must agree to 1e-4 in fp32, for a tiny
SD1.5 config and a tiny SDXL-family config (linear projection in transformers, text_time embeddings),
weights 0 / 0.5 / 1, with and without CFG batching, and with one target per latent.
"""
from __future__ import annotations

import pytest
import torch

from comfyui_iqa_adapter.adapter import iqa_adapter
from comfyui_iqa_adapter.adapter.descriptor import Descriptor
from comfyui_iqa_adapter.scripts import random_weights

diffusers = pytest.importorskip("diffusers", reason="SKIPPED LOUDLY: diffusers is not installed (requirements-dev.txt)")

TOLERANCE = 1e-4
DESCRIPTOR = Descriptor(metrics=("topiq_nr", "laion_aes"), source="test")
MAX_DIFFS: dict = {}

# (host config class, LDM unet_config, diffusers config); both describe the same network.
CONFIGS = {
    "sd15": (
        "SD15",
        {"image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
             "channel_mult": [1, 2], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
             "transformer_depth_middle": 1, "context_dim": 48, "use_linear_in_transformer": False,
             "use_spatial_transformer": True, "adm_in_channels": None,
             "use_temporal_attention": False, "use_temporal_resblock": False},
        {"sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (32, 64), "layers_per_block": 1,
             "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 48,
             "attention_head_dim": 8, "norm_num_groups": 32, "norm_eps": 1e-6, "use_linear_projection": False},
    ),
    "sdxl": (
        "SDXL",
        {"image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 64, "num_res_blocks": [1, 1],
             "channel_mult": [1, 2], "transformer_depth": [0, 2], "transformer_depth_output": [0, 0, 2, 2],
             "transformer_depth_middle": 2,
             "context_dim": 80, "use_linear_in_transformer": True, "use_spatial_transformer": True,
             "adm_in_channels": 40 + 6 * 8, "num_classes": "sequential", "use_temporal_attention": False,
             "use_temporal_resblock": False},
        {"sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (64, 128), "layers_per_block": 1,
             "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
             "transformer_layers_per_block": (1, 2), "cross_attention_dim": 80, "attention_head_dim": (1, 2),
             "norm_num_groups": 32, "norm_eps": 1e-6, "use_linear_projection": True,
             "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
             "projection_class_embeddings_input_dim": 40 + 6 * 8},
    ),
}


def alive_(module: torch.nn.Module, seed: int) -> None:
    """Random weights with signal everywhere (diffusers zero-inits nothing here, but be explicit)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) / param[0].numel() ** 0.5)
            elif name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
            else:
                param.copy_(1.0 + torch.randn(param.shape, generator=gen) * 0.05)


def diffusers_cross_attention_layers(unet):
    """[(processor position i, attention module)] for attn2, in attn_processors order (independent of layers.py)."""
    modules = dict(unet.named_modules())
    out = []
    for position, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            out.append((position, modules[name[: -len(".processor")]]))
    return out


def build_pair(comfy, name: str, tmp_path):
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    config_class, ldm_config, diffusers_config = CONFIGS[name]
    unet = UNet2DConditionModel(**diffusers_config).eval()
    alive_(unet, seed=7)

    # Host model with the same weights.
    model_config = getattr(comfy.supported_models, config_class)(ldm_config)
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    key_map = comfy.utils.unet_to_diffusers(ldm_config)
    diffusers_sd = unet.state_dict()
    host_sd = {key_map[k]: v for k, v in diffusers_sd.items()}
    assert len(host_sd) == len(diffusers_sd), "two diffusers keys mapped to one host key"
    missing, unexpected = base.diffusion_model.load_state_dict(host_sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    base.eval()
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))

    # An adapter in the release layout, its widths taken from diffusers' own attn2 modules.
    layers = diffusers_cross_attention_layers(unet)
    widths = [attn.to_k.out_features for _, attn in layers]
    context_dim = diffusers_config["cross_attention_dim"]
    sd = random_weights.random_adapter_state_dict(context_dim, widths, num_tokens=3, input_dim=2, seed=11)
    path = tmp_path / f"{name}_adapter.safetensors"
    from safetensors.torch import save_file

    save_file(sd, str(path))
    adapter = iqa_adapter.load_adapter(path, descriptor=DESCRIPTOR)

    # diffusers side: the authors' loading scheme, by processor position.
    processors = {}
    for proc_name in unet.attn_processors:
        processors[proc_name] = AttnProcessor2_0()
    unet.set_attn_processor(processors)
    return unet, patcher, adapter, layers, sd


def set_ip_processors(unet, layers, sd, num_tokens: int, scale: float):
    from diffusers.models.attention_processor import (
        AttnProcessor2_0,
        IPAdapterAttnProcessor2_0,
    )

    attn2_positions = {position for position, _ in layers}
    processors = {}
    for position, proc_name in enumerate(unet.attn_processors):
        if position not in attn2_positions:
            processors[proc_name] = AttnProcessor2_0()
            continue
        attn = dict(layers)[position]
        proc = IPAdapterAttnProcessor2_0(hidden_size=attn.to_q.out_features, cross_attention_dim=attn.to_k.in_features,
                                         num_tokens=(num_tokens,), scale=scale)
        proc.to_k_ip[0].weight.data.copy_(sd[f"ip_adapter.{position}.to_k_ip.weight"])
        proc.to_v_ip[0].weight.data.copy_(sd[f"ip_adapter.{position}.to_v_ip.weight"])
        processors[proc_name] = proc
    unet.set_attn_processor(processors)


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def pair(request, comfy, tmp_path_factory):
    return request.param, build_pair(comfy, request.param, tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("cfg_batch", [(0,), (1, 0)], ids=["cond_only", "cfg_uncond_cond"])
@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
def test_noise_prediction_matches_diffusers(pair, weight, cfg_batch):
    from comfyui_iqa_adapter.nodes import adapter_patch

    name, (unet, patcher, adapter, layers, sd) = pair
    _, _ldm_config, diffusers_config = CONFIGS[name]
    # Layer order: our host keys <-> diffusers processor positions 2k+1 (the checkpoint key of layer k).
    assert [position for position, _ in layers] == [2 * k + 1 for k in range(len(layers))]
    assert adapter_patch.unet_cross_attention_layers(patcher)[1] == adapter.info.layer_widths

    gen = torch.Generator().manual_seed(5)
    latents = 2
    x = torch.randn(latents, 4, 8, 8, generator=gen)
    t = torch.tensor([421.0, 421.0])
    text = {0: torch.randn(latents, 7, diffusers_config["cross_attention_dim"], generator=gen),
            1: torch.randn(latents, 7, diffusers_config["cross_attention_dim"], generator=gen)}
    tokens = iqa_adapter.encode_tokens(adapter, torch.tensor([[2.0, 1.5], [-2.0, -1.0]]))  # target i -> latent i
    ip = {0: tokens.cond, 1: tokens.uncond}
    added, y = {}, None
    if name == "sdxl":
        text_embeds = torch.randn(latents, 40, generator=gen)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(latents, 1)
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        with torch.no_grad():
            time_embeds = unet.add_time_proj(time_ids.flatten()).reshape(latents, -1)
        y = torch.cat([text_embeds, time_embeds], dim=-1)

    chunks = list(cfg_batch)
    x_all = torch.cat([x for _ in chunks])
    t_all = torch.cat([t for _ in chunks])
    text_all = torch.cat([text[c] for c in chunks])
    ip_all = torch.cat([ip[c] for c in chunks])
    added_all = {k: torch.cat([v for _ in chunks]) for k, v in added.items()}

    set_ip_processors(unet, layers, sd, adapter.info.num_tokens, weight)
    with torch.no_grad():
        expected = unet(x_all, t_all, encoder_hidden_states=(text_all, [ip_all]),
                        added_cond_kwargs=added_all or None).sample

    patched = adapter_patch.apply_iqa_adapter(patcher, adapter, tokens, weight)
    options = dict(patched.model_options["transformer_options"], cond_or_uncond=chunks, sigmas=torch.ones(len(x_all)))
    with torch.no_grad():
        got = patched.model.diffusion_model(x_all, timesteps=t_all, context=text_all,
                                            y=torch.cat([y for _ in chunks]) if y is not None else None,
                                            transformer_options=options)
    diff = (got - expected).abs().max().item()
    MAX_DIFFS[(name, weight, cfg_batch)] = diff
    print(f"\n[diffusers equivalence] {name} weight={weight} cond_or_uncond={list(cfg_batch)}: "
          f"max |comfy - diffusers| = {diff:.3e} (output scale {expected.abs().max().item():.2f})")
    assert diff <= TOLERANCE
    # Not vacuous: the adapter changes the prediction by far more than the tolerance.
    if weight:
        set_ip_processors(unet, layers, sd, adapter.info.num_tokens, 0.0)
        with torch.no_grad():
            without = unet(x_all, t_all, encoder_hidden_states=(text_all, [ip_all]),
                           added_cond_kwargs=added_all or None).sample
        assert (without - expected).abs().max() > 100 * TOLERANCE
