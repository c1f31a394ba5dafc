"""The vision task's base model: a small ViT (`transformers.ViTForImageClassification` built from a config), pretrained
here on Fashion-MNIST once and cached, because no pretrained vision transformer ships in any package
(docs/data.md). `pretrain_base` trains it (about 3 minutes of CPU with the defaults) into
`<cache_dir>/vit-fmnist-<key>/`: `save_pretrained` files plus `pretrain.json` (its training config, data, test
accuracy, time). `<key>` hashes everything that changes the weights, so another config trains another base; a base
that exists is reused. The folder is written under a temporary name and renamed when complete.

`load_vit_base` gives a fresh copy of a cached base with a new classification head drawn from the run's seed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch

from ..config import check_choice, check_int, check_range
from .data import data_dir
from .files import write_json
from .progress import Progress
from .vision_data import NUM_CLASSES, ImageData, load_fashion_mnist

PRETRAIN_INFO = "pretrain.json"


def to_dict(cfg) -> dict[str, Any]:
    return asdict(cfg)


@dataclass
class ViTSettings:
    """The ViT architecture (`transformers.ViTConfig` keys). 28x28 one-channel images in 7x7 patches: 16 tokens and
    CLS."""

    image_size: int = 28
    patch_size: int = 7
    num_channels: int = 1
    hidden_size: int = 96
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 192
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    num_labels: int = 10

    def __post_init__(self):
        for key in ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers",
                    "num_attention_heads", "intermediate_size"):
            check_int(key, getattr(self, key), low=1)
        check_int("num_labels", self.num_labels, low=2)
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide image_size={self.image_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must divide hidden_size={self.hidden_size}")
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            check_range(key, getattr(self, key), low=0.0, high=1.0, high_open=True)
        check_range("initializer_range", self.initializer_range, low=0.0, low_open=True)

    def vit_config(self):
        from transformers import ViTConfig

        return ViTConfig(**to_dict(self))


@dataclass
class PretrainConfig:
    """Pretraining the base on Fashion-MNIST (all parameters, AdamW, warmup + decay). The defaults (307k parameters,
    5 epochs, 2,345 steps) took about 170 s of CPU time on one thread (6 min wall on a loaded, shared 2-core machine)
    and reached 87.4% test accuracy."""

    vit: ViTSettings = field(default_factory=ViTSettings)
    epochs: int = 5
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_ratio: float = 0.05
    lr_schedule: Literal["linear", "cosine", "constant"] = "cosine"
    max_grad_norm: float = 1.0  # 0: no clipping
    seed: int = 0
    train_limit: Optional[int] = None  # the first N training images (quick runs); null: all 60,000
    test_limit: Optional[int] = None  # the first N test images; null: all 10,000
    fashion_dir: Optional[str] = None  # folder of the four .gz files; null: searched (see vision_data)
    # not part of the cache key (they do not change the weights):
    eval_batch_size: int = 1000
    num_threads: Optional[int] = 1  # torch CPU threads while pretraining; null: leave torch's setting
    log_every: int = 100

    def __post_init__(self):
        check_int("epochs", self.epochs, low=1)
        check_int("batch_size", self.batch_size, low=1)
        check_range("lr", self.lr, low=0.0, low_open=True)
        check_range("weight_decay", self.weight_decay, low=0.0)
        check_range("warmup_ratio", self.warmup_ratio, low=0.0, high=1.0, high_open=True)
        check_choice("lr_schedule", self.lr_schedule, ("linear", "cosine", "constant"))
        check_range("max_grad_norm", self.max_grad_norm, low=0.0)
        check_int("seed", self.seed, low=0)
        for key in ("train_limit", "test_limit", "num_threads"):
            if getattr(self, key) is not None:
                check_int(key, getattr(self, key), low=1)
        check_int("eval_batch_size", self.eval_batch_size, low=1)
        check_int("log_every", self.log_every, low=1)

    def weight_fields(self) -> dict[str, Any]:
        """The fields that determine the pretrained weights (and its reported accuracy): the cache key's content."""
        d = to_dict(self)
        for key in ("eval_batch_size", "num_threads", "log_every", "fashion_dir"):
            d.pop(key)
        return d


def build_vit(settings: ViTSettings | None = None, seed: int = 0):
    """A freshly initialised `ViTForImageClassification` (initialisation drawn from `seed`; the global RNG is left
    as it was)."""
    from transformers import ViTForImageClassification

    settings = settings or ViTSettings()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTForImageClassification(settings.vit_config())
    return model


