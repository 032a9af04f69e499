"""Sweeps on a local Ray cluster (scripts/sweep.py --backend ray): throughput of 2 workers / 1 worker, and
the driver's own cost per item against the workers' sampling time.

Result lines (JSON, one per line):
  sweep_ray_throughput_2w_vs_1w  items/s with 2 workers / items/s with 1 worker, the same items (fresh results
                                 folders, models warm: --warmup); on a 2-core machine the two CPU workers share
                                 the cores, so expect well below 2. baseline_s / variant_s: the sweeps' working
                                 times (from the first worker ready to the last item stored).
  sweep_driver_overhead          the driver's work per item (results from the object store, images and manifest
                                 lines written, graphs prepared and submitted) / the servers' sampling time per
                                 item, in the 2-worker run; driver_total_ms_per_item adds the progress display
                                 and files (twice a second, whatever the rate): everything but waiting.
  sweep_driver_bound_workers     sampling time per item / driver time per item: how many workers of this speed
                                 one driver keeps busy; the same with an assumed GPU sampling time per item.

    python benchmarks/bench_sweep_cluster.py [--quick] [--prompts 4 --targets 8 --batch-size 4 --size 64 --steps 4]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

from comfyui_iqa_adapter.benchmarks.common import add_tiny_sampling_args

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROMPTS = ["a red car", "a lighthouse", "a bowl of fruit", "a mountain lake", "a city street", "an old man",
           "a cat on a sofa", "a field of flowers"]


def workflow(args) -> dict:
    """The tiny SD1.5 text-to-image graph with one IQA-Adapter target (what the sweep fills in)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": args.ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}, "_meta": {"title": "Positive"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": args.size, "height": args.size, "batch_size": 1}},
        "a": {"class_type": "IQAAdapterLoader", "inputs": {"adapter_name": args.adapter}},
        "t": {"class_type": "IQAAdapterEncodeTarget", "inputs": {
            "adapter": ["a", 0], "quality": "custom", "percentile": 50.0, "targets": "", "mode": "percentile",
            "negative_scale": 0.0}},
        "ap": {"class_type": "IQAAdapterApply", "inputs": {
            "model": ["1", 0], "adapter": ["a", 0], "tokens": ["t", 0], "weight": 1.0, "start_at": 0.0, "end_at": 1.0}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["ap", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 0,
            "steps": args.steps, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "bench"}},
    }


def sweep(args, work: pathlib.Path, workers: int) -> dict:
    out = work / f"ray_{workers}w"
    targets = ",".join(f"{1 + 97 * i / max(1, args.targets - 1):.3g}" for i in range(args.targets))
    cmd = [sys.executable, str(ROOT / "scripts" / "sweep.py"), str(work / "workflow_api.json"), "--backend", "ray",
           "--workers", str(workers), "--warmup", "--quiet", "--out", str(out), "--targets", targets,
           "--batch-size", str(args.batch_size), "--seeds", "1", "--prompts", *PROMPTS[:args.prompts]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"sweep with {workers} worker(s) failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    progress = json.loads((out / "progress.json").read_text())
    if progress["done"] != args.prompts * args.targets:
        raise RuntimeError(f"{progress['done']} items stored, expected {args.prompts * args.targets}")
    return progress


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 prompts x 4 targets, 2 steps")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--gpu-item-s", type=float, default=1.0,
                   help="assumed sampling seconds per image on a GPU (SDXL 1024 px, ~25 steps, batched)")
    add_tiny_sampling_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.targets, args.steps = 2, 4, 2
    try:
        import ray  # noqa: F401
    except ImportError:
        print(json.dumps({"name": "sweep_ray_throughput_2w_vs_1w", "skipped": "Ray is not installed "
                          "(pip install -r requirements-dev.txt)"}))
        return 0
    work = pathlib.Path(tempfile.mkdtemp(prefix="iqa-bench-cluster-"))
    (work / "workflow_api.json").write_text(json.dumps(workflow(args)))
    load = os.getloadavg()[0]
    one = sweep(args, work, 1)
    two = sweep(args, work, 2)
    items = args.prompts * args.targets
    common = {"items": items, "batch_size": args.batch_size, "size": args.size, "steps": args.steps,
              "cpus": os.cpu_count(), "load_average_at_start": round(load, 2), "repeats": 1}
    print(json.dumps({"name": "sweep_ray_throughput_2w_vs_1w", "ratio": round(two["rate_per_s"] / one["rate_per_s"], 3),
                      "baseline_s": one["working_s"], "variant_s": two["working_s"],
                      "items_per_s_1w": one["rate_per_s"], "items_per_s_2w": two["rate_per_s"],
                      "goal": "report (2 CPU workers share 2 cores: < 2)", **common}))
    driver_ms, sampling_ms = two["driver_item_ms_per_item"], two["sampling_ms_per_item"]
    print(json.dumps({"name": "sweep_driver_overhead", "ratio": round(driver_ms / sampling_ms, 5),
                      "driver_ms_per_item": driver_ms, "sampling_ms_per_item": sampling_ms,
                      "driver_total_ms_per_item": two["driver_ms_per_item"],
                      "driver_ms_per_item_1w": one["driver_item_ms_per_item"],
                      "baseline_s": sampling_ms / 1000, "variant_s": driver_ms / 1000, "goal": "report", **common}))
    print(json.dumps({"name": "sweep_driver_bound_workers", "ratio": round(sampling_ms / driver_ms, 1),
                      "gpu_item_s_assumed": args.gpu_item_s,
                      "gpu_workers_per_driver": round(1000 * args.gpu_item_s / driver_ms),
                      "baseline_s": driver_ms / 1000, "variant_s": sampling_ms / 1000, "goal": "report", **common}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
