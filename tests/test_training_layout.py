"""The authors' training output (accelerate state of their whole training module) loads as the released layout.

The authors' module is rebuilt here the way their trainer builds it, on a real diffusers SDXL-depth UNet
(70 cross-attention layers; small channels): one processor per entry of `unet.attn_processors`, the
adapter layers on the attn2 processors, `adapter_modules = ModuleList(unet.attn_processors.values())`,
`qual_proj_model` = the projection. Its `state_dict()` therefore has the real key names, including the
second copy of the adapter weights under `unet.<...>.attn2.processor.*`. The released file puts layer
k (diffusers order) at `ip_adapter.<2k+1>`, and the authors' loader fills `adapter_modules` by list
position, so the same weights must land on the same host layers: the patched outputs must be identical.
"""
from __future__ import annotations

import pytest
import torch

from comfyui_iqa_adapter.adapter import checkpoint, iqa_adapter, projection, training_layout
from comfyui_iqa_adapter.adapter.descriptor import Descriptor
from comfyui_iqa_adapter.scripts import random_weights

diffusers = pytest.importorskip("diffusers", reason="SKIPPED LOUDLY: diffusers is not installed (requirements-dev.txt)")

DESCRIPTOR = {"kind": "score", "metrics": ["topiq_nr", "laion_aes"], "normalization": "zscore", "use_flag": False,
              "pos_encode_L": 0}
# SDXL depth (transformer blocks 2/10 down, 10/2 up, 10 mid), tiny channels: names and order only.
DIFFUSERS_SDXL_DEPTH = {
    "sample_size": 8, "block_out_channels": (32, 32, 64), "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "cross_attention_dim": 32, "attention_head_dim": 8,
    "norm_num_groups": 32, "use_linear_projection": True,
}


class AuthorsIPProcessor(torch.nn.Module):
    """Stands in for the authors' IP attention processor: only its two weights matter for the state."""

    def __init__(self, to_k: torch.Tensor, to_v: torch.Tensor):
        super().__init__()
        self.to_k_ip = torch.nn.Linear(to_k.shape[1], to_k.shape[0], bias=False)
        self.to_v_ip = torch.nn.Linear(to_v.shape[1], to_v.shape[0], bias=False)
        with torch.no_grad():
            self.to_k_ip.weight.copy_(to_k)
            self.to_v_ip.weight.copy_(to_v)


class AuthorsPlainProcessor(torch.nn.Module):
    """attn1's processor: no parameters."""


