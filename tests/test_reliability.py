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
import re
import shutil
import time
import uuid

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from comfyui_iqa_adapter.adapter import iqa_adapter, projection
from comfyui_iqa_adapter.scripts import random_weights
from conftest import ComfyServer, PromptRejected, comfy_server_module
from support.bad_files import BAD_FILES_BY_NAME
from support.graphs import (
    SCORE_METRIC,
    TINY_ADAPTER,
    adapter_graph,
    add_guidance,
    add_score,
    empty_image,
    encode_target,
    txt2img,
    unique_prefix,
)
from support.host_models import ModelFiles

PACK_NODES = ["IQAAdapterLoader", "IQAAdapterEncodeTarget", "IQAAdapterApply", "IQAMetricLoader", "IQAScore"]
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
    return iqa_adapter.load_adapter(adapter_dir / TINY_ADAPTER)


class ScratchAdapters:
    """Test-made files in models/iqa_adapter: unique names, the tiny adapter's descriptor copied beside each."""

    def __init__(self, files: ModelFiles, sidecar: pathlib.Path):
        self.files, self.sidecar = files, sidecar
        self.folder = files.models_dir / "iqa_adapter"

    def name(self, label: str, ext: str = ".safetensors") -> str:
        return f"_reltest_{RUN_ID}_{label}{ext}"

    def path(self, label: str, ext: str = ".safetensors", sidecar: bool = True) -> pathlib.Path:
        path = self.files.path("iqa_adapter", self.name(label, ext))
        if sidecar:
            shutil.copyfile(self.sidecar, self.files.track(path.with_suffix(".json")))
        return path

    def write_bytes(self, label: str, data: bytes, ext: str = ".safetensors", sidecar: bool = True) -> str:
        path = self.path(label, ext, sidecar)
        path.write_bytes(data)
        return path.name

    def write_state_dict(self, label: str, state: dict, sidecar: bool = True) -> str:
        path = self.path(label, sidecar=sidecar)
        save_file(state, str(path))
        return path.name

    def make_dir(self, label: str) -> str:
        path = self.path(label, sidecar=False)
        path.mkdir()
        return path.name


@pytest.fixture(scope="module")
def scratch(adapter_dir, module_model_files):
    return ScratchAdapters(module_model_files, adapter_dir / (pathlib.Path(TINY_ADAPTER).stem + ".json"))


def tiny_state(tiny_adapter, seed: int = 0, widths: list[int] | None = None, **overrides) -> dict:
    info = tiny_adapter.info
    kwargs = dict(cross_attention_dim=info.cross_attention_dim, layer_widths=widths or list(info.layer_widths),
                  num_tokens=info.num_tokens, input_dim=info.input_dim, projection_kind=info.projection_kind,
                  seed=seed)
    if info.mlp_hidden_dim:
        kwargs["mlp_hidden_dim"] = info.mlp_hidden_dim
    kwargs.update(overrides)
    return random_weights.random_adapter_state_dict(**kwargs)


def tokens_graph(adapter_name: str, targets: str = "", target: float = 50.0, mode: str = "percentile") -> dict:
    """Loader -> EncodeTarget -> SaveTokens: exercises loading/encoding without sampling."""
    graph = encode_target(adapter_name, targets, target, mode)
    graph["13"] = {"class_type": "IQAAdapterSaveTokens", "inputs": {"tokens": ["11", 0],
                                                                    "filename_prefix": unique_prefix("tokens")}}
    return graph


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


