#!/usr/bin/env bash
# genlora's prepared GPU check (performance issue): versions, the GPU kernel tests, bench.py on the 1b and 150m
# presets within a fixed time budget, results in bench/results/<date>-<gpu>/results.{json,md} and a summary against
# the issue's targets. Uses only what is installed (no package index needed); genlora comes from this checkout.
#
#   bash bench/gpu_check.sh                      # on a GPU machine: about 5 minutes (--budget, default 300 s)
#   bash bench/gpu_check.sh --copy-to "$OUT"     # also copy the results folder there after every phase
#   bash bench/gpu_check.sh --dry-run            # CPU, tiny preset, temporary folder: what CI runs
#   bash bench/gpu_check.sh --help               # every option, the phases, the exit status
#
# Exit status: 0 the check ran (target misses are results); 1 a GPU test failed or a bench phase crashed or
# reported a setup error; 2 the versions check failed (nothing was measured).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "gpu_check: FAILED: no '$PY' on PATH (set PYTHON=/path/to/python)" >&2
  exit 2
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" bench/gpu_check.py "$@"
