"""Write the embedded tiny models into the host's model folders (no downloads are possible here).

- `checkpoints/tiny_sd15.safetensors`: a real SD1.5 single-file checkpoint (the host's
  CheckpointLoaderSimple detects it as SD1.5): UNet at 320/640 channels with one res block and one
  transformer per level, the full CLIP-L text encoder, and TAESD weights as the VAE.
- `iqa_adapter/tiny_sd15_iqa_adapter.safetensors` + `.json`: an IQA-Adapter for that UNet in the
  released key layout (topiq_nr + laion_aes, z-scored, no flag, linear projection, 2 tokens).

Weights are random but alive: matrices scaled by fan-in, norm scales 1, biases 0 (all-zero 1-D
tensors would make the UNet output exactly zero and every comparison pass vacuously).
Seeded and deterministic; a file that exists with the expected stamp is not written again.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

from comfyui_iqa_adapter.scripts import comfy_server

SEED = 20241201
GENERATOR_VERSION = "3"  # bump when the generated layout or values change
CHECKPOINT_NAME = "tiny_sd15.safetensors"
ADAPTER_NAME = "tiny_sd15_iqa_adapter.safetensors"

# The smallest UNet the host still detects as SD1.5 (context 768, 320 channels, conv proj_in, no adm).
TINY_UNET_CONFIG = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "num_heads": 8,
    "num_head_channels": -1,
    "context_dim": 768,
    "use_linear_in_transformer": False,
    "use_spatial_transformer": True,
    "adm_in_channels": None,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
TINY_TAESD_INPUT_SCALE = 0.01
TINY_ADAPTER = {"num_tokens": 2, "input_dim": 2, "projection_kind": "linear"}
TINY_ADAPTER_DESCRIPTOR = {
    "kind": "score",
    "metrics": ["topiq_nr", "laion_aes"],
    "normalization": "zscore",
    "use_flag": False,
    "pos_encode_L": 0,
    "name": "tiny random SD1.5 adapter (scripts/make_tiny_models.py; demos and tests only)",
}


def import_host(comfy_dir: pathlib.Path):
    comfy_server.import_host(comfy_dir, cpu=True)
    import comfy.clip_model
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.ops
    import comfy.taesd.taesd

    return comfy, openaimodel


def cross_attention_widths(unet) -> list[int]:
    """Hidden widths of attn2 in diffusers attn_processors order: input, output, then middle."""
    from comfy.ldm.modules.attention import SpatialTransformer

    widths = []
    groups = [unet.input_blocks, unet.output_blocks, [unet.middle_block]]
    for group in groups:
        for block in group:
            for layer in block:
                if isinstance(layer, SpatialTransformer):
                    widths += [tb.attn2.to_k.weight.shape[0] for tb in layer.transformer_blocks]
    return widths


def build_checkpoint(comfy_dir: pathlib.Path):
    import torch

    from comfyui_iqa_adapter.scripts.random_weights import alive_state_dict

    comfy, openaimodel = import_host(comfy_dir)
    gen = torch.Generator().manual_seed(SEED)
    ops = comfy.ops.disable_weight_init
    unet = openaimodel.UNetModel(**TINY_UNET_CONFIG, dtype=torch.float32, device="cpu", operations=ops)
    with open(comfy_dir / "comfy" / "sd1_clip_config.json") as f:
        clip_config = json.load(f)
    clip = comfy.clip_model.CLIPTextModel(clip_config, dtype=torch.float32, device="cpu", operations=ops)
    taesd = comfy.taesd.taesd.TAESD()

    sd = {}
    for prefix, module in (("model.diffusion_model.", unet), ("cond_stage_model.transformer.", clip),
                           ("first_stage_model.", taesd)):
        for key, value in alive_state_dict(module.state_dict(), gen).items():
            sd[prefix + key] = value
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    unet.load_state_dict({k[len("model.diffusion_model."):]: v for k, v in sd.items()
                          if k.startswith("model.diffusion_model.")})
    # Residual stacks of random layers grow the signal: rescale the output conv so that the
    # noise prediction has unit spread, as a trained model's does (keeps latents in a sane range).
    with torch.no_grad():
        probe = unet(torch.randn(2, 4, 16, 16, generator=gen), timesteps=torch.tensor([500.0, 500.0]),
                     context=torch.randn(2, 77, 768, generator=gen))
    sd["model.diffusion_model.out.2.weight"] /= probe.std()
    # A random eps-predictor does not denoise, so sampled latents end in the hundreds, where TAESD's
    # tanh input clamp saturates (flat images, no gradient for guidance). Its own input scale brings
    # them back to the clamp's working range.
    sd["first_stage_model.vae_scale"] = torch.tensor(TINY_TAESD_INPUT_SCALE)
    # Centre the random decoder's output on mid-grey with a moderate spread, so images are neither
    # mostly clipped black nor flat (IQA scores and their gradients then mean something).
    taesd.load_state_dict({k[len("first_stage_model."):]: v for k, v in sd.items()
                           if k.startswith("first_stage_model.")})
    last = f"first_stage_model.taesd_decoder.{len(taesd.taesd_decoder) - 1}"
    with torch.no_grad():
        pixels = taesd.taesd_decoder(torch.randn(2, 4, 16, 16, generator=gen) * 2)
    sd[last + ".weight"] *= 0.25 / pixels.std()
    sd[last + ".bias"] = torch.full_like(sd[last + ".bias"], 0.5)
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    return sd, cross_attention_widths(unet)


def write_atomic_safetensors(tensors, path: pathlib.Path, metadata: dict[str, str]):
    from safetensors.torch import save_file

    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def stamp_matches(path: pathlib.Path, stamp: str) -> bool:
    if not path.exists():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("iqa_tiny_stamp") == stamp
    except Exception:
        return False


def write_sidecar(adapter_path: pathlib.Path) -> None:
    sidecar = adapter_path.with_suffix(".json")
    text = json.dumps(TINY_ADAPTER_DESCRIPTOR, indent=2) + "\n"
    if not sidecar.exists() or sidecar.read_text() != text:
        sidecar.write_text(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--comfy", required=True, type=pathlib.Path, help="ComfyUI folder")
    parser.add_argument("--force", action="store_true", help="write again even if up to date")
    args = parser.parse_args(argv)
    comfy_dir = args.comfy.resolve()
    models = comfy_dir / "models"
    ckpt_path = models / "checkpoints" / CHECKPOINT_NAME
    adapter_path = models / "iqa_adapter" / ADAPTER_NAME
    stamp = f"v{GENERATOR_VERSION}-seed{SEED}"
    if not args.force and stamp_matches(ckpt_path, stamp) and stamp_matches(adapter_path, stamp):
        write_sidecar(adapter_path)  # cheap; keeps the descriptor in step with the schema
        print(f"[tiny models] up to date: {ckpt_path.name}, {adapter_path.name}")
        return 0

    from comfyui_iqa_adapter.scripts.random_weights import random_adapter_state_dict

    start = time.perf_counter()
    sd, widths = build_checkpoint(comfy_dir)
    ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic_safetensors(sd, ckpt_path, {"iqa_tiny_stamp": stamp, "note": "random weights, noise-like images"})

    adapter_sd = random_adapter_state_dict(768, widths, seed=SEED + 1, dtype=__import__("torch").float16,
                                           **TINY_ADAPTER)
    adapter_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic_safetensors(adapter_sd, adapter_path, {"iqa_tiny_stamp": stamp})
    write_sidecar(adapter_path)
    size_mb = ckpt_path.stat().st_size / 2**20
    print(f"[tiny models] wrote {ckpt_path} ({size_mb:.0f} MiB) and {adapter_path} "
          f"({len(widths)} cross-attention layers) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
