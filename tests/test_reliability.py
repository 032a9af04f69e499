"""Reliability: try to break the real server with bad files, bad values, load, stale caches and interrupts.

Everything runs against the session's real ComfyUI server (`comfy_server`); the isolation test starts a
second, fresh server as the reference. Bad adapter files are written into the host's models/iqa_adapter
under unique `_reltest_<id>_` names and removed afterwards.

Figures (load counts, RSS, interrupt latency) are printed: run with `-s` to see them.
"""
from __future__ import annotations

import json
import math
import pathlib
import pickle
import re
import shutil
import struct
import time
import uuid

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from comfyui_iqa_adapter.adapter import checkpoint, projection, synthetic

from conftest import TINY_ADAPTER, TINY_CHECKPOINT, ComfyServer, PromptRejected, api_prompt_txt2img, \
    comfy_server_module

PACK_NODES = ["IQAAdapterLoader", "IQAAdapterEncodeTarget", "IQAAdapterApply", "IQAMetricLoader", "IQAScore"]
SCORE_METRIC = "piqe"  # weight-free pyiqa metric: scoring works without any downloaded file
RUN_ID = uuid.uuid4().hex[:8]


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def server(comfy_server):
    info = comfy_server.object_info()
    missing = [name for name in PACK_NODES if name not in info]
    if missing:
        pytest.skip(f"SKIPPED LOUDLY: the server has no {missing} (node modules not registered or failed to "
                    f"import; see {comfy_server.log_path})")
    return comfy_server


@pytest.fixture(scope="module")
def adapter_dir(server) -> pathlib.Path:
    return server.models_dir / "iqa_adapter"


@pytest.fixture(scope="module")
def tiny_adapter(adapter_dir):
    """The tiny adapter as read by the pack (its layer widths define what 'matching' files look like)."""
    return checkpoint.load_adapter(adapter_dir / TINY_ADAPTER)


class ScratchAdapters:
    """Test-made files in models/iqa_adapter: unique names, sidecar descriptor copied, all removed at the end."""

    def __init__(self, folder: pathlib.Path, sidecar: pathlib.Path):
        self.folder, self.sidecar, self.created = folder, sidecar, []

    def name(self, label: str, ext: str = ".safetensors") -> str:
        return f"_reltest_{RUN_ID}_{label}{ext}"

    def _track(self, path: pathlib.Path, with_sidecar: bool) -> None:
        self.created.append(path)
        if with_sidecar:
            json_path = path.with_suffix(".json")
            shutil.copyfile(self.sidecar, json_path)
            self.created.append(json_path)

    def write_bytes(self, label: str, data: bytes, ext: str = ".safetensors", sidecar: bool = True) -> str:
        name = self.name(label, ext)
        path = self.folder / name
        path.write_bytes(data)
        self._track(path, sidecar)
        return name

    def write_state_dict(self, label: str, state: dict, sidecar: bool = True) -> str:
        name = self.name(label)
        path = self.folder / name
        save_file(state, str(path))
        if path not in self.created:
            self._track(path, sidecar)
        return name

    def make_dir(self, label: str) -> str:
        name = self.name(label)
        path = self.folder / name
        path.mkdir()
        self.created.append(path)
        return name

    def cleanup(self) -> None:
        for path in reversed(self.created):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def scratch(adapter_dir):
    sidecar = adapter_dir / (pathlib.Path(TINY_ADAPTER).stem + ".json")
    made = ScratchAdapters(adapter_dir, sidecar)
    yield made
    made.cleanup()


def tiny_state(tiny_adapter, seed: int = 0, widths: list[int] | None = None, **overrides) -> dict:
    info = tiny_adapter.info
    kwargs = dict(cross_attention_dim=info.cross_attention_dim, layer_widths=widths or list(info.layer_widths),
                  num_tokens=info.num_tokens, input_dim=info.input_dim, projection_kind=info.projection_kind,
                  seed=seed)
    if info.mlp_hidden_dim:
        kwargs["mlp_hidden_dim"] = info.mlp_hidden_dim
    kwargs.update(overrides)
    return synthetic.random_adapter_state_dict(**kwargs)


def unique_prefix(label: str) -> str:
    return f"reltest/{RUN_ID}_{label}_{uuid.uuid4().hex[:6]}"


def tokens_graph(adapter_name: str, targets: str = "", target: float = 50.0, mode: str = "percentile") -> dict:
    """Loader -> EncodeTarget -> SaveTokens: exercises loading/encoding without sampling."""
    return {
        "10": {"class_type": "IQAAdapterLoader", "inputs": {"adapter_name": adapter_name}},
        "11": {"class_type": "IQAAdapterEncodeTarget", "inputs": {
            "adapter": ["10", 0], "quality": "custom", "percentile": target, "targets": targets, "mode": mode,
            "negative_scale": 0.0}},
        "13": {"class_type": "IQAAdapterSaveTokens", "inputs": {"tokens": ["11", 0],
                                                                "filename_prefix": unique_prefix("tokens")}},
    }


def adapter_graph(adapter_name: str = TINY_ADAPTER, targets: str = "", target: float = 90.0, mode: str = "percentile",
                  weight: float = 1.0, start_at: float = 0.0, end_at: float = 1.0, seed: int = 1, steps: int = 1,
                  batch: int = 1, prefix: str | None = None, score: bool = False, size: int = 64) -> dict:
    """txt2img (node ids 1..7) with the adapter on the model (10 loader, 11 encode, 12 apply), optional scoring (20, 21)."""
    prompt = api_prompt_txt2img(TINY_CHECKPOINT, seed=seed, steps=steps, width=size, height=size, batch=batch,
                                prefix=prefix or unique_prefix("iqa"))
    prompt["10"] = {"class_type": "IQAAdapterLoader", "inputs": {"adapter_name": adapter_name}}
    prompt["11"] = {"class_type": "IQAAdapterEncodeTarget", "inputs": {
        "adapter": ["10", 0], "quality": "custom", "percentile": target, "targets": targets, "mode": mode,
        "negative_scale": 0.0}}
    prompt["12"] = {"class_type": "IQAAdapterApply", "inputs": {
        "model": ["1", 0], "adapter": ["10", 0], "tokens": ["11", 0], "weight": weight, "start_at": start_at,
        "end_at": end_at}}
    prompt["5"]["inputs"]["model"] = ["12", 0]
    if score:
        add_score(prompt, ["6", 0])
    return prompt


