#!/usr/bin/env bash
# Sets up what the tests need (venv, torch, ComfyUI host, tiny models, test extras, Chromium for the
# browser tests) and runs the whole pytest suite. Extra arguments go to pytest.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
IQA_SETUP_TEST=1 bash scripts/setup.sh || { echo "setup failed" >&2; exit 1; }
if ! command -v chromium >/dev/null 2>&1; then
  echo "[test] installing Debian's chromium for the browser tests"
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "[test] WARNING: chromium could not be installed; browser tests will skip loudly" >&2
  else
    echo "[test] WARNING: not root, cannot apt-get chromium; browser tests will skip loudly" >&2
  fi
fi
start=$(date +%s)
.venv/bin/python -m pytest tests -ra "$@"
rc=$?
echo "[test] pytest finished with exit code $rc in $(( $(date +%s) - start )) s"
if [ "$rc" = 5 ]; then echo "[test] pytest collected no tests: that is a failure" >&2; exit 1; fi
exit "$rc"
