"""The vision experiment: a small ViT built from a `transformers.ViTConfig`, pretrained here on Fashion-MNIST once and
cached, then LoRA-adapted few-shot (k images per class) to MNIST-5k with genlora methods, compared across methods the
same way as the text runner (paired per seed, the same statistics and tables).

No pretrained vision transformer ships in any package (shared/spec/data.md), so the base is trained by
`pretrain_base` (a few minutes on two CPU cores with the defaults) and cached under
`<cache_dir>/vit-fmnist-<key>/`: `save_pretrained` files plus `pretrain.json` (its training config, data, test
accuracy, time). `<key>` is a hash of everything that changes the weights, so another config trains another base; a
base that exists is reused. The folder is written under a temporary name and renamed when complete.

`adapt_run` loads the cached base, replaces its classifier by a fresh 10-class head (trained through PEFT's
`modules_to_save=["classifier"]`), puts LoRA on the attention query/value projections (configurable), attaches the
genlora methods, and trains on the seed's few-shot subset with the handle's plain-loop protocol (as in train.py).
The adapter is then saved and evaluated as deployed (reloaded with plain PEFT; LoRA Dropout with its test-time
ensemble), with the text runner's metrics (accuracy, NLL, ECE, effective rank, sharpness, memory, time) and its
`summary` keys (`train_acc`, `test_acc`, `gap`, `test_nll`, `test_ece`, ...).

Determinism: for a seed, the few-shot subset, the batch order, the new head and the LoRA initialisation are the same
for every method (paired comparisons); two runs with the same config give identical numbers on CPU.

`compare_vision` runs variants x seeds x shots (resumable cells, like `genlora compare`), choosing each method's main
hyperparameters per setting on MNIST-5k's validation split (never test), and writes results.md / .csv / .json with the
text runner's statistics (mean, 95% t-interval, paired differences to the baseline, paired t-test).

Command line: `python -m genlora.experiments.vision {pretrain,adapt,compare} [--config FILE.yaml] [--key=value ...]`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch

from ..config import check_choice, check_int, check_range
from ..core.handle import write_json_atomic
from .config import (ConfigError, EvaluationConfig, LoraSettings, TrainingConfig, TuningConfig, Variant, dump_yaml,
                     to_dict)
from .compare import add_statistics, apply_chosen, point_label, resolve_grid, summary_tables, tune, tuning_table
from .data import data_dir
from .train import build_methods, lr_factor, summarize
from .vision_data import NUM_CLASSES, ImageData, few_shot, load_fashion_mnist, mnist_splits

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PRETRAIN_INFO = "pretrain.json"
# Target names of the config (BERT-style, as in the text runner) -> the module names of transformers' ViT (>= 5:
# q_proj/k_proj/v_proj/o_proj, mlp.fc1/fc2; older releases: attention.attention.query/key/value, ...).
VIT_TARGET_ALIASES = {
    "query": ["q_proj", "query"],
    "key": ["k_proj", "key"],
    "value": ["v_proj", "value"],
    "attention.output.dense": ["o_proj", "attention.output.dense"],
    "intermediate.dense": ["mlp.fc1", "intermediate.dense"],
    "output.dense": ["mlp.fc2", "output.dense"],
}


# --- configs --------------------------------------------------------------------------------------------------------
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


def _vision_training() -> TrainingConfig:
    # lr chosen on the MNIST-5k validation split (plain LoRA r=8 on query/value, seeds 0-1, 20 and 100 shots, among
    # 1e-3, 3e-3, 1e-2, 2e-2, 3e-2); the test split was not looked at.
    return TrainingConfig(epochs=20, lr=1e-2, batch_size=32, eval_batch_size=500, warmup_ratio=0.1,
                          lr_schedule="linear", max_grad_norm=1.0, group_by_length=False, num_threads=1, log_every=20)


def _vision_evaluation() -> EvaluationConfig:
    return EvaluationConfig(splits=["train", "test"], sharpness_examples=200)


@dataclass
class VisionDataConfig:
    """The MNIST-5k split (fixed by `split_seed`) and the few-shot subset size (drawn with training.seed)."""

    shots: int = 20  # training images per class
    test_per_class: int = 250
    validation_per_class: int = 50
    split_seed: int = 0

    def __post_init__(self):
        check_int("shots", self.shots, low=1)
        check_int("test_per_class", self.test_per_class, low=1)
        check_int("validation_per_class", self.validation_per_class, low=0)
        check_int("split_seed", self.split_seed, low=0)


@dataclass
class AdaptConfig:
    """One few-shot adaptation run (`adapt_run`). `training.seed` is the run's seed (few-shot subset, batch order,
    head and LoRA initialisation, the methods' own seeds are theirs)."""

    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    cache_dir: Optional[str] = None  # pretrained bases; null: $GENLORA_DATA_DIR/vit or ~/.cache/genlora/vit
    lora: LoraSettings = field(default_factory=LoraSettings)  # target_modules: query/value (ViT names resolved)
    methods: list[dict[str, Any]] = field(default_factory=list)  # [{method: flat_lora, sigma: 0.05}, ...]
    head_lr: Optional[float] = None  # learning rate of the new classifier; null: training.lr
    data: VisionDataConfig = field(default_factory=VisionDataConfig)
    training: TrainingConfig = field(default_factory=_vision_training)
    evaluation: EvaluationConfig = field(default_factory=_vision_evaluation)

    def __post_init__(self):
        for i, m in enumerate(self.methods):
            if not isinstance(m, dict) or "method" not in m:
                raise TypeError(f"methods[{i}] must be a mapping with a `method:` name, got {m!r}")
        if self.head_lr is not None:
            check_range("head_lr", self.head_lr, low=0.0, low_open=True)
        if "validation" in self.evaluation.splits and self.data.validation_per_class == 0:
            raise ValueError("evaluation.splits names 'validation' but data.validation_per_class is 0")


