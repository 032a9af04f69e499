"""The adapter nodes in a real ComfyUI server (tiny SD1.5 + tiny adapter, 64x64, 2 steps), plus the
in-process guarantee that IQAAdapterApply never touches the model it is given.
"""
from __future__ import annotations

import copy
import json
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PromptRejected
from support.bad_files import BAD_FILES
from support.graphs import TINY_ADAPTER, adapter_graph


def pixels(server, result, node="7") -> list[np.ndarray]:
    assert result.ok, result.error_message()
    return [np.asarray(Image.open(server.output_file(image)).convert("RGB")).astype(np.int16)
            for image in result.images(node)]


def test_workflow_runs_and_targets_change_the_image(comfy_server, txt2img):
    plain = pixels(comfy_server, comfy_server.run(txt2img(prefix="iqa_plain")))
    high = pixels(comfy_server, comfy_server.run(adapter_graph(target=99.0, prefix="iqa_high")))
    low = pixels(comfy_server, comfy_server.run(adapter_graph(target=1.0, prefix="iqa_low")))
    zero = pixels(comfy_server, comfy_server.run(adapter_graph(target=99.0, weight=0.0, prefix="iqa_zero")))
    assert len(high) == len(low) == 1
    assert np.abs(high[0] - low[0]).max() > 8, "target 99 and target 1 gave the same image"
    assert np.abs(high[0] - plain[0]).max() > 8, "the adapter had no effect"
    assert np.array_equal(zero[0], plain[0]), "weight 0 must reproduce the unpatched image bit-for-bit"


def test_batch_of_four_targets_one_per_latent(comfy_server):
    rows = "topiq_nr=99, laion_aes=99; topiq_nr=1, laion_aes=1\ntopiq_nr=50, laion_aes=99; topiq_nr=99, laion_aes=1"
    varied = pixels(comfy_server, comfy_server.run(adapter_graph(targets=rows, batch=4, prefix="iqa_b4")))
    # Same batch, row 0's target everywhere: latent 0 keeps its image, latents 1..3 change.
    same = pixels(comfy_server, comfy_server.run(adapter_graph(
        targets=";".join(["topiq_nr=99, laion_aes=99"] * 4), batch=4, prefix="iqa_b4same")))
    assert len(varied) == len(same) == 4
    assert np.abs(varied[0] - same[0]).max() <= 1, "latent 0 must only see target 0"
    for i in (1, 2, 3):
        assert np.abs(varied[i] - same[i]).max() > 8, f"latent {i} did not get target {i}"
    for i in range(4):
        for j in range(i + 1, 4):
            assert not np.array_equal(varied[i], varied[j])


def test_wrong_batch_size_is_an_execution_error(comfy_server):
    """A batch size the graph does not state literally (here: repeated latents) is checked when sampling."""
    graph = adapter_graph(targets="topiq_nr=99, laion_aes=99; topiq_nr=1, laion_aes=1", batch=1,
                          prefix="iqa_badbatch")
    graph["13"] = {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["4", 0], "amount": 3}}
    graph["5"]["inputs"]["latent_image"] = ["13", 0]
    result = comfy_server.run(graph)
    assert not result.ok
    message = result.error_message()
    assert "Apply Quality Adapter: tokens" in message and "2 targets" in message and "latent batch is 3" in message
    assert comfy_server.alive()


@pytest.mark.parametrize("targets,target,expected", [
    ("", 100.0, "Quality Target: percentile: expected a percentile from 1 to 99, got 100.0"),
    ("topiq_nr=99, laion_aes=100", 99.0, "Quality Target: targets: row 1, laion_aes: percentile 100 is outside"),
    ("topiq_nr=99, laion_aes=high", 99.0, "Quality Target: targets: "),
])
def test_bad_targets_name_the_node_and_input(comfy_server, targets, target, expected):
    with pytest.raises(PromptRejected) as rejected:
        comfy_server.queue(adapter_graph(targets=targets, target=target, prefix="iqa_badtarget"))
    assert expected in str(rejected.value), rejected.value