# --- pretraining ---------------------------------------------------------------------------------------------------
def base_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $GENLORA_DATA_DIR/vit, else ~/.cache/genlora/vit."""
    return Path(cache_dir).expanduser() if cache_dir else data_dir() / "vit"


def _data_tag(train: ImageData | None, test: ImageData | None) -> dict[str, Any]:
    if train is None and test is None:
        return {"source": "fashion_mnist"}
    tag = {}
    for name, d in (("train", train), ("test", test)):
        h = hashlib.sha256(d.images.detach().cpu().contiguous().numpy().tobytes())
        h.update(d.labels.numpy().astype("<i8").tobytes())
        tag[name] = {"name": d.name, "n": len(d), "sha256": h.hexdigest()}
    return tag


def base_key(cfg: PretrainConfig, data_tag: dict[str, Any] | None = None) -> str:
    """12 hex digits naming the cached base: a hash of `cfg.weight_fields()` and the data."""
    blob = json.dumps({"pretrain": cfg.weight_fields(), "data": data_tag or {"source": "fashion_mnist"}},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def base_folder(cache_dir: str | os.PathLike | None, cfg: PretrainConfig | None = None,
                data_tag: dict[str, Any] | None = None) -> Path:
    cfg = cfg or PretrainConfig()
    prefix = "vit-fmnist" if (data_tag or {"source": "fashion_mnist"}) == {"source": "fashion_mnist"} else "vit-custom"
    return base_cache_dir(cache_dir) / f"{prefix}-{base_key(cfg, data_tag)}"


def is_base(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return (folder / PRETRAIN_INFO).is_file() and (folder / "config.json").is_file() and any(
        (folder / n).is_file() for n in ("model.safetensors", "pytorch_model.bin"))


def load_base_info(folder: str | os.PathLike) -> dict[str, Any]:
    """The cached base's `pretrain.json` (config, data, accuracies, times)."""
    with open(Path(folder) / PRETRAIN_INFO) as f:
        return json.load(f)


def pretrain_base(cache_dir: str | os.PathLike | None = None, cfg: PretrainConfig | None = None, *,
                  train: ImageData | None = None, test: ImageData | None = None, force: bool = False,
                  progress: bool = False, log=None) -> Path:
    """The folder of the pretrained base for `cfg`, training it first if it is not cached.

    Trains `ViTForImageClassification` on Fashion-MNIST (or on `train`, evaluated on `test`, both given: tests and
    custom data; the data are part of the cache key) and writes `save_pretrained` files + `pretrain.json` into
    `<cache_dir>/vit-fmnist-<key>.tmp-<pid>`, renamed to `vit-fmnist-<key>` when complete. An existing complete folder
    is returned as is (unless `force`). `log`: a callable taking one line (default: stderr when `progress`)."""
    cfg = cfg or PretrainConfig()
    if (train is None) != (test is None):
        raise ValueError("pass both train and test data, or neither (Fashion-MNIST)")
    tag = _data_tag(train, test)
    final = base_folder(cache_dir, cfg, tag)
    if is_base(final) and not force:
        return final
    say = log or ((lambda line: print(f"genlora vision: {line}", file=sys.stderr, flush=True)) if progress
                  else (lambda line: None))
    if train is None:
        train = load_fashion_mnist("train", cfg.fashion_dir, limit=cfg.train_limit)
        test = load_fashion_mnist("test", cfg.fashion_dir, limit=cfg.test_limit)
    else:
        if cfg.train_limit is not None:
            train = train.subset(np.arange(min(cfg.train_limit, len(train))))
        if cfg.test_limit is not None:
            test = test.subset(np.arange(min(cfg.test_limit, len(test))))
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    threads_before = torch.get_num_threads()
    try:
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        info = _pretrain(cfg, train, test, tmp, say, progress)
        info["key"] = final.name.rsplit("-", 1)[1]
        info["data"] = tag if tag != {"source": "fashion_mnist"} else {
            "source": "fashion_mnist (Debian dataset-fashion-mnist)",
            "train": {"name": train.name, "n": len(train)}, "test": {"name": test.name, "n": len(test)}}
        write_json(tmp / PRETRAIN_INFO, info)
        for f in tmp.iterdir():  # mkstemp-based writers leave 0600; the cache is meant to be shared
            f.chmod(0o644)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads_before)
    if final.exists():
        if is_base(final) and not force:  # another process finished first
            shutil.rmtree(tmp)
            return final
        shutil.rmtree(final)
    os.replace(tmp, final)
    say(f"pretrained base: {final} (test accuracy {info['test_accuracy']:.4f}, {info['train_time_s']:.0f} s)")
    return final


