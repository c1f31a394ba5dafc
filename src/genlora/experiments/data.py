"""Text-classification data for the experiments, all offline.

Built-in sources are the four VADER human-rated sentence sets (Hutto & Gilbert, ICWSM 2014), which ship only inside
the source distribution of `vaderSentiment==3.3.2` (`scripts/setup_data.sh` downloads it into the data folder):
tab-separated `id`, mean rating (-4..+4), `text`, latin-1; label = rating > 0, items with |rating| < 0.5 dropped.
Any local CSV/TSV/JSONL file with a text and an integer label column works too (read with `datasets`, offline).

Splits (`make_splits`): the in-domain test set and the out-of-domain subsets are fixed by `split_seed`; the training
subset is drawn from the rest with the run's seed, so the same seed gives the same subset (and, in train.py, the
same batch order) for every method: comparisons are paired.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ConfigError, DataConfig

VADER_VERSION = "3.3.2"
VADER_SDIST = f"vaderSentiment-{VADER_VERSION}.tar.gz"
VADER_SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
VADER_INNER = f"vaderSentiment-{VADER_VERSION}/additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_SETS = {
    "vader_movie": "movieReviewSnippets",
    "vader_tweets": "tweets",
    "vader_amazon": "amazonReviewSnippets",
    "vader_nyt": "nytEditorialSnippets",
}
VADER_MIN_ABS_RATING = 0.5
LOCAL_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
SETUP_HINT = "run `bash scripts/setup_data.sh` (it downloads the VADER sdist with pip, offline-installable)"


@dataclass(frozen=True)
class TextData:
    """A labelled text set. `ids` are stable row identifiers in the source (for recording subsets)."""

    name: str
    texts: tuple[str, ...]
    labels: np.ndarray  # int64 (n,)
    ids: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index, name: str | None = None) -> TextData:
        index = np.asarray(index, dtype=np.int64)
        return TextData(
            name or self.name,
            tuple(self.texts[i] for i in index),
            self.labels[index],
            tuple(self.ids[i] for i in index),
        )

    def ids_sha256(self) -> str:
        """Fingerprint of the examples *and their order*."""
        return hashlib.sha256("\n".join(self.ids).encode()).hexdigest()


# --- locations and checksums ----------------------------------------------------------------------------------------
def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The VADER cache folder: `explicit`, else $GENLORA_DATA_DIR, else ~/.cache/genlora."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("GENLORA_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "genlora"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


_VERIFIED: set[tuple[str, str, float]] = set()


def verify_sha256(path: str | os.PathLike, expected: str, what: str) -> None:
    """Raise if the file's sha256 differs from the pinned value (cached per path, size and mtime)."""
    st = os.stat(path)
    key = (os.fspath(path), expected, st.st_mtime)
    if key in _VERIFIED:
        return
    actual = sha256_file(path)
    if actual != expected:
        raise RuntimeError(f"{what} {path} has sha256 {actual}, expected {expected}: the file is not the pinned release")
    _VERIFIED.add(key)


# --- VADER ----------------------------------------------------------------------------------------------------------
def vader_files(directory: str | os.PathLike | None = None, expected_sha256: str | None = VADER_SDIST_SHA256) -> Path:
    """Folder holding the four `*_GroundTruth.txt` files, extracted once from the sdist in the data folder."""
    root = data_dir(directory)
    out = root / f"vader-{VADER_VERSION}"
    if all((out / f"{stem}_GroundTruth.txt").is_file() for stem in VADER_SETS.values()):
        return out
    sdist = root / VADER_SDIST
    if not sdist.is_file():
        raise FileNotFoundError(f"the VADER data ({VADER_SDIST}) is not in {root}: {SETUP_HINT}")
    if expected_sha256:
        verify_sha256(sdist, expected_sha256, "VADER sdist")
    with tarfile.open(sdist, "r:gz") as outer:
        try:
            inner_bytes = outer.extractfile(VADER_INNER).read()
        except KeyError:
            raise RuntimeError(f"{sdist} does not contain {VADER_INNER}") from None
    tmp = root / f".vader-{VADER_VERSION}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        for stem in VADER_SETS.values():
            member = f"hutto_ICWSM_2014/{stem}_GroundTruth.txt"
            (tmp / f"{stem}_GroundTruth.txt").write_bytes(inner.extractfile(member).read())
    if out.exists():  # another process finished first
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
    else:
        os.replace(tmp, out)
    return out


