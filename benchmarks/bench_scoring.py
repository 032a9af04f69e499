"""Scoring overhead of the IQAScore node's code path vs calling pyiqa directly on the same tensors.

Both sides score the same 512x512 images in the same chunk size with the same weights (random weights in
pyiqa's layout, generated here: no real weights offline). Repeats are interleaved (baseline, variant,
baseline, ...) and the medians compared. Prints one JSON line: {name, ratio, baseline_s, variant_s, repeats}.
Goal: ratio <= 1.05.

    .venv/bin/python benchmarks/bench_scoring.py [--quick] [--metric cnniqa]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from comfyui_iqa_adapter.scripts import comfy_server


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 images, 3 repeats")
    parser.add_argument("--metric", default="cnniqa", help="pyiqa id (weights generated for it)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 8, 3

    import pyiqa
    import torch

    comfy_server.import_host(cpu=True)
    from comfyui_iqa_adapter.adapter import iqa_models
    from comfyui_iqa_adapter.nodes import metric_nodes
    from comfyui_iqa_adapter.scripts import random_weights

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    folder = tempfile.mkdtemp(prefix="bench_iqa_")
    os.environ["TORCH_HOME"] = os.path.join(folder, "torch_home")
    files = random_weights.write_random_weights(args.metric, folder, seed=0)
    metric = iqa_models.load_metric(args.metric, [folder], "cpu")

    direct = pyiqa.create_metric(args.metric, device="cpu", **_no_weights_kwargs(args.metric))
    for path in files:  # same tensors as ours (one file for the usual single-checkpoint metrics)
        state = torch.load(path, map_location="cpu", weights_only=True)
        direct.net.load_state_dict(state.get("params", state))
    direct.eval()

    gen = torch.Generator().manual_seed(0)
    images_bhwc = torch.rand(args.images, args.size, args.size, 3, generator=gen)
    images_bchw = images_bhwc.movedim(-1, 1).contiguous()

    def baseline():
        with torch.no_grad():
            return torch.cat([direct(images_bchw[i:i + args.chunk]).reshape(-1)
                              for i in range(0, args.images, args.chunk)])

    def variant():
        return metric_nodes.score_images([metric], images_bhwc, None, args.chunk).scores[args.metric]

    ours, theirs = torch.tensor(variant()), baseline()
    if not torch.allclose(ours, theirs, atol=1e-6, rtol=0):
        raise SystemExit(f"scores differ: max |diff| {float((ours - theirs).abs().max())}")
    times = {"baseline": [], "variant": []}
    for _ in range(args.repeats):
        for name, fn in (("baseline", baseline), ("variant", variant)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    baseline_s, variant_s = statistics.median(times["baseline"]), statistics.median(times["variant"])
    print(json.dumps({"name": f"iqa_score_{args.metric}_{args.images}x{args.size}",
                      "ratio": round(variant_s / baseline_s, 4), "baseline_s": round(baseline_s, 4),
                      "variant_s": round(variant_s, 4), "repeats": args.repeats}))
    return 0


def _no_weights_kwargs(name: str) -> dict:
    """pyiqa build options that skip its own downloads (docs/METHOD.md §3.4)."""
    if name == "cnniqa":
        return {"pretrained": None}
    if name.startswith("topiq"):
        return {"pretrained": False, "backbone_pretrain": False}
    return {"pretrained": False}


if __name__ == "__main__":
    raise SystemExit(main())
