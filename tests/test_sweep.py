"""Target sweeps: host-free math (adapter/sweep.py), the nodes on the real server, and the resumable CLI."""
from __future__ import annotations

import csv
import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from comfyui_iqa_adapter.adapter import sweep
from conftest import PACK_ROOT, TINY_ADAPTER, TINY_CHECKPOINT

PYTHON = sys.executable


# ------------------------------------------------------------------------------------------- host-free

def test_spacings():
    assert sweep.sweep_values(1, 99, 8) == pytest.approx([1, 15, 29, 43, 57, 71, 85, 99])
    assert sweep.sweep_values(99, 1, 3) == pytest.approx([99, 50, 1])
    assert sweep.sweep_values(1, 99, 8, "quantile-knots") == [1, 5, 10, 25, 50, 75, 90, 95, 99]
    assert sweep.sweep_values(20, 80, 3, "quantile-knots") == [20, 25, 50, 75, 80]
    normal = sweep.sweep_values(1, 99, 7, "normal")
    assert normal[0] == 1 and normal[-1] == 99 and normal[3] == pytest.approx(50)
    gaps = np.diff(normal)
    assert gaps[0] < gaps[2], "normal spacing is denser in the tails"
    assert sweep.sweep_values(-2, 2, 5, "normal", mode="zscore") == pytest.approx([-2, -1, 0, 1, 2])
    with pytest.raises(ValueError, match="strictly between 0 and 100"):
        sweep.sweep_values(0, 99, 4)
    with pytest.raises(ValueError, match="spacing"):
        sweep.sweep_values(1, 99, 4, "cubic")
    with pytest.raises(ValueError, match="percentile"):
        sweep.sweep_values(-1, 1, 4, "quantile-knots", mode="zscore")
    # the paper's five targets (docs/METHOD.md §6.1), whatever from/to/steps say
    assert sweep.sweep_values(10, 20, 3, "paper") == [1, 25, 50, 75, 99]
    with pytest.raises(ValueError, match="percentile"):
        sweep.sweep_values(-1, 1, 4, "paper", mode="zscore")


def test_sweep_rows_hold_and_raw():
    t = sweep.build_sweep(["topiq_nr", "laion_aes"], "laion_aes", 1, 99, 3)
    assert t.swept_metrics == ["laion_aes"]
    assert [r["topiq_nr"] for r in t.rows] == [50.0, 50.0, 50.0]
    assert [r["laion_aes"] for r in t.rows] == [1.0, 50.0, 99.0]
    # percentile knots are exact CC3M values (docs/METHOD.md §4)
    assert t.raw[0]["laion_aes"] == pytest.approx(3.372, abs=1e-3)
    assert t.raw[2]["laion_aes"] == pytest.approx(5.925, abs=1e-3)
    same = sweep.build_sweep(["topiq_nr", "laion_aes"], "laion_aes", 1, 99, 2, hold="same")
    assert same.rows == [{"topiq_nr": 1.0, "laion_aes": 1.0}, {"topiq_nr": 99.0, "laion_aes": 99.0}]
    assert sweep.targets_text(same.rows) == "topiq_nr=1, laion_aes=1; topiq_nr=99, laion_aes=99"
    with pytest.raises(ValueError, match="not inputs of this adapter"):
        sweep.build_sweep(["topiq_nr"], "musiq", 1, 99, 2)
    with pytest.raises(ValueError, match="hold"):
        sweep.hold_value("topiq_nr", "high", "percentile")