def _default_variants() -> list[Variant]:
    return [Variant("lora"), Variant("flat_lora", [{"method": "flat_lora"}]), Variant("rm_lora", [{"method": "rm_lora"}])]


def _vision_tuning() -> TuningConfig:
    # validation_fraction is unused here: the validation split is MNIST-5k's own (data.validation_per_class images per
    # class, disjoint from the few-shot pool and the test split).
    return TuningConfig()


@dataclass
class VisionCompareConfig:
    """A grid of few-shot runs: variants x seeds x shots (x ranks), resumable, paired per seed."""

    base: AdaptConfig = field(default_factory=AdaptConfig)
    variants: list[Variant] = field(default_factory=_default_variants)
    baseline: str = "lora"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    shots: list[int] = field(default_factory=lambda: [20, 100])
    ranks: Optional[list[int]] = None  # null: base.lora.r
    # each method's main hyperparameters chosen per setting on the validation split (text runner's grid and rule)
    tuning: TuningConfig = field(default_factory=_vision_tuning)
    output_dir: str = "runs/vision"
    plots: bool = True
    save_adapters: bool = False  # keep each cell's adapter (~100 kB each)

    def __post_init__(self):
        names = [v.name for v in self.variants]
        if not names:
            raise ValueError("variants must list at least one variant")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variants must have distinct names, repeated: {dup}")
        if self.baseline not in names:
            raise ValueError(f"baseline must name one of the variants {names}, got {self.baseline!r}")
        for key in ("seeds", "shots", "ranks"):
            values = getattr(self, key)
            if values is None and key == "ranks":
                continue
            if not values:
                raise ValueError(f"{key} must list at least one value")
            if len(set(values)) != len(values):
                raise ValueError(f"{key} must be distinct, got {values}")
            for i, v in enumerate(values):
                check_int(f"{key}[{i}]", v, low=0 if key == "seeds" else 1)
        if self.base.methods:
            raise ValueError("base.methods must be empty: list the methods of each row under `variants`")


# --- the ViT --------------------------------------------------------------------------------------------------------
def build_vit(settings: ViTSettings | None = None, seed: int = 0):
    """A freshly initialised `ViTForImageClassification` (initialisation drawn from `seed`; the global RNG is left
    as it was)."""
    from transformers import ViTForImageClassification

    settings = settings or ViTSettings()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTForImageClassification(settings.vit_config())
    return model


def resolve_targets(model, names: list[str]) -> list[str]:
    """PEFT target names that exist in `model`: each name as given if some module's name equals it or ends with
    `.name`, else its ViT alias (query -> q_proj, ...). ConfigError when neither exists."""
    module_names = [n for n, _ in model.named_modules()]

    def present(name: str) -> bool:
        return any(n == name or n.endswith("." + name) for n in module_names)

    out = []
    for name in names:
        for cand in [name] + VIT_TARGET_ALIASES.get(name, []):
            if present(cand):
                out.append(cand)
                break
        else:
            raise ConfigError(f"lora.target_modules: no module of the ViT is named {name!r} (nor an alias "
                              f"{VIT_TARGET_ALIASES.get(name, [])}); e.g. {module_names[8:14]}")
    return list(dict.fromkeys(out))


