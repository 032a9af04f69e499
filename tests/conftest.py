"""Shared fixtures: the pack as a package, the real ComfyUI host in-process, and one real server.

Nothing here mocks ComfyUI. Where the host is absent (setup not run), host tests skip loudly; CI runs
scripts/test.sh, which sets the host up first, so there nothing is absent.
"""
from __future__ import annotations

import os
import pathlib
import socket
import tempfile
import urllib.request

import pytest
from support import third_party

from comfyui_iqa_adapter.scripts import comfy_server as comfy_server_module  # (`comfy_server` is the fixture)

TESTS_DIR = pathlib.Path(__file__).resolve().parent
PACK_ROOT = TESTS_DIR.parent


ComfyServer = comfy_server_module.ComfyServer
PromptRejected = comfy_server_module.PromptRejected

TINY_CHECKPOINT = "tiny_sd15.safetensors"
TINY_ADAPTER = "tiny_sd15_iqa_adapter.safetensors"


def _host_missing_reason() -> str | None:
    comfy_dir = comfy_server_module.host_dir()
    if not (comfy_dir / "main.py").exists():
        return f"ComfyUI host not found at {comfy_dir}: run `bash scripts/setup.sh` (CI does)"
    if not (comfy_dir / "models" / "checkpoints" / TINY_CHECKPOINT).exists():
        return f"tiny models missing in {comfy_dir}/models: run `bash scripts/setup.sh` (CI does)"
    return None


def require_host():
    reason = _host_missing_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail("in CI the host must be present: " + reason)
        pytest.skip("SKIPPED LOUDLY: " + reason)
    return comfy_server_module.host_dir()


@pytest.fixture(scope="session")
def host_dir() -> pathlib.Path:
    return require_host()


@pytest.fixture(scope="session")
def host_version(host_dir) -> tuple[int, ...]:
    """The selected host's release version, e.g. (0, 33, 0): tests pick per-host expectations from it."""
    return comfy_server_module.host_version(host_dir)


@pytest.fixture(scope="session")
def comfy(host_dir):
    """The host's `comfy` package imported in this process, forced to CPU."""
    return comfy_server_module.import_host(host_dir, cpu=True)


@pytest.fixture(scope="session")
def tiny_checkpoint(comfy, host_dir):
    """(model, clip, vae) of the embedded tiny SD1.5 checkpoint, loaded once in-process."""
    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(host_dir / "models" / "checkpoints" / TINY_CHECKPOINT))
    return model, clip, vae


@pytest.fixture(scope="session")
def comfy_server(host_dir, pytestconfig):
    """One real ComfyUI server for the whole session, with the pack linked into custom_nodes/."""
    comfy_server_module.ensure_pack_linked(host_dir)
    third_party.install_ipadapter(host_dir)  # another pack beside ours, as users run it (test fixture)
    work = pathlib.Path(tempfile.mkdtemp(prefix="iqa-comfy-"))
    server = ComfyServer(work, host_dir)
    server.start()
    pack_nodes = sorted(name for name, node in server.object_info().items()
                        if node.get("category", "").startswith("IQA-Adapter"))
    # straight to the terminal (pytest captures print): CI's log shows the real server and our nodes
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            version = ".".join(map(str, comfy_server_module.host_version(host_dir)))
            frontend = comfy_server_module.frontend_root()
            reporter.write_line(f"\n[comfy_server] real ComfyUI {version} ({comfy_server_module.host_name()} host, "
                                f"frontend {frontend.name if frontend else 'pinned by the host'}) started at "
                                f"{server.url} (log {server.log_path}); "
                                f"pack nodes in /object_info: {', '.join(pack_nodes) or 'NONE'}")
    yield server
    server.stop()


def api_prompt_txt2img(ckpt=TINY_CHECKPOINT, text="a photo of a cat", negative="", seed=1, steps=2,
                       cfg=5.0, width=64, height=64, batch=1, sampler="euler", scheduler="normal",
                       prefix="iqa_test"):
    """A plain API-format text-to-image graph (node ids are strings, as the server expects)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": batch}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def api_prompt_target_sweep(steps=2, size=64):
    """api_prompt_txt2img with one IQA-Adapter target (tiny adapter): the workflow scripts/sweep.py sweeps."""
    workflow = api_prompt_txt2img(steps=steps, width=size, height=size)
    workflow["2"]["_meta"] = {"title": "Positive prompt"}
    workflow["a"] = {"class_type": "IQAAdapterLoader", "inputs": {"adapter_name": TINY_ADAPTER}}
    workflow["t"] = {"class_type": "IQAAdapterEncodeTarget", "inputs": {
        "adapter": ["a", 0], "quality": "custom", "percentile": 50.0, "targets": "", "mode": "percentile",
        "negative_scale": 0.0}}
    workflow["ap"] = {"class_type": "IQAAdapterApply", "inputs": {
        "model": ["1", 0], "adapter": ["a", 0], "tokens": ["t", 0], "weight": 1.0, "start_at": 0.0, "end_at": 1.0}}
    workflow["5"]["inputs"]["model"] = ["ap", 0]
    return workflow


@pytest.fixture
def txt2img():
    return api_prompt_txt2img


@pytest.fixture
def network_attempts(monkeypatch):
    """Every socket connect / DNS lookup / urlopen is recorded and refused: offline paths must not wait
    on the network (asserted instead of a wall-clock bound, which a loaded machine breaks)."""
    attempts = []

    def refuse(what):
        def refused(*args, **kwargs):
            attempts.append((what, args[1:2] if what == "connect" else args[:1]))
            raise OSError(f"test: network access attempted ({what})")
        return refused

    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(urllib.request, "urlopen", refuse("urlopen"))
    return attempts
