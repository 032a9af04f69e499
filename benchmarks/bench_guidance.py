"""Cost of gradient quality guidance (IQAGradientGuidance): a guided sampler step ÷ a plain step.

In-process (comfy.sample.sample, CPU), the embedded tiny SD1.5 checkpoint, euler, CFG 5, batch 1, same seed,
interleaved repeats (ABBA), per-step time = sampling time / steps. Guidance on every step (the default range).
Variants:
  * decoder 'vae' with a full-size SD-layout AutoencoderKL (ch 128, ch_mult 1-2-4-4, generated weights, built
    by the host's VAE class from a state dict): the faithful cost, one decoder forward + backward per step;
  * decoder 'taesd' path: the tiny checkpoint's own VAE, which is TAESD (the cheap decoder).
Metric: CNNIQA (pyiqa architecture, generated weights; one of the paper's 21), differentiable. Other metrics
(MUSIQ, TOPIQ, ...) cost more per step; pass --metric to measure one that builds offline.

The tiny UNet is far cheaper than a real SD1.5/SDXL UNet, so these ratios overstate the relative cost on real
models; the absolute extra seconds per step (variant_s - baseline_s) are the decoder+metric cost at that size.

One JSON object per line (benchmarks/common.py). Default 128 px, 3 steps, 5 repeats; `--quick`: 64 px, 2 steps,
2 repeats.
"""
from __future__ import annotations

import argparse
import tempfile

from comfyui_iqa_adapter.benchmarks import common


def random_full_sd_vae(seed: int = 0):
    """A real SD1.x AutoencoderKL (the host detects the layout from the keys), generated weights."""
    import comfy.sd
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL

    from comfyui_iqa_adapter.scripts.random_weights import alive_state_dict

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    generator = torch.Generator().manual_seed(seed)
    state = alive_state_dict(AutoencoderKL(ddconfig=ddconfig, embed_dim=4).state_dict(), generator)
    return comfy.sd.VAE(sd=state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--size", type=int, default=None, help="image size in px (default 128, quick 64)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--metric", default="cnniqa")
    args = parser.parse_args()
    size = args.size or (64 if args.quick else 128)
    steps = args.steps or (2 if args.quick else 3)
    repeats = args.repeats or (2 if args.quick else 5)

    comfy = common.import_host_comfy()
    import torch

    from comfyui_iqa_adapter.adapter import iqa_models
    from comfyui_iqa_adapter.nodes import guidance_nodes
    from comfyui_iqa_adapter.scripts import random_weights

    model, clip, tiny_vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(common.host_dir() / "models" / "checkpoints" / "tiny_sd15.safetensors"))
    full_vae = random_full_sd_vae()
    folder = tempfile.mkdtemp(prefix="bench-guidance-")
    torch.manual_seed(0)
    random_weights.write_random_weights(args.metric, folder, seed=0)
    metric = iqa_models.load_metric(args.metric, [folder], device="cpu", differentiable=True, use_cache=False)
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a cat"))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    latent = torch.zeros(1, 4, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(latent, 1)

    def sampler(patched):
        def run():
            comfy.sample.sample(patched, noise, steps, 5.0, "euler", "normal", positive, negative, latent, seed=1,
                                disable_pbar=True)
        return run

    plain = sampler(model)
    variants = [
        ("guidance_step_full_vae", full_vae, "AutoencoderKL SD layout (ch 128), generated weights"),
        ("guidance_step_taesd", tiny_vae, "TAESD (the tiny checkpoint's VAE)"),
    ]
    for name, vae, decoder_label in variants:
        patched = guidance_nodes.build_guided_model(model, vae, metric, 1.0, 0.0, 1.0, decoder="vae")
        base_times, variant_times = common.interleaved(plain, sampler(patched), repeats)
        line = common.result(
            name, [t / steps for t in base_times], [t / steps for t in variant_times], goal="report",
            decoder=decoder_label, metric=args.metric, size_px=size, steps=steps, sampler="euler", cfg=5.0,
            unet="tiny SD1.5 (random weights)", device="cpu",
            note="per sampler step; ratio overstates real-model cost (tiny UNet)",
            # the fastest repeat of each side is the least disturbed by other processes on a shared machine
            ratio_of_minimums=round(min(variant_times) / min(base_times), 4))
        common.emit(line)


if __name__ == "__main__":
    main()