def add_score(prompt: dict, images, metric: str = SCORE_METRIC, differentiable: bool = False) -> dict:
    prompt["20"] = {"class_type": "IQAMetricLoader", "inputs": {"metric": metric, "device": "cpu",
                                                                "differentiable": differentiable}}
    prompt["21"] = {"class_type": "IQAScore", "inputs": {
        "images": images, "metric": ["20", 0], "chunk_size": 8, "save_rows": "none",
        "filename_prefix": unique_prefix("scores")}}
    return prompt


def score_graph(image_nodes: dict, image_ref) -> dict:
    return add_score(dict(image_nodes), image_ref)


def healthy(server) -> None:
    assert server.alive(), f"the server died:\n{server.log_tail()}"
    info = server.get("/object_info/IQAAdapterLoader", timeout=60)
    assert "IQAAdapterLoader" in info, "the server no longer answers /object_info"


def expect_exec_error(server, prompt: dict, node: str, *needles: str, timeout: float = 300) -> str:
    """The prompt is accepted, fails while running, and the error names `node` and every needle."""
    result = server.run(prompt, timeout=timeout)
    assert not result.ok, f"expected an error from {node}, but the prompt succeeded: {result.outputs}"
    message = result.error_message()
    assert node in message, f"error does not name {node}: {message!r}"
    for needle in needles:
        assert needle.lower() in message.lower(), f"error lacks {needle!r}: {message!r}"
    healthy(server)
    return message


def expect_rejected(server, prompt: dict, node_class: str, input_name: str) -> str:
    """Refused at validation (HTTP 400) with an error on `node_class` naming `input_name`."""
    with pytest.raises(PromptRejected) as caught:
        server.queue(prompt)
    body = caught.value.body
    node_errors = body.get("node_errors", {})
    text = json.dumps(node_errors)
    assert any(entry.get("class_type") == node_class for entry in node_errors.values()), \
        f"rejection does not name {node_class}: {json.dumps(body)[:1500]}"
    assert input_name in text, f"rejection does not name the input {input_name!r}: {text[:1500]}"
    healthy(server)
    return text


def expect_refused(server, prompt: dict, node: str, input_name: str, *needles: str) -> str:
    """Either rejected at validation or failing at run time; both must name the node and the input.

    ComfyUI 0.3.75 does not check V3 combo values against their options at validation, so a node has to
    reject unknown combo values itself."""
    try:
        prompt_id = server.queue(prompt)
    except PromptRejected as rejected:
        text = json.dumps(rejected.body.get("node_errors", {}))
        assert node in text and input_name in text, text[:1500]
        healthy(server)
        return text
    result = server.wait(prompt_id, timeout=300)
    assert not result.ok, f"expected an error from {node}, but the prompt succeeded"
    message = result.error_message()
    for needle in (node, input_name, *needles):
        assert needle.lower() in message.lower(), f"error lacks {needle!r}: {message!r}"
    healthy(server)
    return message


def image_array(server, result, node: str = "7") -> np.ndarray:
    images = result.images(node)
    assert images, f"no image from node {node}: {result.outputs}"
    return np.asarray(Image.open(server.output_file(images[0])))


# ---------------------------------------------------------------- bad files

def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


