"""What a task supplies to the one runner: its splits, its base model and LoRA targets, how examples become model
inputs, and how model outputs become metrics. The training loop, the evaluator, the report writer and the CLI are
shared (loop.py, evaluate.py, report.py, cli.py).

Evaluation outputs are per-example records (arrays in example order) so that the evaluator can batch in any order
and the task computes split-level metrics from the records.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from ..config import TrainConfig
from ..data import sha256_file

WEIGHT_SUFFIXES = (".safetensors", ".bin")
_WEIGHTS_SHA256: dict[tuple, str] = {}


def weights_sha256(folder: Path) -> str:
    """sha256 over the weight files of a model folder (name and content of each, in name order); computed once per
    process and file version."""
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {folder}")
    key = tuple((os.fspath(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _WEIGHTS_SHA256:
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
        _WEIGHTS_SHA256[key] = h.hexdigest()
    return _WEIGHTS_SHA256[key]


@dataclass
class Encoded:
    """Model-ready features of a split (one dict per example), their lengths (for length-grouped batches) and the
    class labels (None for unlabelled text)."""

    features: list[dict[str, Any]]
    lengths: np.ndarray
    labels: np.ndarray | None

    def __len__(self) -> int:
        return len(self.features)

    def head(self, n: int) -> Encoded:
        return Encoded(self.features[:n], self.lengths[:n], None if self.labels is None else self.labels[:n])


class Task:
    """Base of the text, vision and lm tasks."""

    name: ClassVar[str]
    peft_task_type: ClassVar[str | None]

    def model_folder(self, cfg: TrainConfig, progress: bool = False) -> Path:
        """The local folder of the base model the run starts from (for the vision task, pretrained first when it is
        not cached yet; `progress` then reports the pretraining)."""
        raise NotImplementedError

    def base_fingerprint(self, cfg: TrainConfig) -> dict[str, str]:
        """What identifies the base model's weights in a finished run's metrics: its folder's name and the sha256 of
        its weight files. A base that is built on each machine (the vision task's ViT) is not pinned by a published
        hash, so a resumed comparison checks this before reusing a cell run elsewhere (compare.run_cell)."""
        folder = self.model_folder(cfg)
        return {"folder": folder.name, "weights_sha256": weights_sha256(folder)}

    def check(self, cfg: TrainConfig) -> None:
        """Config-time checks (model present, data sources and sizes); ConfigError naming the key. Writes nothing."""
        raise NotImplementedError

    def num_labels(self, cfg: TrainConfig) -> int | None:
        """Classes the model predicts (None: no class labels, e.g. plain-text language modelling)."""
        raise NotImplementedError

    def splits(self, cfg: TrainConfig, seed: int, parts: tuple[str, ...]) -> dict[str, Any]:
        """{'train', 'validation', 'test', 'ood:<name>'} restricted to `parts` ('ood' for every OOD set)."""
        raise NotImplementedError

    def load_base(self, cfg: TrainConfig, seed: int):
        """(fresh base model with any new head initialised from `seed`, processor or None)."""
        raise NotImplementedError

    def lora_config(self, cfg: TrainConfig, model):
        """The PEFT LoraConfig of the run: `lora.*` with the targets resolved against the model and the task's PEFT
        task type (which decides what PEFT saves beside the adapter, e.g. a classification head)."""
        from peft import LoraConfig

        return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.lora_alpha, lora_dropout=cfg.lora.lora_dropout,
                          target_modules=resolve_targets(model, cfg.lora.target_modules),
                          task_type=self.peft_task_type)

    def encode(self, processor, data, cfg: TrainConfig) -> Encoded:
        raise NotImplementedError

    def collator(self, processor) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        raise NotImplementedError

    def records(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Per-example evaluation records of one batch (probabilities, token losses, ...)."""
        raise NotImplementedError

    def metrics(self, records: dict[str, np.ndarray], enc: Encoded, cfg: TrainConfig) -> dict[str, Any]:
        """Split-level metrics from the records of every example: always `loss`; `accuracy` with labels."""
        raise NotImplementedError

    def batch_loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        """(summed loss, count) of a batch: the quantity sharpness and the loss landscape measure."""
        raise NotImplementedError

    def metric_for_selection(self, cfg: TrainConfig) -> str:
        """'accuracy' where predictions have labels, else 'loss'."""
        return "accuracy" if self.num_labels(cfg) else "loss"


def eval_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Length-sorted batches (order does not matter for evaluation; padding does on CPU)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def train_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list:
    """The batches of one epoch, a pure function of (seed, epoch): the same for every variant.

    With `group_by_length`, the shuffled examples are cut into windows of 32 batches, each window is sorted by length
    and cut into batches, and the batch order is shuffled: much less padding, still a random order."""
    rng = np.random.default_rng([seed, 1000 + epoch])
    perm = rng.permutation(len(lengths))
    if not group_by_length:
        return [perm[i: i + batch_size] for i in range(0, len(perm), batch_size)]
    lengths = np.asarray(lengths)
    window = 32 * batch_size
    batches = []
    for w in range(0, len(perm), window):
        chunk = perm[w: w + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def resolve_targets(model, targets, aliases: dict[str, list[str]] | None = None):
    """PEFT `target_modules`: "all-linear" as is; each listed name as given if a module's name equals it or ends
    with `.name`, else its first alias that does (e.g. BERT's `query` -> ViT's `q_proj`). ConfigError otherwise."""
    from ..config import ConfigError

    if targets == "all-linear":
        return "all-linear"
    names = [n for n, _ in model.named_modules()]

    def present(name: str) -> bool:
        return any(n == name or n.endswith("." + name) for n in names)

    out = []
    for name in targets:
        for cand in [name] + (aliases or {}).get(name, []):
            if present(cand):
                out.append(cand)
                break
        else:
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise ConfigError(f"lora.target_modules: the model has no module named {name!r}; its linear layers end "
                              f"in {leaves}")
    return list(dict.fromkeys(out))
