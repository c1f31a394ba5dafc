#!/usr/bin/env bash
# Installs genlora with its test extras on a fresh machine.
# torch first: an unpinned `torch` requirement would pull a multi-GB CUDA build, while torch==2.13.0 resolves to
# the CPU wheel available locally. An already installed torch (e.g. the GPU machine's 2.11) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
# Triton (its CPU interpreter checks the fused noise kernel in the tests); a machine that has one keeps it (the GPU
# machine's triton belongs to its torch). Not a test extra: a pin there would try to replace that one.
if ! "$PY" -c "import triton" >/dev/null 2>&1; then
  "$PY" -m pip install -q "triton==3.6.0"
fi
"$PY" -m pip install -q -e ".[test]"
