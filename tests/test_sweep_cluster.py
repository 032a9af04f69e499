"""scripts/sweep.py on a local Ray cluster of two CPU workers (real ComfyUI servers, tiny checkpoint) against the
one-server path: a worker's server killed mid-sweep, Ctrl-C and resume, reruns, deleted images, a rejected prompt.

Heavy (up to four ComfyUI starts, two at a time): one test, in steps that share their sweeps.
"""
from __future__ import annotations

import collections
import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import PACK_ROOT
from support.graphs import target_sweep_workflow

ray = pytest.importorskip("ray", reason="Ray is an optional dependency: pip install -r requirements-dev.txt")

PYTHON = sys.executable
PROMPTS = ["a red car", "a lighthouse"]
SEEDS = ["1", "2"]
TARGETS = "5,20,35,50,65,95"          # 2 prompts x 2 seeds x 6 targets = 24 items
ITEMS = len(PROMPTS) * len(SEEDS) * 6


def _records(out) -> list[dict]:
    path = out / "manifest.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _server_pid(out) -> int | None:
    try:
        return json.loads((out / "workers.json").read_text()).get("w0", {}).get("server_pid")
    except (OSError, ValueError):  # not written yet, or being replaced
        return None


def _run_slice(pid: int, seconds: float = 0.5) -> bool:
    """Let a stopped process run for a moment, then stop it again."""
    os.kill(pid, signal.SIGCONT)
    time.sleep(seconds)
    os.kill(pid, signal.SIGSTOP)
    return True


def _pixels(out, record) -> bytes:
    from PIL import Image
    return np.asarray(Image.open(out / record["image"]).convert("RGB")).tobytes()


def _wait_for(condition, process, what: str, timeout: float = 1500):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the sweep ended (rc {process.returncode}) before {what}:\n{out[-2000:]}\n{err[-3000:]}")
        time.sleep(0.3)
    process.kill()
    pytest.fail(f"timed out waiting for {what}")


def _finish(process, timeout=1800) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