def expect_rejected(server, prompt: dict, node_class: str, input_name: str, *needles: str,
                    kind: str | None = None) -> str:
    """Refused at validation (HTTP 400): an error on `node_class`'s `input_name` (of type `kind` where given:
    the host's own range or list check, or the pack's `custom_validation_failed`), the text naming every needle."""
    with pytest.raises(PromptRejected) as caught:
        server.queue(prompt)
    body = caught.value.body
    node_errors = body.get("node_errors", {})
    text = json.dumps(node_errors)
    found = [(error["type"], error.get("extra_info", {}).get("input_name"))
             for entry in node_errors.values() if entry.get("class_type") == node_class for error in entry["errors"]]
    assert any(name == input_name and (kind is None or error_kind == kind) for error_kind, name in found), \
        f"no {kind or 'error'} on {node_class}.{input_name}: {found} {json.dumps(body)[:1500]}"
    for needle in needles:
        assert needle.lower() in text.lower(), f"rejection lacks {needle!r}: {text[:1500]}"
    healthy(server)
    return text


def image_array(server, result, node: str = "7") -> np.ndarray:
    images = result.images(node)
    assert images, f"no image from node {node}: {result.outputs}"
    return np.asarray(Image.open(server.output_file(images[0])))


# ------------------------------------------------------- bad files (the file matrix itself: test_adapter_nodes.py)

def test_fewer_or_more_layers_than_the_model(server, scratch, tiny_adapter):
    widths = list(tiny_adapter.info.layer_widths)
    fewer = scratch.write_state_dict("fewer_layers", tiny_state(tiny_adapter, widths=widths[:-1]))
    expect_exec_error(server, adapter_graph(fewer, steps=1), "IQAAdapterApply", "adapter")
    more = scratch.write_state_dict("more_layers", tiny_state(tiny_adapter, widths=widths + [320]))
    expect_exec_error(server, adapter_graph(more, steps=1), "IQAAdapterApply", "adapter")
    swapped = scratch.write_state_dict("wrong_widths", tiny_state(tiny_adapter, widths=list(reversed(widths))))
    if list(reversed(widths)) != widths:
        expect_exec_error(server, adapter_graph(swapped, steps=1), "IQAAdapterApply", "adapter")
    sd2 = scratch.write_state_dict("wrong_context", tiny_state(tiny_adapter, cross_attention_dim=1024))
    expect_exec_error(server, adapter_graph(sd2, steps=1), "IQAAdapterApply", "adapter")


def test_directory_named_like_a_model(server, scratch):
    """Not a file, so not among the adapter files: the loader's own check refuses it at validation (both hosts:
    the host leaves inputs that a node validates itself to the node)."""
    name = scratch.make_dir("folder")
    (scratch.folder / name / "inside.txt").write_text("not a model")
    expect_rejected(server, tokens_graph(name), "IQAAdapterLoader", "adapter_name", name, "is not in")


def test_adapter_without_descriptor_or_sidecar(server, scratch, tiny_adapter):
    """A name no catalog entry matches and no sidecar: refused when loading, saying how to describe it."""
    name = scratch.write_state_dict("no_sidecar", tiny_state(tiny_adapter), sidecar=False)
    expect_exec_error(server, tokens_graph(name), "IQAAdapterLoader", "adapter_name", "no descriptor",
                      pathlib.Path(name).stem + ".json")


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
    expect_rejected(server, tokens_graph(TINY_ADAPTER, targets=targets), "IQAAdapterEncodeTarget", "targets",
                    needle)


def test_bad_target_widget(server):
    expect_rejected(server, tokens_graph(TINY_ADAPTER, target=100.0), "IQAAdapterEncodeTarget", "percentile")
    expect_rejected(server, tokens_graph(TINY_ADAPTER, target=-3.0), "IQAAdapterEncodeTarget", "percentile")
    expect_rejected(server, tokens_graph(TINY_ADAPTER, target=1e9), "IQAAdapterEncodeTarget", "percentile")
    expect_rejected(server, tokens_graph(TINY_ADAPTER, mode="percentage"), "IQAAdapterEncodeTarget", "mode",
                    "percentage")


