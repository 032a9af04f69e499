"""Peak memory of the adapter: peak RSS of a process that samples with the adapter / without.

Each measurement is a fresh subprocess (this file with --child base|adapter): it imports the host and the
pack (both sides import the same modules), loads the tiny SD1.5 checkpoint in-process, the 'adapter' side also
loads the tiny IQA-Adapter, encodes one target and patches the model, then samples once at 128x128 (2 steps,
CFG) and reports ru_maxrss. Children alternate base/adapter, `repeats` pairs; the ratio is of the medians.

Goal: ratio <= 1 + adapter file size / base peak RSS + 0.01.
In this JSON line baseline_s / variant_s are the children's wall times; the ratio is of peak RSS bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from comfyui_iqa_adapter.benchmarks import common

CHECKPOINT = "tiny_sd15.safetensors"
ADAPTER = "tiny_sd15_iqa_adapter.safetensors"


def child(with_adapter: bool, size: int, steps: int) -> None:
    started = time.perf_counter()
    common.import_host_comfy()
    import comfy.sample
    import comfy.sd
    import torch

    from comfyui_iqa_adapter.adapter import iqa_adapter, quality
    from comfyui_iqa_adapter.nodes import adapter_patch

    host = common.host_dir()
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(host / "models" / "checkpoints" / CHECKPOINT))
    if with_adapter:
        adapter = iqa_adapter.load_adapter(host / "models" / "iqa_adapter" / ADAPTER)
        target = {metric: 90.0 for metric in adapter.descriptor.metrics}
        tokens = iqa_adapter.encode_tokens(adapter, quality.build_quality_vector(adapter.descriptor, target))
        model = adapter_patch.apply_iqa_adapter(model, adapter, tokens, 1.0)
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a cat"))
    uncond = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    latent = torch.zeros(1, 4, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(latent, 3)
    out = comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", cond, uncond, latent, seed=3,
                              disable_pbar=True)
    assert torch.isfinite(out).all()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"peak_rss_bytes": peak_kib * 1024, "wall_s": time.perf_counter() - started}), flush=True)


def run_child(kind: str, size: int, steps: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--size", str(size), "--steps", str(steps)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 pair of children instead of 3")
    parser.add_argument("--repeats", type=int, default=3, help="pairs of children (base, adapter)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--child", choices=["base", "adapter"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child == "adapter", args.size, args.steps)
        return
    repeats = 1 if args.quick else args.repeats
    base, variant = [], []
    for i in range(repeats):  # alternate which goes first
        order = ("base", "adapter") if i % 2 == 0 else ("adapter", "base")
        for kind in order:
            (base if kind == "base" else variant).append(run_child(kind, args.size, args.steps))
    adapter_bytes = (common.host_dir() / "models" / "iqa_adapter" / ADAPTER).stat().st_size
    base_rss = statistics.median(r["peak_rss_bytes"] for r in base)
    variant_rss = statistics.median(r["peak_rss_bytes"] for r in variant)
    ratio = variant_rss / base_rss
    goal_max = 1 + adapter_bytes / base_rss + 0.01
    line = common.result(
        "memory_peak_rss_adapter_vs_base", [r["wall_s"] for r in base], [r["wall_s"] for r in variant],
        goal=f"<= {goal_max:.4f} (1 + adapter_bytes/RSS + 1%)", goal_max=round(goal_max, 4))
    line.update({
        "ratio": round(ratio, 4), "passed": ratio <= goal_max, "ratio_of": "peak RSS bytes (medians)",
        "adapter_bytes": adapter_bytes, "baseline_rss_bytes": int(base_rss), "variant_rss_bytes": int(variant_rss),
        "baseline_rss_all": [r["peak_rss_bytes"] for r in base],
        "variant_rss_all": [r["peak_rss_bytes"] for r in variant],
        "size": args.size, "steps": args.steps, "note": "baseline_s/variant_s = child wall times",
    })
    common.emit(line)


if __name__ == "__main__":
    main()
