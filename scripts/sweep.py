"""Quality-target sweep over prompts x seeds x targets with any API-format IQA-Adapter workflow, on one ComfyUI
server, several, or a Ray cluster; resumable, every item stored exactly once.

    # one machine: a server started here (or --url URL [URL ...] for servers already running)
    python scripts/sweep.py workflows/api/sd15_quality_target.json --targets 1,25,50,75,99 \\
        --prompts "a lighthouse" "a red car" --seeds 1 2 --metric piqe --out output/my_sweep
    # the same sweep on a Ray cluster (one worker per GPU; --workers N on CPU; no --address: a local cluster)
    python scripts/sweep.py ... --backend ray --address auto
    # a partial report while it runs (from another shell)
    python scripts/sweep.py --report --out output/my_sweep

Work: one item per (prompt, seed, target), keyed by (workflow hash, prompt, seed, target row, metric set).
Each (prompt, seed) is one sampler run over its targets (fixed chunks of --batch-size), so a worker renders a
batch per prompt and a retried item gets the same noise, hence the same image.
Results (<out>): images/<key>.png, manifest.jsonl (one line per item: scores, worker, host, batch; failures
with their error), workers.json and progress.json (live), and at the end the same report as the
IQASweepReport node: sweep_grid.png, sweep_chart.png, sweep.csv, sweep.json. A rerun skips finished items
(and redoes any whose image was deleted); Ctrl-C stops cleanly and the next run resumes.
Failures: a batch the server rejects is recorded with its error and the sweep goes on; a worker whose server
dies is restarted and its batch retried (on any worker, --max-attempts times).

How the nodes of your workflow are found (override with the --*-node options, by node id):
  * targets: every IQAAdapterEncodeTarget gets quality="custom" and one row per target: all of the adapter's
    metrics at that percentile; or, with --targets-text, the text with '{t}' replaced by the value
    (e.g. "topiq_nr={t}, laion_aes=50") in --mode units, metrics it leaves out at percentile 50;
  * prompt: the CLIPTextEncode whose title contains "positive" (case-insensitive), else the one wired
    to the sampler's `positive` input;
  * seed: the `seed` / `noise_seed` input of every sampler (KSampler, KSamplerAdvanced, RandomNoise, ...);
  * images: the first SaveImage node; batch: EmptyLatentImage batch_size = the batch's number of targets.
Scores: --metric names pyiqa metrics scored by each worker (adapter/iqa_models: nothing downloaded, weights
from --metric-dir); or, with --score-node, the IQAScore node of the workflow is read. Either way images are
scored as the CC3M statistics were made (squashed to 512x512; --score-size native keeps the size), and the
choice is recorded in sweep.csv / sweep.json (score_size).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import signal
import sys
import time

SCRIPTS = pathlib.Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
from comfyui_iqa_adapter.adapter import sweep_jobs  # noqa: E402
from comfyui_iqa_adapter.adapter.sweep_jobs import SweepError, find_nodes, find_prompt_node  # noqa: E402,F401  (find_prompt_node: used by the tests)


def parse_targets(text: str) -> list[float]:
    try:
        return [float(t) for t in text.replace(";", ",").split(",") if t.strip()]
    except ValueError:
        raise SweepError(f"--targets must be numbers separated by commas, got {text!r}") from None


def scores_from_table(table: str, index: int) -> dict[str, float]:
    """Image `index`'s scores from IQAScore's text table ('image  <metric> (higher better) ...')."""
    lines = [line for line in table.splitlines() if line.strip()]
    if len(lines) < index + 2:
        return {}
    heads = [h.split(" (")[0].strip() for h in lines[0].split("  ") if h.strip() and h.strip() != "image"]
    cells = lines[index + 1].split()[1:]
    return {h: float(c) for h, c in zip(heads, cells)}


def write_json_atomic(path: pathlib.Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------- driver

class Progress:
    """Items done, rate and ETA overall (tqdm bar) and per worker (bar postfix, progress.json)."""

    def __init__(self, out_dir: pathlib.Path, total: int, quiet: bool):
        from tqdm import tqdm
        self.path = out_dir / "progress.json"
        self.total = total
        self.bar = tqdm(total=total, desc="sweep", unit="item", disable=quiet, dynamic_ncols=True)
        self.started = time.monotonic()
        self.workers: dict[str, dict] = {}
        self.done = self.failed = self.retried = 0
        self.sampling_s = 0.0
        self.item_s = 0.0  # the driver's work on results and batches (fetch, store, prepare, submit)
        self._written = 0.0

    def worker(self, name: str) -> dict:
        return self.workers.setdefault(name, {"done": 0, "state": "starting", "since": time.monotonic(),
                                              "ready_at": None})

    def add(self, name: str | None, stored: int, failed: int, execution_s: float | None = None, rows: int = 1) -> None:
        """`execution_s`: the server's time for the batch, which rendered `rows` images."""
        if name is not None:
            self.worker(name)["done"] += stored
        self.done += stored
        self.failed += failed
        if execution_s and stored:
            self.sampling_s += execution_s * stored / rows
        self.bar.update(stored + failed)

    def snapshot(self, driver_s: float) -> dict:
        now = time.monotonic()
        elapsed = max(now - self.started, 1e-9)
        ready = [w["ready_at"] for w in self.workers.values() if w.get("ready_at") is not None]
        working = elapsed - min(ready) if ready else 0.0  # since the first worker was ready
        rate = self.done / working if working > 0 else 0.0
        left = self.total - self.done - self.failed
        workers = {}
        for name, entry in self.workers.items():
            busy_for = max(now - entry["since"], 1e-9)
            worker_rate = entry["done"] / busy_for
            share = worker_rate / rate if rate > 0 else 0.0
            workers[name] = {**{k: v for k, v in entry.items() if k != "since"}, "rate_per_s": round(worker_rate, 4),
                             "eta_s": round(left * share / worker_rate, 1) if worker_rate > 0 else None}
        return {"total": self.total, "done": self.done, "failed": self.failed, "retried_batches": self.retried,
                "elapsed_s": round(elapsed, 2), "working_s": round(working, 2), "rate_per_s": round(rate, 4),
                "eta_s": round(left / rate, 1) if rate > 0 else None,
                "driver_ms_per_item": round(1000 * driver_s / self.done, 3) if self.done else None,
                "driver_item_ms_per_item": round(1000 * self.item_s / self.done, 3) if self.done else None,
                "sampling_ms_per_item": round(1000 * self.sampling_s / self.done, 3) if self.done else None,
                "workers": workers}

    def refresh(self, driver_s: float, force: bool = False) -> None:
        if not force and time.monotonic() - self._written < 0.5:
            return
        snap = self.snapshot(driver_s)
        rates = "  ".join(f"{n}:{w['done']} {w['rate_per_s']:.2f}/s" for n, w in snap["workers"].items())
        self.bar.set_postfix_str(rates, refresh=False)
        self.bar.refresh()
        write_json_atomic(self.path, snap)
        self._written = time.monotonic()

    def close(self, driver_s: float) -> dict:
        self.refresh(driver_s, force=True)
        self.bar.close()
        return self.snapshot(driver_s)


