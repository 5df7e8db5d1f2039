#!/usr/bin/env bash
# Creates .venv/ (git-ignored), installs the pinned requirements.txt into it, then this project in editable
# mode (so `import edge_kd, pipelines, models` works from anywhere, benchmarks and tests included). Does nothing
# when .venv is already up to date with requirements.txt and pyproject.toml (a stamp holds their hash).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
stamp=.venv/.requirements.sha256
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up .venv from requirements.txt (TensorFlow: a few minutes) ..."
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt
PYTHONWARNINGS=ignore .venv/bin/python -m pip install --quiet --no-deps --no-build-isolation --editable .
echo "$want" > "$stamp"
echo ".venv ready"
