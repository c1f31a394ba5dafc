"""What the text and vision tasks share: the model predicts class probabilities; a split is scored by accuracy,
NLL (its loss) and calibration (ECE and reliability bins)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..metrics import classification_metrics
from .base import Encoded, Task


class ClassificationTask(Task):
    peft_task_type = "SEQ_CLS"

    def records(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {"probs": torch.softmax(logits.float(), dim=-1).double().cpu().numpy()}

    def metrics(self, records: dict[str, np.ndarray], enc: Encoded, cfg) -> dict[str, Any]:
        m = classification_metrics(records["probs"], enc.labels, cfg.evaluation.ece_bins)
        m["loss"] = m["nll"]
        return m

    def batch_loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        labels = batch["labels"].to(logits.device)
        return F.cross_entropy(logits.float(), labels, reduction="sum").item(), len(labels)