class _OpenOnUnpickle:
    """Unpickling this would create the marker file (what a malicious .bin does, harmlessly)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_truncated_safetensors(server, scratch, adapter_dir):
    data = (adapter_dir / TINY_ADAPTER).read_bytes()
    name = scratch.write_bytes("truncated", data[: len(data) // 2])
    expect_exec_error(server, tokens_graph(name), "IQAAdapterLoader", "adapter_name", "truncated")
    name = scratch.write_bytes("truncated5", data[:5])
    expect_exec_error(server, tokens_graph(name), "IQAAdapterLoader", "adapter_name", "truncated")


def test_safetensors_header_lies_about_sizes(server, scratch):
    header = {"image_proj.proj.weight": {"dtype": "F32", "shape": [1536, 2], "data_offsets": [0, 1536 * 2 * 4]}}
    name = scratch.write_bytes("lying_header", _safetensors_bytes(header, b"\0" * 16))
    expect_exec_error(server, tokens_graph(name), "IQAAdapterLoader", "adapter_name", "image_proj.proj.weight")
    # header length field larger than the file
    name = scratch.write_bytes("lying_length", struct.pack("<Q", 10 ** 12) + b"{}")
    expect_exec_error(server, tokens_graph(name), "IQAAdapterLoader", "adapter_name", "header")
    # not JSON at all
    name = scratch.write_bytes("garbage_header", struct.pack("<Q", 16) + b"\xff" * 16)
    expect_exec_error(server, tokens_graph(name), "IQAAdapterLoader", "adapter_name", "header")


def test_integer_tensors(server, scratch, tiny_adapter):
    state = {key: (value * 100).to(torch.int32) for key, value in tiny_state(tiny_adapter).items()}
    name = scratch.write_state_dict("int_dtype", state)
    expect_exec_error(server, tokens_graph(name), "IQAAdapterLoader", "adapter_name", "floating-point")


def test_nan_weights(server, scratch, tiny_adapter):
    state = tiny_state(tiny_adapter)
    state["ip_adapter.1.to_k_ip.weight"][0, 0] = float("nan")
    name = scratch.write_state_dict("nan_weights", state)
    expect_exec_error(server, tokens_graph(name), "IQAAdapterLoader", "adapter_name", "NaN")


def test_missing_layer_in_the_middle(server, scratch, tiny_adapter):
    state = tiny_state(tiny_adapter)
    del state["ip_adapter.3.to_k_ip.weight"], state["ip_adapter.3.to_v_ip.weight"]
    name = scratch.write_state_dict("gap_layer", state)
    expect_exec_error(server, tokens_graph(name), "IQAAdapterLoader", "adapter_name", "ip_adapter")
    state = tiny_state(tiny_adapter)
    del state["ip_adapter.5.to_v_ip.weight"]  # to_k without its to_v
    name = scratch.write_state_dict("half_layer", state)
    expect_exec_error(server, tokens_graph(name), "IQAAdapterLoader", "adapter_name", "ip_adapter.5")


def test_unknown_keys(server, scratch, tiny_adapter):
    state = tiny_state(tiny_adapter)
    state["unet.something.weight"] = torch.zeros(3)
    name = scratch.write_state_dict("extra_key", state)
    expect_exec_error(server, tokens_graph(name), "IQAAdapterLoader", "adapter_name", "unet.something.weight")


def test_fewer_or_more_layers_than_the_model(server, scratch, tiny_adapter):
    widths = list(tiny_adapter.info.layer_widths)
    fewer = scratch.write_state_dict("fewer_layers", tiny_state(tiny_adapter, widths=widths[:-1]))
    expect_exec_error(server, adapter_graph(fewer), "IQAAdapterApply", "adapter")
    more = scratch.write_state_dict("more_layers", tiny_state(tiny_adapter, widths=widths + [320]))
    expect_exec_error(server, adapter_graph(more), "IQAAdapterApply", "adapter")
    swapped = scratch.write_state_dict("wrong_widths", tiny_state(tiny_adapter, widths=list(reversed(widths))))
    if list(reversed(widths)) != widths:
        expect_exec_error(server, adapter_graph(swapped), "IQAAdapterApply", "adapter")
    sd2 = scratch.write_state_dict("wrong_context", tiny_state(tiny_adapter, cross_attention_dim=1024))
    expect_exec_error(server, adapter_graph(sd2), "IQAAdapterApply", "adapter")


def test_pickle_bin_is_never_executed(server, scratch, tiny_adapter, tmp_path):
    marker = tmp_path / "pickle_ran_code.txt"
    payload = synthetic.nested_bin_layout(tiny_state(tiny_adapter))
    payload["image_proj"]["evil"] = _OpenOnUnpickle(str(marker))
    bin_path = tmp_path / "evil.bin"
    torch.save(payload, bin_path)
    name = scratch.write_bytes("evil", bin_path.read_bytes(), ext=".bin")
    expect_exec_error(server, tokens_graph(name), "IQAAdapterLoader", "adapter_name", "refused")
    assert not marker.exists(), "SECURITY: loading the .bin ran code from the pickle"
    # a plain legacy pickle (not torch's zip format) with the same trick
    name = scratch.write_bytes("evil_legacy", pickle.dumps({"image_proj": _OpenOnUnpickle(str(marker))}), ext=".bin")
    expect_exec_error(server, tokens_graph(name), "IQAAdapterLoader", "adapter_name")
    assert not marker.exists(), "SECURITY: loading the legacy pickle ran code"


def test_empty_file(server, scratch):
    name = scratch.write_bytes("empty", b"")
    expect_exec_error(server, tokens_graph(name), "IQAAdapterLoader", "adapter_name", "empty")


def test_directory_named_like_a_model(server, scratch):
    name = scratch.make_dir("folder")
    (scratch.folder / name / "inside.txt").write_text("not a model")
    try:
        result = server.run(tokens_graph(name), timeout=120)
    except PromptRejected as rejected:  # not a file, so not in the combo: refused at validation
        text = json.dumps(rejected.body.get("node_errors", {}))
        assert "IQAAdapterLoader" in text and "adapter_name" in text and name in text, text[:1500]
    else:
        assert not result.ok
        message = result.error_message()
        assert "IQAAdapterLoader" in message and "adapter_name" in message, message
        assert "directory" in message.lower() or "not found" in message.lower(), message
    healthy(server)


def test_adapter_without_descriptor_or_sidecar(server, scratch, tiny_adapter):
    name = scratch.write_state_dict("no_sidecar", tiny_state(tiny_adapter), sidecar=False)
    message = server.run(tokens_graph(name), timeout=120)
    if message.ok:  # a catalog fallback is allowed, but then the tokens must exist
        assert message.outputs.get("13"), message.outputs
    else:
        text = message.error_message()
        assert "IQAAdapterLoader" in text and "adapter_name" in text, text
        assert "json" in text.lower() or "descriptor" in text.lower(), text
    healthy(server)


# ---------------------------------------------------------------- bad values

@pytest.mark.parametrize("targets, needle", [
    ("topiq_nr=nan, laion_aes=50", "finite"),
    ("topiq_nr=inf, laion_aes=50", "finite"),
    ("topiq_nr=-inf, laion_aes=50", "finite"),
    ("topiq_nr=-5, laion_aes=50", "(0, 100)"),
    ("topiq_nr=0, laion_aes=50", "(0, 100)"),
    ("topiq_nr=100, laion_aes=50", "(0, 100)"),
    ("topiq_nr=1e300, laion_aes=50", "(0, 100)"),
    ("topiq_nr=50, laion_aes=150", "(0, 100)"),
    (" ; ;", "no targets"),
    ("topiq_nr=", "topiq_nr"),
    ("topiq_nr=abc", "not a number"),
    ("topiq_nr=50, topiq_nr=60", "twice"),
    ("not_a_metric=50", "not_a_metric"),
])
def test_bad_targets_text(server, targets, needle):
    expect_refused(server, tokens_graph(TINY_ADAPTER, targets=targets), "IQAAdapterEncodeTarget", "targets",
                   needle)


def test_bad_target_widget(server):
    expect_rejected(server, tokens_graph(TINY_ADAPTER, target=100.0), "IQAAdapterEncodeTarget", "percentile")
    expect_rejected(server, tokens_graph(TINY_ADAPTER, target=-3.0), "IQAAdapterEncodeTarget", "percentile")
    expect_rejected(server, tokens_graph(TINY_ADAPTER, target=1e9), "IQAAdapterEncodeTarget", "percentile")
    expect_refused(server, tokens_graph(TINY_ADAPTER, mode="percentage"), "IQAAdapterEncodeTarget", "mode")


def test_huge_zscore_and_raw_targets_stay_finite_or_fail_clearly(server):
    for mode, targets in (("zscore", "topiq_nr=1e30, laion_aes=-1e30"), ("raw", "topiq_nr=1e300, laion_aes=0")):
        result = server.run(adapter_graph(targets=targets, mode=mode, seed=31), timeout=300)
        if result.ok:
            pixels = image_array(server, result)
            assert np.isfinite(pixels).all() and pixels.std() > 0, f"{mode}: degenerate image"
        else:
            message = result.error_message()
            assert "IQAAdapterEncodeTarget" in message and "targets" in message, message
        healthy(server)


def test_weight_and_schedule_values(server):
    expect_rejected(server, adapter_graph(weight=10.0), "IQAAdapterApply", "weight")
    expect_rejected(server, adapter_graph(weight=-3.0), "IQAAdapterApply", "weight")
    expect_rejected(server, adapter_graph(start_at=-0.5), "IQAAdapterApply", "start_at")
    expect_rejected(server, adapter_graph(end_at=1.5), "IQAAdapterApply", "end_at")
    # NaN passes the host's min/max comparison: the node must catch it
    expect_exec_error(server, adapter_graph(weight=float("nan")), "IQAAdapterApply", "weight", "finite")
    expect_rejected(server, adapter_graph(start_at=0.8, end_at=0.2), "IQAAdapterApply", "start_at")


def test_token_rows_do_not_match_latent_batch(server):
    prompt = adapter_graph(targets="topiq_nr=10, laion_aes=10; topiq_nr=90, laion_aes=90", batch=3, seed=41)
    expect_rejected(server, prompt, "IQAAdapterEncodeTarget", "targets")  # batch size literal: known at queue time
    prompt["13"] = {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["4", 0], "amount": 3}}
    prompt["4"]["inputs"]["batch_size"] = 1
    prompt["5"]["inputs"]["latent_image"] = ["13", 0]
    expect_exec_error(server, prompt, "IQAAdapterApply", "tokens", "2 targets", "3")
    # 1 row for a batch of 2 and 2 rows for 2 are both fine
    result = server.run(adapter_graph(targets="topiq_nr=10, laion_aes=10; topiq_nr=90, laion_aes=90", batch=2,
                                      seed=42), timeout=300)
    assert result.ok, result.error_message()
    assert len(result.images("7")) == 2


def _empty_image(width: int, height: int) -> dict:
    return {"30": {"class_type": "EmptyImage", "inputs": {"width": width, "height": height, "batch_size": 1,
                                                          "color": 0x336699}}}


def _score_text(result) -> str:
    return "".join(result.outputs.get("21", {}).get("text", []))


def test_score_tiny_images(server):
    for width, height in ((1, 1), (1, 64), (64, 1)):
        expect_exec_error(server, score_graph(_empty_image(width, height), ["30", 0]), "IQAScore", "images")


@pytest.mark.parametrize("width, height", [(2, 2), (7, 5), (33, 17), (65, 63)])
def test_score_odd_sizes(server, width, height):
    """Either a finite score or a clear IQAScore error; never a crash or an unnamed exception."""
    nodes = _empty_image(width, height)
    result = server.run(score_graph(nodes, ["30", 0]), timeout=300)
    if result.ok:
        text = _score_text(result)
        assert SCORE_METRIC in text, result.outputs
        numbers = [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:e[+-]?\d+)?|nan|inf", text)]
        assert numbers and all(math.isfinite(x) for x in numbers), f"{width}x{height}: {text}"
    else:
        message = result.error_message()
        assert "IQAScore" in message and "images" in message, f"{width}x{height}: unclear error {message!r}"
    healthy(server)


def test_score_grayscale_rgba_and_scaled_to_one_pixel(server):
    input_dir = server.input_dir
    rng = np.random.default_rng(5)
    gray = f"reltest_{RUN_ID}_gray.png"
    Image.fromarray((rng.random((64, 64)) * 255).astype(np.uint8), mode="L").save(input_dir / gray)
    rgba = f"reltest_{RUN_ID}_rgba.png"
    Image.fromarray((rng.random((64, 48, 4)) * 255).astype(np.uint8), mode="RGBA").save(input_dir / rgba)
    for file in (gray, rgba):
        nodes = {"30": {"class_type": "LoadImage", "inputs": {"image": file}}}
        result = server.run(score_graph(nodes, ["30", 0]), timeout=300)
        assert result.ok, f"{file}: {result.error_message()}"
        assert SCORE_METRIC in _score_text(result)
    # a real 4-channel IMAGE tensor (RGB + alpha)
    nodes = {
        "30": {"class_type": "LoadImage", "inputs": {"image": rgba}},
        "31": {"class_type": "SolidMask", "inputs": {"value": 0.5, "width": 48, "height": 64}},
        "32": {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["30", 0], "alpha": ["31", 0]}},
    }
    result = server.run(score_graph(nodes, ["32", 0]), timeout=300)
    assert result.ok, f"RGBA tensor: {result.error_message()}"
    # an image scaled down to 1x1 by a host node
    nodes = {
        "30": {"class_type": "LoadImage", "inputs": {"image": gray}},
        "31": {"class_type": "ImageScale", "inputs": {"image": ["30", 0], "upscale_method": "nearest-exact",
                                                      "width": 1, "height": 1, "crop": "disabled"}},
    }
    expect_exec_error(server, score_graph(nodes, ["31", 0]), "IQAScore", "images", "1x1")


def test_unknown_metric_name_is_refused(server):
    prompt = score_graph(_empty_image(64, 64), ["30", 0])
    prompt["20"]["inputs"]["metric"] = "definitely_not_a_metric"
    expect_refused(server, prompt, "IQAMetricLoader", "metric", "definitely_not_a_metric")


# ---------------------------------------------------------------- load

BAD_KINDS = ["percentile", "nan_weight", "start_after_end", "one_pixel_score", "batch_mismatch", "truncated_file"]
QUEUE_TIME_KINDS = {"percentile", "start_after_end", "batch_mismatch"}


def _bad_prompt(kind: str, index: int, truncated_name: str) -> tuple[dict, str, tuple[str, ...]]:
    if kind == "percentile":
        return tokens_graph(TINY_ADAPTER, targets=f"topiq_nr={150 + index}, laion_aes=50"), "IQAAdapterEncodeTarget", ("(0, 100)",)
    if kind == "nan_weight":
        return adapter_graph(weight=float("nan"), seed=index), "IQAAdapterApply", ("finite",)
    if kind == "start_after_end":
        return adapter_graph(start_at=0.9, end_at=0.1, seed=index), "IQAAdapterApply", ("start_at",)
    if kind == "one_pixel_score":
        return score_graph(_empty_image(1, 1 + index % 2), ["30", 0]), "IQAScore", ("images",)
    if kind == "batch_mismatch":
        return (adapter_graph(targets="topiq_nr=10, laion_aes=10; topiq_nr=90, laion_aes=90", batch=3, seed=index),
                "IQAAdapterEncodeTarget", ("targets",))
    return tokens_graph(truncated_name), "IQAAdapterLoader", ("truncated",)


def test_load_100_prompts_30_bad(server, scratch, adapter_dir):
    """100 prompts queued at once; 30 bad, 35 plain, 35 with the adapter + scoring.

    Cheap on purpose (64x64, 1 step): 5 distinct seeds per good kind really sample, the other good prompts
    differ only by filename prefix (the host reuses the cached latents; SaveImage still writes each file).
    """
    data = (adapter_dir / TINY_ADAPTER).read_bytes()
    truncated = scratch.write_bytes("load_truncated", data[: len(data) // 3])
    jobs = []  # (kind, expected node or None, needles, prompt)
    for i in range(35):
        jobs.append(("plain", None, (), api_prompt_txt2img(TINY_CHECKPOINT, seed=91000 + i % 5, steps=1,
                                                          prefix=unique_prefix(f"load_plain{i}"))))
        jobs.append(("iqa", None, (), adapter_graph(target=20 + (i % 5) * 15, seed=92000 + i % 5, steps=1,
                                                    prefix=unique_prefix(f"load_iqa{i}"), score=True)))
    for i in range(30):
        kind = BAD_KINDS[i % len(BAD_KINDS)]
        prompt, node, needles = _bad_prompt(kind, i, truncated)
        jobs.append(("bad:" + kind, node, needles, prompt))
    order = np.random.default_rng(0).permutation(len(jobs))
    jobs = [jobs[i] for i in order]

    started = time.monotonic()
    queued, rejected = [], []
    for job in jobs:
        try:
            queued.append((job, server.queue(job[3])))
        except PromptRejected as error:
            rejected.append((job, error))
    survived, lost, failures = 0, 0, []
    for (kind, node, needles, prompt), prompt_id in queued:
        try:
            result = server.wait(prompt_id, timeout=900)
        except (TimeoutError, RuntimeError) as error:
            lost += 1
            failures.append(f"{kind}: lost ({error})")
            continue
        if node is None:
            images = result.images("7")
            good = result.ok and len(images) == 1 and server.output_file(images[0]).exists()
            if good:
                with Image.open(server.output_file(images[0])) as png:
                    good = png.size == (64, 64)
            if good and kind == "iqa":
                good = SCORE_METRIC in _score_text(result)
            detail = result.error_message() or str(result.outputs)[:300]
        else:
            message = result.error_message()
            good = (not result.ok) and node in message and all(n.lower() in message.lower() for n in needles)
            detail = message
        if good:
            survived += 1
        else:
            lost += 1
            failures.append(f"{kind}: {detail}")
    for (kind, node, needles, prompt), error in rejected:
        # mistakes the graph shows (ranges, start > end, rows vs a literal batch size) are refused at queue time
        if node is not None and kind.removeprefix("bad:") in QUEUE_TIME_KINDS and node in json.dumps(error.body.get("node_errors", {})):
            survived += 1
            continue
        lost += 1
        failures.append(f"{kind}: unexpectedly rejected at validation: {error}")
    elapsed = time.monotonic() - started
    print(f"\n[load] tried {len(jobs)}, survived {survived}, lost {lost} "
          f"(good 70, bad 30, rejected at validation {len(rejected)}) in {elapsed:.1f} s")
    healthy(server)
    assert lost == 0, "\n".join(failures[:20])
    assert survived == 100


# ---------------------------------------------------------------- isolation and stale caches

def test_patched_prompt_leaves_the_cached_model_clean(server, tmp_path):
    seed = 777001
    patched = server.run(adapter_graph(seed=seed, steps=2, weight=1.5, prefix=unique_prefix("iso_patched")), timeout=600)
    assert patched.ok, patched.error_message()
    plain = server.run(api_prompt_txt2img(TINY_CHECKPOINT, seed=seed, steps=2, prefix=unique_prefix("iso_plain")),
                       timeout=600)
    assert plain.ok, plain.error_message()
    patched_pixels, plain_pixels = image_array(server, patched), image_array(server, plain)
    assert not np.array_equal(patched_pixels, plain_pixels), "the adapter changed nothing: the check would be vacuous"

    with ComfyServer(tmp_path / "fresh", comfy_server_module.host_dir()) as fresh:
        reference = fresh.run(api_prompt_txt2img(TINY_CHECKPOINT, seed=seed, steps=2, prefix="iso_reference"),
                              timeout=600)
        assert reference.ok, reference.error_message()
        reference_pixels = image_array(fresh, reference)
    difference = np.abs(plain_pixels.astype(int) - reference_pixels.astype(int)).max()
    print(f"\n[isolation] plain-after-patched vs fresh server: max pixel difference {difference}")
    assert np.array_equal(plain_pixels, reference_pixels), \
        f"the session model was altered by the patched prompt (max pixel difference {difference})"


def test_replaced_adapter_file_is_read_again(server, scratch, tiny_adapter):
    name = scratch.write_state_dict("swap", tiny_state(tiny_adapter, seed=1))
    images = []
    for seed_of_weights in (1, 2, 1):
        if images:
            time.sleep(0.05)  # distinct mtime_ns even on coarse clocks
            save_file(tiny_state(tiny_adapter, seed=seed_of_weights), str(scratch.folder / name))
        result = server.run(adapter_graph(name, seed=555, steps=1, weight=2.0, prefix=unique_prefix("swap")),
                            timeout=600)
        assert result.ok, result.error_message()
        images.append(image_array(server, result))
    assert not np.array_equal(images[0], images[1]), "new weights on disk, same image: stale adapter cache"
    assert np.array_equal(images[0], images[2]), "the same weights written back gave another image"


# ---------------------------------------------------------------- memory

def _rss_kib(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def test_memory_rss_stable_over_50_patched_scored_prompts(server):
    pid = server.process.pid
    rss = []
    for i in range(50):
        prompt = adapter_graph(target=5 + i * 1.7, seed=880000 + i, steps=1, score=True,
                               prefix=unique_prefix(f"mem{i}"))
        result = server.run(prompt, timeout=600)
        assert result.ok, f"prompt {i}: {result.error_message()}"
        rss.append(_rss_kib(pid))
    after_5, after_50 = rss[4], rss[-1]
    growth = after_50 / after_5 - 1
    print(f"\n[memory] server RSS after 5 prompts {after_5 / 1024:.1f} MiB, after 50 {after_50 / 1024:.1f} MiB "
          f"({growth * 100:+.2f} %), min {min(rss) / 1024:.1f}, max {max(rss) / 1024:.1f} MiB")
    assert growth <= 0.05, f"RSS grew {growth * 100:.1f} % from prompt 5 to prompt 50: {rss}"


# ---------------------------------------------------------------- interrupt

def _progress_steps(log_slice: str, total: int) -> int:
    found = re.findall(rf"(\d+)/{total} \[", log_slice)
    return int(found[-1]) if found else 0


def _interrupt_long_run(server, prompt: dict, steps: int, label: str) -> None:
    log_start = len(server.log_text())
    prompt_id = server.queue(prompt)
    seen, deadline = {}, time.monotonic() + 600
    while time.monotonic() < deadline:  # wait for two finished steps, timing the second
        done = _progress_steps(server.log_text()[log_start:], steps)
        if done and done not in seen:
            seen[done] = time.monotonic()
        if len(seen) >= 3:
            break
        if server.get(f"/history/{prompt_id}").get(prompt_id):
            pytest.fail(f"{label}: the prompt ended before it could be interrupted")
        time.sleep(0.05)
    else:
        pytest.fail(f"{label}: no sampling progress within 600 s")
    marks = sorted(seen.items())
    step_time = (marks[-1][1] - marks[0][1]) / max(marks[-1][0] - marks[0][0], 1)
    interrupted_at = time.monotonic()
    server.interrupt()
    result = server.wait(prompt_id, timeout=300)
    latency = time.monotonic() - interrupted_at
    steps_done = _progress_steps(server.log_text()[log_start:], steps)
    print(f"\n[interrupt] {label}: stopped {latency:.2f} s after /interrupt (one step ~{step_time:.2f} s), "
          f"at step {steps_done}/{steps}, status {result.status}")
    assert not result.ok, f"{label}: the prompt completed despite the interrupt"
    assert any(kind == "execution_interrupted" for kind, _ in result.messages), result.messages
    assert latency < max(5.0, 3 * step_time + 1.0), f"{label}: took {latency:.1f} s to stop (step {step_time:.2f} s)"
    after = server.run(api_prompt_txt2img(TINY_CHECKPOINT, seed=int(time.time()) % 100000, steps=1,
                                          prefix=unique_prefix("after_interrupt")), timeout=600)
    assert after.ok, f"{label}: the next prompt failed: {after.error_message()}"
    healthy(server)


def test_interrupt_adapter_sampling(server):
    steps = 200
    _interrupt_long_run(server, adapter_graph(seed=int(time.time()) % 100000, steps=steps,
                                              prefix=unique_prefix("interrupt")), steps, "adapter, 200 steps")


def test_interrupt_guidance_sampling(server):
    if "IQAGradientGuidance" not in server.object_info():
        pytest.skip("SKIPPED LOUDLY: IQAGradientGuidance is not registered on the server")
    steps = 200
    prompt = adapter_graph(seed=int(time.time()) % 100000 + 1, steps=steps, prefix=unique_prefix("interrupt_g"))
    add_score(prompt, ["6", 0], differentiable=True)
    prompt["40"] = {"class_type": "IQAGradientGuidance", "inputs": {
        "model": ["12", 0], "vae": ["1", 2], "metric": ["20", 0], "scale": 1.0, "start_at": 0.0, "end_at": 1.0,
        "decoder": "vae", "normalization": "none", "target": "raise", "max_resolution": 0, "chunk_size": 4}}
    prompt["5"]["inputs"]["model"] = ["40", 0]
    _interrupt_long_run(server, prompt, steps, "adapter + gradient guidance, 200 steps")


# ---------------------------------------------------------------- hardening (issue 14): one test per class

def _write_tokens_file(folder: pathlib.Path, label: str, rows: int, fill: float = 0.5, num_tokens: int = 2,
                       width: int = 768) -> str:
    """A tokens file in the Save Tokens format, written directly (QualityTokens refuses such values itself)."""
    name = f"reltest_{RUN_ID}_{label}.safetensors"
    cond = torch.full((rows, num_tokens, width), fill, dtype=torch.float32)
    metadata = {"format": "iqa_adapter_quality_tokens", "version": "1", "num_tokens": str(num_tokens),
                "cross_attention_dim": str(width), "labels": "[]"}
    save_file({"cond": cond, "uncond": cond.clone()}, str(folder / name), metadata=metadata)
    return name


def load_tokens_graph(file: str, apply: bool = False) -> dict:
    """LoadTokens -> SaveTokens, or (apply) -> IQAAdapterApply on the tiny model and one sampler step."""
    if apply:
        prompt = adapter_graph(seed=5, steps=1)
        prompt["11"] = {"class_type": "IQAAdapterLoadTokens", "inputs": {"file": file}}
        return prompt
    return {"11": {"class_type": "IQAAdapterLoadTokens", "inputs": {"file": file}},
            "13": {"class_type": "IQAAdapterSaveTokens", "inputs": {"tokens": ["11", 0],
                                                                    "filename_prefix": unique_prefix("tokens")}}}


def sweep_tokens_graph(hold: str = "", mode: str = "zscore", start: float = -1.0, stop: float = 1.0,
                       steps: int = 3, metrics: str = "topiq_nr") -> dict:
    return {
        "10": {"class_type": "IQAAdapterLoader", "inputs": {"adapter_name": TINY_ADAPTER}},
        "14": {"class_type": "IQATargetSweep", "inputs": {
            "adapter": ["10", 0], "metrics": metrics, "start": start, "stop": stop, "steps": steps, "mode": mode,
            "spacing": "linear", "hold": hold, "negative_scale": 0.0}},
        "13": {"class_type": "IQAAdapterSaveTokens", "inputs": {"tokens": ["14", 0],
                                                                "filename_prefix": unique_prefix("sweep_tokens")}},
    }


def test_class1_memory_is_bounded_for_small_inputs(server, scratch, tiny_adapter):
    """Thousands of target rows, a token file of thousands of rows, a 2 KB torch file of zero-stride views
    claiming gigabytes: each is refused before anything is materialised, and the server's RSS stays put."""
    pid = server.process.pid
    # the checkpoint, the adapter and the pack are loaded first: a normal prompt
    warm = server.run(adapter_graph(seed=4, steps=1, prefix=unique_prefix("warm")), timeout=600)
    assert warm.ok, warm.error_message()
    before = _rss_kib(pid)
    text = "\n".join(f"topiq_nr={5 + i % 90}, laion_aes=50" for i in range(8000))  # ~230 KB of text
    expect_exec_error(server, tokens_graph(TINY_ADAPTER, targets=text), "IQAAdapterEncodeTarget", "targets",
                      "8000 target rows", "at most")
    many = _write_tokens_file(server.input_dir, "rows5000", 5000)
    expect_exec_error(server, load_tokens_graph(many), "IQAAdapterLoadTokens", "file", "5000 token rows", "at most")
    limit = projection.max_rows_for(tiny_adapter.info)
    over = _write_tokens_file(server.input_dir, "rows_over_arch", limit + 1)
    expect_exec_error(server, load_tokens_graph(over, apply=True), "IQAAdapterApply", "tokens",
                      f"at most {limit}")
    # every tensor a zero-stride view of one stored float; one of them claims 10 GB
    state = synthetic.nested_bin_layout({key: torch.zeros(1).expand(*value.shape)
                                         for key, value in tiny_state(tiny_adapter).items()})
    state["ip_adapter"]["1.to_k_ip.weight"] = torch.zeros(1).expand(50_000, 50_000)
    path = scratch.folder / scratch.name("zero_stride", ".bin")
    torch.save(state, path)
    assert path.stat().st_size < 64 * 1024, path.stat().st_size
    scratch._track(path, with_sidecar=True)
    expect_exec_error(server, tokens_graph(path.name), "IQAAdapterLoader", "adapter_name", "expanded view",
                      "refused before allocating")
    after = _rss_kib(pid)
    print(f"\n[hardening memory] server RSS before the memory cases {before / 1024:.1f} MiB, after "
          f"{after / 1024:.1f} MiB ({(after - before) / 1024:+.1f} MiB; 8000 target rows, a 5000-row token file, "
          f"{limit + 1} token rows for the tiny adapter's limit {limit}, a zero-stride .bin claiming 10 GB)")
    assert after - before < 150 * 1024, f"the server grew {(after - before) / 1024:.0f} MiB on refused inputs"


