"""IQA metric nodes through the real ComfyUI server (conftest `comfy_server`).

- a workflow scores an image with a weight-free metric (piqe) and the number equals pyiqa on the same pixels;
- the reference encoder drives sampling of the tiny SD1.5 model: a reference-kind adapter (generated with
  scripts/random_weights.py + sidecar JSON) on cnniqa activations (generated cnniqa weights in models/iqa);
  different references give different images, and a score-kind adapter is refused with a clear message.
"""
from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import torch

pytest.importorskip("pyiqa", reason="SKIPPED LOUDLY: pyiqa is not installed (requirements.txt)")

from comfyui_iqa_adapter.adapter import checkpoint, iqa_models  # noqa: E402
from comfyui_iqa_adapter.scripts import random_weights  # noqa: E402
from support.graphs import TINY_CHECKPOINT, txt2img  # noqa: E402


def _write_png(path, seed: int, smooth: bool = False):
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    if smooth:
        pixels = np.full((64, 64, 3), 128, dtype=np.uint8)
        pixels[:, 32:] = 60
    Image.fromarray(pixels).save(path)
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0


def test_metric_loader_offers_ready_then_paper_metrics_first(comfy_server):
    info = comfy_server.object_info()
    for node in ("IQAMetricLoader", "IQAScore", "IQAAdapterEncodeReference"):
        assert node in info, f"{node} not registered"
    options = info["IQAMetricLoader"]["input"]["required"]["metric"]
    names = options[1]["options"] if isinstance(options[1], dict) and "options" in options[1] else options[0]
    from comfyui_iqa_adapter.adapter import iqa_models
    from comfyui_iqa_adapter.models import metrics as metric_catalog
    from comfyui_iqa_adapter.models.metrics import PAPER_METRICS

    folder = [str(comfy_server.models_dir / "iqa")]
    ready = [n for n in names if iqa_models.missing_weight_files(n, folder, plan=False) == []]
    assert "piqe" in ready  # weight-free
    full_reference = [metric_catalog.is_full_reference(n) for n in names]
    assert full_reference == sorted(full_reference), "no-reference metrics come before full-reference ones"
    for group in (False, True):
        loads = [n in ready for n, fr in zip(names, full_reference) if fr == group]
        assert loads == sorted(loads, reverse=True), f"in each group the metrics that load here come first: {names}"
    missing_paper = [n for n in names if n in PAPER_METRICS and n not in ready]
    assert missing_paper == [n for n in PAPER_METRICS if n not in ready], "the paper's metrics keep their order"


