#!/usr/bin/env bash
# The main job: set everything up, then run the example text-to-image workflow with a quality target
# on a headless ComfyUI server and write images + a scores table under output/demo/.
# Extra arguments go to scripts/demo.py (see --help), e.g. --ckpt my_sdxl.safetensors --adapter x.safetensors
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
