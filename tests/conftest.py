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

from comfyui_iqa_adapter.scripts import comfy_server as comfy_server_module  # (`comfy_server` is the fixture)
from support import graphs, host_models, third_party
from support.graphs import TINY_ADAPTER, TINY_CHECKPOINT  # noqa: F401 - re-exported for the tests

TESTS_DIR = pathlib.Path(__file__).resolve().parent
PACK_ROOT = TESTS_DIR.parent


ComfyServer = comfy_server_module.ComfyServer
PromptRejected = comfy_server_module.PromptRejected


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
def host_checks_combo_values(host_version) -> bool:
    """Whether this host refuses a combo value outside the options at validation (`value_not_in_list`) before
    the node's own check can name it; pinned per host as measured (test_host_contract.py)."""
    if host_version >= (0, 33, 0):
        return True
    if host_version <= (0, 3, 75):
        return False
    pytest.skip(f"SKIPPED LOUDLY: combo validation not measured on ComfyUI {host_version}; pin it here")


@pytest.fixture(scope="session", autouse=True)
def host_model_folders_restored():
    """At the end of the session the host's model folders hold exactly the files they held at its start: every
    test removes what it wrote there (`model_files` / `module_model_files`)."""
    models = comfy_server_module.host_dir() / "models"
    before = host_models.listing(models)
    yield
    after = host_models.listing(models)
    left, lost = sorted(after - before), sorted(before - after)
    assert not left and not lost, (f"the tests changed the host's model folders {models}: "
                                    f"left behind {left}, removed {lost}")


@pytest.fixture
def model_files(host_dir):
    """Files one test writes into the host's model folders, removed when it ends."""
    files = host_models.ModelFiles(host_dir / "models")
    yield files
    files.remove()


@pytest.fixture(scope="module")
def module_model_files(host_dir):
    """Files a module's tests share in the host's model folders, removed after the module."""
    files = host_models.ModelFiles(host_dir / "models")
    yield files
    files.remove()


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


@pytest.fixture
def txt2img():
    return graphs.txt2img


@pytest.fixture
def isolated_metric_caches(tmp_path, monkeypatch):
    """pyiqa's cache (the torch hub dir) and clip's (~/.cache/clip) under tmp_path and the pack's metric cache
    empty: no real file leaks into a metric test, and no test-made metric leaks out of it."""
    from comfyui_iqa_adapter.adapter import iqa_models

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    iqa_models.clear_metric_cache()
    yield
    iqa_models.clear_metric_cache()


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