def test_class2_no_silent_black_images(server):
    """Huge-but-finite values are refused on every token path, naming the input that carries them."""
    expect_exec_error(server, sweep_tokens_graph(hold="1e30"), "IQATargetSweep", "hold")
    expect_exec_error(server, sweep_tokens_graph(hold="1e15"), "IQATargetSweep", "hold")
    message = expect_exec_error(server, sweep_tokens_graph(mode="raw", start=1.0, stop=999.0), "IQATargetSweep")
    assert ": start: " in message or ": stop: " in message, message
    for label, fill in (("huge", 1e30), ("nan", float("nan")), ("big", 5e4)):
        name = _write_tokens_file(server.input_dir, f"tokens_{label}", 2, fill=fill)
        expect_exec_error(server, load_tokens_graph(name), "IQAAdapterLoadTokens", "file", "quality tokens")
    # and the encode node, as before
    expect_refused(server, tokens_graph(TINY_ADAPTER, targets="topiq_nr=1e30, laion_aes=0", mode="zscore"),
                   "IQAAdapterEncodeTarget", "targets")


def _report_graph(prefix: str, seed: int = 1) -> dict:
    graph = sweep_tokens_graph(mode="percentile", start=10.0, stop=90.0, steps=3)
    del graph["13"]
    graph["30"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": ["14", 2],
                                                          "color": 0x336699}}
    graph["20"] = {"class_type": "IQAMetricLoader", "inputs": {"metric": SCORE_METRIC, "device": "cpu",
                                                               "differentiable": False}}
    graph["40"] = {"class_type": "IQASweepReport", "inputs": {
        "images": ["30", 0], "targets": ["14", 1], "metric": ["20", 0], "filename_prefix": prefix}}
    graph["30"]["inputs"]["color"] = 0x336699 + seed  # a different prompt each time (the host caches identical ones)
    return graph