def _epoch_order(n: int, seed: int, epoch: int, stream: int = 1000) -> np.ndarray:
    return np.random.default_rng([seed, stream + epoch]).permutation(n)


@torch.no_grad()
def predict_probs(model, data: ImageData, batch_size: int, device, forward=None) -> np.ndarray:
    """Class probabilities (n, C), float64, in the order of `data`."""
    forward = forward or model
    out = []
    for i in range(0, len(data), batch_size):
        res = forward(pixel_values=data.images[i: i + batch_size].to(device))
        logits = res["logits"] if isinstance(res, dict) else getattr(res, "logits", res)
        out.append(torch.softmax(logits.float(), dim=-1).double().cpu().numpy())
    return np.concatenate(out) if out else np.empty((0, 0))


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True)


# --- pretraining ----------------------------------------------------------------------------------------------------
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
        write_json_atomic(tmp / PRETRAIN_INFO, info)
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
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, cfg.lr_schedule))
    say(f"pretraining a {sum(p.numel() for p in params):,}-parameter ViT on {len(train)} {train.name} images, "
        f"{cfg.epochs} epochs ({total} steps), {torch.get_num_threads()} thread(s)")
    epochs_out = []
    step = 0
    bar = _progress(total, "pretrain", progress)
    with open(out / "pretrain_log.jsonl", "w") as logf, Timer() as timer:
        for epoch in range(cfg.epochs):
            loss_sum, correct, seen = 0.0, 0, 0
            order = _epoch_order(len(train), cfg.seed, epoch, stream=2000)
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
        test_m = classification_metrics(predict_probs(model, test, cfg.eval_batch_size, "cpu"), test.labels.numpy())
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


# --- the adapted model ----------------------------------------------------------------------------------------------
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


@contextlib.contextmanager
def _quiet_peft():
    """PEFT 0.21 asks transformers 5 for `is_gradient_checkpointing`, which warns (FutureWarning) on every wrap."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def peft_vit(base, lora: LoraSettings):
    """PEFT LoRA model on the resolved `lora.target_modules`, the classifier trainable through modules_to_save. Call
    `torch.manual_seed(seed)` first: PEFT draws LoRA's A from the global RNG."""
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, target_modules=resolve_targets(base, lora.target_modules),
                      lora_dropout=lora.lora_dropout, modules_to_save=["classifier"])
    with _quiet_peft():
        return get_peft_model(base, lcfg)


def load_vit_adapter(adapter_dir: str | os.PathLike, base_dir: str | os.PathLike, num_labels: int = NUM_CLASSES,
                     device: torch.device | str = "cpu"):
    """The saved adapter on a fresh copy of the base, with plain PEFT, in eval mode."""
    from peft import PeftModel

    base = load_vit_base(base_dir, num_labels, seed=0)  # the head is replaced by the adapter's trained copy
    with _quiet_peft():
        model = PeftModel.from_pretrained(base, os.fspath(adapter_dir), is_trainable=False)
    return model.to(device).eval()