def authors_training_state(released: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    unet = diffusers.UNet2DConditionModel(**DIFFUSERS_SDXL_DEPTH)
    names = list(unet.attn_processors)
    processors = {}
    for position, name in enumerate(names):
        key = f"ip_adapter.{position}.to_k_ip.weight"
        # The released odd indices are exactly diffusers' attn2 processors (checked against diffusers itself).
        assert (key in released) == name.endswith("attn2.processor"), (position, name)
        processors[name] = (AuthorsIPProcessor(released[key], released[f"ip_adapter.{position}.to_v_ip.weight"])
                            if key in released else AuthorsPlainProcessor())
    unet.set_attn_processor(processors)
    weights = checkpoint.split_state_dict({k: v for k, v in released.items()})
    module = torch.nn.Module()
    module.unet = unet
    module.qual_proj_model = projection.QualityProjection.from_weights(weights.image_proj, weights.info)
    module.adapter_modules = torch.nn.ModuleList(unet.attn_processors.values())
    return module.state_dict()


@pytest.fixture(scope="module")
def sdxl_case(comfy):
    from comfyui_iqa_adapter.nodes import adapter_patch
    from test_adapter_patch import SDXL_SMALL, build_small_model

    model = build_small_model(comfy, "SDXL", SDXL_SMALL, seed=4)
    _, widths, context_dim = adapter_patch.unet_cross_attention_layers(model)
    assert len(widths) == 70
    released = random_weights.random_adapter_state_dict(context_dim, widths, num_tokens=2, input_dim=2, seed=11)
    return model, released, authors_training_state(released)


def test_authors_state_has_the_documented_keys(sdxl_case):
    _, released, state = sdxl_case
    assert training_layout.detect_layout(state) == "authors"
    assert sum(k.startswith("adapter_modules.") for k in state) == 140
    assert sum(k.startswith("unet.") and ".attn2.processor.to_" in k for k in state) == 140
    assert state["adapter_modules.139.to_v_ip.weight"].data_ptr() == \
        state["unet.mid_block.attentions.0.transformer_blocks.9.attn2.processor.to_v_ip.weight"].data_ptr()
    assert {k[len("qual_proj_model."):] for k in state if k.startswith("qual_proj_model.")} == \
        {k[len("image_proj."):] for k in released if k.startswith("image_proj.")}


@pytest.mark.parametrize("variant", ["both copies (.bin)", "adapter_modules only", "unet copy only", "ddp prefix"])
def test_authors_state_patches_like_the_released_file(sdxl_case, tmp_path, variant):
    from safetensors.torch import save_file

    from comfyui_iqa_adapter.nodes import adapter_patch

    model, released, state = sdxl_case
    folder = tmp_path / "checkpoint-1000"
    folder.mkdir()
    if variant == "both copies (.bin)":
        torch.save(state, folder / "pytorch_model.bin")  # accelerate save_state(safe_serialization=False)
    else:
        if variant == "adapter_modules only":
            kept = {k: v for k, v in state.items() if ".processor." not in k}
        elif variant == "unet copy only":
            kept = {k: v for k, v in state.items() if not k.startswith("adapter_modules.")}
        else:
            kept = {f"module.{k}": v for k, v in state.items() if ".processor." not in k}
        save_file({k: v.clone().contiguous() for k, v in kept.items()}, str(folder / "model.safetensors"))
    released_path = tmp_path / "released.safetensors"
    save_file(released, str(released_path))
    descriptor = Descriptor(metrics=("topiq_nr", "laion_aes"), source="test")

    converted = tmp_path / "converted.safetensors"
    checkpoint.convert_training_output(folder, converted, DESCRIPTOR)
    direct = iqa_adapter.load_adapter(training_layout.training_output_file(folder), descriptor=descriptor)
    for adapter in (iqa_adapter.load_adapter(converted), direct):
        reference = iqa_adapter.load_adapter(released_path, descriptor=descriptor)
        assert adapter.info == reference.info
        assert all(torch.equal(a, b)
                   for a, b in zip(adapter.to_k_ip + adapter.to_v_ip, reference.to_k_ip + reference.to_v_ip))
        vectors = torch.tensor([[1.5, -0.5], [-2.0, 1.0]])
        installed = []
        for loaded in (adapter, reference):
            tokens = iqa_adapter.encode_tokens(loaded, vectors)
            patched = adapter_patch.apply_iqa_adapter(model, loaded, tokens)
            installed.append(patched.model_options["transformer_options"]["patches_replace"]["attn2"])
        # Every host layer key gets the same quality keys/values (cond and uncond) from both files.
        assert installed[0].keys() == installed[1].keys() and len(installed[0]) == 70
        for key in installed[0]:
            assert all(torch.equal(a, b) for a, b in zip(installed[0][key].kv_cpu, installed[1][key].kv_cpu)), key
    assert converted.with_suffix(".json").is_file()


def test_disagreeing_copies_are_refused(sdxl_case, tmp_path):
    _, _, state = sdxl_case
    tampered = {k: v.clone() for k, v in state.items()}
    tampered["adapter_modules.3.to_k_ip.weight"] += 1.0
    with pytest.raises(ValueError, match="differs from the copy in the UNet"):
        training_layout.authors_to_released(tampered)
    shifted = {k.replace("adapter_modules.3.", "adapter_modules.4."): v for k, v in state.items()}
    with pytest.raises(ValueError, match="indices"):
        training_layout.authors_to_released(shifted)


def test_diffusers_order_puts_the_mid_block_last():
    paths = ["mid_block.attentions.0.transformer_blocks.0.attn2",
             "up_blocks.0.attentions.2.transformer_blocks.9.attn2",
             "down_blocks.2.attentions.1.transformer_blocks.0.attn2",
             "down_blocks.1.attentions.0.transformer_blocks.1.attn2"]
    assert sorted(paths, key=training_layout.diffusers_attn2_order) == paths[::-1]
