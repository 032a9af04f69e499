"""Run every ratio benchmark, collect their JSON lines, print a pass/fail summary against each goal.

    .venv/bin/python benchmarks/run.py [--quick] [--only NAME ...] [--hosts NAME ...] [--json-out FILE] [--strict]

Each benchmark is a script printing one JSON object per line (at least name, ratio, baseline_s, variant_s,
repeats, goal). It runs in its own subprocess; a missing or failing script is reported, not fatal.
Every benchmark runs on the default host; the patch-overhead benchmark also runs on every other host that
`scripts/setup.sh --host ...` set up (.host/<version>/), in that host's own venv (--hosts picks which).
Exit status: 0 when every selected script ran (goal misses are reported in the summary; --strict makes them
exit 1 too), 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

from comfyui_iqa_adapter.benchmarks import common
from comfyui_iqa_adapter.scripts import comfy_server

BENCH_DIR = pathlib.Path(__file__).resolve().parent

# (short name, script) in run order
BENCHMARKS = [
    ("patch_overhead", "bench_patch_overhead.py"),
    ("sweep_batching", "bench_sweep.py"),
    ("sweep_cluster", "bench_sweep_cluster.py"),
    ("scoring", "bench_scoring.py"),
    ("guidance", "bench_guidance.py"),
    ("memory", "bench_memory.py"),
]

# benchmarks that also run on every other host set up beside the default one (they touch host internals)
HOST_MATRIX = {"patch_overhead"}


def installed_hosts() -> dict[str, str]:
    """host name -> its venv's Python: "default" (.venv) and each .host/<version>/ with ComfyUI and a venv."""
    hosts = {"default": comfy_server.host_python("default")}
    for folder in sorted(comfy_server.HOSTS_DIR.glob("*/")):
        if (folder / "ComfyUI" / "main.py").exists() and (folder / "venv" / "bin" / "python").exists():
            hosts[folder.name] = comfy_server.host_python(folder.name)
    return hosts


# Goals from the issues, used only for result lines that carry no "goal" of their own (name prefix -> goal).
DEFAULT_GOALS = {
    "patch_overhead_ksampler": "<= 1.02",
    "sweep_vs_plain_batch": "<= 1.02",
    "iqa_score_": "<= 1.05",
}


def with_default_goal(line: dict) -> dict:
    if not line.get("goal"):
        for prefix, goal in DEFAULT_GOALS.items():
            if str(line.get("name", "")).startswith(prefix):
                line["goal"] = goal
                line["goal_source"] = "benchmarks/run.py default"
                break
    return line


def parse_lines(stdout: str) -> tuple[list[dict], list[str]]:
    results, other = [], []
    for line in stdout.splitlines():
        text = line.strip()
        if text.startswith("{"):
            try:
                obj = json.loads(text)
            except ValueError:
                other.append(line)
                continue
            if isinstance(obj, dict) and "name" in obj:
                results.append(with_default_goal(obj))
                continue
        if text:
            other.append(line)
    return results, other


def verdict(line: dict) -> str:
    passed = line.get("passed")
    if passed is None:
        goal_min, goal_max = line.get("goal_min"), line.get("goal_max")
        if goal_min is None and goal_max is None and isinstance(line.get("goal"), str):
            goal_min, goal_max = common.parse_goal(line["goal"])
        ratio = line.get("ratio")
        if isinstance(ratio, (int, float)):
            passed = common.judge(float(ratio), goal_min, goal_max)
    return {True: "PASS", False: "FAIL", None: "reported (no goal)"}[passed]


def run_one(name: str, script: str, quick: bool, timeout: float, python: str, host: str = "default") -> dict:
    path = BENCH_DIR / script
    record = {"bench": name, "script": script, "lines": [], "status": "ok", "detail": "", "wall_s": 0.0,
              "host": host}
    if not path.exists():
        record.update(status="missing", detail=f"{script} not found")
        return record
    cmd = [python, str(path)] + (["--quick"] if quick else [])
    env = dict(os.environ, IQA_TEST_HOST=host)
    if host != "default":
        env.pop("IQA_COMFYUI_DIR", None)
    record["host"] = "ComfyUI " + ".".join(map(str, comfy_server.host_version(comfy_server.host_dir(host))))
    print(f"\n=== {name} on {record['host']}: {' '.join(cmd[1:])}", flush=True)
    started = time.monotonic()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=BENCH_DIR.parent, env=env)
    except subprocess.TimeoutExpired as expired:
        out = expired.stdout.decode(errors="replace") if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        record["lines"], _ = parse_lines(out)
        record.update(status="timeout", detail=f"killed after {timeout:.0f} s", wall_s=time.monotonic() - started)
        for line in record["lines"]:
            print(json.dumps(line), flush=True)
        return record
    record["wall_s"] = time.monotonic() - started
    record["lines"], other = parse_lines(done.stdout)
    for line in record["lines"]:
        line["host"] = record["host"]
    for line in record["lines"]:
        print(json.dumps(line), flush=True)
    if done.returncode != 0:
        tail = (done.stderr or "").strip().splitlines()[-8:]
        record.update(status="failed", detail=f"exit {done.returncode}: " + " | ".join(tail))
    elif not record["lines"]:
        record.update(status="failed", detail="no JSON result lines; output: " + " | ".join(other[-5:]))
    return record