def test_a_row_naming_some_metrics_takes_the_rest_from_the_slider(comfy, tiny_checkpoint, host_dir):
    from comfyui_iqa_adapter.nodes import adapter_nodes

    (adapter,) = adapter_nodes.IQAAdapterLoader.execute(TINY_ADAPTER).args
    partial = adapter_nodes.IQAAdapterEncodeTarget.execute(adapter, "custom", 30.0, "topiq_nr=90", "percentile", 0.0)
    full = adapter_nodes.IQAAdapterEncodeTarget.execute(adapter, "custom", 30.0, "topiq_nr=90, laion_aes=30",
                                                        "percentile", 0.0)
    assert partial.args[1] == 1 and torch.equal(partial.args[0].cond, full.args[0].cond)
    preset = adapter_nodes.IQAAdapterEncodeTarget.execute(adapter, "good", 75.0, "", "percentile", 0.0)
    slider = adapter_nodes.IQAAdapterEncodeTarget.execute(adapter, "custom", 75.0, "", "percentile", 0.0)
    assert torch.equal(preset.args[0].cond, slider.args[0].cond)


@pytest.fixture(scope="module")
def tiny_state(host_dir):
    """A valid state dict with the tiny adapter's shapes: what the bad files are made from."""
    from comfyui_iqa_adapter.adapter import checkpoint
    from comfyui_iqa_adapter.scripts import random_weights

    info = checkpoint.load_adapter_weights(host_dir / "models" / "iqa_adapter" / TINY_ADAPTER).info
    return random_weights.random_adapter_state_dict(info.cross_attention_dim, list(info.layer_widths),
                                                    num_tokens=info.num_tokens, input_dim=info.input_dim,
                                                    projection_kind=info.projection_kind, seed=0)


@pytest.mark.parametrize("case", BAD_FILES, ids=lambda case: case.name)
def test_bad_adapter_file_is_an_execution_error(comfy_server, model_files, tiny_state, tmp_path, case):
    """The core's bad-file matrix (tests/support/bad_files.py) through the server: the loader names itself, the
    input and the file, says what is wrong, runs no pickled code, and the server lives on."""
    marker = tmp_path / "pwned"
    name = f"iqa_test_bad_{case.name}{case.ext}"
    model_files.path("iqa_adapter", name).write_bytes(case.build(tiny_state, str(marker)))
    descriptor = (comfy_server.models_dir / "iqa_adapter" / TINY_ADAPTER).with_suffix(".json").read_text()
    model_files.path("iqa_adapter", pathlib.Path(name).stem + ".json").write_text(descriptor)
    result = comfy_server.run(adapter_graph(adapter=name, prefix=f"iqa_bad_{case.name}"))
    assert not result.ok, case.name
    message = result.error_message()
    assert message.startswith("IQAAdapterLoader: Load Quality Adapter: adapter_name:"), message
    assert name in message and all(needle in message for needle in case.needles), message
    assert not marker.exists(), "SECURITY: loading the file ran code from its pickle"
    assert comfy_server.alive()


def test_descriptor_of_another_size_is_an_execution_error(comfy_server, model_files):
    good = comfy_server.models_dir / "iqa_adapter" / TINY_ADAPTER
    name = "iqa_test_wrong_metrics.safetensors"
    model_files.path("iqa_adapter", name).write_bytes(good.read_bytes())
    model_files.path("iqa_adapter", "iqa_test_wrong_metrics.json").write_text(
        '{"kind": "score", "metrics": ["topiq_nr", "laion_aes", "musiq"], "normalization": "zscore"}')
    result = comfy_server.run(adapter_graph(adapter=name, prefix="iqa_bad_wrong_metrics"))
    assert not result.ok
    message = result.error_message()
    assert message.startswith("IQAAdapterLoader: Load Quality Adapter: adapter_name:"), message
    assert name in message and "size 2" in message, message
    # The server still works after the error.
    assert comfy_server.run(adapter_graph(prefix="iqa_after_errors")).ok


def test_tokens_save_and_load_roundtrip(comfy_server):
    graph = adapter_graph(targets="topiq_nr=95, laion_aes=5", prefix="iqa_tokens_direct")
    graph["13"] = {"class_type": "IQAAdapterSaveTokens", "inputs": {"tokens": ["11", 0],
                                                                    "filename_prefix": "iqa_test_tokens/t"}}
    direct = comfy_server.run(graph)
    saved = direct.outputs["13"]["tokens"][0]
    assert saved["filename"].endswith(".safetensors")
    loaded_graph = adapter_graph(prefix="iqa_tokens_loaded")
    loaded_graph["11"] = {"class_type": "IQAAdapterLoadTokens",
                          "inputs": {"file": f"{saved['subfolder']}/{saved['filename']} [output]"}}
    loaded = comfy_server.run(loaded_graph)
    assert np.array_equal(pixels(comfy_server, direct)[0], pixels(comfy_server, loaded)[0])


