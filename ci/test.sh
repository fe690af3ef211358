#!/usr/bin/env bash
# Fresh virtual environment, the README's install command, the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
df -h . | tail -1 | awk '{print "ci: free disk before install: " $4}'
python -m pip install --no-cache-dir --upgrade pip
pip install --no-cache-dir -e ".[test]"
python -m pytest -q tests