def summary(records: list[dict]) -> tuple[str, bool, bool]:
    rows, all_ran, all_pass = [], True, True
    counts: dict[str, int] = {}
    for record in records:
        for line in record["lines"]:
            counts[line.get("name")] = counts.get(line.get("name"), 0) + 1
    for record in records:
        if record["status"] != "ok":
            all_ran = False
            rows.append((f"{record['bench']} [{record['host']}]", "-", "-",
                         record["status"].upper() + ": " + record["detail"][:160]))
        for line in record["lines"]:
            result = verdict(line)
            all_pass &= result != "FAIL"
            ratio = line.get("ratio")
            ratio_text = f"{ratio:.4g}" if isinstance(ratio, (int, float)) else str(ratio)
            name = str(line.get("name", record["bench"]))
            if counts.get(line.get("name"), 0) > 1:  # same name, different sizes or hosts: show what differs
                detail = [f"{key}={line[key]}" for key in ("size", "size_px", "num_tokens", "metric", "host")
                          if key in line]
                name += f" [{', '.join(detail)}]" if detail else ""
            rows.append((name, ratio_text, str(line.get("goal", "-")), result))
    widths = [max(len(row[i]) for row in rows + [("name", "ratio", "goal", "result")]) for i in range(3)]
    text = ["", "=== summary", f"{'name':<{widths[0]}}  {'ratio':>{widths[1]}}  {'goal':<{widths[2]}}  result"]
    for name, ratio, goal, result in rows:
        text.append(f"{name:<{widths[0]}}  {ratio:>{widths[1]}}  {goal:<{widths[2]}}  {result}")
    return "\n".join(text), all_ran, all_pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (passed to every script)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help=f"subset of {[n for n, _ in BENCHMARKS]}")
    parser.add_argument("--timeout", type=float, help="per script, seconds (default 600 quick, 3600 full)")
    parser.add_argument("--json-out", help="also write all results (and run info) to this JSON file")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    parser.add_argument("--hosts", nargs="+", metavar="NAME",
                        help=f"hosts for {sorted(HOST_MATRIX)} (default: every one set up: {list(installed_hosts())})")
    args = parser.parse_args()
    hosts = installed_hosts()
    if args.hosts:
        unknown = [h for h in args.hosts if h not in hosts]
        if unknown:
            parser.error(f"host(s) {unknown} not set up; set up: {list(hosts)} (scripts/setup.sh --host ...)")
        hosts = {h: hosts[h] for h in args.hosts}
    known = {name for name, _ in BENCHMARKS}
    selected = BENCHMARKS
    if args.only:
        unknown = [n for n in args.only if n not in known]
        if unknown:
            parser.error(f"unknown benchmark(s) {unknown}; choose from {sorted(known)}")
        selected = [(n, s) for n, s in BENCHMARKS if n in args.only]
    timeout = args.timeout or (600.0 if args.quick else 3600.0)
    started = time.monotonic()
    records = []
    for name, script in selected:
        if name in HOST_MATRIX:
            records += [run_one(name, script, args.quick, timeout, python, host) for host, python in hosts.items()]
        else:
            records.append(run_one(name, script, args.quick, timeout, sys.executable))
    text, all_ran, all_pass = summary(records)
    print(text)
    total = time.monotonic() - started
    print(f"total {total:.1f} s ({'quick' if args.quick else 'full'} mode); "
          + ", ".join(f"{r['bench']} ({r['host']}) {r['wall_s']:.0f} s" for r in records))
    if args.json_out:
        pathlib.Path(args.json_out).write_text(json.dumps(
            {"mode": "quick" if args.quick else "full", "total_s": total, "records": records}, indent=1))
    return 0 if all_ran and (all_pass or not args.strict) else 1


if __name__ == "__main__":
    sys.exit(main())