def test_class3_files_never_overwritten_and_safe_to_open(server):
    prefix = unique_prefix("report")
    runs = []
    for seed in (1, 2):
        result = server.run(_report_graph(prefix, seed=seed), timeout=600)
        assert result.ok, result.error_message()
        report = json.loads(result.outputs["40"]["report"][0])
        runs.append({kind: server.output_dir / rel for kind, rel in report["files"].items()})
        if seed == 1:
            first_csv = runs[0]["csv"].read_bytes()
            # the host's counter only counts image names: without the images it starts at 1 again
            for image in runs[0]["csv"].parent.glob(runs[0]["csv"].stem + "_img*.png"):
                image.unlink()
    assert set(runs[0].values()).isdisjoint(runs[1].values()), f"the second report reused a file: {runs}"
    assert runs[0]["csv"].read_bytes() == first_csv and runs[0]["json"].exists()
    # scoring never appends to a CSV it did not write
    foreign_prefix = unique_prefix("foreign")
    foreign = server.output_dir / f"{foreign_prefix}.csv"
    foreign.parent.mkdir(parents=True, exist_ok=True)
    foreign.write_text("name,amount\nalice,3\n")
    prompt = score_graph(_empty_image(64, 64), ["30", 0])
    prompt["21"]["inputs"].update(save_rows="csv", filename_prefix=foreign_prefix)
    for color in (0x336699, 0x996633):  # two different prompts (the host would reuse a cached identical one)
        prompt["30"]["inputs"]["color"] = color
        result = server.run(prompt, timeout=300)
        assert result.ok, result.error_message()
    assert foreign.read_text() == "name,amount\nalice,3\n", "scores were appended to a foreign CSV"
    ours = foreign.with_name(foreign.stem + "_2.csv")
    lines = ours.read_text().splitlines()
    assert lines[0].startswith("timestamp,") or "metric" in lines[0], lines[:2]
    assert len(lines) == 3, f"two runs should append two rows under one header: {lines}"
    healthy(server)


