"""Workers and backends of scripts/sweep.py: who renders the batches the driver hands out.

A SweepWorker owns one ComfyUI server (started here, models kept warm between batches, or a running one at a
URL) and, with --metric, the IQA metrics that score its images. Two pools drive workers for the driver:
  LocalPool  one thread per worker in this process (one started server, or one per --url);
  RayPool    one Ray actor per worker (one per GPU, or --workers N on CPU) on a running cluster
             (--address) or on a local one started here. An actor whose server dies exits; Ray restarts it
             (a fresh server) and the driver retries the batch it held on whichever worker is free.
Both report events to the driver: ("ready", worker, info), ("done", worker, batch, result),
("lost", worker, batch, error) and ("dead", worker, error).
"""
from __future__ import annotations

import concurrent.futures
import os
import pathlib
import queue
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

from comfyui_iqa_adapter.scripts.comfy_server import ComfyServer, PromptRejected, ensure_pack_linked, host_dir


class ServerLost(RuntimeError):
    """The worker's server died or stopped answering: the batch goes back to the queue."""


class RemoteServer(ComfyServer):
    """A server someone else started: only the HTTP half of ComfyServer."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.process = None

    def alive(self) -> bool:
        return True

    def log_tail(self, n: int = 60) -> str:
        return "(remote server: see its own log)"


def download(server_url: str, image: dict) -> bytes:
    query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                    "type": image.get("type", "output")})
    with urllib.request.urlopen(f"{server_url}/view?{query}", timeout=60) as response:
        return response.read()


def rejection_text(error: PromptRejected) -> str:
    """'KSampler (node 5) seed: Value -1 smaller than min of 0' from the server's validation answer."""
    parts = []
    for node_id, node in (error.body.get("node_errors") or {}).items():
        for item in node.get("errors", []):
            parts.append(f"{node.get('class_type', '?')} (node {node_id}) {item.get('details', '')}: "
                         f"{item.get('message', '')}".replace(" :", ":"))
    message = (error.body.get("error") or {}).get("message") if isinstance(error.body.get("error"), dict) else None
    return "; ".join(parts) or message or str(error)


def load_scorer(name: str, folders: list[str], device: str = "cpu", score_size: str = "cc3m"):
    """PNG bytes -> score with the pack's pyiqa loader (nothing downloaded; weights from `folders`);
    `score_size` 'cc3m' squashes the image to 512x512 first, as the CC3M statistics were made."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    from comfyui_iqa_adapter.adapter import iqa_models

    metric = iqa_models.load_metric(name, folders, device)

    def score(png: bytes) -> float:
        array = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255.0
        image = iqa_models.resize_for_scoring(torch.from_numpy(array).permute(2, 0, 1)[None], score_size)
        return float(metric.score(image).reshape(-1)[0])
    return score, bool(metric.lower_better)


class SweepWorker:
    def __init__(self, name: str, url: str | None = None, metrics=(), metric_dirs=None, metric_device: str = "cpu",
                 score_size: str = "cc3m", timeout: float = 1800, warmup: dict | None = None, gpu: bool = False,
                 threads: int | None = None):
        self.name = name
        self.threads = threads
        self.gpu = gpu
        self.warmup = warmup
        self.host = socket.gethostname()
        self.timeout = timeout
        self.url = url
        self.server = None
        self._work_dir = None
        self._start_server()
        folders = list(metric_dirs or [str(host_dir() / "models" / "iqa")])
        self.scorers = {m: load_scorer(m, folders, metric_device, score_size) for m in metrics}

    def _start_server(self) -> None:
        if self.url:
            self.server = RemoteServer(self.url)
            self.server.get("/system_stats", timeout=30)  # fail early on a wrong URL
            return
        ensure_pack_linked(host_dir())
        if self.threads:
            os.environ["OMP_NUM_THREADS"] = str(self.threads)
        self._work_dir = pathlib.Path(tempfile.mkdtemp(prefix=f"iqa-sweep-{self.name}-"))
        self.server = ComfyServer(self._work_dir, host_dir(), cpu=not self.gpu).start()
        if self.warmup:  # load the models before the first batch (an error shows again on that batch)
            self.server.run(self.warmup, timeout=self.timeout)

    def info(self) -> dict:
        process = getattr(self.server, "process", None)
        return {"worker": self.name, "host": self.host, "pid": os.getpid(), "url": self.server.url,
                "server_pid": process.pid if process else None,
                "lower_better": {m: lb for m, (_, lb) in self.scorers.items()}}

    def adapter_metrics(self, adapter_name: str) -> list[str]:
        """The metric names (in order) of an adapter in this server's models/iqa_adapter folder."""
        from comfyui_iqa_adapter.adapter.descriptor import resolve_descriptor
        return list(resolve_descriptor(host_dir() / "models" / "iqa_adapter" / adapter_name).metrics)

    def render(self, graph: dict, batch: dict, save_node: str, score_node: str | None = None) -> dict:
        """Run one batch. A prompt the server refuses or fails on comes back as {"error": ...}; a dead or
        unreachable server raises ServerLost."""
        try:
            return self._render(graph, batch, save_node, score_node)
        except PromptRejected as error:
            return {"error": f"rejected by the server: {rejection_text(error)}"}
        except (OSError, RuntimeError) as error:
            # a refused or reset connection: the server is gone (or going: a killed process is reaped later)
            connection = isinstance(error, (ConnectionError, urllib.error.URLError)) and \
                not isinstance(error, urllib.error.HTTPError)
            if isinstance(error, TimeoutError) or (self.server.alive() and not connection):
                return {"error": f"{type(error).__name__}: {error}"}
            raise ServerLost(f"worker {self.name}: server {self.server.url} lost: {error}") from None

    def _render(self, graph: dict, batch: dict, save_node: str, score_node: str | None) -> dict:
        started = time.perf_counter()
        result = self.server.run(graph, timeout=self.timeout)
        if not result.ok:
            return {"error": result.error_message() or "the server reports an execution error"}
        images = result.images(save_node)
        if len(images) != len(batch["rows"]):
            return {"error": f"node {save_node} gave {len(images)} images for {len(batch['rows'])} targets "
                             "(pass --save-node, or --batch-size 1 if the workflow fixes its batch size)"}
        out = []
        for index in batch["wanted"]:
            png = download(self.server.url, images[index])
            out.append({"index": index, "png": png, "scores": {m: s(png) for m, (s, _) in self.scorers.items()}})
        if self._work_dir is not None:  # our own server: its copies are no longer needed
            for image in images:
                self.server.output_file(image).unlink(missing_ok=True)
        score_table = result.outputs.get(str(score_node), {}).get("text", [""])[0] if score_node else ""
        return {"images": out, "score_table": score_table, "prompt_id": result.prompt_id,
                "execution_s": result.execution_seconds(), "worker_s": time.perf_counter() - started,
                "worker": self.name, "host": self.host}

    def restart(self) -> None:
        self.stop()
        self._start_server()

    def interrupt(self) -> None:
        try:
            self.server.interrupt()
        except Exception:  # already gone: nothing to interrupt
            pass

    def stop(self) -> None:
        if self._work_dir is not None:
            self.server.stop()
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None


