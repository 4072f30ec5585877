#!/usr/bin/env bash
# A prepared device check: throughput, edit time, Generate latency with many active edits and a CounterFact
# evaluation, in bfloat16 and float32 on a CUDA GPU, all written to one folder with a summary.md.
#
#   scripts/device_check.sh [--small] [--require-cuda] [--model DIR] [--steps LIST] [--dtypes LIST] [OUT]
#
# OUT (argument, else $OUT, else device-check-out/) receives: env.txt, one <step>-<dtype>.log per step
# (its stdout and stderr), the steps' JSON figures, eval-<dtype>/ (the evaluation's own report), steps.tsv
# (status and seconds of every step), summary.md and summary.json.
#
# Steps (--steps, comma-separated; default all, in this order):
#   throughput  bench/serve_throughput.py: the service over gRPC at 1/16/64 concurrent streams beside
#               transformers generate, one prompt at a time and as one static batch, in the same run
#   edits       bench/edit_benchmark.py --only compute: edit compute time, median and p90 over 20 edits
#   generate    bench/edit_benchmark.py --only generate: Generate latency with 0 and 10,000 active edits
#   eval        editserve eval: 100 CounterFact records at T=100 (methods $EVAL_METHODS); skipped with a
#               message when $DATA_DIR/counterfact-val.json is absent
#
# Without CUDA, or with --small, the sizes shrink so that a 2-core CPU finishes in a few minutes (float32
# only, clients 1,4, 8 new tokens, 3 edits, 200 active edits, eval on 5 records at T=5): CI runs it so.
# Every step runs under `timeout`, capped by what is left of a total budget ($BUDGET_S: 470 s, small 330 s),
# so a hung step cannot eat the rest. A failed, timed-out or budget-skipped step is marked in summary.md
# and makes the script exit 1 at the end.
#
# --model DIR (or $MODEL) measures a Hugging Face model folder instead of the embedded SmolLM2 ("embedded").
#
# Environment: OUT, MODEL, DATA_DIR (../shared/data, relative to the repository root), PYTHON (.venv/bin/python),
# BUDGET_S, EVAL_METHODS ("unedited hook retrieval both"; add rome for the ROME baseline),
# EDITSERVE_TORCH_THREADS (torch CPU threads of every step).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

small=0
require_cuda=0
steps="throughput,edits,generate,eval"
dtypes=""
out_arg=""
model_arg=""
while [ $# -gt 0 ]; do
  case "$1" in
    --small) small=1 ;;
    --require-cuda) require_cuda=1 ;;
    --model) model_arg=$2; shift ;;
    --model=*) model_arg=${1#*=} ;;
    --steps) steps=$2; shift ;;
    --steps=*) steps=${1#*=} ;;
    --dtypes) dtypes=$2; shift ;;
    --dtypes=*) dtypes=${1#*=} ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "device_check.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) out_arg=$1 ;;
  esac
  shift
done

OUT_DIR=${out_arg:-${OUT:-device-check-out}}
MODEL=${model_arg:-${MODEL:-embedded}}
if [ "$MODEL" != embedded ]; then
  [ -d "$MODEL" ] || { echo "device_check.sh: --model $MODEL is not a folder (or 'embedded')" >&2; exit 2; }
  MODEL=$(cd "$MODEL" && pwd)  # the steps run from the repository root
fi
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$ROOT"
DATA_DIR=${DATA_DIR:-../shared/data}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, whatever the venv installed
THREADS=${EDITSERVE_TORCH_THREADS:-0}

started=$(date +%s)
cuda=$("$PYTHON" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null || echo "error")
if [ "$cuda" = "error" ]; then
  echo "device_check.sh: $PYTHON cannot import torch (run make install, or set PYTHON)" >&2
  exit 2
fi
gpu_seen=0
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && gpu_seen=1
note=""
if [ "$cuda" = "True" ]; then
  device=cuda
else
  device=cpu
  small=1
  if [ "$gpu_seen" = 1 ]; then
    note="nvidia-smi sees a GPU but this torch has no CUDA: ran the small CPU configuration"
  fi
  if [ "$require_cuda" = 1 ]; then
    echo "device_check.sh: --require-cuda, but torch.cuda.is_available() is $cuda ($PYTHON)" >&2
    exit 2
  fi
fi

if [ "$small" = 1 ]; then
  config=small
  : "${dtypes:=float32}"
  BUDGET_S=${BUDGET_S:-330}
  tp_args=(--clients 1,4 --new-tokens 8 --repeats 1 --edits 0)
  edit_n=3
  gen_args=(--table-sizes 0,200 --rounds 2 --tokens 8)
  eval_n=5 eval_t=5
  cap_throughput=150 cap_edits=120 cap_generate=120 cap_eval=180
else
  config=full
  : "${dtypes:=bfloat16,float32}"
  BUDGET_S=${BUDGET_S:-470}
  tp_args=(--clients 1,16,64 --new-tokens 32 --repeats 1 --edits 0)
  edit_n=20
  gen_args=(--table-sizes 0,10000 --rounds 7 --tokens 32)
  eval_n=100 eval_t=100
  cap_throughput=120 cap_edits=120 cap_generate=90 cap_eval=300
fi
EVAL_METHODS=${EVAL_METHODS:-unedited hook retrieval both}
deadline=$((started + BUDGET_S))
IFS=, read -r -a dtype_list <<<"$dtypes"
IFS=, read -r -a step_list <<<"$steps"
for s in "${step_list[@]}"; do
  case "$s" in throughput|edits|generate|eval) ;; *) echo "device_check.sh: unknown step $s" >&2; exit 2 ;; esac