def test_class4_every_error_names_node_and_input(server, scratch, tiny_adapter):
    # the right input is blamed
    prompt = tokens_graph(TINY_ADAPTER)
    prompt["11"]["inputs"]["negative_scale"] = float("nan")
    expect_refused(server, prompt, "IQAAdapterEncodeTarget", "negative_scale")
    message = expect_exec_error(server, sweep_tokens_graph(hold="not a number"), "IQATargetSweep", "hold")
    assert ": hold: " in message, message
    if "IQAGradientGuidance" in server.object_info():
        guided = adapter_graph(seed=3, steps=1)
        add_score(guided, ["6", 0], differentiable=True)
        guided["40"] = {"class_type": "IQAGradientGuidance", "inputs": {
            "model": ["12", 0], "vae": ["1", 2], "metric": ["20", 0], "scale": 1.0, "start_at": 0.0, "end_at": 1.0,
            "decoder": "vae", "normalization": "none", "target": "raise", "max_resolution": 8, "chunk_size": 4}}
        guided["5"]["inputs"]["model"] = ["40", 0]
        expect_refused(server, guided, "IQAGradientGuidance", "max_resolution")
    # paths: NUL bytes, over-long names
    save = tokens_graph(TINY_ADAPTER)
    save["13"]["inputs"]["filename_prefix"] = "bad\x00name"
    expect_exec_error(server, save, "IQAAdapterSaveTokens", "filename_prefix", "NUL")
    save["13"]["inputs"]["filename_prefix"] = "reltest/" + "n" * 300
    expect_exec_error(server, save, "IQAAdapterSaveTokens", "filename_prefix", "longer than")
    expect_refused(server, load_tokens_graph("x\x00y.safetensors"), "IQAAdapterLoadTokens", "file")
    # unbounded user input is quoted shortened
    message = expect_refused(server, tokens_graph("a" * 1_000_000), "IQAAdapterLoader", "adapter_name")
    assert len(message) < 4000, f"a 1 MB name gave a {len(message)}-character message"
    message = expect_refused(server, tokens_graph(TINY_ADAPTER, targets="topiq_nr=" + "9x" * 500_000),
                             "IQAAdapterEncodeTarget", "targets")
    assert len(message) < 4000, f"a 1 MB target gave a {len(message)}-character message"
    # hostile files: deep JSON, numbers too large, sparse and meta tensors
    deep_sidecar = scratch.write_state_dict("deep_sidecar", tiny_state(tiny_adapter), sidecar=False)
    (scratch.folder / deep_sidecar).with_suffix(".json").write_text("[" * 200_000 + "]" * 200_000)
    scratch.created.append((scratch.folder / deep_sidecar).with_suffix(".json"))
    expect_exec_error(server, tokens_graph(deep_sidecar), "IQAAdapterLoader", "adapter_name", "nested too deeply")
    huge_std = scratch.write_state_dict("huge_std", tiny_state(tiny_adapter), sidecar=False)
    (scratch.folder / huge_std).with_suffix(".json").write_text(
        '{"metrics": ["topiq_nr", "laion_aes"], "metric_stats": {"topiq_nr": {"mean": 1, "std": 1' + "0" * 400 + '}}}')
    scratch.created.append((scratch.folder / huge_std).with_suffix(".json"))
    expect_exec_error(server, tokens_graph(huge_std), "IQAAdapterLoader", "adapter_name", "finite")
    name = scratch.write_bytes("deep_header", _safetensors_bytes_raw(b"[" * 100_000 + b"]" * 100_000, b""))
    expect_exec_error(server, tokens_graph(name), "IQAAdapterLoader", "adapter_name", "nested too deeply")
    name = scratch.write_bytes("inf_dim", _safetensors_bytes_raw(
        b'{"image_proj.proj.weight": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}}', b"\0" * 8))
    expect_exec_error(server, tokens_graph(name), "IQAAdapterLoader", "adapter_name", "corrupt")
    for label, tensor, needle in (("sparse", torch.sparse_coo_tensor([[0]], [1.0], (4,)), "sparse"),
                                  ("meta", torch.empty(4, device="meta"), "meta")):
        state = synthetic.nested_bin_layout(tiny_state(tiny_adapter))
        state["image_proj"]["norm.bias"] = tensor
        path = scratch.folder / scratch.name(label, ".bin")
        torch.save(state, path)
        scratch._track(path, with_sidecar=True)
        expect_exec_error(server, tokens_graph(path.name), "IQAAdapterLoader", "adapter_name", needle)


def _safetensors_bytes_raw(header: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def test_class5_replaced_file_with_preserved_mtime_is_read_again(server, scratch, tiny_adapter):
    """`cp -p` / `rsync -t`: other weights, same size, same mtime; the adapter must be read again."""
    import os
    name = scratch.write_state_dict("preserved_mtime", tiny_state(tiny_adapter, seed=11))
    path = scratch.folder / name
    first = server.run(adapter_graph(name, seed=556, steps=1, weight=2.0, prefix=unique_prefix("mtime")), timeout=600)
    assert first.ok, first.error_message()
    stat = path.stat()
    save_file(tiny_state(tiny_adapter, seed=12), str(path))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    second = server.run(adapter_graph(name, seed=556, steps=1, weight=2.0, prefix=unique_prefix("mtime")), timeout=600)
    assert second.ok, second.error_message()
    assert not np.array_equal(image_array(server, first), image_array(server, second)), \
        "other weights with the same size and mtime gave the same image: stale cache"


def test_class6_empty_token_file_is_refused_at_load(server):
    name = _write_tokens_file(server.input_dir, "zero_rows", 0)
    expect_exec_error(server, load_tokens_graph(name), "IQAAdapterLoadTokens", "file", "no token rows")