# ------------------------------------------------------------------------------------------- local

class LocalPool:
    """Workers in threads of this process: one started server, or one per given URL."""

    def __init__(self, urls: list[str] | None, worker_kwargs: dict):
        self.urls = urls or [None]
        self.size = len(self.urls)
        self.waited_s = 0.0  # time poll() sat waiting: the driver's overhead is the rest
        self.workers: dict[str, SweepWorker] = {}
        self.events: queue.Queue = queue.Queue()
        self.executor = concurrent.futures.ThreadPoolExecutor(len(self.urls) + 1)
        self.kwargs = worker_kwargs
        for i, url in enumerate(self.urls):
            self.executor.submit(self._start, f"w{i}", url)

    def _start(self, name: str, url: str | None) -> None:
        try:
            self.workers[name] = SweepWorker(name, url, **self.kwargs)
            self.events.put(("ready", name, self.workers[name].info()))
        except Exception as error:
            self.events.put(("dead", name, f"{type(error).__name__}: {error}"))

    def _render(self, name: str, graph: dict, batch) -> None:
        worker = self.workers[name]
        try:
            result = worker.render(graph, batch.to_dict(), self.save_node, self.score_node)
            self.events.put(("done", name, batch, result))
        except ServerLost as error:
            self.events.put(("lost", name, batch, str(error)))
            if worker.url:  # not ours to restart
                self.events.put(("dead", name, str(error)))
                return
            try:
                worker.restart()
                self.events.put(("ready", name, worker.info()))
            except Exception as restart_error:
                self.events.put(("dead", name, f"restart failed: {restart_error}"))
        except Exception as error:
            self.events.put(("lost", name, batch, f"{type(error).__name__}: {error}"))

    def adapter_metrics(self, name: str, adapter: str) -> list[str]:
        return self.workers[name].adapter_metrics(adapter)

    def submit(self, name: str, graph: dict, batch) -> None:
        self.executor.submit(self._render, name, graph, batch)

    def poll(self, timeout: float) -> list[tuple]:
        events = []
        try:
            started = time.perf_counter()
            try:
                events.append(self.events.get(timeout=timeout))
            finally:
                self.waited_s += time.perf_counter() - started
            while True:
                events.append(self.events.get_nowait())
        except queue.Empty:
            return events

    def close(self, interrupted: bool = False) -> None:
        if interrupted:
            for worker in list(self.workers.values()):
                worker.interrupt()
        self.executor.shutdown(wait=True, cancel_futures=True)
        for worker in self.workers.values():
            worker.stop()


