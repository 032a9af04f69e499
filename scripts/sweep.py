"""Quality-target sweep over prompts x seeds x targets with any API-format IQA-Adapter workflow; resumable.

    python scripts/sweep.py workflows/api/sd15_quality_target.json --targets 1,25,50,75,99 \\
        --prompts "a lighthouse" "a red car" --seeds 1 2 --metric piqe --out output/my_sweep

One prompt is queued per item (prompt, seed, target) with --url's server or a server started here
(scripts/comfy_server.py). Finished items are recorded in <out>/sweep_state.json keyed by
(prompt, seed, target); a rerun (after an interruption, or with more targets) skips them. At the end the
same report as the IQASweepReport node is written: sweep_grid.png, sweep_chart.png, sweep.csv, sweep.json.

How the nodes of your workflow are found (override with the --*-node options, by node id):
  * targets: every IQAAdapterEncodeTarget gets quality="custom", targets="" and percentile=<value>
    (all of the adapter's metrics at that percentile); or, with --targets-text, 'targets' = the text with
    '{t}' replaced by the value (e.g. "topiq_nr={t}, laion_aes=50") in --mode units, metrics it leaves
    out at percentile 50;
  * prompt: the CLIPTextEncode whose title contains "positive" (case-insensitive), else the one wired
    to the sampler's `positive` input;
  * seed: the `seed` / `noise_seed` input of every sampler (KSampler, KSamplerAdvanced, RandomNoise, ...);
  * images: the first SaveImage node (its images are downloaded through the server's /view);
  * batch size: EmptyLatentImage batch_size is set to 1 (one image per item).
Scores: --metric names a pyiqa metric scored in this process (adapter/iqa_models: nothing downloaded,
weights from --metric-dir); or, with --score-node, the IQAScore node of the workflow is read.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import pathlib
import sys
import tempfile
import time
import urllib.parse
import urllib.request

SCRIPTS = pathlib.Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))
from comfy_server import ComfyServer, ensure_pack_linked, host_dir  # noqa: E402

STATE_FILE = "sweep_state.json"
SAMPLERS_WITH_SEED = {"seed", "noise_seed"}


class SweepError(RuntimeError):
    pass


def item_key(prompt: str, seed: int, target: float) -> str:
    return json.dumps([prompt, int(seed), round(float(target), 6)])


# ------------------------------------------------------------------------------------------- graph

def find_nodes(api: dict, class_types: set[str]) -> list[str]:
    return [node_id for node_id, node in api.items() if node.get("class_type") in class_types]


def find_prompt_node(api: dict) -> str:
    encoders = find_nodes(api, {"CLIPTextEncode"})
    titled = [n for n in encoders if "positive" in api[n].get("_meta", {}).get("title", "").lower()]
    if titled:
        return titled[0]
    for node in api.values():
        positive = node.get("inputs", {}).get("positive")
        if isinstance(positive, list) and api.get(str(positive[0]), {}).get("class_type") == "CLIPTextEncode":
            return str(positive[0])
    raise SweepError("no prompt node found: title a CLIPTextEncode 'Positive ...' or wire one to a sampler's "
                     "'positive' input, or pass --prompt-node")


def prepare_graph(api: dict, prompt: str, seed: int, target: float, args) -> dict:
    graph = copy.deepcopy(api)
    target_nodes = args.target_node or find_nodes(graph, {"IQAAdapterEncodeTarget"})
    if not target_nodes:
        raise SweepError("the workflow has no IQAAdapterEncodeTarget node (pass --target-node)")
    for node_id in target_nodes:
        inputs = graph[node_id]["inputs"]
        inputs["quality"] = "custom"
        if args.targets_text:
            inputs["targets"] = args.targets_text.replace("{t}", f"{target:g}")
            inputs["percentile"] = 50.0  # metrics the text leaves out stay at the median
        else:
            if args.mode != "percentile":
                raise SweepError(f"--mode {args.mode} needs --targets-text (the quality slider is a percentile)")
            inputs["targets"] = ""
            inputs["percentile"] = float(target)
        inputs["mode"] = args.mode
    graph[args.prompt_node or find_prompt_node(graph)]["inputs"]["text"] = prompt
    seeded = 0
    for node in graph.values():
        for name in SAMPLERS_WITH_SEED & set(node.get("inputs", {})):
            if not isinstance(node["inputs"][name], list):
                node["inputs"][name] = int(seed)
                seeded += 1
    if not seeded:
        raise SweepError("no sampler seed input (seed / noise_seed) found in the workflow")
    for node_id in find_nodes(graph, {"EmptyLatentImage", "EmptySD3LatentImage"}):
        if not isinstance(graph[node_id]["inputs"].get("batch_size"), list):
            graph[node_id]["inputs"]["batch_size"] = 1
    return graph


# ------------------------------------------------------------------------------------------- state

class SweepState:
    """<out>/sweep_state.json: finished items by key, written atomically after each item."""

    def __init__(self, out_dir: pathlib.Path, workflow_hash: str):
        self.path = out_dir / STATE_FILE
        self.data = {"workflow_sha256": workflow_hash, "items": {}}
        if self.path.exists():
            self.data = json.loads(self.path.read_text())
            if self.data.get("workflow_sha256") != workflow_hash:
                print(f"[sweep] warning: {self.path} was made with another workflow; finished items are kept",
                      file=sys.stderr)
        self.out_dir = out_dir

    def done(self, key: str) -> bool:
        item = self.data["items"].get(key)
        return bool(item) and (self.out_dir / item["image"]).exists()

    def record(self, key: str, item: dict) -> None:
        self.data["items"][key] = item
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


# ------------------------------------------------------------------------------------------- scoring

def load_scorer(name: str, folders: list[str]):
    from _pack import load_pack
    load_pack()
    from comfyui_iqa_adapter.adapter import iqa_models

    metric = iqa_models.load_metric(name, folders, "cpu")

    def score(path: pathlib.Path) -> float:
        import numpy as np
        import torch
        from PIL import Image
        array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
        return float(metric.score(torch.from_numpy(array).permute(2, 0, 1)[None]).reshape(-1)[0])
    return score, bool(metric.lower_better)


def download(server_url: str, image: dict) -> bytes:
    query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                    "type": image.get("type", "output")})
    with urllib.request.urlopen(f"{server_url}/view?{query}", timeout=60) as response:
        return response.read()


class RemoteServer(ComfyServer):
    """A server someone else started: only the HTTP half of ComfyServer."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.process = None

    def alive(self) -> bool:
        return True

    def log_tail(self, n: int = 60) -> str:
        return "(remote server: see its own log)"


