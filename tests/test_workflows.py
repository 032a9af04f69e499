"""The example workflows (workflows/ui = source, workflows/api = generated twins) against the real server.

1. every UI workflow validates against /object_info (node types exist, widget values allowed, links
   connect matching types, required inputs connected);
2. the API twins are exactly what scripts/workflow_tools.py generates from the UI files today;
   layout facts (groups, overlaps, the stored default view) are read from the UI files themselves;
3. every API workflow runs headless on the tiny models (model names, sizes and steps swapped; tiny
   random metric weights and a tiny reference adapter written here), and its outputs are checked.
"""
from __future__ import annotations

import copy
import csv
import json
import pathlib

import numpy as np
import pytest

from comfyui_iqa_adapter.scripts import workflow_tools
from conftest import TINY_ADAPTER, TINY_CHECKPOINT, comfy_server_module

EXAMPLES = workflow_tools.examples()  # API twin name -> UI file (named for people: the template's title)
NAMES = list(EXAMPLES)
GENERATING = ["sdxl_quality_target", "sd15_quality_target", "degradation_sweep", "reference_transfer",
              "gradient_guidance"]
SDXL_EXAMPLES = ["sdxl_quality_target", "degradation_sweep", "reference_transfer", "gradient_guidance"]


def load_ui(name: str) -> dict:
    return json.loads(EXAMPLES[name].read_text())


def load_api(name: str) -> dict:
    return json.loads(workflow_tools.api_path(name).read_text())
REFERENCE_ADAPTER = "tiny_sd15_reference_adapter.safetensors"
WINDOW = (1366, 768)  # a laptop: every example shows whole in its stored default view
READABLE_SCALE = 0.6  # below ~0.57 the frontend stops drawing node text
SMALL_METRIC = "cnniqa"      # tiny CNN: random weights written below (nothing is downloaded)
WEIGHT_FREE_METRIC = "piqe"  # no weights at all


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.object_info()


def test_every_example_is_there():
    assert set(NAMES) == {"sdxl_quality_target", "sd15_quality_target", "degradation_sweep", "reference_transfer",
                          "gradient_guidance", "score_images"}
    assert sorted(p.name for p in workflow_tools.API_DIR.glob("*.json")) == sorted(f"{n}.json" for n in NAMES)
    for name in NAMES:
        ui = load_ui(name)
        notes = [n for n in ui["nodes"] if n["type"] in ("Note", "MarkdownNote")]
        assert notes and len(notes[0]["widgets_values"][0]) > 80, f"{name}: needs a Note explaining it"


def test_templates_people_can_run():
    """What the template browser and the canvas show: a readable title (the file name), a small thumbnail
    beside it, a unique id, groups, base-model download metadata, and a note on where adapters come from."""
    ids = set()
    for name in NAMES:
        path, ui = EXAMPLES[name], load_ui(name)
        title = path.stem
        assert " " in title and "_" not in title and "-" not in title, f"{title!r}: a title for people"
        thumbnail = workflow_tools.thumbnail_path(path)
        assert thumbnail.exists() and 5_000 < thumbnail.stat().st_size < 100 * 1024, thumbnail
        assert thumbnail.read_bytes()[:3] == b"\xff\xd8\xff", "the frontend asks for <title>.jpg: a JPEG"
        ids.add(ui["id"])
        groups = {g["title"] for g in ui["groups"]}
        expected = {"Images", "Score"} if name == "score_images" else {"Models", "Quality target", "Sample", "Score"}
        assert expected <= groups, (name, groups)
        note = " ".join(n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "Note")
        for node in ui["nodes"]:
            if node["type"] == "CheckpointLoaderSimple":
                (model,) = node["properties"]["models"]
                assert model["name"] == node["widgets_values"][0] and model["directory"] == "checkpoints"
                assert model["url"].startswith("https://huggingface.co/") and model["url"].endswith(model["name"])
                assert model in ui["models"]
        if name == "sd15_quality_target":  # no SD1.5 adapter is released: the note says how to train one
            assert "trained" in note and "github.com/X1716/IQA-Adapter" not in note, f"{name}: where adapters come from"
        elif name != "score_images":
            assert "github.com/X1716/IQA-Adapter" in note, f"{name}: where adapters come from"
        if name != "score_images":
            assert "models/iqa_adapter" in note
        # every node and group lies inside the stored default view of a 1366x768 window
        scale, (off_x, off_y) = ui["extra"]["ds"]["scale"], ui["extra"]["ds"]["offset"]
        assert scale >= READABLE_SCALE, "text is drawn at this zoom"
        boxes = [workflow_tools.rectangle(n) for n in ui["nodes"]]
        boxes += [workflow_tools.group_rectangle(g) for g in ui["groups"]]
        width, height = WINDOW
        for left, top, right, bottom in boxes:
            assert (left + off_x) * scale >= 0 and (top + off_y) * scale >= 0, name
            assert (right + off_x) * scale <= width and (bottom + off_y) * scale <= height, name
    assert len(ids) == len(NAMES), "unique workflow ids"


