"""The checkpoint's layer order (diffusers attn_processors order) mapped to the host's attn2 patch keys.

Nothing is hard-coded: the full SD1.5 and SDXL diffusers UNets are built on the meta device (no
memory, no weights), their `attn_processors` give the order the authors loaded `ip_adapter.<2k+1>`
in, and the host's own `comfy.model_detection.unet_config_from_diffusers_unet` +
`comfy.utils.unet_to_diffusers` translate each attn2 to its LDM/ComfyUI block. The pack's walk of the
host's own UNet (nodes/adapter_patch.unet_cross_attention_layers, built from that unet_config on the meta
device) must produce exactly that sequence.
"""
from __future__ import annotations

import re
import types

import pytest
import torch

from comfyui_iqa_adapter.adapter import layers

SD15_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SDXL_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    use_linear_projection=True,
)


@pytest.fixture(scope="module")
def host(comfy):
    """The host's own key map is the reference for the layer order (the `comfy` fixture skips loudly without it)."""
    import comfy.model_detection
    import comfy.utils

    return comfy


def diffusers_unet(config):
    diffusers = pytest.importorskip("diffusers",
                                    reason="SKIPPED LOUDLY: diffusers is needed to build the reference UNets")
    with torch.device("meta"):
        return diffusers.UNet2DConditionModel(**config)


LDM_ATTN2 = re.compile(r"^(?:(input|output)_blocks\.(\d+)|(middle)_block)"
                       r"\.1\.transformer_blocks\.(\d+)\.attn2\.to_k\.weight$")


def host_order(comfy, unet):
    """attn2 layers in diffusers attn_processors order, as (host key, hidden width), plus the host's unet_config."""
    state = unet.state_dict()  # meta tensors: shapes only
    unet_config = comfy.model_detection.unet_config_from_diffusers_unet(state)
    assert unet_config is not None, "the host did not recognise this diffusers UNet"
    key_map = comfy.utils.unet_to_diffusers(unet_config)  # diffusers name -> LDM name
    keys, widths = [], []
    for name in unet.attn_processors:
        if ".attn2." not in name:
            continue
        diffusers_key = name.replace(".processor", ".to_k.weight")
        match = LDM_ATTN2.match(key_map[diffusers_key])
        assert match, key_map[diffusers_key]
        block, block_id, middle, index = match.groups()
        # The host calls the mid block ("middle", 0) in transformer_options (middle_block.1 is its transformer).
        keys.append(("middle", 0, int(index)) if middle else (block, int(block_id), int(index)))
        widths.append(state[diffusers_key].shape[0])
    return keys, widths, unet_config


def host_model(comfy, unet_config):
    """The host's own UNet for that config, on the meta device (shapes only), as a model patcher holds it."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**unet_config, operations=comfy.ops.disable_weight_init, device=torch.device("meta"))
    return types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=unet))


@pytest.mark.parametrize("config, expected_widths, context_dim", [
    (SD15_CONFIG, layers.SD15_LAYER_WIDTHS, 768),
    (SDXL_CONFIG, layers.SDXL_LAYER_WIDTHS, 2048),
], ids=["sd15", "sdxl"])
def test_layer_order_matches_diffusers_and_host(host, config, expected_widths, context_dim):
    unet = diffusers_unet(config)
    expected_keys, expected_model_widths, unet_config = host_order(host, unet)
    assert len(expected_keys) == len(expected_widths)  # 16 / 70
    from comfyui_iqa_adapter.nodes import adapter_patch  # needs the host's comfy_api on the path

    keys, widths, walked_context_dim = adapter_patch.unet_cross_attention_layers(host_model(host, unet_config))
    assert keys == expected_keys
    assert widths == expected_model_widths == expected_widths
    assert unet_config["context_dim"] == walked_context_dim == context_dim
    # The middle block is last, as in diffusers (not in LDM execution order).
    middle_count = int(unet_config["transformer_depth_middle"])
    assert keys[-1][0] == "middle" and all(k[0] != "middle" for k in keys[:-middle_count])

    # Same order from an unordered layout list.
    depths = {}
    for name, block_id, _ in keys:
        depths[(name, block_id)] = depths.get((name, block_id), 0) + 1
    shuffled = [(name, block_id, depth) for (name, block_id), depth in reversed(list(depths.items()))]
    assert layers.ordered_layer_keys(shuffled) == expected_keys
    layers.check_layers_match(expected_widths, context_dim, widths, unet_config["context_dim"])


def test_sd15_adapter_refused_on_sdxl_layout(host):
    _, sdxl_widths, sdxl_config = host_order(host, diffusers_unet(SDXL_CONFIG))
    with pytest.raises(ValueError, match=r"16 cross-attention layers \(C=768\) "
                                         r"but the model has 70 \(context dim 2048\)"):
        layers.check_layers_match(layers.SD15_LAYER_WIDTHS, 768, sdxl_widths, sdxl_config["context_dim"])
