"""Evaluating a saved adapter as it is deployed: the base model plus the adapter folder, loaded with plain
`peft.PeftModel.from_pretrained`; optionally with LoRA Dropout's test-time ensemble (`genlora.ensemble`), which
re-attaches the saved LoRA Dropout config to the loaded model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..core.handle import GENLORA_CONFIG_NAME
from .config import ModelConfig
from .data import Encoded, collate, encode, eval_batches
from .metrics import classification_metrics
from .models import load_base


def load_adapter(adapter_dir: str | os.PathLike, model_cfg: ModelConfig, device: torch.device, seed: int = 0):
    """(PeftModel in eval mode on `device`, tokenizer)."""
    from peft import PeftModel

    base, tokenizer, _ = load_base(model_cfg, seed)
    model = PeftModel.from_pretrained(base, os.fspath(adapter_dir), is_trainable=False)
    model.to(device)
    model.eval()
    return model, tokenizer


def saved_methods(adapter_dir: str | os.PathLike) -> list[dict]:
    path = Path(adapter_dir) / GENLORA_CONFIG_NAME
    if not path.is_file():
        return []
    with open(path) as f:
        return json.load(f).get("methods", [])


def ensemble_forward(model, adapter_dir: str | os.PathLike, n_test: int | None = None):
    """(callable like the model that runs LoRA Dropout's test-time ensemble, handle to detach afterwards), or
    (None, reason) when the ensemble does not apply or is not available in this genlora."""
    entries = [m for m in saved_methods(adapter_dir) if m.get("method") == "lora_dropout"]
    if not entries:
        return None, "the adapter was not trained with LoRA Dropout"
    entry = dict(entries[0])
    if entry.get("deploy", "ensemble") != "ensemble":
        return None, f"the adapter was saved with deploy={entry.get('deploy')!r} (the expectation is merged in)"
    try:
        from .. import ensemble as ensemble_module
        from ..core.handle import attach
        from ..registry import method_from_dict
    except ImportError:
        return None, "genlora.ensemble is not available in this version"
    factory = getattr(ensemble_module, "test_time_ensemble", None)
    if factory is None:
        return None, "genlora.ensemble has no test_time_ensemble()"
    try:
        method = method_from_dict(entry)
    except ValueError as e:
        return None, f"cannot rebuild the saved LoRA Dropout config: {e}"
    handle = attach(model, method)
    return factory(model, handle, n_test), handle


@torch.no_grad()
def predict_probs(model, enc: Encoded, batch_size: int, device: torch.device, pad_id: int, forward=None) -> np.ndarray:
    """Class probabilities (n, C), float64, in the original example order."""
    forward = forward or model
    out = None
    for index in eval_batches(enc, batch_size):
        batch = collate(enc, index, pad_id)
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        res = forward(**inputs)
        logits = res["logits"] if isinstance(res, dict) else getattr(res, "logits", res)
        probs = torch.softmax(logits.float(), dim=-1).double().cpu().numpy()
        if out is None:
            out = np.empty((len(enc), probs.shape[1]), dtype=np.float64)
        out[index] = probs
    return out if out is not None else np.empty((0, 0))


def evaluate_sets(model, tokenizer, sets: dict, max_length: int, batch_size: int, device, ece_bins: int, forward=None):
    """{name: classification metrics} for the TextData sets given."""
    results = {}
    for name, data in sets.items():
        enc = encode(tokenizer, data, max_length)
        probs = predict_probs(model, enc, batch_size, device, tokenizer.pad_token_id, forward)
        results[name] = classification_metrics(probs, data.labels, ece_bins)
    return results