def test_generating_examples_score_their_images():
    for name in GENERATING:
        api = load_api(name)
        decoded = {node_id for node_id, node in api.items() if node["class_type"] == "VAEDecode"}
        scorers = [node for node in api.values() if node["class_type"] == "IQAScore"]
        assert scorers, f"{name}: no IQA Score"
        fed = set()
        for node in scorers:
            origin = node["inputs"]["images"][0]
            fed |= {origin} | {value[0] for value in api[origin]["inputs"].values() if isinstance(value, list)}
        assert decoded <= fed, f"{name}: some generated images are not scored"


def test_sdxl_examples_use_the_authors_zero_negative_and_sd15_their_negative_prompt():
    """Authors' SDXL pipeline: no negative prompt, and SDXL base zeroes empty prompts (text and pooled):
    ConditioningZeroOut. SD1.5: their negative prompt at CFG 7.5. Everywhere: 30 steps, weight 1.0."""
    for name in SDXL_EXAMPLES + ["sd15_quality_target"]:
        api = load_api(name)
        samplers = [node for node in api.values() if node["class_type"] == "KSampler"]
        assert samplers
        for sampler in samplers:
            negative = api[sampler["inputs"]["negative"][0]]
            assert sampler["inputs"]["steps"] == 30
            if name in SDXL_EXAMPLES:
                assert negative["class_type"] == "ConditioningZeroOut", name
                assert sampler["inputs"]["cfg"] == 5.0
            else:
                assert negative["class_type"] == "CLIPTextEncode"
                assert negative["inputs"]["text"] == "monochrome, lowres, bad anatomy, worst quality, low quality"
                assert sampler["inputs"]["cfg"] == 7.5
            positive = api[sampler["inputs"]["positive"][0]]
            assert positive["inputs"]["text"].startswith("best quality, high quality")
        assert all(node["inputs"]["weight"] == 1.0 for node in api.values() if node["class_type"] == "IQAAdapterApply")


def test_reference_example_is_image_to_image():
    """The authors demo reference transfer as SDEdit: the sampler starts from a loaded image's latent, with
    the denoise exposed below 1."""
    api = load_api("reference_transfer")
    (sampler,) = [node for node in api.values() if node["class_type"] == "KSampler"]
    encode = api[sampler["inputs"]["latent_image"][0]]
    assert encode["class_type"] == "VAEEncode" and api[encode["inputs"]["pixels"][0]]["class_type"] == "LoadImage"
    assert 0.0 < sampler["inputs"]["denoise"] < 1.0
    assert not any(node["class_type"] == "EmptyLatentImage" for node in api.values())
    note = next(n for n in load_ui("reference_transfer")["nodes"] if n["type"] == "Note")["widgets_values"][0]
    assert "our reading" in note and "denoise" in note


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_valid_against_object_info(object_info, name):
    ui = load_ui(name)
    assert workflow_tools.validate_ui(ui, object_info) == []


def test_validator_catches_broken_workflows(object_info):
    ui = load_ui("sd15_quality_target")
    broken = copy.deepcopy(ui)
    sampler = next(n for n in broken["nodes"] if n["type"] == "KSampler")
    sampler["widgets_values"][4] = "no_such_sampler"              # bad combo value
    loader = next(n for n in broken["nodes"] if n["type"] == "IQAAdapterLoader")
    loader["type"] = "IQANoSuchNode"                                # unknown type
    link = next(candidate for candidate in broken["links"] if candidate[5] == "LATENT")
    link[5] = "IMAGE"                                               # type mismatch
    errors = "\n".join(workflow_tools.validate_ui(broken, object_info))
    assert "no_such_sampler" in errors and "IQANoSuchNode" in errors and "LATENT" in errors, errors


