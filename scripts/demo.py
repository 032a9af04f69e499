"""Run the example quality-target workflow headless and write images + a scores table.

Starts a ComfyUI server (the host set up by scripts/setup.sh), queues the shipped example
workflows/api/sd15_quality_target.json (with this run's models and targets) plus a scoring branch:
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

from comfyui_iqa_adapter.scripts.comfy_server import PACK_ROOT as ROOT
from comfyui_iqa_adapter.scripts.comfy_server import ComfyServer, ensure_pack_linked, host_dir

WORKFLOW = ROOT / "workflows" / "api" / "sd15_quality_target.json"


def adapter_metrics(comfy_dir: pathlib.Path, adapter_name: str) -> list[str]:
    """The adapter's metrics, in order, from its descriptor (sidecar JSON or the built-in catalog)."""
    from comfyui_iqa_adapter.adapter.descriptor import resolve_descriptor

    return list(resolve_descriptor(comfy_dir / "models" / "iqa_adapter" / adapter_name).metrics)


def nodes_of(graph: dict, class_type: str) -> list[dict]:
    return [node for node in graph.values() if node["class_type"] == class_type]


def build_graph(args, metrics: list[str], targets: list[float]) -> dict:
    """The shipped SD1.5 example (workflows/api) with this run's models, targets and a scoring branch."""
    graph = json.loads(WORKFLOW.read_text())
    nodes_of(graph, "CheckpointLoaderSimple")[0]["inputs"]["ckpt_name"] = args.ckpt
    nodes_of(graph, "IQAAdapterLoader")[0]["inputs"]["adapter_name"] = args.adapter
    # one batch, one row of targets per image: every metric of the adapter at that percentile
    rows = "; ".join(", ".join(f"{m}={t:g}" for m in metrics) for t in targets)
    nodes_of(graph, "IQAAdapterEncodeTarget")[0]["inputs"].update(targets=rows, mode="percentile")
    nodes_of(graph, "IQAAdapterApply")[0]["inputs"]["weight"] = args.weight
    nodes_of(graph, "EmptyLatentImage")[0]["inputs"].update(width=args.size, height=args.size,
                                                           batch_size=len(targets))
    nodes_of(graph, "KSampler")[0]["inputs"].update(seed=args.seed, steps=args.steps, cfg=args.cfg)
    positive = graph[nodes_of(graph, "KSampler")[0]["inputs"]["positive"][0]]
    positive["inputs"]["text"] = args.prompt
    if args.negative is not None:
        negative = graph[nodes_of(graph, "KSampler")[0]["inputs"]["negative"][0]]
        negative["inputs"]["text"] = args.negative
    nodes_of(graph, "SaveImage")[0]["inputs"]["filename_prefix"] = "demo/iqa"
    # the example's own scoring branch, with this run's metric, writing its rows where the demo reads them
    nodes_of(graph, "IQAMetricLoader")[0]["inputs"].update(metric=args.metric, device="cpu", differentiable=False)
    nodes_of(graph, "IQAScore")[0]["inputs"].update(save_rows="csv", filename_prefix="demo/scores",
                                                    score_size=args.score_size)
    return graph


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=os.environ.get("IQA_DEMO_CKPT", "tiny_sd15.safetensors"))
    p.add_argument("--adapter", default=os.environ.get("IQA_DEMO_ADAPTER", "tiny_sd15_iqa_adapter.safetensors"))
    p.add_argument("--targets", default="99,50,1", help="percentile targets, one image each")
    p.add_argument("--prompt", default="best quality, high quality, a lighthouse on a cliff at sunset")
    p.add_argument("--negative", default=None, help="negative prompt (default: the authors' SD1.5 negative)")
    p.add_argument("--metric", default="piqe", help="pyiqa metric for the scores table (weight-free by default)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--cfg", type=float, default=7.5, help="CFG scale (7.5: the authors' SD1.5 value)")
    p.add_argument("--score-size", default="cc3m", choices=["cc3m", "native"],
                   help="cc3m: score images squashed to 512x512 as the CC3M statistics were made; native: as they are")
    p.add_argument("--weight", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "output" / "demo")
    args = p.parse_args(argv)

    comfy_dir = host_dir()
    ensure_pack_linked(comfy_dir)
    targets = [float(t) for t in args.targets.split(",") if t.strip()]
    metrics = adapter_metrics(comfy_dir, args.adapter)
    args.out.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix="iqa-demo-"))
    t0 = time.perf_counter()
    with ComfyServer(work, comfy_dir) as server:
        print(f"[demo] ComfyUI up at {server.url} in {time.perf_counter() - t0:.0f} s (log: {server.log_path})")
        graph = build_graph(args, metrics, targets)
        (args.out / "workflow_api.json").write_text(json.dumps(graph, indent=2))
        t1 = time.perf_counter()
        result = server.run(graph, timeout=1800)
        if not result.ok:
            print(f"[demo] the workflow failed: {result.error_message()}\n{server.log_tail()}", file=sys.stderr)
            return 1
        print(f"[demo] workflow ran in {time.perf_counter() - t1:.1f} s")
        save_id = next(k for k, v in graph.items() if v["class_type"] == "SaveImage")
        images = []
        for image in result.images(save_id):
            src = server.output_file(image)
            shutil.copy2(src, args.out / src.name)
            images.append(src.name)
        with open(server.output_dir / "demo" / "scores.csv", newline="") as f:
            score_rows = list(csv.DictReader(f))
    rows = [{"image": images[int(r["image"])], "target_percentile": targets[int(r["image"])],
             "metric": r["metric"], "lower_better": r["lower_better"], "score_size": r["score_size"],
             "score": round(float(r["score"]), 6)}
            for r in score_rows]
    with open(args.out / "scores.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (args.out / "scores.json").write_text(json.dumps(
        {"ckpt": args.ckpt, "adapter": args.adapter, "adapter_metrics": metrics, "prompt": args.prompt,
         "seed": args.seed, "steps": args.steps, "size": args.size, "score_size": args.score_size, "rows": rows},
        indent=2))
    for row in rows:
        print(f"[demo] {row['image']}: target percentile {row['target_percentile']:g} -> "
              f"{row['metric']} {row['score']}")
    print(f"[demo] images and scores table written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
