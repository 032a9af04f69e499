"""Write models/metric_weights.json: the weight files each offered pyiqa metric reads (pyiqa's default
file names; [] = weight-free), so the metric picker can list installed metrics first and name the
weight-free ones without building ~100 networks when the server starts.

    python scripts/metric_weight_catalog.py            # rebuild after a pyiqa upgrade

Each metric's architecture is built on CPU without reading weights (iqa_models.expected_weight_files).
Metrics whose build needs a file before any network exists (e.g. NIQE's .mat) are recorded with that
file; metrics that cannot be built offline at all are left out (the loader says why when chosen).
"""
from __future__ import annotations

import json
import sys

from comfyui_iqa_adapter.adapter import iqa_models
from comfyui_iqa_adapter.models import metrics
from comfyui_iqa_adapter.scripts.comfy_server import PACK_ROOT

OUT = PACK_ROOT / "models" / "metric_weights.json"


def main() -> int:
    catalog: dict[str, list[str]] = {}
    for name in metrics.offered_metric_names():
        try:
            catalog[name] = iqa_models.expected_weight_files(name, [])
        except iqa_models.MissingMetricWeightsError as error:
            catalog[name] = [error.file_name]
        except Exception as error:  # noqa: BLE001 - report and skip what pyiqa cannot build offline
            print(f"skip {name}: {type(error).__name__}: {str(error)[:120]}", file=sys.stderr)
            continue
        print(name, catalog[name], file=sys.stderr)
    import pyiqa
    OUT.write_text(json.dumps({"pyiqa": pyiqa.__version__, "files": catalog}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT} ({len(catalog)} metrics)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
