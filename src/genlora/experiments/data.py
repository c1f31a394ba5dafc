"""Sentence data for the text and lm tasks, all offline, and the fixed splits every variant shares.

Built-in sources are the four VADER human-rated sentence sets (Hutto & Gilbert, ICWSM 2014), which ship only inside
the source distribution of `vaderSentiment==3.3.2` (`scripts/setup_data.sh` downloads it): tab-separated `id`, mean
rating (-4..+4), `text`, latin-1; label = rating > 0, items with |rating| < 0.5 dropped. Local files are read
verbatim by `local_files.read_table`.

Splits (`make_splits`): the in-domain test set, the validation set and the out-of-domain subsets are fixed by
`split_seed`; the training subset is drawn from the rest with the run's seed, so a seed gives the same subset for
every variant (paired comparisons). Parts not asked for are never materialised: a tuning run's splits hold no test
examples at all.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ConfigError, DataConfig
from .local_files import SUFFIXES, DataFileError, read_table

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
SETUP_HINT = "run `bash scripts/setup_data.sh` (it downloads the VADER sdist with pip, offline-installable)"


@dataclass(frozen=True)
class TextData:
    """Labelled sentences; `ids` are stable row identifiers in the source (for recording subsets)."""

    name: str
    texts: tuple[str, ...]
    labels: np.ndarray  # int64 (n,)
    ids: tuple[str, ...]
    dropped: tuple[int, ...] = ()  # local files: lines of incomplete rows dropped (data.drop_incomplete)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index, name: str | None = None) -> TextData:
        index = np.asarray(index, dtype=np.int64)
        return TextData(name or self.name, tuple(self.texts[i] for i in index), self.labels[index],
                        tuple(self.ids[i] for i in index), self.dropped)  # `dropped` describes the source file

    def ids_sha256(self) -> str:
        """Fingerprint of the examples *and their order*."""
        return hashlib.sha256("\n".join(self.ids).encode()).hexdigest()


# --- locations and checksums ----------------------------------------------------------------------------------------
def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The data cache folder: `explicit`, else $GENLORA_DATA_DIR, else ~/.cache/genlora."""
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
    """Raise if the file's sha256 differs from the pinned value (checked once per path and mtime)."""
    key = (os.fspath(path), expected, os.stat(path).st_mtime)
    if key in _VERIFIED:
        return
    actual = sha256_file(path)
    if actual != expected:
        raise RuntimeError(f"{what} {path} has sha256 {actual}, expected {expected}: not the pinned release")
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


# --- sources --------------------------------------------------------------------------------------------------------
def is_builtin(source: str) -> bool:
    return source in VADER_SETS


def check_source(source: str, key: str) -> None:
    """Config-time check: a built-in name or an existing local data file."""
    if is_builtin(source):
        return
    p = Path(source).expanduser()
    if p.suffix.lower() not in SUFFIXES:
        raise ConfigError(f"{key}: {source!r} is neither a built-in data set ({sorted(VADER_SETS)}) nor a file ending "
                          f"in {list(SUFFIXES)}")
    if not p.is_file():
        raise ConfigError(f"{key}: data file {source!r} does not exist")


_CACHE: dict[tuple, TextData] = {}


def load_source(source: str, cfg: DataConfig, labels: bool = True) -> TextData:
    """A built-in VADER set or a local file (cached in-process). DataFileError names the file and rows."""
    if is_builtin(source):
        key: tuple = (source, os.fspath(data_dir(cfg.data_dir)))
    else:
        p = Path(source).expanduser().resolve()
        key = (os.fspath(p), p.stat().st_mtime_ns, cfg.text_column, cfg.label_column if labels else None,
               cfg.drop_incomplete)
    if key not in _CACHE:
        if is_builtin(source):
            folder = vader_files(cfg.data_dir)
            data = parse_vader(folder / f"{VADER_SETS[source]}_GroundTruth.txt", source)
        else:
            t = read_table(source, cfg.text_column, cfg.label_column if labels else None,
                           drop_incomplete=cfg.drop_incomplete)
            lab = t.labels if t.labels is not None else np.zeros(len(t.texts), dtype=np.int64)
            data = TextData(Path(source).stem, t.texts, lab, tuple(str(i) for i in t.lines), t.dropped)
        if len(_CACHE) > 16:
            _CACHE.clear()
        _CACHE[key] = data
    return _CACHE[key]


