"""Trainer: does the learned conditioning carry information? Held-out denoising loss with true vs
shuffled quality vectors after a short training (tests/support/trainer_signal.py), over several seeds.

Prints one JSON line per seed and a summary line: ratio = mean loss(true) / mean loss(shuffled)
(< 1: the vectors help), with the gap's mean and standard deviation over seeds.

    .venv/bin/python benchmarks/bench_trainer_signal.py [--quick] [--seeds N] [--steps S]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tempfile
import time

from comfyui_iqa_adapter.benchmarks import common

REPO = common.REPO_ROOT


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int)
    p.add_argument("--steps", type=int)
    args = p.parse_args()
    seeds = args.seeds or (2 if args.quick else 5)
    steps = args.steps or (20 if args.quick else 40)
    from comfyui_iqa_adapter.scripts.comfy_server import import_host

    import_host(REPO / ".host" / "ComfyUI", cpu=True)
    import torch

    torch.set_num_threads(1)
    from comfyui_iqa_adapter.nodes.train_host import HostBase
    from comfyui_iqa_adapter.tests.support import trainer_signal

    base = HostBase.from_checkpoint(
        str(REPO / ".host" / "ComfyUI" / "models" / "checkpoints" / "tiny_sd15.safetensors"))
    results = []
    with tempfile.TemporaryDirectory(prefix="iqa-signal-") as work:
        for seed in range(seeds):
            began = time.perf_counter()
            result = trainer_signal.run(base, pathlib.Path(work), seed, steps=steps)
            result["seconds"] = round(time.perf_counter() - began, 1)
            results.append(result)
            print(json.dumps({"name": "trainer_signal_seed", **result}), flush=True)
    gaps = [r["gap"] for r in results]
    true = statistics.mean(r["loss_true"] for r in results)
    shuffled = statistics.mean(r["loss_shuffled"] for r in results)
    summary = {"name": "trainer_signal", "ratio": true / shuffled, "baseline_s": shuffled, "variant_s": true,
               "repeats": seeds, "goal": "< 1 (true vectors lower the held-out loss)", "goal_max": 1.0,
               "passed": true < shuffled, "gap_mean": statistics.mean(gaps),
               "gap_std": statistics.stdev(gaps) if len(gaps) > 1 else 0.0,
               "seeds_with_positive_gap": sum(g > 0 for g in gaps), "steps": steps}
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