def test_score_workflow_equals_pyiqa(comfy_server):
    import pyiqa

    name = f"iqa_score_{uuid.uuid4().hex[:8]}.png"
    pixels = _write_png(comfy_server.input_dir / name, seed=7)
    prefix = f"iqa_scores_test/{uuid.uuid4().hex[:8]}"
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "IQAMetricLoader", "inputs": {"metric": "piqe", "device": "cpu", "differentiable": False}},
        "3": {"class_type": "IQAScore", "inputs": {"images": ["1", 0], "metric": ["2", 0], "chunk_size": 1,
                                                  "save_rows": "json", "filename_prefix": prefix,
                                                  "score_size": "native"}},
    }
    result = comfy_server.run(prompt, timeout=300)
    assert result.ok, result.error_message()
    table = result.outputs["3"]["text"][0]  # Markdown shown on the node, with the metric's direction
    assert "piqe (↓)" in table and "lower is better" in table and "| 1 |" in table, table
    (card,) = result.outputs["3"]["images"]  # the score card, previewed by the node
    assert card["type"] == "temp" and comfy_server.output_file(card).stat().st_size > 0
    rows = [json.loads(line) for line in (comfy_server.output_dir / f"{prefix}.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["metric"] == "piqe" and rows[0]["lower_better"] is True
    expected = pyiqa.create_metric("piqe", device="cpu")(torch.from_numpy(pixels).permute(2, 0, 1)[None]).item()
    assert abs(rows[0]["score"] - expected) < 1e-6


def test_score_node_scores_as_cc3m_statistics_were_made(comfy_server):
    """Default sizing: a 1024x768 image is scored as the authors scored CC3M (torchvision Resize((512, 512))
    after ToTensor, clamped): the node's number equals pyiqa's on that tensor; 'native' gives pyiqa's number on
    the unresized image, and the JSON rows say which."""
    import pyiqa
    from PIL import Image
    from torchvision import transforms

    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[0:768, 0:1024]
    pixels = (np.stack([xx / 1024, yy / 768, 0.5 + 0.5 * np.sin(xx / 9.0)], -1) * 200
              + rng.integers(0, 56, (768, 1024, 3))).astype(np.uint8)  # structure + noise: resizing matters
    name = f"iqa_score_{uuid.uuid4().hex[:8]}.png"
    Image.fromarray(pixels).save(comfy_server.input_dir / name)
    tensor = torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    prefix = f"iqa_scores_test/{uuid.uuid4().hex[:8]}"
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
              "2": {"class_type": "IQAMetricLoader", "inputs": {"metric": "piqe", "device": "cpu",
                                                                "differentiable": False}}}
    for node_id, size in (("3", None), ("4", "native")):
        inputs = {"images": ["1", 0], "metric": ["2", 0], "chunk_size": 1, "save_rows": "json",
                  "filename_prefix": prefix}
        if size:
            inputs["score_size"] = size
        prompt[node_id] = {"class_type": "IQAScore", "inputs": inputs}
    result = comfy_server.run(prompt, timeout=300)
    assert result.ok, result.error_message()
    rows = [json.loads(line) for line in (comfy_server.output_dir / f"{prefix}.jsonl").read_text().splitlines()]
    by_size = {row["score_size"]: row["score"] for row in rows}
    assert set(by_size) == {"cc3m", "native"}, rows
    assert "512x512" in result.outputs["3"]["text"][0]

    authors = transforms.Resize(size=(512, 512))(tensor).clamp(0, 1)  # the statistics script's resize
    ours = iqa_models.resize_for_scoring(tensor, "cc3m")
    assert torch.equal(ours, authors)
    piqe = pyiqa.create_metric("piqe", device="cpu")
    expected = piqe(authors).item()
    native = piqe(tensor).item()
    without_antialias = piqe(torch.nn.functional.interpolate(tensor, size=(512, 512), mode="bilinear",
                                                             align_corners=False).clamp(0, 1)).item()
    print(f"[cc3m sizing] node {by_size['cc3m']:.9g} pyiqa(Resize 512) {expected:.9g} "
          f"|diff| {abs(by_size['cc3m'] - expected):.2e}; native {native:.6g}; no antialias {without_antialias:.6g}")
    assert abs(by_size["cc3m"] - expected) <= 1e-6
    assert abs(by_size["native"] - native) <= 1e-6
    assert abs(expected - native) > 1e-3, "the test image must be one where sizing changes the score"


def test_score_node_reports_missing_reference(comfy_server):
    name = f"iqa_score_{uuid.uuid4().hex[:8]}.png"
    _write_png(comfy_server.input_dir / name, seed=8)
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "IQAMetricLoader", "inputs": {"metric": "psnr", "device": "cpu", "differentiable": False}},
        "3": {"class_type": "IQAScore", "inputs": {"images": ["1", 0], "metric": ["2", 0], "chunk_size": 4,
                                                  "save_rows": "none", "filename_prefix": "x"}},
    }
    result = comfy_server.run(prompt, timeout=300)
    assert not result.ok
    assert "Quality Score: reference" in result.error_message() and "full-reference" in result.error_message()