# ------------------------------------------------------------------------------------------- main

def parse_targets(text: str) -> list[float]:
    try:
        return [float(t) for t in text.replace(";", ",").split(",") if t.strip()]
    except ValueError:
        raise SweepError(f"--targets must be numbers separated by commas, got {text!r}") from None


def run(args) -> int:
    from tqdm import tqdm

    api = json.loads(pathlib.Path(args.workflow).read_text())
    if "nodes" in api and "links" in api:
        raise SweepError(f"{args.workflow} is a UI-format workflow; give its API twin (workflows/api/) or "
                         "export with 'Export (API)'")
    targets = parse_targets(args.targets)
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = SweepState(out_dir, hashlib.sha256(json.dumps(api, sort_keys=True).encode()).hexdigest())
    items = [(p, s, t) for p in args.prompts for s in args.seeds for t in targets]
    todo = [item for item in items if not state.done(item_key(*item))]
    print(f"[sweep] {len(items)} items, {len(items) - len(todo)} already finished, {len(todo)} to run")
    if args.max_items is not None:
        todo = todo[:args.max_items]
    scorer, lower_better = (load_scorer(args.metric, args.metric_dir) if args.metric else (None, None))

    server = None
    if todo:
        if args.url:
            server = RemoteServer(args.url)
        else:
            ensure_pack_linked(host_dir())
            server = ComfyServer(pathlib.Path(tempfile.mkdtemp(prefix="iqa-sweep-")), host_dir()).start()
    try:
        for prompt, seed, target in tqdm(todo, desc="sweep", unit="item", disable=args.quiet):
            graph = prepare_graph(api, prompt, seed, target, args)
            started = time.perf_counter()
            result = server.run(graph, timeout=args.timeout)
            if not result.ok:
                raise SweepError(f"item (prompt={prompt!r}, seed={seed}, target={target:g}) failed: "
                                 f"{result.error_message()}")
            save_node = args.save_node or (find_nodes(graph, {"SaveImage"}) or [None])[0]
            images = result.images(save_node) if save_node else []
            if not images:
                raise SweepError(f"no images from node {save_node}: pass --save-node")
            name = f"item_{hashlib.sha1(item_key(prompt, seed, target).encode()).hexdigest()[:12]}.png"
            (out_dir / name).write_bytes(download(server.url, images[0]))
            scores = {}
            if scorer:
                scores[args.metric] = scorer(out_dir / name)
            if args.score_node:
                score_out = result.outputs.get(args.score_node, {})
                scores.update(_scores_from_text(score_out.get("text", [""])[0]))
            state.record(item_key(prompt, seed, target), {
                "prompt": prompt, "seed": int(seed), "target": float(target), "image": name, "scores": scores,
                "prompt_id": result.prompt_id, "seconds": round(time.perf_counter() - started, 3),
                "finished_at": time.time()})
    finally:
        if server is not None and not isinstance(server, RemoteServer):
            server.stop()
    finished = [state.data["items"][item_key(*i)] for i in items if state.done(item_key(*i))]
    if len(finished) < len(items):
        print(f"[sweep] {len(finished)}/{len(items)} items finished; rerun the same command to continue")
    if finished:
        write_report(finished, out_dir, args, lower_better)
    return 0