def test_huge_zscore_and_raw_targets_are_refused_by_the_encoder(server):
    """Finite but far beyond real z-scores: the encoder refuses them (they would make black images)."""
    for mode, targets in (("zscore", "topiq_nr=1e30, laion_aes=-1e30"), ("raw", "topiq_nr=1e300, laion_aes=0")):
        expect_exec_error(server, adapter_graph(targets=targets, mode=mode, seed=31, steps=1),
                          "IQAAdapterEncodeTarget", "targets", f"({mode}) gives the adapter the value", "beyond")


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
    # the patch runs inside KSampler: the host names KSampler, the message the node the user wired
    message = expect_exec_error(server, prompt, "KSampler", "2 targets", "3")
    assert "Apply Quality Adapter: tokens: " in message, message
    # 1 row for a batch of 2 and 2 rows for 2 are both fine
    result = server.run(adapter_graph(targets="topiq_nr=10, laion_aes=10; topiq_nr=90, laion_aes=90", batch=2, steps=1,
                                      seed=42), timeout=300)
    assert result.ok, result.error_message()
    assert len(result.images("7")) == 2


def _score_text(result) -> str:
    return "".join(result.outputs.get("21", {}).get("text", []))


def test_score_tiny_images(server):
    for width, height in ((1, 1), (1, 64), (64, 1)):
        expect_exec_error(server, score_graph(empty_image(width, height), ["30", 0]), "IQAScore", "images")


@pytest.mark.parametrize("width, height", [(2, 2), (7, 5), (33, 17), (65, 63)])
def test_score_odd_sizes(server, width, height):
    """Any image of at least 2x2 pixels gets a finite score (the metric's input is resized as needed)."""
    result = server.run(score_graph(empty_image(width, height), ["30", 0]), timeout=300)
    assert result.ok, f"{width}x{height}: {result.error_message()}"
    text = _score_text(result)
    assert SCORE_METRIC in text, result.outputs
    numbers = [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:e[+-]?\d+)?|nan|inf", text)]
    assert numbers and all(math.isfinite(x) for x in numbers), f"{width}x{height}: {text}"
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
    prompt = score_graph(empty_image(64, 64), ["30", 0])
    prompt["20"]["inputs"]["metric"] = "definitely_not_a_metric"
    expect_rejected(server, prompt, "IQAMetricLoader", "metric", "definitely_not_a_metric")


# ---------------------------------------------------------------- load

BAD_KINDS = ["percentile", "nan_weight", "start_after_end", "one_pixel_score", "batch_mismatch", "truncated_file"]
QUEUE_TIME_KINDS = {"percentile", "start_after_end", "batch_mismatch"}


def _bad_prompt(kind: str, index: int, truncated_name: str) -> tuple[dict, str, tuple[str, ...]]:
    if kind == "percentile":
        return (tokens_graph(TINY_ADAPTER, targets=f"topiq_nr={150 + index}, laion_aes=50"), "IQAAdapterEncodeTarget",
                ("(0, 100)",))
    if kind == "nan_weight":
        return adapter_graph(weight=float("nan"), seed=index, steps=1), "IQAAdapterApply", ("finite",)
    if kind == "start_after_end":
        return adapter_graph(start_at=0.9, end_at=0.1, seed=index, steps=1), "IQAAdapterApply", ("start_at",)
    if kind == "one_pixel_score":
        return score_graph(empty_image(1, 1 + index % 2), ["30", 0]), "IQAScore", ("images",)
    if kind == "batch_mismatch":
        return (adapter_graph(targets="topiq_nr=10, laion_aes=10; topiq_nr=90, laion_aes=90", batch=3, seed=index,
                              steps=1),
                "IQAAdapterEncodeTarget", ("targets",))
    return tokens_graph(truncated_name), "IQAAdapterLoader", ("truncated",)


