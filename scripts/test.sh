#!/usr/bin/env bash
# Sets up what the tests need (venv, torch, ComfyUI hosts, tiny models, test extras, Chromium for the
# browser tests), runs the linter (ruff, rules in pyproject.toml) once, and runs the tests over the host matrix:
#   1. the whole suite on the default host (ComfyUI 0.3.75 from the wheel, or COMFYUI_PATH);
#   2. when ../shared/hosts/ComfyUI-0.33.0.tar.gz lies beside this checkout (it does in CI): the
#      host-contract, workflow, adapter, interop, guidance and browser tests on ComfyUI 0.33.0, then the browser
#      tests on 0.33.0 with the newest frontend (comfyui-frontend-package 1.58.1).
# Extra arguments go to every pytest run (e.g. -k foundation). IQA_TEST_MATRIX=default runs only step 1.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
second_host_tarball="${IQA_SHARED_DIR:-$root/../shared}/hosts/ComfyUI-0.33.0.tar.gz"  # IQA_SHARED_DIR: another place
second_host="0.33.0"
newest_frontend="1.58.1"
second_host_tests=(tests/test_host_contract.py tests/test_workflows.py tests/test_adapter_nodes.py
                   tests/test_adapter_patch.py tests/test_interop.py tests/test_guidance.py tests/test_browser.py)

setup_start=$(date +%s)
IQA_SETUP_TEST=1 bash scripts/setup.sh || { echo "setup failed" >&2; exit 1; }
matrix=0
if [ "${IQA_TEST_MATRIX:-all}" != default ] && [ -f "$second_host_tarball" ]; then
  matrix=1
  IQA_SETUP_TEST=1 bash scripts/setup.sh --host "$second_host_tarball" --frontend "$newest_frontend" \
    || { echo "setup of ComfyUI $second_host failed" >&2; exit 1; }
elif [ "${IQA_TEST_MATRIX:-all}" != default ]; then
  echo "[test] NOTE: $second_host_tarball not found: only the default host is tested" >&2
fi
if ! command -v chromium >/dev/null 2>&1; then
  echo "[test] installing Debian's chromium for the browser tests"
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "[test] WARNING: chromium could not be installed; browser tests will skip loudly" >&2
  else
    echo "[test] WARNING: not root, cannot apt-get chromium; browser tests will skip loudly" >&2
  fi
fi
echo "[test] setup took $(( $(date +%s) - setup_start )) s"

summary=()
final=0
user_args=$#
# run LABEL PYTHON ENV... -- PYTEST-ARGS...: one pytest run against one host; its counts go to the summary
run() {
  local label="$1" python="$2"; shift 2
  local envs=()
  while [ "$1" != -- ]; do envs+=("$1"); shift; done
  shift
  local start=$(date +%s) log rc
  log="$(mktemp)"
  echo "[test] === $label ==="
  env "${envs[@]}" "$python" -m pytest -ra "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 5 ] && [ "$user_args" -gt 0 ]; then echo "[test] $label: your pytest arguments selected no tests here"; rc=0
  elif [ "$rc" = 5 ]; then echo "[test] $label: pytest collected no tests: that is a failure" >&2; rc=1; fi
  summary+=("$label: $(grep -E '^=+ .*(passed|failed|error|skipped|deselected|no tests ran).* in ' "$log" | tail -1 | tr -d '=' | sed 's/^ *//;s/ *$//') (exit $rc, $(( $(date +%s) - start )) s wall)")
  rm -f "$log"
  [ "$rc" = 0 ] || final=1
}

# the linter (rules in pyproject.toml) once, before the tests; a finding fails the run like a failed test
lint_start=$(date +%s)
lint_log="$(mktemp)"
echo "[test] === ruff check ==="
.venv/bin/ruff check . 2>&1 | tee "$lint_log"
lint_rc=${PIPESTATUS[0]}
lint_result="$(grep -E '^(All checks passed!|Found [0-9]+ errors?)' "$lint_log" | tail -1)"
summary+=("ruff check: ${lint_result:-no result line} (exit $lint_rc, $(( $(date +%s) - lint_start )) s wall)")
rm -f "$lint_log"
[ "$lint_rc" = 0 ] || final=1

run "ComfyUI default host (whole suite)" .venv/bin/python IQA_TEST_HOST=default -- tests "$@"
if [ "$matrix" = 1 ]; then
  py2=".host/$second_host/venv/bin/python"
  run "ComfyUI $second_host (contract, workflows, adapter, interop, guidance, browser)" "$py2" IQA_TEST_HOST="$second_host" \
    -- "${second_host_tests[@]}" "$@"
  run "ComfyUI $second_host + frontend $newest_frontend (browser)" "$py2" IQA_TEST_HOST="$second_host" \
    IQA_TEST_FRONTEND="$newest_frontend" -- tests/test_browser.py "$@"
fi
echo "[test] summary:"
printf '[test]   %s\n' "${summary[@]}"
exit "$final"