def source_name(source: str) -> str:
    """Short name used in metric keys: `vader_tweets` -> `vader_tweets`, `/x/y/news.csv` -> `news`."""
    return source if is_builtin(source) else Path(source).stem


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(list(keys))


SPLIT_PARTS = ("train", "validation", "test", "ood")


def make_splits(cfg: DataConfig, seed: int, parts=SPLIT_PARTS, labels: bool = True) -> dict[str, TextData]:
    """{'train', 'validation', 'test', 'ood:<name>', ...} (those in `parts`) for a run with `seed`.

    The pool is permuted once by `split_seed`: the first `test_size` examples are the test set (unless `cfg.test`
    gives one), the next `validation_size` the validation set, and the training subset is drawn from the rest by
    (`split_seed`, `seed`). Raises ValueError when the sizes do not fit."""
    pool = load_source(cfg.dataset, cfg, labels)
    out: dict[str, TextData] = {}
    perm = _rng(cfg.split_seed, 0).permutation(len(pool))
    if cfg.test is None:
        n_test = cfg.test_size if cfg.test_size is not None else max(1, len(pool) // 5)
    else:
        n_test = 0
    n_val = cfg.validation_size
    if n_test + n_val >= len(pool):
        raise ValueError(f"data.test_size={n_test} and data.validation_size={n_val} leave no training examples in "
                         f"{cfg.dataset} ({len(pool)} usable rows)")
    rest = perm[n_test + n_val:]
    n_train = len(rest) if cfg.train_size is None else cfg.train_size
    if n_train > len(rest):
        raise ValueError(f"data.train_size={n_train} but only {len(rest)} examples of {cfg.dataset} remain after the "
                         f"test ({n_test}) and validation ({n_val}) splits")
    if "test" in parts:
        if cfg.test is None:
            out["test"] = pool.subset(np.sort(perm[:n_test]), name=f"{pool.name}:test")
        else:
            test = load_source(cfg.test, cfg, labels)
            if cfg.test_size is not None and cfg.test_size < len(test):
                test = test.subset(np.sort(_rng(cfg.split_seed, 1).permutation(len(test))[: cfg.test_size]))
            out["test"] = test
    if "validation" in parts and n_val:
        out["validation"] = pool.subset(np.sort(perm[n_test: n_test + n_val]), name=f"{pool.name}:validation")
    if "train" in parts:
        order = _rng(cfg.split_seed, 2, seed).permutation(len(rest))[:n_train]
        out["train"] = pool.subset(rest[order], name=f"{pool.name}:train")
    if "ood" in parts:
        for k, source in enumerate(cfg.ood):
            data = load_source(source, cfg, labels)
            if cfg.ood_size is not None and cfg.ood_size < len(data):
                data = data.subset(np.sort(_rng(cfg.split_seed, 3, k).permutation(len(data))[: cfg.ood_size]))
            out[f"ood:{source_name(source)}"] = data
    return out


def infer_num_labels(cfg: DataConfig, num_labels: int | None) -> int:
    """`num_labels`, or the largest label of the pool + 1 (at least 2)."""
    if num_labels is not None:
        return num_labels
    pool = load_source(cfg.dataset, cfg)
    return max(2, int(pool.labels.max()) + 1) if len(pool) else 2


def check_data(cfg: DataConfig, num_labels: int | None, labels: bool = True) -> int:
    """Config-time check of the sources and sizes (raising ConfigError naming the key); returns the number of
    classes (`num_labels`, or inferred from the pool's labels)."""
    check_source(cfg.dataset, "data.dataset")
    if cfg.test is not None:
        check_source(cfg.test, "data.test")
    for i, s in enumerate(cfg.ood):
        check_source(s, f"data.ood[{i}]")
    keys = ["data.dataset"] + (["data.test"] if cfg.test else []) + [f"data.ood[{i}]" for i in range(len(cfg.ood))]
    sources = [cfg.dataset] + ([cfg.test] if cfg.test else []) + list(cfg.ood)
    try:
        make_splits(cfg, 0, parts=(), labels=labels)  # sizes only (loads and caches the pool)
        n = infer_num_labels(cfg, num_labels) if labels else 0
        for key, source in zip(keys, sources):
            data = load_source(source, cfg, labels)
            if labels and len(data) and int(data.labels.max()) >= n:
                raise ConfigError(f"{key}: {source} has label {int(data.labels.max())}, but model.num_labels is {n}")
    except DataFileError as e:
        raise ConfigError(str(e)) from None
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"data: {e}") from None
    return n
