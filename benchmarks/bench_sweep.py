"""Cost of a batched target sweep on the real server (tiny SD1.5 model unless told otherwise).

Ratios (one JSON object per line: name, ratio, baseline_s, variant_s, repeats):
  sweep_vs_plain_batch   one sampler run of a batch of 8 latents with 8 different targets (IQATargetSweep ->
                         IQAAdapterApply) / the same batch of 8 without the pack. Goal <= 1.02.
  sweep_vs_8_prompts     the same batched sweep / 8 separate prompts, one target each (reported).
Repeats are interleaved (plain, sweep, separate, plain, ...) and each run gets a new seed, so ComfyUI's
cache never skips the sampler; times are the server's own execution time per prompt, medians over repeats.
Plain and sweep each run twice in a row and the second run is timed: switching between the plain model
and a patched clone makes the host swap the loaded model (its cost per switch is printed as model_switch_s).

    python benchmarks/bench_sweep.py [--quick] [--size 64 --steps 4 --repeats 5]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tempfile
import time

from comfyui_iqa_adapter.benchmarks.common import add_tiny_sampling_args
from comfyui_iqa_adapter.scripts.comfy_server import ComfyServer, ensure_pack_linked, host_dir


def graph(kind: str, seed: int, args, target: float = 50.0) -> dict:
    batch = 1 if kind == "single" else args.targets
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": args.ckpt}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": args.size, "height": args.size,
                                                                "batch_size": batch}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": seed, "steps": args.steps, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}},
        "out": {"class_type": "PreviewImage", "inputs": {"images": ["decode", 0]}},
    }
    if kind == "plain":
        return g
    g["adapter"] = {"class_type": "IQAAdapterLoader", "inputs": {"adapter_name": args.adapter}}
    if kind == "sweep":
        g["tokens"] = {"class_type": "IQATargetSweep", "inputs": {
            "adapter": ["adapter", 0], "metrics": "", "start": 1.0, "stop": 99.0, "steps": args.targets,
            "mode": "percentile", "spacing": "linear", "hold": "", "negative_scale": 0.0}}
    else:
        g["tokens"] = {"class_type": "IQAAdapterEncodeTarget", "inputs": {
            "adapter": ["adapter", 0], "quality": "custom", "percentile": target, "targets": "",
            "mode": "percentile", "negative_scale": 0.0}}
    g["apply"] = {"class_type": "IQAAdapterApply", "inputs": {
        "model": ["ckpt", 0], "adapter": ["adapter", 0], "tokens": ["tokens", 0], "weight": 1.0, "start_at": 0.0,
        "end_at": 1.0}}
    g["sampler"]["inputs"]["model"] = ["apply", 0]
    return g


def timed(server: ComfyServer, prompt: dict) -> float:
    start = time.perf_counter()
    result = server.run(prompt, timeout=1800)
    if not result.ok:
        raise RuntimeError(result.error_message() + "\n" + server.log_tail())
    # the server's own timing: the client polls /history, which would quantise short runs
    return result.execution_seconds() or (time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 repeats, 2 steps")
    p.add_argument("--repeats", type=int, default=5)
    add_tiny_sampling_args(p)
    p.add_argument("--url", help="a running server (default: start one)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.steps = 2, 2
    ensure_pack_linked(host_dir())
    server = ComfyServer(pathlib.Path(tempfile.mkdtemp(prefix="iqa-bench-")), host_dir()).start()
    try:
        seed = 1000
        timed(server, graph("plain", seed, args))  # warm-up: model loads
        timed(server, graph("sweep", seed, args))
        timed(server, graph("single", seed, args))
        times = {"plain": [], "sweep": [], "separate": [], "plain_after_switch": [], "sweep_after_switch": []}
        for _ in range(args.repeats):
            seed += 2
            # Going from the plain model to a patched clone (or back) makes the host swap the loaded model
            # (a host cost for any model patch, once per switch, not per target). Each variant therefore
            # runs twice in a row (new seed); the second run is timed, the first shows the switch cost.
            for kind in ("plain", "sweep"):
                times[kind + "_after_switch"].append(timed(server, graph(kind, seed - 1, args)))
                times[kind].append(timed(server, graph(kind, seed, args)))
            targets = [1 + 98 * i / max(1, args.targets - 1) for i in range(args.targets)]
            times["separate"].append(sum(timed(server, graph("single", seed, args, t)) for t in targets))
    finally:
        server.stop()
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, base in (("sweep_vs_plain_batch", "plain"), ("sweep_vs_8_prompts", "separate")):
        print(json.dumps({"name": name, "ratio": round(med["sweep"] / med[base], 4), "baseline_s": round(med[base], 4),
                          "variant_s": round(med["sweep"], 4), "repeats": args.repeats,
                          "model_switch_s": round(med["sweep_after_switch"] - med["sweep"], 4),
                          "config": {"size": args.size, "steps": args.steps, "targets": args.targets,
                                     "ckpt": args.ckpt}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
