#!/usr/bin/env bash
# Creates .venv/ (git-ignored) and installs the pinned requirements.txt into it; does nothing
# when .venv is already up to date with requirements.txt (a stamp holds the file's hash).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
want=$(sha256sum requirements.txt | cut -d' ' -f1)
stamp=.venv/.requirements.sha256
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up .venv from requirements.txt (TensorFlow: a few minutes) ..."
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt
echo "$want" > "$stamp"
echo ".venv ready"