def adapt_run(cfg: AdaptConfig | None = None, *, base_dir: str | os.PathLike | None = None,
              splits: dict[str, ImageData] | None = None, out_dir: str | os.PathLike | None = None,
              keep_adapter: bool = True, progress: bool = False) -> dict[str, Any]:
    """Few-shot LoRA adaptation of the pretrained base; returns the metrics (`summary` holds the headline numbers).

    base_dir: a pretrained base folder; default: `pretrain_base(cfg.cache_dir, cfg.pretrain)` (trained if not cached).
    splits: {'pool', 'test', ['validation']} ImageData; default: `mnist_splits(...)` of MNIST-5k per `cfg.data`.
    out_dir: where to write metrics.json, config.yaml, methods.json, data_split.json, train_log.jsonl and adapter/
        (when `keep_adapter`); default: nothing is kept.
    """
    from ..core.handle import attach
    from .metrics import PeakMemory, Timer
    from .models import resolve_device

    cfg = cfg or AdaptConfig()
    tc, dc = cfg.training, cfg.data
    t_start, cpu_start = time.perf_counter(), time.process_time()
    methods = build_methods(cfg.methods)  # validates names and options before any work
    for m in cfg.methods:
        if m.get("method") == "rm_lora" and isinstance(m.get("k"), int) and m["k"] > cfg.lora.r:
            raise ConfigError(f"methods: rm_lora k={m['k']} exceeds lora.r={cfg.lora.r}")
    device = resolve_device(tc.device)
    threads_before = torch.get_num_threads()
    if tc.num_threads is not None:
        torch.set_num_threads(tc.num_threads)
    try:
        if base_dir is None:
            base_dir = pretrain_base(cfg.cache_dir, cfg.pretrain, progress=progress)
        base_dir = Path(base_dir)
        if splits is None:
            splits = mnist_splits(dc.test_per_class, dc.validation_per_class, dc.split_seed)
        seed = tc.seed
        train = few_shot(splits["pool"], dc.shots, seed)
        sets = {"train": train, "test": splits["test"]}
        if "validation" in splits:
            sets["validation"] = splits["validation"]

        keep_dir = Path(out_dir) if out_dir is not None else None
        if keep_dir is not None:
            keep_dir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix="genlora-vision-"))
        try:
            adapter_dir = (keep_dir if keep_dir is not None and keep_adapter else scratch) / "adapter"
            log_dir = keep_dir if keep_dir is not None else scratch
            torch.manual_seed(seed)
            base = load_vit_base(base_dir, NUM_CLASSES, seed)
            torch.manual_seed(seed)  # LoRA's A init draws from the global RNG: the same for every method
            model = peft_vit(base, cfg.lora).to(device)
            n = len(train)
            steps_per_epoch = math.ceil(n / tc.batch_size)
            epochs = tc.epochs_for(steps_per_epoch)
            total_steps = steps_per_epoch * epochs
            warmup = int(round(tc.warmup_ratio * total_steps))
            handle = attach(model, *methods, total_steps=total_steps) if methods else None
            trainable = [p for p in model.parameters() if p.requires_grad]
            head_ids = {id(p) for name, p in model.named_parameters() if p.requires_grad and "classifier" in name}
            groups = [{"params": [p for p in trainable if id(p) not in head_ids]},
                      {"params": [p for p in trainable if id(p) in head_ids], "lr": cfg.head_lr or tc.lr}]
            optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=tc.lr, weight_decay=tc.weight_decay)
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: lr_factor(s, total_steps, warmup, tc.lr_schedule))
            if handle is not None:
                handle.bind_optimizer(optimizer)
                handle.steps_per_epoch = steps_per_epoch
            # LoRA Dropout averages the loss over several masks per step (train_instances), as in train.py
            dropout = next((m for m in handle.methods if hasattr(m, "train_instances")), None) if handle else None
            if keep_dir is not None:
                dump_yaml(cfg, keep_dir / "config.yaml")
                write_json_atomic(keep_dir / "methods.json", handle.config_dict() if handle else {"methods": []})
                write_json_atomic(keep_dir / "data_split.json",
                                  {"train": train.ids.tolist(), "shots": dc.shots, "seed": seed,
                                   "pool": splits["pool"].name})

            model.train()
            step, epoch_losses = 0, []
            bar = _progress(total_steps, "adapt", progress)
            with open(log_dir / "train_log.jsonl", "w") as logf, Timer() as train_timer, PeakMemory(device) as mem:
                for epoch in range(epochs):
                    loss_sum, correct = 0.0, 0
                    order = _epoch_order(n, seed, epoch)
                    for i in range(0, n, tc.batch_size):
                        idx = torch.as_tensor(order[i: i + tc.batch_size])
                        x, y = train.images[idx].to(device), train.labels[idx].to(device)
                        if handle is not None:
                            handle.begin_step()
                        step_loss = 0.0
                        if dropout is not None:
                            for inst in dropout.train_instances():
                                out_ = model(pixel_values=x, labels=y)
                                inst.backward(out_.loss)
                                step_loss += out_.loss.item() / inst.n
                        else:
                            out_ = model(pixel_values=x, labels=y)
                            out_.loss.backward()
                            step_loss = out_.loss.item()
                        if not math.isfinite(step_loss):
                            raise FloatingPointError(f"training loss became {step_loss} at step {step}; lower "
                                                     "training.lr")
                        if tc.max_grad_norm > 0:
                            torch.nn.utils.clip_grad_norm_(trainable, tc.max_grad_norm)
                        if handle is not None:
                            handle.optimizer_step(optimizer)
                        else:
                            optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                        step += 1
                        loss_sum += step_loss * len(y)
                        correct += int((out_.logits.argmax(-1) == y).sum())
                        bar.update(1)
                        if step % tc.log_every == 0 or step == total_steps:
                            logf.write(json.dumps({"step": step, "epoch": epoch + 1, "loss": step_loss,
                                                   "lr": scheduler.get_last_lr()[0]}) + "\n")
                    epoch_losses.append(loss_sum / n)
                    logf.write(json.dumps({"event": "epoch", "epoch": epoch + 1, "train_loss": loss_sum / n,
                                           "running_train_accuracy": correct / n}) + "\n")
            bar.close()

            if handle is not None:
                handle.save_pretrained(adapter_dir)
                methods_config = handle.config_dict()
                with warnings.catch_warnings():  # LoRASC warns that detaching drops its experts: they are saved
                    warnings.simplefilter("ignore", UserWarning)
                    handle.detach()
            else:
                model.save_pretrained(adapter_dir)
                methods_config = {"methods": []}
            del model, handle, optimizer, scheduler, trainable, dropout

            metrics = evaluate_adapter(cfg, adapter_dir, base_dir, sets, device)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    finally:
        torch.set_num_threads(threads_before)
    info = load_base_info(base_dir)
    metrics.update({
        "train_time_s": train_timer.seconds,
        "peak_memory_mib": mem.peak_mib,
        "memory_kind": mem.kind,
        "steps": total_steps,
        "epochs": epochs,
        "epoch_train_loss": epoch_losses,
        "methods": methods_config["methods"],
        "device": str(device),
        "torch_threads": tc.num_threads or threads_before,
        "shots": dc.shots,
        "seed": seed,
        "data": {k: {"name": v.name, "n": len(v), "ids_sha256": v.ids_sha256()} for k, v in sets.items()},
        "base": {"folder": os.fspath(base_dir), "key": info.get("key"), "pretrain_test_accuracy":
                 info.get("test_accuracy"), "pretrain_data": info.get("data", {}).get("source")},
    })
    metrics["wall_time_s"] = time.perf_counter() - t_start
    metrics["cpu_time_s"] = time.process_time() - cpu_start
    metrics["summary"] = summarize(metrics)
    if keep_dir is not None:
        write_json_atomic(keep_dir / "metrics.json", _jsonable(metrics))
    return metrics


