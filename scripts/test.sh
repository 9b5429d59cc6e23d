#!/usr/bin/env bash
# The whole test suite in one command: installs what the tests need (cached between
# runs: the project's venv in .venv, real ComfyUI in ~/.cache/comfylb) and runs it all.
#   scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${COMFYLB_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PY" -m venv "$VENV"
fi
echo "== installing comfylb with its test dependencies"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
if ! command -v chromium >/dev/null 2>&1; then
  echo "== installing Debian's chromium for the browser tests"
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
echo "== real ComfyUI for the integration tests (cached)"
"$VENV/bin/python" scripts/comfyui_env.py
# The core supports Python 3.10-3.13: where those interpreters are installed (pyenv or on
# PATH), the fast tests run on them too.  COMFYLB_OTHER_PYTHONS="" skips this.
find_python() {
  local cand
  for cand in "python$1" $(ls -d "$(pyenv root 2>/dev/null)"/versions/"$1".*/bin/python 2>/dev/null); do
    if "$cand" -c pass >/dev/null 2>&1; then echo "$cand"; return; fi
  done
}
for v in ${COMFYLB_OTHER_PYTHONS-3.10 3.13}; do
  py=$(find_python "$v")
  if [ -z "$py" ]; then echo "== python $v not installed: skipped"; continue; fi
  other=".venv-py$v"
  [ -x "$other/bin/python" ] || "$py" -m venv "$other"
  "$other/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
  echo "== unit tests on $("$other/bin/python" --version)"
  "$other/bin/python" -m pytest tests/unit -q -p no:cacheprovider
done
echo "== checking types (mypy; configured in pyproject.toml)"
"$VENV/bin/python" -m mypy
echo "== running the tests"
exec "$VENV/bin/python" -m pytest "$@"