def _pretrain(cfg: PretrainConfig, train: ImageData, test: ImageData, out: Path, say, progress: bool) -> dict:
    from .metrics import Timer, classification_metrics

    t0, cpu0 = time.perf_counter(), time.process_time()
    model = build_vit(cfg.vit, cfg.seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = int(round(cfg.warmup_ratio * total))
    from transformers import get_scheduler

    scheduler = get_scheduler(cfg.lr_schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    say(f"pretraining a {sum(p.numel() for p in params):,}-parameter ViT on {len(train)} {train.name} images, "
        f"{cfg.epochs} epochs ({total} steps), {torch.get_num_threads()} thread(s)")
    epochs_out = []
    step = 0
    bar = Progress(total, "pretrain the ViT base", enabled=progress)
    with open(out / "pretrain_log.jsonl", "w") as logf, Timer() as timer:
        for epoch in range(cfg.epochs):
            loss_sum, correct, seen = 0.0, 0, 0
            order = np.random.default_rng([cfg.seed, 2000 + epoch]).permutation(len(train))
            for i in range(0, len(order), cfg.batch_size):
                idx = torch.as_tensor(order[i: i + cfg.batch_size])
                x, y = train.images[idx], train.labels[idx]
                out_ = model(pixel_values=x, labels=y)
                loss = out_.loss
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"pretraining loss became {loss.item()} at step {step}; lower lr")
                loss.backward()
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                loss_sum += loss.item() * len(y)
                correct += int((out_.logits.argmax(-1) == y).sum())
                seen += len(y)
                bar.update(1)
                if step % cfg.log_every == 0:
                    logf.write(json.dumps({"step": step, "epoch": epoch + 1, "loss": loss.item(),
                                           "lr": scheduler.get_last_lr()[0],
                                           "elapsed_s": time.perf_counter() - t0}) + "\n")
                    logf.flush()
            epochs_out.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct / seen})
            logf.write(json.dumps({"event": "epoch", **epochs_out[-1], "elapsed_s": time.perf_counter() - t0}) + "\n")
            say(f"epoch {epoch + 1}/{cfg.epochs}: loss {loss_sum / seen:.4f}, running train accuracy "
                f"{correct / seen:.4f} ({time.perf_counter() - t0:.0f} s)")
    bar.close()
    model.eval()
    with Timer() as eval_timer:
        test_m = classification_metrics(_predict(model, test, cfg.eval_batch_size), test.labels.numpy())
    import transformers

    model.save_pretrained(out, safe_serialization=True)
    return {
        "config": to_dict(cfg),
        "test_accuracy": test_m["accuracy"],
        "test_nll": test_m["nll"],
        "test_ece": test_m["ece"],
        "last_epoch_train_accuracy": epochs_out[-1]["train_accuracy"],  # running accuracy while training
        "epochs": epochs_out,
        "steps": total,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_time_s": timer.seconds,
        "eval_time_s": eval_timer.seconds,
        "wall_time_s": time.perf_counter() - t0,
        "cpu_time_s": time.process_time() - cpu0,  # all threads of the process (shared machines: wall time varies)
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }




@torch.no_grad()
def _predict(model, data: ImageData, batch_size: int) -> np.ndarray:
    out = []
    for i in range(0, len(data), batch_size):
        logits = model(pixel_values=data.images[i: i + batch_size]).logits
        out.append(torch.softmax(logits.float(), dim=-1).double().numpy())
    return np.concatenate(out)


# --- a fresh copy for a run ---
_BASE_CACHE: dict[tuple, Any] = {}


def load_vit_base(folder: str | os.PathLike, num_labels: int = NUM_CLASSES, seed: int = 0):
    """A fresh copy of the cached base with a new `num_labels`-way classifier (weights normal(0,
    initializer_range) drawn from `seed`, zero bias, as transformers initialises a Linear). The pretrained weights are
    read once per process."""
    from transformers import ViTForImageClassification

    folder = Path(folder)
    if not is_base(folder):
        raise FileNotFoundError(f"{folder} is not a pretrained base folder (no {PRETRAIN_INFO} / weights); create it "
                                "with pretrain_base()")
    weights = next(folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file())
    key = (os.fspath(folder.resolve()), weights.stat().st_mtime_ns)
    if key not in _BASE_CACHE:
        model = ViTForImageClassification.from_pretrained(os.fspath(folder), local_files_only=True,
                                                          dtype=torch.float32)
        model.eval()
        if len(_BASE_CACHE) >= 2:
            _BASE_CACHE.clear()
        _BASE_CACHE[key] = model
    model = copy.deepcopy(_BASE_CACHE[key])
    hidden = model.config.hidden_size
    head = torch.nn.Linear(hidden, num_labels)
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * model.config.initializer_range)
        head.bias.zero_()
    model.classifier = head
    model.num_labels = num_labels
    model.config.num_labels = num_labels
    model.config.id2label = {i: str(i) for i in range(num_labels)}
    model.config.label2id = {str(i): i for i in range(num_labels)}
    return model


