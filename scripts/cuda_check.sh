#!/usr/bin/env bash
# bench/cuda_check.py on a GPU machine that has PyTorch but not this project's other pinned packages and no
# network: tiny random checkpoints of ten architectures served on CUDA in bfloat16 (edit fires, rollback
# exact, base weights untouched), then decode throughput of the engine beside transformers generate on a
# random ~0.9B Llama at batch 1, 16 and 64.
#
#   scripts/cuda_check.sh --prepare      # on a machine with pip access: fills .whl/ and .devassets/
#   scripts/cuda_check.sh [OUT] [ARGS]   # on the GPU machine: OUT ($OUT, else cuda-check-out/) gets log,
#                                        # cuda_check.json and cuda_check.md; ARGS go to bench/cuda_check.py
#
# --prepare downloads the CPython 3.12 manylinux x86_64 wheels of the pinned packages a stock
# PyTorch/transformers image lacks (about 44 MiB) into .whl/, and saves the embedded model's tokenizer as a
# folder (3.4 MiB) into .devassets/tokenizer and the encoder's tokenizer into .devassets/encoder-tokenizer:
# the SmolLM2 GGUF (94 MiB) and the retrieval encoder (88 MiB) are too big to send, so the check uses random
# weights (a random tiny encoder too) and runs with retrieval off. Both folders are
# added to .git/info/exclude; send them along with the working tree (the device tool's `carry`).
# On the GPU machine the wheels are installed into /tmp/site (PYTHONPATH), over the image's versions.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

if [ "${1:-}" = "--prepare" ]; then
  PY=${PYTHON:-.venv/bin/python}
  for d in /.whl/ /.devassets/; do
    grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >>.git/info/exclude
  done
  mkdir -p .whl .devassets
  plat=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
           manylinux1_x86_64; do plat+=(--platform "$p"); done
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d .whl \
    transformers==5.23.0 grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
    grpcio-status==1.85.1 googleapis-common-protos==1.76.0 protobuf==7.36.2 grpc-interceptor==0.15.4 \
    starlette==1.10.0 uvicorn==0.55.0 SQLAlchemy==2.1.9 faiss-cpu==1.15.1 pytest-asyncio==1.5.0 || exit 1
  EDITSERVE_TORCH_THREADS=1 "$PY" -c '
import sys; sys.path[:0] = [".", "tests"]
from tiny_checkpoints import embedded_tokenizer
embedded_tokenizer().save_pretrained(".devassets/tokenizer")' || exit 1
  # the encoder's tokenizer without its weights: the check builds a random encoder with it (retrieval is off)
  enc=$("$PY" -c 'from service.retrieval.encoder import embedded_encoder_path as p; print(p())') || exit 1
  mkdir -p .devassets/encoder-tokenizer
  cp "$enc"/tokenizer.json "$enc"/tokenizer_config.json "$enc"/vocab.txt "$enc"/special_tokens_map.json \
    .devassets/encoder-tokenizer/
  du -sh .whl .devassets
  exit 0
fi

OUT_DIR=${OUT:-cuda-check-out}
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then OUT_DIR=$1; shift; fi
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${CUDA_CHECK_WHEELS:-1}" != 0 ] && compgen -G ".whl/*.whl" >/dev/null; then  # CUDA_CHECK_WHEELS=0: skip
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
tok=()
[ -d .devassets/tokenizer ] && tok=(--tokenizer .devassets/tokenizer)
[ -d .devassets/encoder-tokenizer ] && tok+=(--encoder-tokenizer .devassets/encoder-tokenizer)
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  git rev-parse HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  "$PY" bench/cuda_check.py --out "$OUT_DIR" "${tok[@]}" "$@"
} 2>&1 | tee "$OUT_DIR/log"