@pytest.mark.timeout(3600)
def test_ray_sweep_survives_a_dead_server_and_matches_one_server(tmp_path):
    workflow = tmp_path / "workflow_api.json"
    workflow.write_text(json.dumps(target_sweep_workflow(steps=2, size=64)))
    common = [PYTHON, str(PACK_ROOT / "scripts" / "sweep.py"), str(workflow), "--targets", TARGETS,
              "--prompts", *PROMPTS, "--batch-size", "3", "--metric", "piqe", "--quiet"]

    # 1. one server (local backend); a prompt the server rejects (seed -1) is recorded and the sweep goes on;
    #    Ctrl-C after the first batch stops cleanly, the rerun resumes
    one = tmp_path / "one_server"
    local = common + ["--seeds", *SEEDS, "-1", "--out", str(one)]
    process = subprocess.Popen(local, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server = _wait_for(lambda: _server_pid(one), process, "the worker's server")
    # The server runs in short slices until a first batch is recorded, so that however loaded this machine
    # is, the sweep cannot finish before the Ctrl-C reaches it.
    os.kill(server, signal.SIGSTOP)
    try:
        _wait_for(lambda: _run_slice(server) and any(r["status"] == "ok" for r in _records(one)), process,
                  "a first finished batch")
        process.send_signal(signal.SIGINT)
    finally:
        os.kill(server, signal.SIGCONT)
    rc, out, err = _finish(process, 600)
    assert rc == 130, err[-3000:]
    assert "interrupted" in err
    stopped_at = {r["key"] for r in _records(one) if r["status"] == "ok"}
    assert 0 < len(stopped_at) < ITEMS
    rc, out, err = _finish(subprocess.Popen(local, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    assert rc == 3, f"expected 'finished with failures' (the seed -1 items)\n{out[-2000:]}\n{err[-3000:]}"
    assert f"{ITEMS + 12} items, {len(stopped_at)} already finished" in out
    latest = {r["key"]: r for r in _records(one)}
    failed = [r for r in latest.values() if r["status"] == "failed"]
    assert len(failed) == 12 and {r["seed"] for r in failed} == {-1}
    assert all("rejected by the server" in r["error"] and "seed" in r["error"] for r in failed)
    reference = {k: r for k, r in latest.items() if r["status"] == "ok"}
    assert len(reference) == ITEMS and {r["worker"] for r in reference.values()} == {"w0"}
    report = json.loads((one / "sweep.json").read_text())
    assert len(report["failed_items"]) == 12 and len(report["rows"]) == ITEMS

    # 2. the same items on Ray, two workers; one worker's server is killed by its pid mid-sweep
    spread = tmp_path / "ray"
    on_ray = common + ["--seeds", *SEEDS, "--out", str(spread), "--backend", "ray", "--workers", "2"]
    process = subprocess.Popen(on_ray, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: any(r["status"] == "ok" for r in _records(spread)), process, "a first finished batch on Ray")
    progress = json.loads((spread / "progress.json").read_text())
    busy = [n for n, w in progress["workers"].items() if w["state"] == "busy"] or ["w0"]
    victim = json.loads((spread / "workers.json").read_text())[busy[0]]
    os.kill(victim["server_pid"], signal.SIGKILL)
    rc, out, err = _finish(process)
    assert rc == 0, f"{out[-2000:]}\n{err[-4000:]}"
    assert f"worker {busy[0]} lost its server" in err
    after = json.loads((spread / "workers.json").read_text())[busy[0]]
    if after["state"] == "ready":  # Ray restarted the actor with a fresh server before the sweep ended
        assert after["restarts"] >= 1 and after["server_pid"] != victim["server_pid"]
    else:  # the other worker finished first; the actor was still restarting
        assert after["state"] == "restarting", after
    records = _records(spread)
    assert len(records) == ITEMS and {r["status"] for r in records} == {"ok"}  # every item exactly once
    assert {r["key"] for r in records} == set(reference)
    assert all(r["host"] and r["worker"] in ("w0", "w1") for r in records)
    assert any(r["worker"] != busy[0] for r in records)  # the victim's batch was done elsewhere (or after restart)
    differing = [r["key"] for r in records if _pixels(spread, r) != _pixels(one, reference[r["key"]])]
    assert not differing, f"{len(differing)} images differ from the one-server run"
    rows = list(csv.DictReader(open(spread / "sweep.csv")))
    assert len(rows) == ITEMS and collections.Counter(r["image"] for r in rows).most_common(1)[0][1] == 1
    assert (spread / "sweep_grid.png").stat().st_size > 0 and (spread / "sweep_chart.png").stat().st_size > 0

    # 3. a rerun of the finished sweep does no work (no cluster, no server)
    before = (spread / "manifest.jsonl").read_text()
    rc, out, err = _finish(subprocess.Popen(on_ray, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), 600)
    assert rc == 0 and f"{ITEMS} items, {ITEMS} already finished, 0 to run\n" in out, err[-2000:]
    assert (spread / "manifest.jsonl").read_text() == before

    # 4. three deleted images (three batches) are redone, exactly those, identical; a partial report meanwhile
    gone = [records[0], records[10], records[20]]
    for record in gone:
        (spread / record["image"]).unlink()
    rc, out, err = _finish(subprocess.Popen(common + ["--seeds", *SEEDS, "--out", str(spread), "--report"],
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), 600)
    assert rc == 0 and f"({ITEMS - 3} images)" in out, err[-2000:]
    rc, out, err = _finish(subprocess.Popen(common + ["--seeds", *SEEDS, "--out", str(spread)],
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), 1200)
    assert rc == 0 and f"{ITEMS} items, {ITEMS - 3} already finished, 3 to run" in out, err[-2000:]
    assert (spread / "manifest.jsonl").read_text().startswith(before)
    added = _records(spread)[ITEMS:]
    assert sorted(r["key"] for r in added) == sorted(r["key"] for r in gone)
    assert all(_pixels(spread, r) == _pixels(one, reference[r["key"]]) for r in added)
    assert len(list(csv.DictReader(open(spread / "sweep.csv")))) == ITEMS