@pytest.mark.parametrize("name", NAMES)
def test_api_twin_is_generated_from_ui(object_info, name):
    ui, twin = load_ui(name), load_api(name)
    twin = titles_as_this_host_names_them(ui, twin, object_info)
    assert workflow_tools.ui_to_api(ui, object_info) == twin, \
        f"workflows/api/{name}.json is stale: run `python -m comfyui_iqa_adapter.scripts.workflow_tools convert`"


def titles_as_this_host_names_them(ui: dict, twin: dict, object_info: dict) -> dict:
    """The twins are generated on the default host. A node without a title of its own carries the host's
    display name for its type, which other hosts may word differently (0.33.0: 'Batch Images (DEPRECATED)'
    for ImageBatch): on another host expect that host's names, everything else unchanged."""
    if comfy_server_module.host_name() == "default":
        return twin
    twin = copy.deepcopy(twin)
    for node in ui["nodes"]:
        entry = twin.get(str(node["id"]))
        if entry is not None and not node.get("title") and node["type"] in object_info:
            entry["_meta"]["title"] = object_info[node["type"]].get("display_name") or node["type"]
    return twin


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_nodes_do_not_overlap(name):
    ui = load_ui(name)
    assert all(len(n["size"]) == 2 and n["size"][0] >= 140 and n["size"][1] >= 40 for n in ui["nodes"]), \
        "every node stores a realistic size"
    assert workflow_tools.layout_problems(ui) == []
    # the check itself catches a node dropped onto its neighbour's title bar
    broken = copy.deepcopy(ui)
    first, second = broken["nodes"][:2]
    second["pos"] = [first["pos"][0] + 10, first["pos"][1] + first["size"][1] + workflow_tools.TITLE_HEIGHT // 2]
    assert (first["id"], second["id"]) in workflow_tools.overlapping_nodes(broken)


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_flows_left_to_right(name):
    """Every link leaves a node that lies wholly left of the node it feeds (columns, no back-links), or
    one right above it in the same column (a patch chain, e.g. adapter apply -> gradient guidance)."""
    ui = load_ui(name)
    nodes = {n["id"]: n for n in ui["nodes"]}

    def forward(origin: dict, target: dict) -> bool:
        o, t = workflow_tools.rectangle(origin), workflow_tools.rectangle(target)
        return o[2] < t[0] or (o[0] == t[0] and o[3] < t[1])

    backwards = [f"link {link[0]}: {nodes[link[1]]['type']} -> {nodes[link[3]]['type']}" for link in ui["links"]
                 if not forward(nodes[link[1]], nodes[link[3]])]
    assert backwards == []


# ---------------------------------------------------------------------------------------------- running

@pytest.fixture(scope="module")
def tiny_assets(comfy_server, module_model_files):
    """Random weights for the small metric, a tiny reference adapter, input images."""
    from PIL import Image
    from safetensors.torch import save_file

    from comfyui_iqa_adapter.adapter import iqa_adapter, iqa_models
    from comfyui_iqa_adapter.scripts import random_weights

    iqa_dir = comfy_server.models_dir / "iqa"
    expected = iqa_models.expected_weight_files(SMALL_METRIC, [str(iqa_dir)])
    if not all((iqa_dir / pathlib.Path(f).name).exists() for f in expected):
        present = {path.name for path in iqa_dir.iterdir()} if iqa_dir.is_dir() else set()
        random_weights.write_random_weights(SMALL_METRIC, str(iqa_dir), seed=1, noise=0.05)
        module_model_files.track_new("iqa", present)  # removed after the module
    adapter_dir = comfy_server.models_dir / "iqa_adapter"
    ref_path = adapter_dir / REFERENCE_ADAPTER
    if not ref_path.exists():
        widths = iqa_adapter.load_adapter(str(adapter_dir / TINY_ADAPTER)).info.layer_widths  # the tiny UNet's layers
        state = random_weights.random_adapter_state_dict(768, list(widths), num_tokens=2, input_dim=50, seed=3)
        save_file(state, str(module_model_files.track(ref_path)))
        module_model_files.track(ref_path.with_suffix(".json")).write_text(json.dumps({
            "kind": "reference", "name": "tiny reference adapter (tests)",
            "extractor": {"model": SMALL_METRIC, "layers": ["conv1"], "pooling": "avg", "dim": 50}}))
    rng = np.random.default_rng(0)
    for name in ("example1.png", "example2.png", "reference.png", "content.png"):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(comfy_server.input_dir / name)
    return True


def tiny_version(api: dict, object_info: dict) -> dict:
    """Swap model names, sizes and steps for the tiny ones; metrics for ones that run offline here."""
    api = copy.deepcopy(api)
    for node in api.values():
        kind, inputs = node["class_type"], node["inputs"]
        if "ckpt_name" in inputs:
            inputs["ckpt_name"] = TINY_CHECKPOINT
        if kind == "IQAAdapterLoader":
            inputs["adapter_name"] = REFERENCE_ADAPTER if "reference" in inputs["adapter_name"] else TINY_ADAPTER
        if kind == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = 64
        if kind in ("KSampler", "KSamplerAdvanced"):
            inputs["steps"] = 2
        if kind == "IQATargetSweep":
            inputs["steps"] = 4
        if kind == "IQAMetricLoader":
            differentiable = inputs.get("differentiable", False)
            title = node.get("_meta", {}).get("title", "")
            inputs["metric"] = WEIGHT_FREE_METRIC if ("second" in title and not differentiable) else SMALL_METRIC
            inputs["device"] = "cpu"
    return api


def _outputs_of(result, api, class_type):
    return [result.outputs.get(node_id, {}) for node_id, node in api.items() if node["class_type"] == class_type]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_runs_on_tiny_models(comfy_server, object_info, tiny_assets, name):
    api = tiny_version(load_api(name), object_info)
    result = comfy_server.run(api, timeout=900)
    assert result.ok, f"{name}: {result.error_message()}\n{comfy_server.log_tail(30)}"
    saved = [img for out in _outputs_of(result, api, "SaveImage") for img in out.get("images", [])]
    for image in saved:
        assert comfy_server.output_file(image).stat().st_size > 0
    texts = [t for out in _outputs_of(result, api, "IQAScore") for t in out.get("text", [])]
    if name in GENERATING:
        assert texts and all(SMALL_METRIC in text for text in texts), f"{name}: scores on the canvas: {texts}"
    if name in ("sdxl_quality_target", "sd15_quality_target", "reference_transfer"):
        assert len(saved) == 1
    if name == "sdxl_quality_target":  # ran with the zeroed negative (ConditioningZeroOut)
        assert any(node["class_type"] == "ConditioningZeroOut" for node in api.values())
    if name == "gradient_guidance":
        assert len(saved) == 2, "unguided and guided image side by side"
        assert len(texts) == 1 and WEIGHT_FREE_METRIC in texts[0], texts
    if name == "score_images":
        assert len(texts) == 1 and SMALL_METRIC in texts[0]
        rows = [line for line in texts[0].splitlines() if line.startswith("| ") and line[2:3].isdigit()]
        assert len(rows) == 2, texts[0]
    if name == "degradation_sweep":
        (report,) = _outputs_of(result, api, "IQASweepReport")
        files = json.loads(report["report"][0])["files"]
        for kind in ("grid", "chart", "csv", "json"):
            assert comfy_server.output_dir.joinpath(files[kind]).stat().st_size > 0, kind
        with open(comfy_server.output_dir / files["csv"]) as handle:
            rows = list(csv.DictReader(handle))
        assert [float(r["target"]) for r in rows] == pytest.approx([1.0, 33.666667, 66.333333, 99.0], abs=1e-4)
        assert {r["metric"] for r in rows} == {SMALL_METRIC}


def test_examples_listed_in_template_browser(comfy_server):
    """The host lists custom_nodes/<pack>/example_workflows/*.json (and workflows/*.json: none there, so no
    duplicates) and serves them under /api/workflow_templates/<pack>/."""
    import urllib.parse
    import urllib.request

    listing = comfy_server.get("/workflow_templates")
    ours = [names for pack, names in listing.items() if "IQA" in pack]
    titles = [path.stem for path in EXAMPLES.values()]
    assert len(ours) == 1 and sorted(ours[0]) == sorted(titles), listing
    pack = next(pack for pack in listing if "IQA" in pack)
    base = f"{comfy_server.url}/api/workflow_templates/{urllib.parse.quote(pack)}/"
    title = EXAMPLES["degradation_sweep"].stem
    with urllib.request.urlopen(base + urllib.parse.quote(f"{title}.json")) as r:  # as the frontend fetches it
        served = json.loads(r.read())
    assert served == load_ui("degradation_sweep")
    with urllib.request.urlopen(base + urllib.parse.quote(f"{title}.jpg")) as r:
        assert r.read() == workflow_tools.thumbnail_path(EXAMPLES["degradation_sweep"]).read_bytes()