@pytest.mark.load
def test_load_100_prompts_30_bad(server, scratch, adapter_dir):
    """100 prompts queued at once; 30 bad, 35 plain, 35 with the adapter + scoring.

    Cheap on purpose (64x64, 1 step): 5 distinct seeds per good kind really sample, the other good prompts
    differ only by filename prefix (the host reuses the cached latents; SaveImage still writes each file).
    """
    data = (adapter_dir / TINY_ADAPTER).read_bytes()
    truncated = scratch.write_bytes("load_truncated", data[: len(data) // 3])
    jobs = []  # (kind, expected node or None, needles, prompt)
    for i in range(35):
        jobs.append(("plain", None, (), txt2img(seed=91000 + i % 5, steps=1, prefix=unique_prefix(f"load_plain{i}"))))
        jobs.append(("iqa", None, (), add_score(adapter_graph(target=20 + (i % 5) * 15, seed=92000 + i % 5, steps=1,
                                                              prefix=unique_prefix(f"load_iqa{i}")), ["6", 0])))
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
    for (kind, node, needles, _prompt), prompt_id in queued:
        try:
            result = server.wait(prompt_id, timeout=900)
        except (TimeoutError, RuntimeError) as error:
            lost += 1
            failures.append(f"{kind}: lost ({error})")
            continue
        if kind.removeprefix("bad:") in QUEUE_TIME_KINDS:
            lost += 1
            failures.append(f"{kind}: accepted at validation, expected a refusal at queue time")
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
    for (kind, node, _needles, _prompt), error in rejected:
        # mistakes the graph shows (ranges, start > end, rows vs a literal batch size) are refused at queue time
        if (node is not None and kind.removeprefix("bad:") in QUEUE_TIME_KINDS
                and node in json.dumps(error.body.get("node_errors", {}))):
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
    patched = server.run(adapter_graph(seed=seed, steps=2, weight=1.5, prefix=unique_prefix("iso_patched")),
                         timeout=600)
    assert patched.ok, patched.error_message()
    plain = server.run(txt2img(seed=seed, steps=2, prefix=unique_prefix("iso_plain")),
                       timeout=600)
    assert plain.ok, plain.error_message()
    patched_pixels, plain_pixels = image_array(server, patched), image_array(server, plain)
    assert not np.array_equal(patched_pixels, plain_pixels), "the adapter changed nothing: the check would be vacuous"

    with ComfyServer(tmp_path / "fresh", comfy_server_module.host_dir()) as fresh:
        reference = fresh.run(txt2img(seed=seed, steps=2, prefix="iso_reference"),
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


@pytest.mark.soak
def test_memory_rss_stable_over_50_patched_scored_prompts(server):
    pid = server.process.pid
    rss = []
    for i in range(50):
        prompt = add_score(adapter_graph(target=5 + i * 1.7, seed=880000 + i, steps=1,
                                         prefix=unique_prefix(f"mem{i}")), ["6", 0])
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
    after = server.run(txt2img(seed=int(time.time()) % 100000, steps=1, prefix=unique_prefix("after_interrupt")),
                       timeout=600)
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
    add_guidance(add_score(prompt, ["6", 0], differentiable=True))
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
    zero_stride = BAD_FILES_BY_NAME["zero_stride_views"]
    data = zero_stride.build(tiny_state(tiny_adapter), "")
    assert len(data) < 64 * 1024, len(data)
    name = scratch.write_bytes("zero_stride", data, ext=zero_stride.ext)
    expect_exec_error(server, tokens_graph(name), "IQAAdapterLoader", "adapter_name", *zero_stride.needles)
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
    assert ": stop: " in message, message  # 1 is fine, 999 is not
    for label, fill in (("huge", 1e30), ("nan", float("nan")), ("big", 5e4)):
        name = _write_tokens_file(server.input_dir, f"tokens_{label}", 2, fill=fill)
        expect_exec_error(server, load_tokens_graph(name), "IQAAdapterLoadTokens", "file", "quality tokens")
    # and the encode node, as before
    expect_exec_error(server, tokens_graph(TINY_ADAPTER, targets="topiq_nr=1e30, laion_aes=0", mode="zscore"),
                      "IQAAdapterEncodeTarget", "targets", "beyond")


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
    prompt = score_graph(empty_image(64, 64), ["30", 0])
    prompt["21"]["inputs"].update(save_rows="csv", filename_prefix=foreign_prefix)
    for color in (0x336699, 0x996633):  # two different prompts (the host would reuse a cached identical one)
        prompt["30"]["inputs"]["color"] = color
        result = server.run(prompt, timeout=300)
        assert result.ok, result.error_message()
    assert foreign.read_text() == "name,amount\nalice,3\n", "scores were appended to a foreign CSV"
    ours = foreign.with_name(foreign.stem + "_2.csv")
    lines = ours.read_text().splitlines()
    assert lines[0].startswith("timestamp,image,metric,"), lines[:2]
    assert len(lines) == 3, f"two runs should append two rows under one header: {lines}"
    healthy(server)


def test_class4_every_error_names_node_and_input(server, scratch, tiny_adapter, host_checks_combo_values):
    # the right input is blamed
    prompt = tokens_graph(TINY_ADAPTER)
    prompt["11"]["inputs"]["negative_scale"] = float("nan")
    expect_rejected(server, prompt, "IQAAdapterEncodeTarget", "negative_scale", "negative_scale")
    message = expect_rejected(server, sweep_tokens_graph(hold="not a number"), "IQATargetSweep", "hold")
    assert "Quality Target Sweep: hold: " in message, message
    if "IQAGradientGuidance" in server.object_info():
        guided = add_guidance(add_score(adapter_graph(seed=3, steps=1), ["6", 0], differentiable=True),
                              max_resolution=8)
        expect_rejected(server, guided, "IQAGradientGuidance", "max_resolution", "at least 32")
    # paths: NUL bytes, over-long names
    save = tokens_graph(TINY_ADAPTER)
    save["13"]["inputs"]["filename_prefix"] = "bad\x00name"
    expect_exec_error(server, save, "IQAAdapterSaveTokens", "filename_prefix", "NUL")
    save["13"]["inputs"]["filename_prefix"] = "reltest/" + "n" * 300
    expect_exec_error(server, save, "IQAAdapterSaveTokens", "filename_prefix", "longer than")
    if host_checks_combo_values:  # the file input is left to the host, which refuses names not in the list
        expect_rejected(server, load_tokens_graph("x\x00y.safetensors"), "IQAAdapterLoadTokens", "file",
                        kind="value_not_in_list")
    else:
        expect_exec_error(server, load_tokens_graph("x\x00y.safetensors"), "IQAAdapterLoadTokens", "file", "NUL")
    # unbounded user input is quoted shortened
    message = expect_rejected(server, tokens_graph("a" * 1_000_000), "IQAAdapterLoader", "adapter_name")
    assert len(message) < 4000, f"a 1 MB name gave a {len(message)}-character message"
    message = expect_rejected(server, tokens_graph(TINY_ADAPTER, targets="topiq_nr=" + "9x" * 500_000),
                              "IQAAdapterEncodeTarget", "targets")
    assert len(message) < 4000, f"a 1 MB target gave a {len(message)}-character message"
    # hostile descriptors: deep JSON, numbers too large (hostile weight files: the bad-file matrix)
    deep_sidecar = scratch.write_state_dict("deep_sidecar", tiny_state(tiny_adapter), sidecar=False)
    scratch.files.track((scratch.folder / deep_sidecar).with_suffix(".json")).write_text("[" * 200_000 + "]" * 200_000)
    expect_exec_error(server, tokens_graph(deep_sidecar), "IQAAdapterLoader", "adapter_name", "nested too deeply")
    huge_std = scratch.write_state_dict("huge_std", tiny_state(tiny_adapter), sidecar=False)
    scratch.files.track((scratch.folder / huge_std).with_suffix(".json")).write_text(
        '{"metrics": ["topiq_nr", "laion_aes"], "metric_stats": {"topiq_nr": {"mean": 1, "std": 1' + "0" * 400 + '}}}')
    expect_exec_error(server, tokens_graph(huge_std), "IQAAdapterLoader", "adapter_name", "finite")


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
