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
# the install is ~9 GB (CUDA torch, FlashInfer, SGLang's kernel wheels) plus pip's unpacking
free_kib=$(df -Pk . | awk 'NR == 2 {print $4}')
if [ "${free_kib:-0}" -lt $((12 * 1024 * 1024)) ]; then
  echo "ci: needs about 12 GB of free disk for the install, found $((free_kib / 1024 / 1024)) GB; free some space (old virtual environments, /tmp) and rerun." >&2
  exit 1
fi
python -m pip install --no-cache-dir --upgrade pip
pip install --no-cache-dir -e ".[test]"
ruff check . && ruff format --check .
python -m pytest -q tests
