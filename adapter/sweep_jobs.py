"""Sweep bookkeeping for scripts/sweep.py: work items, batches, graph preparation and the results folder.

Host-free (json, hashlib, os): the driver of any backend (one server, a list of servers, a Ray cluster)
uses it, and the tests run it without a server.

An item is one image, keyed by its content: (workflow hash, prompt, seed, target row, metric set). Items of
one (prompt, seed) are rendered together, one sampler run per batch (row i of the quality tokens <-> latent i,
as the sweep nodes do), in fixed chunks of the sweep's target list: an item's row in its batch, hence its
noise, never depends on what else is left to do, so a retried or redone item gives the same image.

The results folder holds images/<key>.png and manifest.jsonl, an append-only log that only the driver writes:
one line per finished or failed item, the last line per key wins, a torn last line (a killed driver) is
ignored. An item is finished when its line says "ok" and its image exists; images are written before their
line, atomically, so a crash leaves at worst an unrecorded image that the next run overwrites.
"""
from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import pathlib
import time
from dataclasses import asdict, dataclass, field

MANIFEST = "manifest.jsonl"
IMAGES = "images"
LOCK = ".sweep.lock"
SEED_INPUTS = {"seed", "noise_seed"}
ALL_METRICS = "*"  # target row wildcard: every metric of the adapter at the value


class SweepError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------- items

