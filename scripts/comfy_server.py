"""The ComfyUI host for tests, demos and benchmarks: where it lives, importing it in-process, and a real
server (start, queue API prompts, collect results).

Used by tests/conftest.py (one server per pytest session), scripts/demo.py and the benchmarks.
Talks HTTP to 127.0.0.1 only.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field

PACK_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_HOST_DIR = PACK_ROOT / ".host" / "ComfyUI"
PACK_LINK_NAME = "ComfyUI-IQA-Adapter"


HOSTS_DIR = PACK_ROOT / ".host"  # default host in .host/ComfyUI, others in .host/<version>/{ComfyUI,venv}


def host_name() -> str:
    """The host this process targets: IQA_TEST_HOST=<version> (set up by `scripts/setup.sh --host
    ComfyUI-<version>.tar.gz`), or "default" (.host/ComfyUI, the wheel's host or COMFYUI_PATH)."""
    return os.environ.get("IQA_TEST_HOST", "").strip() or "default"


def host_dir(name: str | None = None) -> pathlib.Path:
    """The one place that says where a host lives: the selected one (IQA_COMFYUI_DIR overrides it) or `name`."""
    if name is None and os.environ.get("IQA_COMFYUI_DIR"):
        return pathlib.Path(os.environ["IQA_COMFYUI_DIR"]).resolve()
    name = name or host_name()
    return (DEFAULT_HOST_DIR if name == "default" else HOSTS_DIR / name / "ComfyUI").resolve()


def host_python(name: str | None = None) -> str:
    """The Python of a host's venv, the selected one by default (each host has its own requirements)."""
    name = name or host_name()
    venv = PACK_ROOT / ".venv" if name == "default" else HOSTS_DIR / name / "venv"
    venv_python = venv / "bin" / "python"
    return str(venv_python) if venv_python.exists() else sys.executable


def import_host(comfy_dir: pathlib.Path | None = None, cpu: bool = True):
    """The host's `comfy` package in this process (the selected host by default): the host's root goes on
    sys.path, as `python main.py` has it; `cpu` forces CPU before comfy.model_management is imported."""
    comfy_dir = pathlib.Path(comfy_dir or host_dir())
    if not (comfy_dir / "comfy").is_dir():
        raise SystemExit(f"no ComfyUI at {comfy_dir} (run `bash scripts/setup.sh`, or give COMFYUI_PATH)")
    if str(comfy_dir) not in sys.path:
        sys.path.insert(0, str(comfy_dir))
    import comfy.cli_args

    if cpu:
        comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401
    import comfy.sd  # noqa: F401

    return comfy


def host_version(comfy_dir: pathlib.Path | None = None) -> tuple[int, ...]:
    """The host's release version from its comfyui_version.py, e.g. (0, 33, 0)."""
    text = ((comfy_dir or host_dir()) / "comfyui_version.py").read_text()
    match = re.search(r'__version__\s*=\s*"([0-9.]+)', text)
    if not match:
        raise RuntimeError(f"no __version__ in {comfy_dir or host_dir()}/comfyui_version.py")
    return tuple(int(part) for part in match.group(1).split("."))


def frontend_root() -> pathlib.Path | None:
    """IQA_TEST_FRONTEND=<version>: serve that frontend (`scripts/setup.sh --frontend <version>`) instead
    of the host's pinned one."""
    version = os.environ.get("IQA_TEST_FRONTEND", "").strip()
    if not version:
        return None
    folder = HOSTS_DIR / "frontends" / version
    if not (folder / "index.html").exists():
        raise FileNotFoundError(f"frontend {version} not found at {folder}: run "
                                f"`bash scripts/setup.sh --frontend {version}`")
    return folder


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PromptResult:
    prompt_id: str
    status: str  # "success" | "error"
    outputs: dict = field(default_factory=dict)
    messages: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "success"

    def error_message(self) -> str:
        for kind, data in self.messages:
            if kind == "execution_error":
                return f"{data.get('node_type')}: {data.get('exception_message', '')}".strip()
        return ""

    def execution_seconds(self) -> float | None:
        """The server's own start-to-end time of the prompt (ms timestamps of its status messages),
        free of the client's polling granularity."""
        stamps = {kind: data.get("timestamp") for kind, data in self.messages if isinstance(data, dict)}
        end = stamps.get("execution_success") or stamps.get("execution_error") or stamps.get("execution_interrupted")
        if stamps.get("execution_start") is None or end is None:
            return None
        return (end - stamps["execution_start"]) / 1000.0

    def images(self, node_id: str) -> list[dict]:
        return self.outputs.get(str(node_id), {}).get("images", [])


class ComfyServer:
    """One ComfyUI process on a free loopback port with its own output/input/user/temp folders."""

    def __init__(self, work_dir: pathlib.Path, comfy_dir: pathlib.Path | None = None,
                 extra_args: list[str] | None = None, port: int | None = None, cpu: bool = True):
        self.comfy_dir = comfy_dir or host_dir()
        self.work_dir = pathlib.Path(work_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output_dir = self.work_dir / "output"
        self.input_dir = self.work_dir / "input"
        self.temp_dir = self.work_dir / "temp"
        self.user_dir = self.work_dir / "user"
        self.log_path = self.work_dir / "server.log"
        self.models_dir = self.comfy_dir / "models"
        self.extra_args = list(extra_args or [])
        frontend = frontend_root()
        if frontend is not None and "--front-end-root" not in self.extra_args:
            self.extra_args += ["--front-end-root", str(frontend)]
        self.cpu = cpu  # False: the host picks its accelerator (the GPU a Ray worker was given)
        self.process: subprocess.Popen | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> ComfyServer:
        if not (self.comfy_dir / "main.py").exists():
            raise FileNotFoundError(f"no ComfyUI at {self.comfy_dir}: run `bash scripts/setup.sh` first")
        for d in (self.output_dir, self.input_dir, self.temp_dir, self.user_dir):
            d.mkdir(parents=True, exist_ok=True)
        cmd = [host_python(), "main.py", *(["--cpu"] if self.cpu else []),
               "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
               "--output-directory", str(self.output_dir),
               "--input-directory", str(self.input_dir), "--temp-directory", str(self.temp_dir),
               "--user-directory", str(self.user_dir),
               "--database-url", f"sqlite:///{self.user_dir / 'comfyui.db'}", *self.extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.get("/object_info/CheckpointLoaderSimple", timeout=5)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # --- HTTP ----------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
                return json.loads(body) if body else {}
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")
            raise PromptRejected(e.code, body) from None

    def object_info(self) -> dict:
        return self.get("/object_info", timeout=120)

    def queue(self, prompt: dict) -> str:
        """Queue an API-format prompt; raises PromptRejected when validation fails."""
        client_id = uuid.uuid4().hex
        return self.post("/prompt", {"prompt": prompt, "client_id": client_id})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> PromptResult:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("completed") or status.get("status_str") == "error":
                    return PromptResult(prompt_id, status.get("status_str", "error"), entry.get("outputs", {}),
                                        status.get("messages", []))
            if not self.alive():
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")

    def run(self, prompt: dict, timeout: float = 600) -> PromptResult:
        return self.wait(self.queue(prompt), timeout)

    def interrupt(self) -> None:
        self.post("/interrupt", {})

    def output_file(self, image: dict) -> pathlib.Path:
        # the host keeps previews in <--temp-directory>/temp
        base = self.output_dir if image.get("type", "output") == "output" else self.temp_dir / "temp"
        return base / image.get("subfolder", "") / image["filename"]


class PromptRejected(Exception):
    """The server refused a prompt at validation (HTTP 400): `.body` holds its JSON error."""

    def __init__(self, code: int, body: str):
        super().__init__(f"HTTP {code}: {body[:2000]}")
        self.code = code
        try:
            self.body = json.loads(body)
        except ValueError:
            self.body = {"raw": body}


def ensure_pack_linked(comfy_dir: pathlib.Path) -> None:
    link = comfy_dir / "custom_nodes" / PACK_LINK_NAME
    if link.is_symlink() and link.resolve() == PACK_ROOT:
        return
    if link.exists() and not link.is_symlink():
        return  # a real copy installed by the user
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        link.unlink()
    link.symlink_to(PACK_ROOT, target_is_directory=True)