def evaluate_adapter(cfg: AdaptConfig, adapter_dir: Path, base_dir: Path, sets: dict[str, ImageData],
                     device) -> dict[str, Any]:
    """Metrics of the saved adapter reloaded with plain PEFT: per split accuracy/NLL/ECE/reliability, spectra,
    sharpness and the loss along random directions (text runner's definitions)."""
    from .evaluate import ensemble_forward
    from .metrics import Timer, classification_metrics, loss_landscape, sharpness, update_spectra

    ev = cfg.evaluation
    model = load_vit_adapter(adapter_dir, base_dir, NUM_CLASSES, device)
    forward, ens_handle, ensemble_info = None, None, None
    if ev.ensemble and any(m.get("method") == "lora_dropout" for m in cfg.methods):
        forward, ens_handle = ensemble_forward(model, adapter_dir)
        if forward is None:
            ensemble_info = {"used": False, "reason": ens_handle}
            ens_handle = None
        else:
            ensemble_info = {"used": True, "n_test": forward.n_test}
    results = {}
    with Timer() as eval_timer:
        for name in ev.splits:
            if name in sets:
                probs = predict_probs(model, sets[name], cfg.training.eval_batch_size, device, forward)
                results[name] = classification_metrics(probs, sets[name].labels.numpy(), ev.ece_bins)
    metrics: dict[str, Any] = {"eval": results, "eval_time_s": eval_timer.seconds, "ensemble": ensemble_info}
    if ens_handle is not None:
        ens_handle.detach()
    if ev.spectra:
        metrics["spectra"] = update_spectra(model)
    if ev.sharpness or ev.landscape_scales:
        train = sets["train"]
        n = min(ev.sharpness_examples, len(train))
        bs = cfg.training.eval_batch_size
        batches = [{"pixel_values": train.images[i: min(i + bs, n)].to(device),
                    "labels": train.labels[i: min(i + bs, n)].to(device)} for i in range(0, n, bs)]
        with Timer() as sharp_timer:
            if ev.sharpness:
                metrics["sharpness"] = sharpness(model, batches, ev.sharpness_scale, ev.sharpness_draws,
                                                 seed=cfg.training.seed)
            if ev.landscape_scales:
                metrics["landscape"] = loss_landscape(model, batches, ev.landscape_scales, ev.landscape_directions,
                                                      seed=cfg.training.seed)
        metrics["sharpness_time_s"] = sharp_timer.seconds
    return metrics


def _jsonable(x):
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return _jsonable(x.item())
    return x