def make_pool(args, warmup: dict | None):
    from comfyui_iqa_adapter.scripts.sweep_workers import LocalPool, RayPool
    kwargs = {"metrics": args.metric, "metric_dirs": args.metric_dir, "metric_device": args.metric_device,
              "score_size": args.score_size,
              "timeout": args.timeout, "warmup": warmup, "threads": args.threads}
    if args.backend == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise SweepError("--backend ray needs Ray: pip install 'ray>=2.40' (in this environment)") from None
        return RayPool(args.address, args.workers, kwargs, max_restarts=args.max_restarts,
                       object_store_mb=args.object_store_mb)
    if args.address or args.workers:
        raise SweepError("--address and --workers belong to --backend ray (local: --url URL [URL ...])")
    return LocalPool(args.url, {**kwargs, "gpu": args.gpu})


def run_batches(api: dict, batches: list, store, args, out_dir: pathlib.Path) -> dict:
    todo_items = sum(len(b.wanted) for b in batches)
    progress = Progress(out_dir, todo_items, args.quiet)
    queue = collections.deque(batches)
    save_node = args.save_node or (find_nodes(api, {"SaveImage"}) or [None])[0]
    if save_node is None:
        raise SweepError("the workflow has no SaveImage node: pass --save-node")
    needs_metrics = not args.targets_text and any(len(b.rows) > 1 for b in batches)
    adapters = sweep_jobs.adapter_names(api)
    if needs_metrics and len(adapters) != 1:
        raise SweepError(f"several targets per batch need the adapter's metric names, but the workflow loads "
                         f"{len(adapters)} adapters: pass --targets-text or --batch-size 1")
    adapter_metrics = None
    idle, busy, dead, workers = [], {}, set(), {}
    directions: dict[str, bool] = {}
    warmup = None
    if args.warmup:  # one image of the first batch: loads the checkpoint, adapter and text encoder
        first = batches[0]
        one = sweep_jobs.Batch(first.prompt, first.seed, first.targets[:1],
                               [sweep_jobs.target_row(first.targets[0], args.targets_text)], first.keys[:1], [0])
        warmup = sweep_jobs.prepare_graph(api, one, args.mode, None, args.target_node, args.prompt_node)
    pool = make_pool(args, warmup)
    loop_started = time.perf_counter()
    pool.save_node, pool.score_node = save_node, args.score_node
    interrupted = False

    def write_workers():
        write_json_atomic(out_dir / "workers.json", workers)

    def fail(batch, error: str) -> None:
        for index in batch.wanted:
            store.add_failure(batch.keys[index], item_record(batch, index, None), error)
        progress.add(None, 0, len(batch.wanted))
        print(f"\n[sweep] batch {batch.id} (prompt {batch.prompt!r}, seed {batch.seed}) failed: {error[:500]}",
              file=sys.stderr)

    def item_record(batch, index, result) -> dict:
        record = {"prompt": batch.prompt, "seed": batch.seed, "target": batch.targets[index], "row": batch.rows[index],
                  "mode": args.mode, "metrics": list(args.metric), "batch": batch.id, "batch_index": index,
                  "batch_rows": len(batch.rows), "attempt": batch.attempts + 1}
        if result:
            record.update({"worker": result["worker"], "host": result["host"], "prompt_id": result["prompt_id"],
                           "batch_execution_s": result["execution_s"], "batch_worker_s": round(result["worker_s"], 3)})
        return record

    try:
        while queue or busy:
            if len(dead) == pool.size and not busy:
                raise SweepError(f"every worker is gone ({'; '.join(w.get('error', '') for w in workers.values())}); "
                                 "rerun to resume")
            polled, waited = time.perf_counter(), pool.waited_s
            events = pool.poll(0.5)
            for event in events:
                kind, name = event[0], event[1]
                if kind == "ready":
                    restarts = workers.get(name, {}).get("restarts", -1) + 1
                    workers[name] = {**event[2], "state": "ready", "restarts": restarts}
                    directions.update(event[2].get("lower_better", {}))
                    entry = progress.worker(name)
                    if entry["state"] == "starting":  # its rate counts from its first ready, not its start-up
                        entry["since"] = time.monotonic()
                        entry["ready_at"] = round(entry["since"] - progress.started, 2)
                    entry["state"] = "ready"
                    dead.discard(name)
                    idle.append(name)
                    write_workers()
                elif kind == "done":
                    batch, result = busy.pop(name), event[3]
                    idle.append(name)
                    progress.worker(name)["state"] = "idle"
                    if "error" in result:
                        fail(batch, result["error"])
                        continue
                    stored = 0
                    for image in result["images"]:
                        record = item_record(batch, image["index"], result)
                        scores = dict(image["scores"])
                        if args.score_node:
                            scores.update(scores_from_table(result.get("score_table", ""), image["index"]))
                        record["scores"] = scores
                        stored += store.add_image(batch.keys[image["index"]], image["png"], record)
                    progress.add(name, stored, 0, result["execution_s"], len(batch.rows))
                elif kind == "lost":
                    batch = busy.pop(name, None) or event[2]
                    batch.attempts += 1
                    progress.retried += 1
                    workers.setdefault(name, {})["state"] = "restarting"
                    progress.worker(name)["state"] = "restarting"
                    write_workers()
                    print(f"\n[sweep] worker {name} lost its server ({event[3][:300]}); batch {batch.id} "
                          f"{'retried' if batch.attempts < args.max_attempts else 'given up'}", file=sys.stderr)
                    if batch.attempts < args.max_attempts:
                        queue.appendleft(batch)
                    else:
                        fail(batch, f"worker lost {batch.attempts} times: {event[3]}")
                elif kind == "dead":
                    dead.add(name)
                    if name in idle:
                        idle.remove(name)
                    workers.setdefault(name, {}).update(state="dead", error=event[2])
                    progress.worker(name)["state"] = "dead"
                    write_workers()
                    print(f"\n[sweep] worker {name} is gone: {event[2][:500]}", file=sys.stderr)
            while idle and queue:
                name = idle.pop(0)
                batch = queue.popleft()
                if needs_metrics and adapter_metrics is None:
                    adapter_metrics = pool.adapter_metrics(name, adapters[0])
                graph = sweep_jobs.prepare_graph(api, batch, args.mode, adapter_metrics, args.target_node,
                                                 args.prompt_node)
                busy[name] = batch
                pool.submit(name, graph, batch)
                progress.worker(name)["state"] = "busy"
            progress.item_s += time.perf_counter() - polled - (pool.waited_s - waited)  # all but the waiting
            progress.refresh(driver_seconds(loop_started, pool))
    except KeyboardInterrupt:
        interrupted = True
        print("\n[sweep] interrupted: stopping the workers; finished items are kept, rerun to resume",
              file=sys.stderr)
    finally:
        pool.close(interrupted=interrupted)
    summary = progress.close(driver_seconds(loop_started, pool))
    summary.update(interrupted=interrupted, directions=directions)
    return summary


