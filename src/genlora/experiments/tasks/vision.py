"""The vision task: few-shot MNIST-5k (k images per class) on a small ViT pretrained on Fashion-MNIST (vit.py), with
a new 10-way head trained through PEFT's `modules_to_save` and LoRA on the ViT's linear layers.

Splits: MNIST-5k is split once, stratified by `split_seed`, into test (`test_size`), validation
(`validation_size`) and a few-shot pool; the run's seed draws `train_size / 10` images per class from the pool
(vision_data.py), so a seed gives every variant the same images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, TrainConfig
from ..vision_data import NUM_CLASSES, few_shot, mnist_splits
from .base import Encoded, resolve_targets
from .classification import ClassificationTask

# Target names as in the text task's BERT -> the ViT's module names (transformers >= 5: q_proj/k_proj/v_proj/o_proj,
# mlp.fc1/fc2; older releases: attention.attention.query/key/value, ...).
VIT_ALIASES = {
    "query": ["q_proj"],
    "key": ["k_proj"],
    "value": ["v_proj"],
    "attention.output.dense": ["o_proj"],
    "intermediate.dense": ["mlp.fc1"],
    "output.dense": ["mlp.fc2"],
}
DATASETS = ("mnist5k",)


class ImageClassification(ClassificationTask):
    name = "vision"
    peft_task_type = None

    def model_folder(self, cfg: TrainConfig, progress: bool = False) -> Path:
        from .. import vit

        if cfg.model.path is not None:
            folder = Path(cfg.model.path).expanduser()
            if not (folder / "config.json").is_file():
                raise ConfigError(f"model.path: {cfg.model.path!r} is not a ViT folder (no config.json)")
            return folder
        folder = vit.base_folder(None)
        if vit.is_base(folder):
            return folder
        return vit.pretrain_base(None, vit.PretrainConfig(), progress=progress)

    def check(self, cfg: TrainConfig) -> None:
        if cfg.data.dataset not in DATASETS:
            raise ConfigError(f"data.dataset must be one of {list(DATASETS)} for task vision, got "
                              f"{cfg.data.dataset!r}")
        if cfg.model.num_labels not in (None, NUM_CLASSES):
            raise ConfigError(f"model.num_labels must be {NUM_CLASSES} (or null) for MNIST, got "
                              f"{cfg.model.num_labels}")
        if cfg.model.path is not None:
            self.model_folder(cfg)
        from ..vision_data import mnist5k_csv_path

        try:
            mnist5k_csv_path()
        except ImportError as e:
            raise ConfigError(f"data.dataset: {e}") from None
        try:
            self.splits(cfg, 0, ("train", "validation"))
        except ValueError as e:
            raise ConfigError(f"data: {e}") from None

    def num_labels(self, cfg: TrainConfig) -> int:
        return NUM_CLASSES

    def splits(self, cfg: TrainConfig, seed: int, parts: tuple[str, ...]):
        dc = cfg.data
        test_size = dc.test_size if dc.test_size is not None else 2500
        parts_ = mnist_splits(test_size // NUM_CLASSES, dc.validation_size // NUM_CLASSES, dc.split_seed,
                              verify=cfg.model.verify_sha256)
        out = {}
        if "train" in parts:
            pool = parts_["pool"]
            shots = (dc.train_size or len(pool)) // NUM_CLASSES
            out["train"] = few_shot(pool, shots, seed)
        if "validation" in parts and "validation" in parts_:
            out["validation"] = parts_["validation"]
        if "test" in parts:
            out["test"] = parts_["test"]
        return out

    def load_base(self, cfg: TrainConfig, seed: int):
        from ..vit import load_vit_base

        return load_vit_base(self.model_folder(cfg, progress=True), NUM_CLASSES, seed), None

    def lora_config(self, cfg: TrainConfig, model):
        from peft import LoraConfig

        targets = cfg.lora.target_modules
        if targets == "all-linear":  # PEFT's "all-linear" does not recognise the ViT's head: name the layers
            targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                              if isinstance(m, torch.nn.Linear) and not n.startswith("classifier")})
        return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.lora_alpha, lora_dropout=cfg.lora.lora_dropout,
                          target_modules=resolve_targets(model, targets, VIT_ALIASES), modules_to_save=["classifier"])

    def encode(self, processor, data, cfg: TrainConfig) -> Encoded:
        features = [{"pixel_values": data.images[i], "labels": int(data.labels[i])} for i in range(len(data))]
        return Encoded(features, np.ones(len(features), dtype=np.int64), data.labels.numpy())

    def collator(self, processor):
        from transformers import default_data_collator

        return default_data_collator