def parse_vader(path: str | os.PathLike, name: str) -> TextData:
    """`id<TAB>rating<TAB>text` lines (latin-1); label = rating > 0; |rating| < 0.5 dropped."""
    texts, labels, ids = [], [], []
    with open(path, encoding="latin-1") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 3:
                raise ValueError(f"{path}:{lineno}: expected id, rating, text separated by tabs")
            rating = float(parts[1])
            if abs(rating) < VADER_MIN_ABS_RATING:
                continue
            ids.append(parts[0])
            labels.append(int(rating > 0))
            texts.append("\t".join(parts[2:]).strip())
    return TextData(name, tuple(texts), np.asarray(labels, dtype=np.int64), tuple(ids))


# --- local files ----------------------------------------------------------------------------------------------------
def load_local(path: str | os.PathLike, text_column: str, label_column: str, num_labels: int | None = None) -> TextData:
    """A CSV/TSV/JSONL file through `datasets` (offline; `HF_DATASETS_OFFLINE=1`)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        import datasets
    except ImportError as e:
        raise ImportError("local data files need `datasets`: pip install 'genlora[experiments]'") from e
    datasets.disable_progress_bars()
    if suffix in (".csv", ".tsv"):
        ds = datasets.load_dataset(
            "csv", data_files=str(path), split="train", delimiter="\t" if suffix == ".tsv" else ","
        )
    elif suffix in (".jsonl", ".json"):
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
    else:
        raise ValueError(f"{path}: data files must end in one of {LOCAL_SUFFIXES}")
    for key, col in (("data.text_column", text_column), ("data.label_column", label_column)):
        if col not in ds.column_names:
            raise ConfigError(f"{key}: column {col!r} is not in {path} (columns: {ds.column_names})")
    texts = ["" if t is None else str(t) for t in ds[text_column]]
    labels = []
    for i, v in enumerate(ds[label_column]):
        if isinstance(v, bool):
            v = int(v)
        elif isinstance(v, float) and v.is_integer():
            v = int(v)
        elif isinstance(v, str) and v.strip().lstrip("-").isdigit():
            v = int(v.strip())
        if not isinstance(v, int):
            raise ValueError(f"{path}: row {i} has label {v!r}; labels must be integers 0..num_labels-1")
        if v < 0 or (num_labels is not None and v >= num_labels):
            raise ValueError(f"{path}: row {i} has label {v}, outside 0..{(num_labels or 0) - 1} (model.num_labels)")
        labels.append(v)
    return TextData(path.stem, tuple(texts), np.asarray(labels, dtype=np.int64), tuple(str(i) for i in range(len(texts))))


# --- sources --------------------------------------------------------------------------------------------------------
def is_builtin(source: str) -> bool:
    return source in VADER_SETS


def check_source(source: str, key: str) -> None:
    """Config-time check (before anything is written): a built-in name or an existing local data file."""
    if is_builtin(source):
        return
    p = Path(source).expanduser()
    if p.suffix.lower() not in LOCAL_SUFFIXES:
        raise ConfigError(
            f"{key}: {source!r} is neither a built-in data set ({sorted(VADER_SETS)}) nor a file ending in "
            f"{LOCAL_SUFFIXES}"
        )
    if not p.is_file():
        raise ConfigError(f"{key}: data file {source!r} does not exist")


_CACHE: dict[tuple, TextData] = {}


def load_source(source: str, cfg: DataConfig, num_labels: int | None = None) -> TextData:
    """A built-in VADER set or a local file (cached in-process)."""
    if is_builtin(source):
        key = (source, os.fspath(data_dir(cfg.data_dir)))
    else:
        p = Path(source).expanduser().resolve()
        key = (os.fspath(p), p.stat().st_mtime, cfg.text_column, cfg.label_column, num_labels)
    if key not in _CACHE:
        if is_builtin(source):
            folder = vader_files(cfg.data_dir)
            _CACHE[key] = parse_vader(folder / f"{VADER_SETS[source]}_GroundTruth.txt", source)
        else:
            _CACHE[key] = load_local(source, cfg.text_column, cfg.label_column, num_labels)
    data = _CACHE[key]
    if num_labels is not None and len(data) and data.labels.max() >= num_labels:
        raise ValueError(f"{source} has label {int(data.labels.max())}, but model.num_labels is {num_labels}")
    return data


def source_name(source: str) -> str:
    """Short name used in metric keys: `vader_tweets` -> `vader_tweets`, `/x/y/news.csv` -> `news`."""
    return source if is_builtin(source) else Path(source).stem


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(list(keys))


def make_splits(cfg: DataConfig, seed: int, num_labels: int | None = None) -> dict[str, TextData]:
    """{'train', 'test', ['validation'], 'ood:<name>' ...} for a run with `seed`."""
    pool = load_source(cfg.dataset, cfg, num_labels)
    out: dict[str, TextData] = {}
    if cfg.test is None:
        n_test = cfg.test_size if cfg.test_size is not None else max(1, len(pool) // 5)
        if n_test >= len(pool):
            raise ValueError(f"data.test_size={n_test} leaves no training examples in {cfg.dataset} ({len(pool)} rows)")
        perm = _rng(cfg.split_seed, 0).permutation(len(pool))
        test_idx, rest = perm[:n_test], perm[n_test:]
        out["test"] = pool.subset(np.sort(test_idx), name=f"{pool.name}:test")
    else:
        test = load_source(cfg.test, cfg, num_labels)
        if cfg.test_size is not None and cfg.test_size < len(test):
            test = test.subset(np.sort(_rng(cfg.split_seed, 1).permutation(len(test))[: cfg.test_size]))
        out["test"] = test
        rest = np.arange(len(pool))
    n_train = len(rest) if cfg.train_size is None else cfg.train_size
    if n_train > len(rest):
        raise ValueError(f"data.train_size={n_train} but only {len(rest)} examples of {cfg.dataset} are left after the test split")
    order = _rng(cfg.split_seed, 2, seed).permutation(len(rest))[:n_train]
    train = pool.subset(rest[order], name=f"{pool.name}:train")
    if cfg.validation_fraction > 0:
        n_val = int(round(cfg.validation_fraction * len(train)))
        if n_val < 1 or n_val >= len(train):
            raise ValueError(
                f"data.validation_fraction={cfg.validation_fraction} of {len(train)} training examples leaves an "
                "empty training or validation split"
            )
        out["validation"] = train.subset(np.arange(n_val), name=f"{pool.name}:validation")
        train = train.subset(np.arange(n_val, len(train)), name=f"{pool.name}:train")
    out["train"] = train
    for k, source in enumerate(cfg.ood):
        data = load_source(source, cfg, num_labels)
        if cfg.ood_size is not None and cfg.ood_size < len(data):
            data = data.subset(np.sort(_rng(cfg.split_seed, 3, k).permutation(len(data))[: cfg.ood_size]))
        out[f"ood:{source_name(source)}"] = data
    return out


# --- tokenization and batches ----------------------------------------------------------------------------------------
@dataclass
class Encoded:
    """Token ids per example (unpadded) and labels."""

    input_ids: list[list[int]]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self.input_ids))


_ENC_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {(texts, max_length): ids}


def encode(tokenizer, data: TextData, max_length: int) -> Encoded:
    """Token ids (truncated, unpadded) of `data`; cached per tokenizer object, texts and max_length."""
    try:
        cache = _ENC_CACHE.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no cache
        cache = {}
    key = (hashlib.sha256("\x00".join(data.texts).encode()).hexdigest(), max_length)
    ids = cache.get(key)
    if ids is None:
        ids = tokenizer(list(data.texts), truncation=True, max_length=max_length)["input_ids"]
        if len(cache) > 64:
            cache.clear()
        cache[key] = ids
    return Encoded(ids, data.labels)


def collate(enc: Encoded, index, pad_id: int):
    """Padded batch dict (input_ids, attention_mask, labels) of the examples `index`."""
    import torch

    rows = [enc.input_ids[i] for i in index]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[j, : len(r)] = 1
    labels = torch.as_tensor(enc.labels[np.asarray(index)], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_batches(enc: Encoded, batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[np.ndarray]:
    """The batches of one epoch, a pure function of (seed, epoch): the same for every method.

    With `group_by_length`, the shuffled examples are cut into windows of 32 batches, each window is sorted by length
    and cut into batches, and the batch order is shuffled: much less padding, still a random order.
    """
    rng = _rng(seed, 1000 + epoch)
    perm = rng.permutation(len(enc))
    if not group_by_length:
        return [perm[i : i + batch_size] for i in range(0, len(perm), batch_size)]
    lengths = enc.lengths
    window = 32 * batch_size
    batches = []
    for w in range(0, len(perm), window):
        chunk = perm[w : w + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def eval_batches(enc: Encoded, batch_size: int) -> list[np.ndarray]:
    """Length-sorted batches (order does not matter for evaluation; padding does on CPU)."""
    order = np.argsort(-enc.lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