def _scores_from_text(table: str) -> dict[str, float]:
    """First image's scores from IQAScore's text table ('image  <metric> (higher better) ...')."""
    lines = [line for line in table.splitlines() if line.strip()]
    if len(lines) < 2:
        return {}
    heads = [h.split(" (")[0].strip() for h in lines[0].split("  ") if h.strip() and h.strip() != "image"]
    cells = lines[1].split()[1:]
    return {h: float(c) for h, c in zip(heads, cells)}


def write_report(finished: list[dict], out_dir: pathlib.Path, args, lower_better) -> None:
    import numpy as np
    from PIL import Image

    from _pack import load_pack
    load_pack()
    from comfyui_iqa_adapter.adapter import sweep

    finished = sorted(finished, key=lambda r: (r["prompt"], r["seed"], r["target"]))
    metrics = sorted({m for r in finished for m in r["scores"]})
    targets = sweep.SweepTargets(args.mode, ["(all adapter metrics)"] if not args.targets_text else
                                 [args.targets_text], [r["target"] for r in finished],
                                 [{} for _ in finished], "given", [])
    scores = {m: [r["scores"].get(m, float("nan")) for r in finished] for m in metrics}
    directions = {args.metric: lower_better} if args.metric and lower_better is not None else {}
    groups = [f"{r['prompt'][:30]} / seed {r['seed']}" for r in finished]
    # grid: one row per (prompt, seed), one column per target
    images = [np.asarray(Image.open(out_dir / r["image"]).convert("RGB")) for r in finished]
    grid = None
    if len({im.shape for im in images}) == 1:
        columns = len({r["target"] for r in finished})
        captions = [f"{g}\n" + sweep.caption(r["target"], args.mode, {m: r["scores"][m] for m in r["scores"]})
                    for g, r in zip(groups, finished)]
        grid = sweep.make_grid(np.stack(images), captions, columns=columns if len(finished) % columns == 0 else None)
    per_image = [{"prompt": r["prompt"], "seed": r["seed"]} for r in finished]
    meta = {"workflow": str(args.workflow), "model": args.model_label, "adapter": args.adapter_label,
            "prompts": list(args.prompts), "seeds": list(args.seeds)}
    if scores:
        report = sweep.write_report(out_dir, "sweep", targets, scores, None, [r["image"] for r in finished], meta,
                                    directions, grid=grid, groups=groups, per_image_meta=per_image,
                                    replace=True)  # the report of this folder's (resumed) state
        print("[sweep] " + sweep.summary_text(report["summary"]).replace("\n", "\n[sweep] "))
    elif grid is not None:
        sweep.save_png(grid, out_dir / "sweep_grid.png")
    print(f"[sweep] report in {out_dir}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("workflow", help="API-format workflow JSON (e.g. workflows/api/sd15_quality_target.json)")
    p.add_argument("--targets", default="1,25,50,75,99", help="target values, comma separated")
    p.add_argument("--mode", default="percentile", choices=["percentile", "zscore", "raw"])
    p.add_argument("--targets-text", help="text for the 'targets' input, '{t}' = the value (default: all metrics)")
    p.add_argument("--prompts", nargs="+", default=["best quality, high quality, a lighthouse on a cliff at sunset"])
    p.add_argument("--seeds", nargs="+", type=int, default=[1])
    p.add_argument("--metric", help="pyiqa metric scored here (e.g. piqe, topiq_nr)")
    p.add_argument("--metric-dir", nargs="*", default=[str(host_dir() / "models" / "iqa")],
                   help="folders with metric weights")
    p.add_argument("--score-node", help="id of an IQAScore node whose table to read instead/as well")
    p.add_argument("--url", help="a running ComfyUI server (default: start one)")
    p.add_argument("--out", default=str(ROOT / "output" / "sweep"))
    p.add_argument("--target-node", nargs="*", help="ids of the nodes that take the target")
    p.add_argument("--prompt-node", help="id of the positive CLIPTextEncode")
    p.add_argument("--save-node", help="id of the node whose images are collected")
    p.add_argument("--max-items", type=int, help="stop after this many new items (resume later)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--model-label", default="", help="model name for the report")
    p.add_argument("--adapter-label", default="", help="adapter name for the report")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except SweepError as error:
        print(f"[sweep] error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
