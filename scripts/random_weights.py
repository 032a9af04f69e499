"""Random weights for tests, the tiny demo models and the benchmarks: no real weights can be downloaded here.

Adapters in the exact released key layout, networks kept "alive" (fan-in scaled), pyiqa metrics and CLIP
backbones under their official file names. Matrices are scaled by fan-in and LayerNorm scales are 1, so the
adapter's tokens carry signal (an all-zero adapter would make every comparison pass vacuously).

    from comfyui_iqa_adapter.scripts import random_weights
"""
from __future__ import annotations

import os

import torch

from comfyui_iqa_adapter.adapter import clip_weights, metric_build

# The host's (LDM) UNet configs of full SD1.5 and SDXL, as its model detection produces them: used to
# build full-depth models (small channels for tests, full size for the FLOP count).
SD15_UNET_CONFIG = {
    "image_size": 64, "in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1,
    "context_dim": 768, "use_linear_in_transformer": False, "use_spatial_transformer": True,
    "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False}
SDXL_UNET_CONFIG = {
    "image_size": 128, "in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2],
    "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10,
    "context_dim": 2048, "use_linear_in_transformer": True, "use_spatial_transformer": True,
    "adm_in_channels": 2816, "num_classes": "sequential", "use_temporal_attention": False,
    "use_temporal_resblock": False}


# ----------------------------------------------------------------------------------------------------
# Adapters and plain networks
# ----------------------------------------------------------------------------------------------------

def random_adapter_state_dict(
    cross_attention_dim: int,
    layer_widths: list[int],
    num_tokens: int = 2,
    input_dim: int = 2,
    projection_kind: str = "linear",
    mlp_hidden_dim: int = 128,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    bias_scale: float = 0.1,
) -> dict[str, torch.Tensor]:
    """Flat dict `image_proj.*` + `ip_adapter.<2k+1>.to_{k,v}_ip.weight`, as in released `.safetensors`.

    `layer_widths[k]` is the hidden size of cross-attention layer k (diffusers attn_processors order).
    """
    gen = torch.Generator().manual_seed(seed)

    def matrix(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen) / cols**0.5

    def vector(n: int) -> torch.Tensor:
        return torch.randn(n, generator=gen) * bias_scale

    c = cross_attention_dim
    sd: dict[str, torch.Tensor] = {}
    if projection_kind == "linear":
        sd["image_proj.proj.weight"] = matrix(num_tokens * c, input_dim)
        sd["image_proj.proj.bias"] = vector(num_tokens * c)
    elif projection_kind == "mlp":
        sd["image_proj.proj.0.weight"] = matrix(mlp_hidden_dim, input_dim)
        sd["image_proj.proj.0.bias"] = vector(mlp_hidden_dim)
        sd["image_proj.proj.2.weight"] = matrix(num_tokens * c, mlp_hidden_dim)
        sd["image_proj.proj.2.bias"] = vector(num_tokens * c)
    else:
        raise ValueError(f"projection_kind must be 'linear' or 'mlp', got {projection_kind!r}")
    sd["image_proj.norm.weight"] = torch.ones(c)
    sd["image_proj.norm.bias"] = vector(c)
    for k, width in enumerate(layer_widths):
        sd[f"ip_adapter.{2 * k + 1}.to_k_ip.weight"] = matrix(width, c)
        sd[f"ip_adapter.{2 * k + 1}.to_v_ip.weight"] = matrix(width, c)
    return {key: value.to(dtype).contiguous() for key, value in sd.items()}


def nested_bin_layout(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The `.bin` release layout: {"image_proj": {...}, "ip_adapter": {"<i>.to_k_ip.weight": ...}}."""
    out: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        prefix, rest = key.split(".", 1)
        out[prefix][rest] = value
    return out


def alive_state_dict(state_dict: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights for any network's state dict that keep it alive: matrices and kernels scaled by
    fan-in, biases and shifts 0, other 1-D tensors (norm scales) 1; non-float buffers kept."""
    out = {}
    for key, value in state_dict.items():
        if not value.is_floating_point():
            out[key] = value
        elif value.ndim >= 2:
            fan_in = value[0].numel()
            out[key] = torch.randn(value.shape, generator=generator) / fan_in**0.5
        elif key.endswith("bias") or key.endswith("shift"):
            out[key] = torch.zeros(value.shape)
        else:
            out[key] = torch.ones(value.shape)
    return out


# ----------------------------------------------------------------------------------------------------
# CLIP backbones and pyiqa metrics
# ----------------------------------------------------------------------------------------------------

def random_clip_model(clip_name: str, seed: int = 0, module=None, **architecture) -> torch.nn.Module:
    """A CLIP of `clip_name`'s official architecture (fields of CLIP_ARCHITECTURES can be overridden, e.g. a
    tiny width for tests) with the constructor's seeded random init, fp16 where OpenAI's files are fp16."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = clip_weights.official_clip(clip_name, module, **architecture)
    convert = getattr(module, "convert_weights", None) or clip_weights.import_clip_package().model.convert_weights
    convert(model)
    return model


def _save_state(state: dict[str, torch.Tensor], path: str) -> str:
    torch.save({key: value.contiguous() for key, value in state.items()}, path)
    return path


def write_random_clip_weights(clip_name: str, folder: str, seed: int = 0, **architecture) -> str:
    """Random CLIP weights saved as a plain state dict under OpenAI's file name (e.g. 'RN50.pt'); the keys
    and dtypes of the official files. Returns the path."""
    os.makedirs(folder, exist_ok=True)
    model = random_clip_model(clip_name, seed, **architecture)
    return _save_state(model.state_dict(), os.path.join(folder, clip_weights.clip_file_name(clip_name)))


def write_random_weights(name: str, folder: str, seed: int = 0, noise: float = 0.0) -> list[str]:
    """Write random weights for pyiqa metric `name` into `folder` under pyiqa's default file names, in the
    layout pyiqa expects ('params' wrapper where the arch uses one). `noise` > 0 perturbs the constructor's
    init (seeded) so two seeds give different networks. CLIP backbones: a CLIP file already in `folder` is
    kept and used (they are large; see `write_random_clip_weights` for small test-sized ones); a missing one
    is generated with the official architecture. Files pyiqa reads during the build (e.g. clipiqa+'s prompt
    tensor) are not generated."""
    os.makedirs(folder, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    plan = metric_build.plan_metric(
        name, make_clip=lambda module, clip_name: random_clip_model(clip_name, seed, module),
        clip_folders=[os.path.abspath(folder)])
    written = [_save_state(random_clip_model(load.clip_name, seed).state_dict(), os.path.join(folder, load.file_name))
               for load in plan.clip_loads if load.path is None]
    for load in plan.weight_loads:
        state = {}
        for key, tensor in load.module.state_dict().items():
            tensor = tensor.detach().clone()
            if noise > 0 and tensor.is_floating_point() and tensor.numel() > 1:
                tensor = tensor + noise * tensor.std().nan_to_num(0.0) * torch.randn(tensor.shape, generator=generator)
            state[key] = tensor.contiguous()
        path = os.path.join(folder, load.file_name)
        torch.save({load.weight_keys: state} if load.weight_keys else state, path)
        written.append(path)
    return written
