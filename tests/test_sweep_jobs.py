"""Sweep bookkeeping without a server (adapter/sweep_jobs.py): content keys, batches, graphs, the results folder."""
from __future__ import annotations

import json

import pytest

from comfyui_iqa_adapter.adapter import sweep_jobs
from comfyui_iqa_adapter.adapter.sweep_jobs import Batch, ResultStore, SweepError
from support.graphs import adapter_graph

WF = "w" * 64


def test_item_key_is_the_content():
    base = (WF, "a dog", 1, "percentile", "*=50", ["piqe"])
    key = sweep_jobs.item_key(*base)
    assert key == sweep_jobs.item_key(WF, "a dog", 1, "percentile", "*=50", ["piqe"])
    assert sweep_jobs.item_key(WF, "a dog", 1, "percentile", "*=50", ["piqe", "topiq_nr"]) == \
        sweep_jobs.item_key(WF, "a dog", 1, "percentile", "*=50", ["topiq_nr", "piqe"])  # a set
    changed = [(WF[:-1] + "x", "a dog", 1, "percentile", "*=50", ["piqe"]),
               (WF, "a cat", 1, "percentile", "*=50", ["piqe"]), (WF, "a dog", 2, "percentile", "*=50", ["piqe"]),
               (WF, "a dog", 1, "zscore", "*=50", ["piqe"]),
               (WF, "a dog", 1, "percentile", "*=51", ["piqe"]), (WF, "a dog", 1, "percentile", "*=50", [])]
    assert len({key, *(sweep_jobs.item_key(*c) for c in changed)}) == 1 + len(changed)
    assert sweep_jobs.target_row(25, None) == "*=25"
    assert sweep_jobs.target_row(25.5, "topiq_nr={t}, laion_aes=50") == "topiq_nr=25.5, laion_aes=50"
    assert sweep_jobs.workflow_hash({"b": 1, "a": 2}) == sweep_jobs.workflow_hash({"a": 2, "b": 1})


def test_plan_batches_per_prompt_and_seed_in_fixed_chunks():
    batches = sweep_jobs.plan(WF, ["p", "q"], [1, 2], [1, 25, 50, 75, 99], "percentile", None, [], batch_size=2)
    assert len(batches) == 2 * 2 * 3
    assert [(b.prompt, b.seed, b.targets) for b in batches[:3]] == [
        ("p", 1, [1.0, 25.0]), ("p", 1, [50.0, 75.0]), ("p", 1, [99.0])]
    keys = [k for b in batches for k in b.keys]
    assert len(set(keys)) == 20
    # what is finished does not move an item to another row (its noise) of another batch
    finished = set(keys[0:1] + keys[2:4])
    todo = sweep_jobs.pending(batches, finished.__contains__)
    assert todo[0].keys == batches[0].keys and todo[0].wanted == [1]
    assert todo[1].targets == [99.0] and len(todo) == len(batches) - 1
    assert sum(len(b.wanted) for b in todo) == 17
    with pytest.raises(SweepError, match="twice"):
        sweep_jobs.plan(WF, ["p"], [1, 1], [50], "percentile", None, [], 4)
    with pytest.raises(SweepError, match="batch-size"):
        sweep_jobs.plan(WF, ["p"], [1], [50], "percentile", None, [], 0)


