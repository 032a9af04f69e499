"""Run the example quality-target workflow headless and write images + a scores table.

Starts a ComfyUI server (the host set up by scripts/setup.sh), queues the API-format graph
checkpoint -> IQA-Adapter (loader, target, apply) -> KSampler -> decode -> save -> score, and writes
under output/demo/: the images, scores.csv and scores.json. With real weights in the host's model
folders, pass their names (or set IQA_DEMO_CKPT / IQA_DEMO_ADAPTER).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

SCRIPTS = pathlib.Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))
from comfy_server import ComfyServer, ensure_pack_linked, host_dir  # noqa: E402


def build_graph(args, info: dict) -> tuple[dict, str, str | None]:
    """API-format graph; returns (graph, save node id, score node id or None)."""
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": args.ckpt}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": args.prompt, "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": args.negative, "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage",
                   "inputs": {"width": args.size, "height": args.size, "batch_size": len(targets)}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": args.seed, "steps": args.steps, "cfg": args.cfg, "sampler_name": "euler",
            "scheduler": "normal", "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "demo/iqa"}},
    }
    if "IQAAdapterApply" in info:
        # one batch, each latent its own target (one text row per image)
        g["adapter"] = {"class_type": "IQAAdapterLoader", "inputs": {"adapter_name": args.adapter}}
        g["target"] = {"class_type": "IQAAdapterEncodeTarget", "inputs": {
            "adapter": ["adapter", 0], "targets": "; ".join(f"*={t}" for t in targets),
            "target": float(targets[0]), "mode": "percentile", "negative_scale": 0.0}}
        g["apply"] = {"class_type": "IQAAdapterApply", "inputs": {
            "model": ["ckpt", 0], "adapter": ["adapter", 0], "tokens": ["target", 0],
            "weight": args.weight, "start_at": 0.0, "end_at": 1.0}}
        g["sampler"]["inputs"]["model"] = ["apply", 0]
    else:
        print("[demo] the adapter nodes are not registered: running the plain graph", file=sys.stderr)
    score_id = None
    if "IQAScore" in info and "IQAMetricLoader" in info:
        g["metric"] = {"class_type": "IQAMetricLoader", "inputs": {"metric": args.metric, "device": "cpu",
                                                                  "differentiable": False}}
        g["score"] = {"class_type": "IQAScore", "inputs": {"images": ["decode", 0], "metric": ["metric", 0]}}
        score_id = "score"
    return g, "save", score_id


def fill_widget_defaults(graph: dict, info: dict) -> None:
    """Give every node the server's default for any required widget the graph leaves out."""
    for node in graph.values():
        spec = info.get(node["class_type"], {}).get("input", {}).get("required", {})
        for name, definition in spec.items():
            if name in node["inputs"] or not isinstance(definition, list) or len(definition) < 2:
                continue
            options = definition[1] if isinstance(definition[1], dict) else {}
            if "default" in options:
                node["inputs"][name] = options["default"]


def score_locally(paths: list[pathlib.Path], metric: str) -> list[float]:
    import numpy as np
    import pyiqa
    import torch
    from PIL import Image

    net = pyiqa.create_metric(metric, device="cpu")
    scores = []
    for p in paths:
        arr = np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0
        with torch.no_grad():
            scores.append(float(net(torch.from_numpy(arr).permute(2, 0, 1)[None])))
    return scores


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=os.environ.get("IQA_DEMO_CKPT", "tiny_sd15.safetensors"))
    p.add_argument("--adapter", default=os.environ.get("IQA_DEMO_ADAPTER", "tiny_sd15_iqa_adapter.safetensors"))
    p.add_argument("--targets", default="99,50,1", help="percentile targets, one image each")
    p.add_argument("--prompt", default="best quality, high quality, a lighthouse on a cliff at sunset")
    p.add_argument("--negative", default="")
    p.add_argument("--metric", default="piqe", help="pyiqa metric for the scores table (weight-free by default)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--weight", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "output" / "demo")
    args = p.parse_args(argv)

    comfy_dir = host_dir()
    ensure_pack_linked(comfy_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix="iqa-demo-"))
    t0 = time.perf_counter()
    with ComfyServer(work, comfy_dir) as server:
        print(f"[demo] ComfyUI up at {server.url} in {time.perf_counter() - t0:.0f} s (log: {server.log_path})")
        info = server.object_info()
        graph, save_id, score_id = build_graph(args, info)
        fill_widget_defaults(graph, info)
        (args.out / "workflow_api.json").write_text(json.dumps(graph, indent=2))
        t1 = time.perf_counter()
        result = server.run(graph, timeout=1800)
        if not result.ok:
            print(f"[demo] the workflow failed: {result.error_message()}\n{server.log_tail()}", file=sys.stderr)
            return 1
        print(f"[demo] workflow ran in {time.perf_counter() - t1:.1f} s")
        images = []
        for image in result.images(save_id):
            src = server.output_file(image)
            dst = args.out / src.name
            shutil.copy2(src, dst)
            images.append(dst)
        scores = None
        if score_id:
            table = result.outputs.get(score_id, {})
            scores = table.get("scores") or None
        if scores is None:
            scores = score_locally(images, args.metric)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    rows = [{"image": img.name, "target_percentile": targets[i] if i < len(targets) else "",
             "metric": args.metric, "score": round(float(s), 6)}
            for i, (img, s) in enumerate(zip(images, scores))]
    with open(args.out / "scores.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (args.out / "scores.json").write_text(json.dumps({"ckpt": args.ckpt, "adapter": args.adapter,
                                                      "prompt": args.prompt, "seed": args.seed, "rows": rows},
                                                     indent=2))
    for row in rows:
        print(f"[demo] {row['image']}: target {row['target_percentile']} -> {args.metric} {row['score']}")
    print(f"[demo] images and scores table written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