def driver_seconds(loop_started: float, pool) -> float:
    """The driver's own time: the loop's wall time less the time it sat waiting for workers."""
    return time.perf_counter() - loop_started - pool.waited_s


# ------------------------------------------------------------------------------------------- report

def write_report(records: list[dict], out_dir: pathlib.Path, meta: dict, directions: dict, failed=()) -> None:
    import numpy as np
    from PIL import Image

    from comfyui_iqa_adapter.adapter import sweep

    records = sorted(records, key=lambda r: (r["prompt"], r["seed"], r["target"]))
    mode = records[0]["mode"]
    metrics = sorted({m for r in records for m in r["scores"]})
    swept = sorted({"(all adapter metrics)" if r["row"].startswith(f"{sweep_jobs.ALL_METRICS}=") else r["row"]
                    .split("=")[0] for r in records})
    targets = sweep.SweepTargets(mode, swept,
                                 [r["target"] for r in records], [{} for _ in records], "given", [])
    scores = {m: [r["scores"].get(m, float("nan")) for r in records] for m in metrics}
    groups = [f"{r['prompt'][:30]} / seed {r['seed']}" for r in records]
    images = [np.asarray(Image.open(out_dir / r["image"]).convert("RGB")) for r in records]
    grid = None
    if len({im.shape for im in images}) == 1:
        columns = len({r["target"] for r in records})
        captions = [f"{g}\n" + sweep.caption(r["target"], mode, r["scores"]) for g, r in zip(groups, records)]
        grid = sweep.make_grid(np.stack(images), captions, columns=columns if len(records) % columns == 0 else None)
    per_image = [{"prompt": r["prompt"], "seed": r["seed"]} for r in records]
    meta = {**meta, "items": len(records), "failed_items": [
        {k: r.get(k) for k in ("prompt", "seed", "target", "error")} for r in failed]}
    if scores:
        report = sweep.write_report(out_dir, "sweep", targets, scores, None, [r["image"] for r in records], meta,
                                    directions, grid=grid, groups=groups, per_image_meta=per_image,
                                    score_sizes={m: meta.get("score_size", "") for m in scores},
                                    replace=True)  # the report of this folder's (resumed) state
        print("[sweep] " + sweep.summary_text(report["summary"]).replace("\n", "\n[sweep] "))
    elif grid is not None:
        sweep.save_png(grid, out_dir / "sweep_grid.png")
    print(f"[sweep] report in {out_dir} ({len(records)} images)")