def workflow_hash(api: dict) -> str:
    return hashlib.sha256(json.dumps(api, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def target_row(value: float, template: str | None) -> str:
    """The row a target value stands for: the --targets-text template filled in, or '*=<value>'."""
    text = f"{float(value):.6g}"
    return template.replace("{t}", text) if template else f"{ALL_METRICS}={text}"


def item_key(workflow: str, prompt: str, seed: int, mode: str, row: str, metrics) -> str:
    content = json.dumps([workflow, prompt, int(seed), mode, row, sorted(metrics)], separators=(",", ":"))
    return hashlib.sha256(content.encode()).hexdigest()[:32]


@dataclass
class Batch:
    """One sampler run: a (prompt, seed) and a fixed chunk of the sweep's targets; `wanted` are the row
    indexes still to store (the others are finished but rendered all the same, to keep every row's noise)."""
    prompt: str
    seed: int
    targets: list[float]
    rows: list[str]
    keys: list[str]
    wanted: list[int] = field(default_factory=list)
    attempts: int = 0

    @property
    def id(self) -> str:
        return self.keys[0][:12]

    def to_dict(self) -> dict:
        return asdict(self)


def plan(workflow: str, prompts, seeds, targets, mode: str, template: str | None, metrics,
         batch_size: int) -> list[Batch]:
    """Every batch of the sweep, in (prompt, seed, target chunk) order, all rows wanted."""
    if batch_size < 1:
        raise SweepError(f"--batch-size must be at least 1, got {batch_size}")
    batches = []
    for prompt in prompts:
        for seed in seeds:
            for start in range(0, len(targets), batch_size):
                chunk = [float(t) for t in targets[start:start + batch_size]]
                rows = [target_row(t, template) for t in chunk]
                keys = [item_key(workflow, prompt, seed, mode, row, metrics) for row in rows]
                batches.append(Batch(prompt, int(seed), chunk, rows, keys, list(range(len(chunk)))))
    keys = [k for b in batches for k in b.keys]
    if len(set(keys)) != len(keys):
        raise SweepError("the sweep lists an item twice (a repeated prompt, seed or target)")
    return batches


def pending(batches: list[Batch], finished) -> list[Batch]:
    """The batches with unfinished rows, each wanting only those rows."""
    out = []
    for batch in batches:
        wanted = [i for i, key in enumerate(batch.keys) if not finished(key)]
        if wanted:
            out.append(Batch(batch.prompt, batch.seed, batch.targets, batch.rows, batch.keys, wanted))
    return out


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


def adapter_names(api: dict) -> list[str]:
    return sorted({api[n]["inputs"]["adapter_name"] for n in find_nodes(api, {"IQAAdapterLoader"})
                   if isinstance(api[n]["inputs"].get("adapter_name"), str)})


def rows_text(rows: list[str], adapter_metrics: list[str] | None) -> str:
    """Rows in IQAAdapterEncodeTarget's 'targets' syntax; '*=v' rows need the adapter's metric names."""
    out = []
    for row in rows:
        if row.startswith(f"{ALL_METRICS}="):
            if not adapter_metrics:
                raise SweepError("a batch of several targets for all metrics needs the adapter's metric names")
            value = row.split("=", 1)[1]
            row = ", ".join(f"{metric}={value}" for metric in adapter_metrics)
        out.append(row)
    return "; ".join(out)


def prepare_graph(api: dict, batch: Batch, mode: str, adapter_metrics: list[str] | None = None,
                  target_nodes=None, prompt_node: str | None = None) -> dict:
    """The workflow with the batch's prompt, seed and target rows, and a latent batch of one per row."""
    graph = copy.deepcopy(api)
    target_nodes = target_nodes or find_nodes(graph, {"IQAAdapterEncodeTarget"})
    if not target_nodes:
        raise SweepError("the workflow has no IQAAdapterEncodeTarget node (pass --target-node)")
    all_metrics = batch.rows[0].startswith(f"{ALL_METRICS}=")
    if all_metrics and mode != "percentile":
        raise SweepError(f"--mode {mode} needs --targets-text (the quality slider is a percentile)")
    for node_id in target_nodes:
        inputs = graph[node_id]["inputs"]
        inputs["quality"] = "custom"
        if all_metrics and len(batch.rows) == 1:  # no metric names needed: the slider covers every metric
            inputs["targets"], inputs["percentile"] = "", float(batch.targets[0])
        else:
            inputs["targets"] = rows_text(batch.rows, adapter_metrics)
            inputs["percentile"] = 50.0  # metrics a --targets-text row leaves out stay at the median
        inputs.pop("target", None)  # the node's input before the quality slider
        inputs["mode"] = mode
    graph[prompt_node or find_prompt_node(graph)]["inputs"]["text"] = batch.prompt
    seeded = 0
    for node in graph.values():
        for name in SEED_INPUTS & set(node.get("inputs", {})):
            if not isinstance(node["inputs"][name], list):
                node["inputs"][name] = int(batch.seed)
                seeded += 1
    if not seeded:
        raise SweepError("no sampler seed input (seed / noise_seed) found in the workflow")
    latents = find_nodes(graph, {"EmptyLatentImage", "EmptySD3LatentImage"})
    if not latents and len(batch.rows) > 1:
        raise SweepError("no EmptyLatentImage to size the batch: pass --batch-size 1")
    for node_id in latents:
        if not isinstance(graph[node_id]["inputs"].get("batch_size"), list):
            graph[node_id]["inputs"]["batch_size"] = len(batch.rows)
    return graph


# ------------------------------------------------------------------------------------------- storage

class ResultStore:
    """A results folder: images/<key>.png + manifest.jsonl (see the module docstring). One driver at a time
    (an exclusive lock on .sweep.lock); readers (a partial report, a look while running) need no lock."""

    def __init__(self, out_dir: str | os.PathLike, writer: bool = True):
        self.out_dir = pathlib.Path(out_dir)
        self.manifest = self.out_dir / MANIFEST
        self.records: dict[str, dict] = {}
        self.torn_lines = 0
        self._lock = None
        if writer:
            (self.out_dir / IMAGES).mkdir(parents=True, exist_ok=True)
            self._lock = open(self.out_dir / LOCK, "a+")
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock.seek(0)
                holder = self._lock.read().strip()
                self._lock.close()
                raise SweepError(
                    f"another sweep is writing to {self.out_dir} ({holder or 'unknown process'})") from None
            self._lock.truncate(0)
            self._lock.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
            self._lock.flush()
        self.reload()

    def reload(self) -> None:
        self.records = {}
        self.torn_lines = 0
        if not self.manifest.exists():
            return
        with open(self.manifest, "rb") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except ValueError:
                    self.torn_lines += 1
                    continue
                self.records[record["key"]] = record

    def close(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def image_name(self, key: str) -> str:
        return f"{IMAGES}/{key}.png"

    def finished(self, key: str) -> bool:
        record = self.records.get(key)
        return bool(record) and record["status"] == "ok" and (self.out_dir / record["image"]).exists()

    def _append(self, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with open(self.manifest, "a") as handle:
            if handle.tell() and not self._ends_with_newline():
                handle.write("\n")  # after a torn line: start clean
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        self.records[record["key"]] = record

    def _ends_with_newline(self) -> bool:
        with open(self.manifest, "rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) == b"\n"

    def add_image(self, key: str, png: bytes, record: dict) -> bool:
        """Store a finished item; False (and nothing written) when it is already finished."""
        if self.finished(key):
            return False
        name = self.image_name(key)
        tmp = self.out_dir / f"{name}.{os.getpid()}.tmp"
        tmp.write_bytes(png)
        os.replace(tmp, self.out_dir / name)
        self._append({**record, "key": key, "status": "ok", "image": name, "recorded_at": time.time()})
        return True

    def add_failure(self, key: str, record: dict, error: str) -> None:
        if not self.finished(key):
            self._append({**record, "key": key, "status": "failed", "error": error, "recorded_at": time.time()})

    def finished_records(self, keys) -> list[dict]:
        return [self.records[k] for k in keys if self.finished(k)]

    def failed_records(self, keys) -> list[dict]:
        return [self.records[k] for k in keys if k in self.records and self.records[k]["status"] == "failed"]
