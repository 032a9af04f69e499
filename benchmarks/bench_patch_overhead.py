"""Cost of the IQA-Adapter attention patch.

1. Measured: KSampler-equivalent sampling time (comfy.sample.sample, in-process, CPU) with
   IQAAdapterApply's patch / without, on the embedded tiny SD1.5 model: same seed, batch 2, CFG on,
   interleaved repeats; median ratio and spread. Goal: ratio <= 1.02.
2. Analytic: extra FLOPs of the patch for full SD1.5 and SDXL at 1024x1024 / the UNet's own FLOPs
   (UNet FLOPs counted with torch's FlopCounterMode on the meta device; per cross-attention layer
   the patch adds q K_ip^T and attn V_ip for N tokens: 4 * T * N * hidden FLOPs per image; the
   token K/V projections 4 * N * C * hidden per layer happen once per apply, not per step).

One JSON object per line. `--quick`: fewer repeats and steps.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from comfyui_iqa_adapter.scripts.comfy_server import host_dir, import_host
from comfyui_iqa_adapter.scripts.random_weights import SD15_UNET_CONFIG as SD15_FULL
from comfyui_iqa_adapter.scripts.random_weights import SDXL_UNET_CONFIG as SDXL_FULL

HOST = host_dir()  # the selected host (IQA_TEST_HOST, see scripts/comfy_server.py)
import_host(HOST, cpu=True)


def measure(quick: bool):
    import comfy.sample
    import comfy.sd

    from comfyui_iqa_adapter.adapter import iqa_adapter, quality
    from comfyui_iqa_adapter.nodes import adapter_patch

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
        str(HOST / "models" / "checkpoints" / "tiny_sd15.safetensors"))
    adapter = iqa_adapter.load_adapter(HOST / "models" / "iqa_adapter" / "tiny_sd15_iqa_adapter.safetensors")
    target = quality.build_quality_vector(adapter.descriptor, {"topiq_nr": 99, "laion_aes": 99})
    tokens = iqa_adapter.encode_tokens(adapter, target)
    patched = adapter_patch.apply_iqa_adapter(model, adapter, tokens, 1.0)
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a cat"))
    uncond = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    steps, repeats = (2, 3) if quick else (4, 7)
    for size in (256, 128):
        latent = torch.zeros(2, 4, size // 8, size // 8)
        noise = comfy.sample.prepare_noise(latent, 7)

        def run(m, noise=noise, latent=latent):
            start = time.perf_counter()
            comfy.sample.sample(m, noise, steps, 5.0, "euler", "normal", cond, uncond, latent, seed=7,
                                disable_pbar=True)
            return time.perf_counter() - start

        run(model), run(patched)  # warm-up
        base, variant = [], []
        for i in range(repeats):  # interleaved, alternating which goes first
            pair = (model, patched) if i % 2 == 0 else (patched, model)
            for m in pair:
                (base if m is model else variant).append(run(m))
        ratios = [v / b for b, v in zip(base, variant)]
        print(json.dumps({
            "name": "patch_overhead_ksampler_tiny_sd15", "size": size, "batch": 2, "cfg": True, "steps": steps,
            "ratio": round(statistics.median(variant) / statistics.median(base), 4),
            "ratio_spread": [round(min(ratios), 4), round(max(ratios), 4)],
            "baseline_s": round(statistics.median(base), 4), "variant_s": round(statistics.median(variant), 4),
            "repeats": repeats, "goal": "<= 1.02",
        }), flush=True)


def analytic(name: str, config_class: str, unet_config: dict, size: int, num_tokens: int):
    """UNet FLOPs (FlopCounterMode, meta device) and the patch's extra FLOPs, per image and step."""
    import comfy.ldm.modules.attention as host_attention
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from torch.utils.flop_counter import FlopCounterMode

    if config_class == "SD15":
        extra = {"num_heads": 8, "num_head_channels": -1}
    else:
        extra = {"num_heads": -1, "num_head_channels": 64}
    unet = UNetModel(**unet_config, **extra, dtype=torch.float32, device="meta",
                     operations=comfy.ops.disable_weight_init)
    layer_shapes = []
    hooks = []
    for module in unet.modules():
        if isinstance(module, host_attention.BasicTransformerBlock) and module.attn2 is not None:
            hooks.append(module.attn2.register_forward_hook(
                lambda mod, args, out: layer_shapes.append(
                    (args[0].shape[1], mod.to_q.out_features, mod.to_k.in_features))))
    latent = size // 8
    x = torch.zeros(1, 4, latent, latent, device="meta")
    kwargs = {}
    if unet_config.get("adm_in_channels"):
        kwargs["y"] = torch.zeros(1, unet_config["adm_in_channels"], device="meta")
    original = host_attention.optimized_attention
    # FlopCounterMode counts SDPA; the CPU default (sub-quadratic chunking) cannot run on meta tensors.
    host_attention.optimized_attention = host_attention.attention_pytorch
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            unet(x, timesteps=torch.zeros(1, device="meta"),
                 context=torch.zeros(1, 77, unet_config["context_dim"], device="meta"), **kwargs)
    finally:
        host_attention.optimized_attention = original
        for hook in hooks:
            hook.remove()
    unet_flops = counter.get_total_flops()
    per_step = sum(4 * t * num_tokens * hidden + t * hidden for t, hidden, _ in layer_shapes)  # + the add
    once = sum(4 * num_tokens * context * hidden for _, hidden, context in layer_shapes)
    print(json.dumps({
        "name": f"patch_extra_flops_{name}", "size": size, "num_tokens": num_tokens,
        "cross_attention_layers": len(layer_shapes), "unet_gflops_per_image_step": round(unet_flops / 1e9, 1),
        "patch_gflops_per_image_step": round(per_step / 1e9, 4), "ratio": round(per_step / unet_flops, 6),
        "kv_projection_gflops_once_per_apply": round(once / 1e9, 5),
    }), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--skip-measure", action="store_true", help="only the analytic FLOP ratios")
    args = parser.parse_args(argv)
    for name, cls, config in (("sd15", "SD15", SD15_FULL), ("sdxl", "SDXL", SDXL_FULL)):
        for tokens in (2, 4):
            analytic(name, cls, config, 1024, tokens)
    if not args.skip_measure:
        measure(args.quick)


if __name__ == "__main__":
    main()