def report_only(args) -> int:
    out_dir = pathlib.Path(args.out)
    store = sweep_jobs.ResultStore(out_dir, writer=False)
    records = [r for k, r in store.records.items() if store.finished(k)]
    failed = [r for r in store.records.values() if r["status"] == "failed"]
    if not records:
        raise SweepError(f"no finished items in {out_dir / sweep_jobs.MANIFEST} yet")
    progress = out_dir / "progress.json"
    if progress.exists():
        snap = json.loads(progress.read_text())
        print(f"[sweep] progress: {snap['done']}/{snap['total']} items this run, {snap['rate_per_s']}/s, "
              f"ETA {snap['eta_s']} s")
    write_report(records, out_dir, {"partial": True, "score_size": args.score_size}, {}, failed)
    return 0


# ------------------------------------------------------------------------------------------- main

def run(args) -> int:
    if args.report:
        return report_only(args)
    if not args.workflow:
        raise SweepError("give the workflow JSON (or --report --out DIR for a report of what is finished)")
    api = json.loads(pathlib.Path(args.workflow).read_text())
    if "nodes" in api and "links" in api:
        raise SweepError(f"{args.workflow} is a UI-format workflow; give its API twin (workflows/api/) or "
                         "export with 'Export (API)'")
    for node_id in find_nodes(api, {"IQAScore"}):
        api[node_id]["inputs"]["score_size"] = args.score_size  # the workflow scores as --metric does
    args.metric = [m.strip() for text in (args.metric or []) for m in text.split(",") if m.strip()]
    targets = parse_targets(args.targets)
    out_dir = pathlib.Path(args.out)
    store = sweep_jobs.ResultStore(out_dir)
    try:
        batches = sweep_jobs.plan(sweep_jobs.workflow_hash(api), args.prompts, args.seeds, targets, args.mode,
                                  args.targets_text, args.metric, args.batch_size or len(targets))
        keys = [k for b in batches for k in b.keys]
        todo = sweep_jobs.pending(batches, store.finished)
        left = sum(len(b.wanted) for b in todo)
        print(f"[sweep] {len(keys)} items, {len(keys) - left} already finished, {left} to run"
              + (f" ({len(todo)} batches, backend {args.backend})" if todo else ""), flush=True)
        if args.max_items is not None:
            todo = cap_items(todo, args.max_items)
        summary = {"interrupted": False, "directions": {}}
        if todo:
            summary = run_batches(api, todo, store, args, out_dir)
            print(f"[sweep] stored {summary['done']} items, {summary['failed']} failed, "
                  f"{summary['retried_batches']} batches retried; driver {summary['driver_ms_per_item']} ms/item, "
                  f"sampling {summary['sampling_ms_per_item']} ms/item", flush=True)
        finished = store.finished_records(keys)
        failed = store.failed_records(keys)
        if len(finished) < len(keys):
            print(f"[sweep] {len(finished)}/{len(keys)} items finished ({len(failed)} failed); "
                  "rerun the same command to continue")
        if finished:
            meta = {"workflow": str(args.workflow), "model": args.model_label, "adapter": args.adapter_label,
                    "score_size": args.score_size,
                    "prompts": list(args.prompts), "seeds": list(args.seeds), "partial": len(finished) < len(keys)}
            write_report(finished, out_dir, meta, summary["directions"], failed)
        if summary["interrupted"]:
            return 130
        return 3 if failed else 0
    finally:
        store.close()