# --- a grid of runs -------------------------------------------------------------------------------------------------
def compare_vision(cfg: VisionCompareConfig | None = None, *, base_dir: str | os.PathLike | None = None,
                   splits: dict[str, ImageData] | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) variants x seeds x shots (x ranks) and write results.json / .md / .csv (and plots) into
    `cfg.output_dir`, with the text runner's statistics (`compare.add_statistics`, `compare.write_tables`).

    Cells: `cells/k<shots>_r<rank>/<variant>/seed-<s>/` (an `adapt_run` folder each), written under `.tmp` and
    renamed; a finished cell with the same config is reused, one with another config is an error. With tuning on,
    each method's grid first runs in `tuning/k<shots>_r<rank>/<method>/<point>/seed-<s>/`, scored on the validation
    split only (the text runner's selection rule), and the chosen values fill the options a variant leaves open."""
    cfg = cfg or VisionCompareConfig()
    for v in cfg.variants:  # method names and options, before anything runs
        build_methods(v.methods, f"variants[{v.name}].methods")
    grid, grid_messages = resolve_grid(cfg.tuning, {e["method"] for v in cfg.variants for e in v.methods})
    if grid and ("validation" not in splits if splits is not None else cfg.base.data.validation_per_class == 0):
        raise ConfigError("tuning needs a validation split: set base.data.validation_per_class > 0 (or "
                          "tuning.enabled: false)")
    say = (lambda line: print(f"genlora vision: {line}", file=sys.stderr, flush=True)) if progress else (
        lambda line: None)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, out / "compare_config.yaml")
    t0 = time.perf_counter()
    if base_dir is None:
        base_dir = pretrain_base(cfg.base.cache_dir, cfg.base.pretrain, progress=progress)
    base_info = load_base_info(base_dir)
    say(f"base {base_dir}: Fashion-MNIST test accuracy {base_info['test_accuracy']:.4f}")
    if splits is None:
        dc = cfg.base.data
        splits = mnist_splits(dc.test_per_class, dc.validation_per_class, dc.split_seed)
    ranks = cfg.ranks or [cfg.base.lora.r]
    tuning_seeds = cfg.tuning.seeds or [cfg.seeds[0]]
    counts = {"ran": 0, "skipped": 0}
    cpu0 = time.process_time()

    def cell(run_cfg: AdaptConfig, path: Path, label: str, keep_adapter: bool) -> dict[str, Any]:
        """Run one adaptation into `path` (via `path.tmp`, renamed when complete), or reuse a finished one."""
        wanted = to_dict(run_cfg)
        if (path / "metrics.json").is_file():
            with open(path / "config.json") as f:
                if json.load(f) != json.loads(json.dumps(wanted)):
                    raise ConfigError(f"finished cell {path} was run with another config; choose another "
                                      "output_dir or delete the cell")
            with open(path / "metrics.json") as f:
                counts["skipped"] += 1
                return json.load(f)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        m = adapt_run(run_cfg, base_dir=base_dir, splits=splits, out_dir=tmp, keep_adapter=keep_adapter,
                      progress=False)
        write_json_atomic(tmp / "config.json", wanted)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        counts["ran"] += 1
        sm = m["summary"]
        say(f"{label}: " + ", ".join(f"{k.replace('_acc', '')} {sm[k]:.3f}" for k in
                                     ("train_acc", "validation_acc", "test_acc") if k in sm)
            + f" ({sm['train_time_s']:.1f} s)")
        return m

    def run_config(shots: int, rank: int, seed: int, methods: list[dict], tuning: bool = False) -> AdaptConfig:
        run_cfg = copy.deepcopy(cfg.base)
        run_cfg.methods = copy.deepcopy(methods)
        run_cfg.data.shots = shots
        run_cfg.lora.r = rank
        run_cfg.training.seed = seed
        if tuning:  # validation accuracy/NLL only: never the test split
            ev = run_cfg.evaluation
            ev.splits, ev.spectra, ev.sharpness, ev.landscape_scales = ["validation"], False, False, []
        return run_cfg

    settings_out = []
    for rank in ranks:
        for shots in cfg.shots:
            key = f"k{shots}_r{rank}"

            def run_point(method: str, entry: dict[str, Any], point: dict[str, Any], seed: int) -> dict[str, float]:
                return cell(run_config(shots, rank, seed, [entry], tuning=True),
                            out / "tuning" / key / method / point_label(point) / f"seed-{seed}",
                            f"tune {key} {method} {point_label(point)} seed {seed}", keep_adapter=False)["summary"]

            chosen, tuning_report = tune(grid, rank, [v.methods for v in cfg.variants], tuning_seeds,
                                         cfg.tuning.metric, run_point, lambda msg: say(f"{key}: {msg}"))
            variants_out = {}
            for v in cfg.variants:
                methods = apply_chosen(v.methods, chosen, cfg.tuning.apply_to_combinations)
                per_seed, cells = {}, {}
                for seed in cfg.seeds:
                    path = out / "cells" / key / v.name / f"seed-{seed}"
                    m = cell(run_config(shots, rank, seed, methods), path, f"{key} {v.name} seed {seed}",
                             keep_adapter=cfg.save_adapters)
                    per_seed[seed] = m["summary"]
                    cells[seed] = os.fspath(path.relative_to(out))
                variants_out[v.name] = {"methods": methods, "skipped_methods": [], "per_seed": per_seed,
                                        "cells": cells}
            settings_out.append({"setting": key, "train_size": shots * NUM_CLASSES, "shots": shots, "rank": rank,
                                 "chosen": chosen, "tuning": tuning_report, "variants": variants_out})
    ran, skipped = counts["ran"], counts["skipped"]
    results = {
        "task": "vision: ViT pretrained on Fashion-MNIST, LoRA few-shot on MNIST-5k",
        "baseline": cfg.baseline,
        "seeds": cfg.seeds,
        "tuning_seeds": tuning_seeds if grid else [],
        "settings": settings_out,
        "messages": grid_messages + [f"base {Path(base_dir).name}: Fashion-MNIST test accuracy {base_info['test_accuracy']:.4f}; "
                     f"MNIST-5k test set {len(splits['test'])} images; train_size = shots x 10 classes"],
        "base": {k: base_info.get(k) for k in ("key", "test_accuracy", "train_time_s", "parameters", "config")},
        "cells_run": ran,
        "cells_skipped": skipped,
        "wall_time_s": time.perf_counter() - t0,
        "cpu_time_s": time.process_time() - cpu0,
    }
    add_statistics(results)
    write_vision_tables(results, out)
    if cfg.plots:
        try:
            from .plots import make_plots

            results["plots"] = make_plots(results, out)
        except ImportError as e:  # matplotlib missing
            say(f"no plots: {e}")
    write_json_atomic(out / "results.json", _jsonable(results))
    say(f"{ran} cells run, {skipped} reused, {results['wall_time_s']:.0f} s; tables in {out / 'results.md'}")
    return results