# ------------------------------------------------------------------------------------------- Ray

class RayWorker(SweepWorker):
    """The actor: a server death ends the process, so that Ray restarts the actor with a fresh server."""

    def __init__(self, *args, **kwargs):
        # Ray sets OMP_NUM_THREADS=1 in its workers; the server would inherit it and, with another thread
        # count than a server started by hand, sum in another order: images off by one level here and there
        os.environ.pop("OMP_NUM_THREADS", None)
        super().__init__(*args, **kwargs)

    def render(self, graph: dict, batch: dict, save_node: str, score_node: str | None = None) -> dict:
        try:
            return super().render(graph, batch, save_node, score_node)
        except ServerLost:
            self.stop()
            os._exit(1)


class RayPool:
    """One actor per worker on a Ray cluster: --address to join one, else a small local one started here."""

    def __init__(self, address: str | None, workers: int | None, worker_kwargs: dict, max_restarts: int = 3,
                 object_store_mb: int = 200):
        import ray
        self.ray = ray
        runtime_env = {"env_vars": {}}  # workers import the pack from the venv's editable install
        for name in ("IQA_COMFYUI_DIR",):
            if os.environ.get(name):
                runtime_env["env_vars"][name] = os.environ[name]
        if address:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        else:
            ray.init(num_cpus=workers or 1, object_store_memory=object_store_mb * 2**20, include_dashboard=False,
                     runtime_env=runtime_env, log_to_driver=False)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        count = workers or gpus or 1
        per_worker = {"num_gpus": 1, "num_cpus": 0} if gpus and not workers else {"num_cpus": 1}
        # two threads: interrupt() and stop() get through while render() runs
        actor = ray.remote(max_restarts=max_restarts, max_task_retries=0, max_concurrency=2)(RayWorker)
        worker_kwargs = {**worker_kwargs, "gpu": "num_gpus" in per_worker}  # Ray gives each its own GPU
        self.actors = {f"w{i}": actor.options(**per_worker).remote(f"w{i}", **worker_kwargs) for i in range(count)}
        self.size = count
        self.waited_s = 0.0
        self.refs: dict = {}  # ObjectRef -> (kind, worker, batch)
        self.ask_again: dict[str, float] = {}  # worker -> when to ask a restarting actor whether it is up
        for name in self.actors:
            self._ask_ready(name)

    def _ask_ready(self, name: str) -> None:
        self.refs[self.actors[name].info.remote()] = ("ready", name, None)

    def adapter_metrics(self, name: str, adapter: str) -> list[str]:
        return self.ray.get(self.actors[name].adapter_metrics.remote(adapter))

    def submit(self, name: str, graph: dict, batch) -> None:
        self.refs[self.actors[name].render.remote(graph, batch.to_dict(), self.save_node, self.score_node)] = \
            ("done", name, batch)

    def poll(self, timeout: float) -> list[tuple]:
        now = time.monotonic()
        for name, due in list(self.ask_again.items()):
            if due <= now:
                del self.ask_again[name]
                self._ask_ready(name)
        started = time.perf_counter()
        if not self.refs:
            time.sleep(timeout)
            self.waited_s += time.perf_counter() - started
            return []
        ready, _ = self.ray.wait(list(self.refs), num_returns=1, timeout=timeout)
        self.waited_s += time.perf_counter() - started
        events = []
        errors = self.ray.exceptions
        for ref in ready:
            kind, name, batch = self.refs.pop(ref)
            try:
                value = self.ray.get(ref)
            except (errors.RayActorError, errors.ActorUnavailableError) as error:
                reason = str(error).splitlines()[0]
                if kind == "done":  # the actor died or is restarting: its batch goes back to the queue
                    events.append(("lost", name, batch, reason))
                if isinstance(error, errors.ActorDiedError) and kind == "ready":
                    events.append(("dead", name, reason))  # no restarts left
                else:
                    self.ask_again[name] = time.monotonic() + 2.0
                continue
            except errors.RayTaskError as error:
                reason = str(error).splitlines()[-1]
                events.append(("lost", name, batch, reason) if kind == "done" else ("dead", name, reason))
                continue
            events.append((kind, name, value) if kind == "ready" else (kind, name, batch, value))
        return events

    def close(self, interrupted: bool = False) -> None:
        if interrupted:
            for actor in self.actors.values():
                actor.interrupt.remote()
        stops = [actor.stop.remote() for actor in self.actors.values()]
        try:
            self.ray.wait(stops, num_returns=len(stops), timeout=30)
        finally:
            for actor in self.actors.values():
                self.ray.kill(actor, no_restart=True)
            self.ray.shutdown()