def test_apply_node_leaves_the_input_model_untouched(comfy, tiny_checkpoint, host_dir):
    from comfyui_iqa_adapter.nodes import adapter_nodes

    model = tiny_checkpoint[0]
    options_before = copy.deepcopy(model.model_options)
    state_before = {k: v.clone() for k, v in model.model.state_dict().items()}
    (adapter,) = adapter_nodes.IQAAdapterLoader.execute(TINY_ADAPTER).args
    tokens, _count = adapter_nodes.IQAAdapterEncodeTarget.execute(adapter, "best", 99.0, "", "percentile", 0.0).args
    (patched,) = adapter_nodes.IQAAdapterApply.execute(model, adapter, tokens, 1.0, 0.0, 1.0).args
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 768, generator=gen)
    options = dict(patched.model_options["transformer_options"], cond_or_uncond=[1, 0], sigmas=torch.ones(2))
    with torch.no_grad():
        patched.model.apply_model(x, torch.ones(2), c_crossattn=context, transformer_options=options)
    installed = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert patched is not model and len({id(patch) for patch in installed.values()}) == 7
    assert model.model_options == options_before
    state_after = model.model.state_dict()
    assert all(torch.equal(state_before[k], state_after[k]) for k in state_before)
    # The loader's cache returns the same object for an unchanged file.
    assert adapter_nodes.IQAAdapterLoader.execute(TINY_ADAPTER).args[0] is adapter


def test_loader_follows_an_edited_broken_or_deleted_sidecar(comfy_server, model_files):
    """Same weights file, sidecar changed between prompts (same size and mtime): the node re-runs and the
    loaded adapter carries the new descriptor, exactly as a fresh load of that descriptor would."""
    import os
    import uuid

    folder = pathlib.Path(comfy_server.models_dir) / "iqa_adapter"
    good = folder / TINY_ADAPTER
    descriptor = json.loads((folder / "tiny_sd15_iqa_adapter.json").read_text())
    original = json.dumps(descriptor)
    swapped = json.dumps(dict(descriptor, metrics=descriptor["metrics"][::-1]))
    assert swapped != original and len(swapped) == len(original)
    stem = f"iqa_test_sidecar_{uuid.uuid4().hex[:8]}"
    edited, fresh = (model_files.path("iqa_adapter", f"{stem}{suffix}.safetensors") for suffix in ("", "_fresh"))
    targets = "topiq_nr=95, laion_aes=5"
    for path, text in ((edited, original), (fresh, swapped)):
        path.write_bytes(good.read_bytes())
        model_files.track(path.with_suffix(".json")).write_text(text)
    side = edited.with_suffix(".json")
    stat = side.stat()

    def run(name, prefix):
        return comfy_server.run(adapter_graph(targets=targets, adapter=name, prefix=prefix))

    first = pixels(comfy_server, run(edited.name, "iqa_sidecar_first"))[0]
    side.write_text(swapped)
    os.utime(side, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after_edit = pixels(comfy_server, run(edited.name, "iqa_sidecar_edited"))[0]
    reference = pixels(comfy_server, run(fresh.name, "iqa_sidecar_fresh"))[0]
    assert np.abs(after_edit - first).max() > 8, "the edited metric order was ignored (stale descriptor)"
    assert np.array_equal(after_edit, reference), "the edited sidecar must load as a fresh one does"

    side.write_text('{"metrics": ["topiq_nr", ')
    broken = run(edited.name, "iqa_sidecar_broken")
    assert not broken.ok and "invalid JSON" in broken.error_message(), broken.error_message()
    side.unlink()
    deleted = run(edited.name, "iqa_sidecar_deleted")
    assert not deleted.ok and "no descriptor" in deleted.error_message(), deleted.error_message()
    side.write_text(original)
    assert np.array_equal(pixels(comfy_server, run(edited.name, "iqa_sidecar_restored"))[0], first)