def cap_items(batches: list, limit: int) -> list:
    out, left = [], limit
    for batch in batches:
        if left <= 0:
            break
        batch.wanted = batch.wanted[:left]
        left -= len(batch.wanted)
        out.append(batch)
    return out


def build_parser() -> argparse.ArgumentParser:
    from comfyui_iqa_adapter.scripts.comfy_server import host_dir
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("workflow", nargs="?", help="API-format workflow JSON (e.g. workflows/api/sd15_quality_target.json)")
    p.add_argument("--targets", default="1,25,50,75,99",
                   help="target values, comma separated (default: the paper's CC3M percentiles 1,25,50,75,99)")
    p.add_argument("--mode", default="percentile", choices=["percentile", "zscore", "raw"])
    p.add_argument("--targets-text", help="text of one target row, '{t}' = the value (default: all metrics)")
    p.add_argument("--prompts", nargs="+", default=["best quality, high quality, a lighthouse on a cliff at sunset"])
    p.add_argument("--seeds", nargs="+", type=int, default=[1])
    p.add_argument("--batch-size", type=int, default=0,
                   help="targets per sampler run (default: all targets of a prompt and seed); keep it fixed "
                        "within a study: an image's noise depends on its row in the batch")
    p.add_argument("--metric", action="append", help="pyiqa metric(s) scored by the workers (piqe, topiq_nr, ...)")
    p.add_argument("--metric-dir", nargs="*", default=[str(host_dir() / "models" / "iqa")],
                   help="folders with metric weights (on every worker)")
    p.add_argument("--metric-device", default="cpu", help="device of the metrics on the workers")
    p.add_argument("--score-node", help="id of an IQAScore node whose table to read instead/as well")
    p.add_argument("--score-size", default="cc3m", choices=["cc3m", "native"],
                   help="cc3m (default): score images squashed to 512x512 as the CC3M statistics were made, so "
                        "scores compare with the targets; native: at the image's own size. Recorded in CSV/JSON.")
    p.add_argument("--out", default=str(ROOT / "output" / "sweep"), help="results folder (local or shared)")
    p.add_argument("--report", action="store_true", help="only write the report of what is finished (safe while "
                                                         "a sweep runs) and exit")
    backend = p.add_argument_group("where it runs")
    backend.add_argument("--backend", choices=["local", "ray"], default="local")
    backend.add_argument("--url", nargs="+", help="local: running ComfyUI servers (default: start one)")
    backend.add_argument("--gpu", action="store_true", help="local: start the server on the GPU (default: CPU)")
    backend.add_argument("--address", help="ray: a running cluster ('auto', or host:port); default: start a local one")
    backend.add_argument("--workers", type=int, help="ray: number of workers (default: one per GPU, else 1)")
    backend.add_argument("--threads", type=int, help="CPU threads of each server started here (default: torch's; "
                                                    "one thread count for a whole study keeps images identical)")
    backend.add_argument("--max-restarts", type=int, default=3, help="ray: restarts of a worker whose server dies")
    backend.add_argument("--object-store-mb", type=int, default=200, help="ray: object store of a local cluster")
    backend.add_argument("--max-attempts", type=int, default=3, help="tries of a batch whose worker is lost")
    p.add_argument("--target-node", nargs="*", help="ids of the nodes that take the target")
    p.add_argument("--prompt-node", help="id of the positive CLIPTextEncode")
    p.add_argument("--save-node", help="id of the node whose images are collected")
    p.add_argument("--max-items", type=int, help="stop after this many new items (resume later)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one batch may take")
    p.add_argument("--warmup", action="store_true", help="each worker renders one image before its first batch "
                                                         "(models loaded: the rates then show steady state)")
    p.add_argument("--model-label", default="", help="model name for the report")
    p.add_argument("--adapter-label", default="", help="adapter name for the report")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill = Ctrl-C: stop cleanly, resumable
    try:
        return run(args)
    except SweepError as error:
        print(f"[sweep] error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