done
wanted() { [[ ",$steps," == *",$1,"* ]]; }

steps_tsv="$OUT_DIR/steps.tsv"
printf 'step\tdtype\tstatus\tseconds\tlog\tnote\n' >"$steps_tsv"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "config: $config (device $device, dtypes $dtypes, steps $steps, budget ${BUDGET_S}s)"
  echo "model: $MODEL"
  if [ -n "$note" ]; then echo "note: $note"; fi
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with local changes)')"
  echo "host: $(uname -srm), $(nproc) CPUs"
  echo "python: $PYTHON ($("$PYTHON" -c 'import sys; print(sys.version.split()[0])'))"
  "$PYTHON" bench/device_check.py env || echo "torch environment: could not be read"
  echo "EDITSERVE_TORCH_THREADS: ${EDITSERVE_TORCH_THREADS:-unset}"
  echo
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi 2>&1 || true
  else
    echo "nvidia-smi: not found"
  fi
} >"$OUT_DIR/env.txt" 2>&1

echo "device check: $config configuration on $device, model $MODEL, dtypes $dtypes, output $OUT_DIR"
if [ -n "$note" ]; then echo "note: $note"; fi

# run_step NAME DTYPE CAP_S COMMAND...: stdout and stderr to NAME-DTYPE.log, a row in steps.tsv.
run_step() {
  local name=$1 dtype=$2 cap=$3
  shift 3
  local log="$name-$dtype.log" now left limit rc t0 seconds status
  now=$(date +%s)
  left=$((deadline - now))
  limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 20 ]; then
    printf '%s\t%s\tskipped\t0\t\tbudget: %ss left of %ss\n' "$name" "$dtype" "$left" "$BUDGET_S" >>"$steps_tsv"
    echo "  $name ($dtype): skipped, ${left}s left of the ${BUDGET_S}s budget"
    return 0
  fi
  echo "  $name ($dtype): up to ${limit}s ..."
  { echo "\$ $*"; echo; } >"$OUT_DIR/$log"
  t0=$(date +%s)
  rc=0
  timeout --kill-after=15 "$limit" "$@" >>"$OUT_DIR/$log" 2>&1 || rc=$?
  seconds=$(($(date +%s) - t0))
  case "$rc" in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$dtype" "$status" "$seconds" "$log" \
    "$([ "$status" = ok ] || echo "exit $rc, limit ${limit}s")" >>"$steps_tsv"
  echo "  $name ($dtype): $status in ${seconds}s"
}

if wanted throughput; then
  for dtype in "${dtype_list[@]}"; do
    run_step throughput "$dtype" "$cap_throughput" \
      "$PYTHON" bench/serve_throughput.py --model "$MODEL" --device "$device" --dtype "$dtype" --threads "$THREADS" \
      "${tp_args[@]}" --json "$OUT_DIR/throughput-$dtype.json"
  done
fi
if wanted edits; then
  for dtype in "${dtype_list[@]}"; do
    run_step edits "$dtype" "$cap_edits" \
      "$PYTHON" bench/edit_benchmark.py --model "$MODEL" --device "$device" --dtype "$dtype" --threads "$THREADS" \
      --only compute --edits "$edit_n" --json "$OUT_DIR/edits-$dtype.json"
  done
fi
if wanted generate; then
  for dtype in "${dtype_list[@]}"; do
    run_step generate "$dtype" "$cap_generate" \
      "$PYTHON" bench/edit_benchmark.py --model "$MODEL" --device "$device" --dtype "$dtype" --threads "$THREADS" \
      --only generate "${gen_args[@]}" --json "$OUT_DIR/generate-$dtype.json"
  done
fi
if wanted eval; then
  data="$DATA_DIR/counterfact-val.json"
  if [ ! -f "$data" ]; then
    for dtype in "${dtype_list[@]}"; do
      printf 'eval\t%s\tskipped\t0\t\tno data: %s is absent (set DATA_DIR)\n' "$dtype" "$data" >>"$steps_tsv"
    done
    echo "  eval: skipped, $data is absent (set DATA_DIR to the folder holding counterfact-val.json)"
  else
    for dtype in "${dtype_list[@]}"; do
      rm -rf "$OUT_DIR/eval-$dtype"  # a fresh evaluation, not a resumed one
      # shellcheck disable=SC2086  # EVAL_METHODS is a word list
      run_step eval "$dtype" "$cap_eval" \
        "$PYTHON" -m service eval --data "$data" --format counterfact --n "$eval_n" \
        --sequential "$eval_t" --methods $EVAL_METHODS --model "$MODEL" --device "$device" --dtype "$dtype" \
        --out "$OUT_DIR/eval-$dtype"
    done
  fi
fi

wall=$(($(date +%s) - started))
"$PYTHON" bench/device_check.py summarize "$OUT_DIR" --config "$config" --device "$device" --model "$MODEL" \
  --wall "$wall" --note "$note"
echo "wrote $OUT_DIR/summary.md (${wall}s)"
if awk -F'\t' 'NR > 1 && ($3 == "failed" || $3 == "timeout" || ($3 == "skipped" && $6 ~ /^budget/)) \
    { bad = 1 } END { exit !bad }' "$steps_tsv"; then
  echo "device check: some steps did not finish (see $OUT_DIR/summary.md)" >&2
  exit 1
fi