def test_spearman_matches_definition():
    assert sweep.spearman_rho([1, 2, 3, 4, 5], [2, 4, 6, 8, 100]) == pytest.approx(1.0)
    assert sweep.spearman_rho([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # no ties: 1 - 6 sum d^2 / (n (n^2 - 1)); d = (0, 1, -1, 0, 0) -> 1 - 12 / 120 = 0.9
    assert sweep.spearman_rho([1, 2, 3, 4, 5], [1, 3, 2, 4, 5]) == pytest.approx(0.9)
    assert sweep.rank_average([10, 20, 20, 30]).tolist() == [1, 2.5, 2.5, 4]
    assert math.isnan(sweep.spearman_rho([1, 2, 3], [5, 5, 5]))
    summary = sweep.summarize([1, 2, 3], {"piqe": [30, 20, 10], "topiq_nr": [0.1, 0.2, 0.3]})
    assert summary["piqe"]["lower_better"] and summary["piqe"]["aligned_rho"] == pytest.approx(1.0)
    assert summary["topiq_nr"]["rho"] == pytest.approx(1.0)


def test_report_files(tmp_path):
    t = sweep.build_sweep(["topiq_nr", "laion_aes"], "", 1, 99, 4)
    images = np.random.default_rng(0).random((4, 32, 32, 3))
    out = sweep.write_report(tmp_path, "s", t, {"topiq_nr": [0.3, 0.5, 0.6, 0.7]}, images,
                             [f"i{i}.png" for i in range(4)], {"prompt": "p", "seed": 3, "model": "m", "adapter": "a"})
    rows = list(csv.DictReader(open(out["paths"]["csv"])))
    assert [r["target"] for r in rows] == ["1.0", "33.66667", "66.33333", "99.0"]  # no float noise
    assert rows[0]["prompt"] == "p" and rows[0]["seed"] == "3" and rows[0]["image"] == "i0.png"
    data = json.loads(out["paths"]["json"].read_text())
    assert data["summary"]["topiq_nr"]["rho"] == pytest.approx(1.0)
    assert out["chart"].shape[2] == 3 and out["chart"].std() > 0
    assert out["grid"].shape[0] > 32 * 2 and out["paths"]["grid"].stat().st_size > 0


# ------------------------------------------------------------------------------------------- server

def sweep_graph(steps=8, metric="piqe", prefix="iqa_sweep/test"):
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_CHECKPOINT}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "adapter": {"class_type": "IQAAdapterLoader", "inputs": {"adapter_name": TINY_ADAPTER}},
        "sweep": {"class_type": "IQATargetSweep", "inputs": {
            "adapter": ["adapter", 0], "metrics": "", "start": 1.0, "stop": 99.0, "steps": steps,
            "mode": "percentile", "spacing": "linear", "hold": "", "negative_scale": 0.0}},
        "apply": {"class_type": "IQAAdapterApply", "inputs": {
            "model": ["ckpt", 0], "adapter": ["adapter", 0], "tokens": ["sweep", 0], "weight": 1.0,
            "start_at": 0.0, "end_at": 1.0}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64,
                                                                "batch_size": ["sweep", 2]}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["apply", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": 7, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}},
        "metric": {"class_type": "IQAMetricLoader", "inputs": {"metric": metric, "device": "cpu",
                                                               "differentiable": False}},
        "score": {"class_type": "IQAScore", "inputs": {"images": ["decode", 0], "metric": ["metric", 0],
                                                       "chunk_size": 8, "save_rows": "none",
                                                       "filename_prefix": "iqa_scores/scores",
                                                       # 64 px test images: 512 px squashes are flat for piqe
                                                       "score_size": "native"}},
        "report": {"class_type": "IQASweepReport", "inputs": {
            "images": ["decode", 0], "targets": ["sweep", 1], "scores": ["score", 0], "filename_prefix": prefix}},
    }


@pytest.mark.timeout(900)
def test_one_sampler_run_renders_the_whole_sweep(comfy_server):
    from PIL import Image

    graph = sweep_graph(steps=8)
    assert sum(node["class_type"] == "KSampler" for node in graph.values()) == 1
    result = comfy_server.run(graph, timeout=900)
    assert result.ok, f"{result.error_message()}\n{comfy_server.log_tail(30)}"
    files = json.loads(result.outputs["report"]["report"][0])["files"]
    for kind in ("grid", "chart", "csv", "json"):
        assert (comfy_server.output_dir / files[kind]).stat().st_size > 0, kind
    data = json.loads((comfy_server.output_dir / files["json"]).read_text())
    rows = data["rows"]
    assert len(rows) == 8 and [r["target"] for r in rows] == pytest.approx(sweep.sweep_values(1, 99, 8))
    assert {r["metric"] for r in rows} == {"piqe"} and rows[0]["lower_better"] is True
    # seed, prompt, checkpoint and adapter come from the graph itself
    assert rows[0]["prompt"] == "a lighthouse" and rows[0]["seed"] == 7 and rows[0]["adapter"] == TINY_ADAPTER
    assert rows[0]["model"] == TINY_CHECKPOINT
    rho = data["summary"]["piqe"]["rho"]
    assert rho is not None and -1.0 <= rho <= 1.0
    folder = comfy_server.output_dir / pathlib.Path(files["csv"]).parent
    images = [np.asarray(Image.open(folder / r["image"]), dtype=np.float32) for r in rows]
    assert all(im.shape == (64, 64, 3) for im in images)
    # each latent got its own target: the images differ (same seed batch, different tokens)
    first_last = np.abs(images[0] - images[-1]).mean()
    assert first_last > 0.5, f"targets 1 and 99 gave (nearly) the same image: mean |diff| {first_last}"
    assert len({im.tobytes() for im in images}) == 8
    shown = result.outputs["report"]["text"][0]
    assert "Spearman rho" in shown and "a lighthouse" in shown and "| piqe |" in shown, shown


def test_paper_preset_through_the_server_records_score_size(comfy_server):
    """spacing 'paper' renders the paper's five targets in one run; the report says how images were scored
    (IQA Score's default: squashed to 512x512 as the CC3M statistics were made)."""
    graph = sweep_graph(prefix="iqa_sweep/paper")
    graph["sweep"]["inputs"]["spacing"] = "paper"
    del graph["score"]["inputs"]["score_size"]  # the default
    result = comfy_server.run(graph, timeout=900)
    assert result.ok, f"{result.error_message()}\n{comfy_server.log_tail(30)}"
    files = json.loads(result.outputs["report"]["report"][0])["files"]
    data = json.loads((comfy_server.output_dir / files["json"]).read_text())
    assert [r["target"] for r in data["rows"]] == [1, 25, 50, 75, 99]
    assert {r["score_size"] for r in data["rows"]} == {"cc3m"} and data["score_sizes"] == {"piqe": "cc3m"}
    with open(comfy_server.output_dir / files["csv"]) as handle:
        assert {row["score_size"] for row in csv.DictReader(handle)} == {"cc3m"}


def test_wrong_batch_is_refused_at_queue_time(comfy_server):
    from conftest import PromptRejected

    graph = sweep_graph(steps=4, prefix="iqa_sweep/wrong")
    graph["latent"]["inputs"]["batch_size"] = 3
    with pytest.raises(PromptRejected) as rejected:
        comfy_server.queue(graph)
    text = json.dumps(rejected.value.body["node_errors"]["sweep"])
    assert "Quality Target Sweep: steps: 4 target rows" in text and "count" in text, text


# ------------------------------------------------------------------------------------------- CLI

@pytest.mark.timeout(900)
def test_cli_resumes_without_redoing_items(comfy_server, tmp_path):
    from support.graphs import target_sweep_workflow

    workflow = target_sweep_workflow(steps=2)
    path = tmp_path / "workflow_api.json"
    path.write_text(json.dumps(workflow))
    out = tmp_path / "sweep"
    base = [PYTHON, str(PACK_ROOT / "scripts" / "sweep.py"), str(path), "--url", comfy_server.url, "--out", str(out),
            "--targets", "1,50,99", "--seeds", "3", "--prompts", "a red car", "--metric", "piqe", "--quiet"]

    first = subprocess.run(base + ["--max-items", "2"], capture_output=True, text=True, timeout=800)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "3 items, 0 already finished, 3 to run" in first.stdout
    manifest = out / "manifest.jsonl"
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(records) == 2 and {r["status"] for r in records} == {"ok"}
    assert {r["batch_rows"] for r in records} == {3}  # one sampler run for the three targets
    before = manifest.read_text()

    second = subprocess.run(base, capture_output=True, text=True, timeout=800)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "3 items, 2 already finished, 1 to run" in second.stdout
    assert manifest.read_text().startswith(before)  # finished items untouched, one line appended
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(records) == 3 and sorted(r["target"] for r in records) == [1.0, 50.0, 99.0]

    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(r["prompt"], r["seed"], float(r["target"]), r["metric"]) for r in rows] == [
        ("a red car", "3", t, "piqe") for t in (1.0, 50.0, 99.0)]
    assert all((out / r["image"]).exists() for r in rows)
    for name in ("sweep_chart.png", "sweep_grid.png", "sweep.json"):
        assert (out / name).stat().st_size > 0
    assert "Spearman rho" in second.stdout

    third = subprocess.run(base, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and "3 already finished, 0 to run" in third.stdout
    assert manifest.read_text().count("\n") == 3


def test_cli_finds_nodes_and_complains_clearly():
    from comfyui_iqa_adapter.adapter import sweep_jobs
    from comfyui_iqa_adapter.scripts import sweep as cli
    from support.graphs import txt2img

    graph = txt2img()
    assert cli.find_prompt_node(graph) == "2"  # wired to the sampler's positive input
    graph["t"] = {"class_type": "IQAAdapterEncodeTarget", "inputs": {"targets": "x", "percentile": 1.0, "mode": "raw"}}
    batch = sweep_jobs.plan("w", ["a dog"], [11], [25.0], "percentile", None, [], 1)[0]
    prepared = sweep_jobs.prepare_graph(graph, batch, "percentile")
    assert prepared["2"]["inputs"]["text"] == "a dog" and prepared["5"]["inputs"]["seed"] == 11
    assert prepared["t"]["inputs"] == {"quality": "custom", "targets": "", "percentile": 25.0, "mode": "percentile"}
    assert cli.main(["--report", "--out", "/nonexistent/sweep"]) == 2  # nothing finished there: a clear error
    with pytest.raises(cli.SweepError, match="--targets"):
        cli.parse_targets("1, x")
