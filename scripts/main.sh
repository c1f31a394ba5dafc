#!/usr/bin/env bash
# The main job: set up on a fresh machine (package, offline model and data), then run the default comparison
# (configs/default_compare.yaml): all-MiniLM-L6-v2 with LoRA on all linear layers, 100 VADER movie sentences, plain
# LoRA, early stopping (the baseline a user would pick first), Flat-LoRA, LoRASC, LoRA Dropout and all four tuned as
# a combination, every variant tuned on a fixed validation split, 3 seeds, in-domain and out-of-domain tests; prints
# the tables and writes tables and plots to runs/compare_default (runs/compare_quick with --quick).
# Resumable: run it again to continue after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_data.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python3}" -m genlora.cli compare configs/default_compare.yaml "$@"