TABLE_METRICS = ["train_acc", "validation_acc", "test_acc", "gap", "test_nll", "test_ece", "eff_rank", "sharpness",
                 "train_time_s"]
_LABELS = {"train_acc": "train acc %", "validation_acc": "val acc %", "test_acc": "test acc %",
           "gap": "gap (train-test) %", "test_nll": "test NLL", "test_ece": "test ECE", "eff_rank": "eff. rank",
           "sharpness": "sharpness", "train_time_s": "train s"}
_PERCENT = {"train_acc", "validation_acc", "test_acc", "gap"}


def _num(x, metric: str, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    x = 100 * x if metric in _PERCENT else x
    if metric == "sharpness":
        return f"{x:+.2e}" if signed else f"{x:.2e}"
    digits = 1 if metric in _PERCENT or metric == "train_time_s" else (2 if metric == "eff_rank" else 3)
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def write_vision_tables(results: dict[str, Any], out: str | os.PathLike) -> None:
    """results.md (per setting: mean ± 95% t-interval half-width over seeds; paired differences to the baseline with
    their 95% interval and paired t-test p) and results.csv (one row per setting, variant and metric)."""
    out = Path(out)
    names = [m for m in TABLE_METRICS
             if any(m in v["stats"] for s in results["settings"] for v in s["variants"].values())]
    base = results["baseline"]
    lines = ["# genlora vision comparison", "",
             f"{results.get('task', '')}. Seeds {results['seeds']}; mean ± half-width of the 95% t-interval over "
             f"seeds. Paired differences are per seed (same few-shot subset, batch order, head and LoRA init) against "
             f"`{base}`, with a 95% t-interval and a paired t-test p-value. ECE: 15 equal-width bins.", ""]
    lines += [f"- {m}" for m in results.get("messages", [])] + [""]
    if len(results["settings"]) > 1:
        lines += ["## Summary over settings", ""] + summary_tables(results)
    for s in results["settings"]:
        lines += [f"## {s['shots']} shots per class ({s['train_size']} images), LoRA rank {s['rank']}", ""]
        lines += tuning_table(s.get("tuning", {}), f"MNIST-5k's validation split (seeds {results['tuning_seeds']})")
        lines += ["| variant | methods | " + " | ".join(_LABELS[m] for m in names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for vname, v in s["variants"].items():
            desc = " + ".join(", ".join(f"{k}={x}" for k, x in e.items()) for e in v["methods"]) or "plain LoRA"
            cells = []
            for m in names:
                st = v["stats"].get(m, {})
                half = (st.get("ci95_high", math.nan) - st.get("mean", math.nan)) if st else math.nan
                cells.append(_num(st.get("mean"), m) + ("" if math.isnan(half) else f" ± {_num(half, m)}"))
            lines.append(f"| {vname} | {desc} | " + " | ".join(cells) + " |")
        lines.append("")
        if any(v["paired"] for v in s["variants"].values()):
            lines += [f"Paired difference to `{base}`: mean [95% CI] (p)", "",
                      "| variant | " + " | ".join(_LABELS[m] for m in names) + " |", "|---|" + "---|" * len(names)]
            for vname, v in s["variants"].items():
                if not v["paired"]:
                    continue
                cells = []
                for m in names:
                    pr = v["paired"].get(m)
                    if not pr:
                        cells.append("–")
                        continue
                    ci = "" if math.isnan(pr["diff_ci95_low"]) else (
                        f" [{_num(pr['diff_ci95_low'], m, True)}, {_num(pr['diff_ci95_high'], m, True)}]")
                    p = "" if math.isnan(pr["p_value"]) else f" (p={pr['p_value']:.2f})"
                    cells.append(_num(pr["diff_mean"], m, True) + ci + p)
                lines.append(f"| {vname} | " + " | ".join(cells) + " |")
            lines.append("")
    cpu = results.get("cpu_time_s", math.nan)
    lines.append(f"Wall time {results['wall_time_s']:.0f} s, process CPU time {cpu:.0f} s ({results['cells_run']} "
                 f"cells run, {results['cells_skipped']} reused).")
    (out / "results.md").write_text("\n".join(lines) + "\n")

    import csv

    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setting", "shots", "train_size", "rank", "variant", "methods", "metric", "n", "mean", "std",
                    "ci95_low", "ci95_high", "diff_mean", "diff_ci95_low", "diff_ci95_high", "p_value"])
        for s in results["settings"]:
            for vname, v in s["variants"].items():
                for m in names:
                    st, pr = v["stats"].get(m, {}), v["paired"].get(m, {})
                    w.writerow([s["setting"], s["shots"], s["train_size"], s["rank"], vname,
                                json.dumps(v["methods"], sort_keys=True), m, st.get("n"), st.get("mean"),
                                st.get("std"), st.get("ci95_low"), st.get("ci95_high"), pr.get("diff_mean", ""),
                                pr.get("diff_ci95_low", ""), pr.get("diff_ci95_high", ""), pr.get("p_value", "")])


# --- command line ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """`python -m genlora.experiments.vision {pretrain,adapt,compare} [--config FILE] [--key=value ...]`: pretrain
    and adapt read an AdaptConfig (pretrain uses its `pretrain` and `cache_dir`), compare a VisionCompareConfig."""
    from .config import parse_config

    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("pretrain", "adapt", "compare")
    if not argv or argv[0] not in commands:
        print(main.__doc__.strip(), file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    source = None
    if "--config" in rest:
        i = rest.index("--config")
        source = rest[i + 1]
        rest = rest[:i] + rest[i + 2:]
    out_dir = None
    for a in list(rest):
        if a.startswith("--output_dir="):
            out_dir = a.split("=", 1)[1]
            if command != "compare":
                rest.remove(a)
    try:
        if command == "compare":
            cfg = parse_config(VisionCompareConfig, source, rest)
            compare_vision(cfg)
            print((Path(cfg.output_dir) / "results.md").read_text())
        else:
            cfg = parse_config(AdaptConfig, source, rest)
            if command == "pretrain":
                folder = pretrain_base(cfg.cache_dir, cfg.pretrain, progress=True)
                print(json.dumps({"folder": os.fspath(folder), **load_base_info(folder)}, indent=1))
            else:
                m = adapt_run(cfg, out_dir=out_dir, progress=True)
                print(json.dumps(_jsonable(m["summary"]), indent=1))
    except ConfigError as e:
        print(f"genlora vision: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ImportError) as e:
        print(f"genlora vision: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