def test_prepare_graph_renders_one_batch_per_prompt():
    graph = adapter_graph("x.safetensors", quality="high", target=1.0, targets="old", mode="raw")
    batch = sweep_jobs.plan(WF, ["a dog"], [11], [10, 90], "percentile", None, [], 8)[0]
    prepared = sweep_jobs.prepare_graph(graph, batch, "percentile", ["topiq_nr", "laion_aes"])
    assert prepared["11"]["inputs"]["targets"] == "topiq_nr=10, laion_aes=10; topiq_nr=90, laion_aes=90"
    assert prepared["11"]["inputs"]["mode"] == "percentile"
    assert prepared["2"]["inputs"]["text"] == "a dog" and prepared["5"]["inputs"]["seed"] == 11
    assert prepared["4"]["inputs"]["batch_size"] == 2
    assert graph["11"]["inputs"]["targets"] == "old"  # the template is untouched
    assert sweep_jobs.adapter_names(graph) == ["x.safetensors"]
    with pytest.raises(SweepError, match="metric names"):
        sweep_jobs.prepare_graph(graph, batch, "percentile", None)
    single = sweep_jobs.plan(WF, ["a dog"], [11], [30], "percentile", None, [], 8)[0]
    inputs = sweep_jobs.prepare_graph(graph, single, "percentile")["11"]["inputs"]
    assert (inputs["quality"], inputs["targets"], inputs["percentile"], inputs["mode"]) == \
        ("custom", "", 30.0, "percentile")
    with pytest.raises(SweepError, match="--targets-text"):  # the slider is a percentile
        sweep_jobs.prepare_graph(graph, single, "zscore")
    text = sweep_jobs.plan(WF, ["a dog"], [11], [5, 6], "raw", "piqe={t}", [], 8)[0]
    inputs = sweep_jobs.prepare_graph(graph, text, "raw")["11"]["inputs"]
    assert (inputs["targets"], inputs["percentile"], inputs["mode"]) == ("piqe=5; piqe=6", 50.0, "raw")
    del graph["11"]
    with pytest.raises(SweepError, match="IQAAdapterEncodeTarget"):
        sweep_jobs.prepare_graph(graph, batch, "percentile", ["piqe"])


def _record(batch: Batch, i: int) -> dict:
    return {"prompt": batch.prompt, "seed": batch.seed, "target": batch.targets[i]}


def test_store_keeps_each_item_once_and_survives_a_torn_line(tmp_path):
    batch = sweep_jobs.plan(WF, ["p"], [1], [10, 20, 30], "percentile", None, [], 3)[0]
    store = ResultStore(tmp_path)
    assert store.add_image(batch.keys[0], b"png0", _record(batch, 0))
    assert not store.add_image(batch.keys[0], b"other", _record(batch, 0))  # a retried batch's late copy
    store.add_failure(batch.keys[1], _record(batch, 1), "rejected: seed -1")
    store.add_failure(batch.keys[0], _record(batch, 0), "late failure")  # never overrides a finished item
    assert (tmp_path / store.image_name(batch.keys[0])).read_bytes() == b"png0"
    with pytest.raises(SweepError, match="another sweep is writing"):
        ResultStore(tmp_path)
    store.close()
    with open(tmp_path / sweep_jobs.MANIFEST, "a") as handle:
        handle.write('{"key": "torn')  # a driver killed mid-line
    store = ResultStore(tmp_path)
    assert store.torn_lines == 1
    assert store.finished(batch.keys[0]) and not store.finished(batch.keys[1])
    assert [r["error"] for r in store.failed_records(batch.keys)] == ["rejected: seed -1"]
    assert store.add_image(batch.keys[1], b"png1", _record(batch, 1))  # a rerun fixes the failure
    lines = [json.loads(line) for line in (tmp_path / sweep_jobs.MANIFEST).read_text().splitlines()
             if line.startswith("{") and line.endswith("}")]
    assert [(r["key"], r["status"]) for r in lines] == [
        (batch.keys[0], "ok"), (batch.keys[1], "failed"), (batch.keys[1], "ok")]
    # a deleted image means the item is to be done again
    (tmp_path / store.image_name(batch.keys[0])).unlink()
    assert not store.finished(batch.keys[0])
    assert [r["key"] for r in store.finished_records(batch.keys)] == [batch.keys[1]]
    store.close()
    reader = ResultStore(tmp_path, writer=False)  # a report while a sweep runs: no lock needed
    assert reader.finished(batch.keys[1]) and not reader.finished(batch.keys[2])