@pytest.fixture(scope="module")
def reference_setup(comfy_server, module_model_files):
    """cnniqa weights in models/iqa and a reference-kind tiny adapter (+ a score-kind one) in models/iqa_adapter."""
    from safetensors.torch import save_file

    files = module_model_files
    iqa_dir = files.models_dir / "iqa"
    present = {path.name for path in iqa_dir.iterdir()} if iqa_dir.is_dir() else set()
    random_weights.write_random_weights("cnniqa", str(iqa_dir), seed=11, noise=0.1)
    files.track_new("iqa", present)
    adapter_dir = files.models_dir / "iqa_adapter"
    stem = "test_reference_tiny_sd15"
    # the tiny UNet's cross-attention widths, read from the score adapter that setup generated for it
    tiny_adapter = adapter_dir / "tiny_sd15_iqa_adapter.safetensors"
    if not tiny_adapter.exists():
        pytest.skip(f"SKIPPED LOUDLY: {tiny_adapter} missing: run `bash scripts/setup.sh`")
    widths = checkpoint.load_adapter_weights(tiny_adapter).info.layer_widths
    state = random_weights.random_adapter_state_dict(768, widths, num_tokens=2, input_dim=50, seed=3)
    # large projection weights so that the tiny model's image visibly depends on the tokens
    state["image_proj.proj.weight"] = state["image_proj.proj.weight"] * 20
    save_file(state, str(files.path("iqa_adapter", f"{stem}.safetensors")))
    files.path("iqa_adapter", f"{stem}.json").write_text(json.dumps(
        {"kind": "reference", "extractor": {"model": "cnniqa", "layers": ["conv1"], "pooling": "avg", "dim": 50}}))
    score_stem = "test_reference_score_kind"
    save_file(random_weights.random_adapter_state_dict(768, widths, input_dim=2),
              str(files.path("iqa_adapter", f"{score_stem}.safetensors")))
    files.path("iqa_adapter", f"{score_stem}.json").write_text(
        json.dumps({"kind": "score", "metrics": ["topiq_nr", "laion_aes"]}))
    names = [f"ref_{uuid.uuid4().hex[:8]}_{i}.png" for i in range(2)]
    _write_png(comfy_server.input_dir / names[0], seed=1)
    _write_png(comfy_server.input_dir / names[1], seed=2, smooth=True)
    return f"{stem}.safetensors", f"{score_stem}.safetensors", names


def _reference_prompt(adapter_name: str, image_name: str, prefix: str) -> dict:
    prompt = txt2img(ckpt=TINY_CHECKPOINT, steps=2, prefix=prefix)
    prompt.update({
        "10": {"class_type": "IQAAdapterLoader", "inputs": {"adapter_name": adapter_name}},
        "11": {"class_type": "IQAMetricLoader",
               "inputs": {"metric": "cnniqa", "device": "cpu", "differentiable": False}},
        "12": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "13": {"class_type": "IQAAdapterEncodeReference",
               "inputs": {"adapter": ["10", 0], "reference": ["12", 0], "metric": ["11", 0]}},
        "14": {"class_type": "IQAAdapterApply", "inputs": {"model": ["1", 0], "adapter": ["10", 0], "tokens": ["13", 0],
                                                          "weight": 1.0, "start_at": 0.0, "end_at": 1.0}},
    })
    prompt["5"]["inputs"]["model"] = ["14", 0]
    return prompt


def _saved_pixels(server, result, node="7"):
    from PIL import Image

    images = result.images(node)
    assert images, f"no image saved: {result.outputs}"
    return np.asarray(Image.open(server.output_file(images[0])), dtype=np.int16)


def test_reference_encoder_drives_sampling(comfy_server, reference_setup):
    adapter_name, _, (first, second) = reference_setup
    a = comfy_server.run(_reference_prompt(adapter_name, first, "iqa_ref_a"), timeout=600)
    assert a.ok, a.error_message()
    b = comfy_server.run(_reference_prompt(adapter_name, second, "iqa_ref_b"), timeout=600)
    assert b.ok, b.error_message()
    plain = comfy_server.run(txt2img(ckpt=TINY_CHECKPOINT, steps=2, prefix="iqa_ref_plain"), timeout=600)
    assert plain.ok, plain.error_message()
    pa, pb, pp = (_saved_pixels(comfy_server, r) for r in (a, b, plain))
    assert np.abs(pa - pp).max() > 0, "the reference tokens did not change the image"
    assert np.abs(pa - pb).max() > 0, "different references gave the same image"


def test_reference_encoder_refuses_score_adapter(comfy_server, reference_setup):
    _, score_adapter, (first, _) = reference_setup
    result = comfy_server.run(_reference_prompt(score_adapter, first, "iqa_ref_bad"), timeout=600)
    assert not result.ok
    assert "this adapter is score-conditioned" in result.error_message()
