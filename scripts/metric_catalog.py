"""Write models/metric_catalog.json: what the pack knows of each pyiqa metric without importing pyiqa at
server start: mode (NR/FR), direction, pyiqa's rough score range and the weight files it reads (pyiqa's
default file names; [] = weight-free; null = not known without the weights).

    python scripts/metric_catalog.py            # rebuild after a pyiqa upgrade (tests/test_iqa_models.py
                                                # fails while the file disagrees with the installed pyiqa)

Each metric's architecture is built on CPU without reading weights (iqa_models.expected_weight_files).
Metrics whose build needs a file before any network exists (e.g. NIQE's .mat) are recorded with that
file; metrics that cannot be built offline at all get null (the loader says why when one is chosen).
"""
from __future__ import annotations

import json
import sys

from comfyui_iqa_adapter.adapter import iqa_models, metric_files
from comfyui_iqa_adapter.scripts.comfy_server import PACK_ROOT

OUT = PACK_ROOT / "models" / "metric_catalog.json"
NOT_PER_IMAGE = {"fid", "fid_dinov2", "inception_score"}  # dataset-level scores, not per image


def registry() -> dict[str, dict]:
    """pyiqa's NR then FR metrics (its own order) with mode, direction and range."""
    import pyiqa
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    names = list(pyiqa.list_models(metric_mode="NR")) + list(pyiqa.list_models(metric_mode="FR"))
    return {name: {"mode": DEFAULT_CONFIGS[name]["metric_mode"],
                   "lower_better": bool(DEFAULT_CONFIGS[name].get("lower_better", False)),
                   "score_range": DEFAULT_CONFIGS[name].get("score_range")}
            for name in names if name not in NOT_PER_IMAGE}


def main() -> int:
    import pyiqa

    metrics = registry()
    for name, entry in metrics.items():
        try:
            entry["files"] = iqa_models.expected_weight_files(name, [])
        except metric_files.MissingMetricWeightsError as error:
            entry["files"] = [error.file_name]
        except Exception as error:  # noqa: BLE001 - recorded as unknown: pyiqa cannot build it offline
            entry["files"] = None
            print(f"{name}: files unknown ({type(error).__name__}: {str(error)[:120]})", file=sys.stderr)
    OUT.write_text(json.dumps({"pyiqa": pyiqa.__version__, "metrics": metrics}, indent=1) + "\n")
    print(f"wrote {OUT} ({len(metrics)} metrics)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
