"""The one training loop (every task): a plain PyTorch loop that drives the genlora handle, per optimizer step

    handle.begin_step()
    for inst in handle.train_instances():       # LoRA Dropout's n_train passes; one pass otherwise
        inst.backward(model(**batch).loss)       # the model's loss already holds RM-LoRA's regularizer
    clip_grad_norm_(trainable, max_grad_norm)
    handle.optimizer_step(optimizer)             # RM-LoRA's mask, optimizer.step(), bookkeeping
    scheduler.step(); optimizer.zero_grad()

(plain LoRA: the same without the handle). At evenly spaced evaluation points it calls `evaluate(step)`, which
measures the live model on the curve splits; early stopping watches the validation loss there, keeps a snapshot of
the best point (trainable parameters and the handle's state) and restores it at the end, like the Trainer's
`load_best_model_at_end`.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .progress import Progress
from .tasks import Encoded, train_batches


class TrainLog:
    """train.log (lines for people) and train_log.jsonl (the same events as JSON), flushed per line."""

    def __init__(self, folder: Path):
        self.text = open(folder / "train.log", "w")
        self.jsonl = open(folder / "train_log.jsonl", "w")

    def write(self, record: dict[str, Any], line: str) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.text.write(line + "\n")
        self.text.flush()
        self.jsonl.flush()

    def close(self) -> None:
        self.text.close()
        self.jsonl.close()


@dataclass
class LoopResult:
    steps: int  # optimizer steps run
    epoch_losses: list[float]
    curve: list[dict[str, Any]] = field(default_factory=list)  # [{"step", "epoch", <split>: metrics}, ...]
    stopped_early: bool = False
    restored_step: int | None = None  # early stopping: the evaluation point restored


def eval_points(total_steps: int, n: int) -> list[int]:
    """`n` evenly spaced optimizer steps in (0, total], the last one at the end."""
    return sorted({max(1, round(total_steps * k / n)) for k in range(1, n + 1)}) if n else []


def _snapshot(model, handle) -> dict[str, Any]:
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"params": params, "handle": copy.deepcopy(handle.state_dict()) if handle is not None else None}


def _restore(model, handle, snap: dict[str, Any]) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in snap["params"]:
                p.copy_(snap["params"][n])
    if handle is not None:
        handle.load_state_dict(snap["handle"])


def train_loop(model, handle, optimizer, scheduler, train: Encoded, collate, tc, *, epochs: int,
               total_steps: int, device, evaluate: Callable[[int], dict[str, Any]] | None, points: list[int],
               log: TrainLog, progress: bool = True) -> LoopResult:
    """Run `epochs` over `train` (batches a pure function of (seed, epoch)); see the module docstring."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    result = LoopResult(steps=0, epoch_losses=[])
    # early stopping: the best validation score so far, as a loss (accuracy enters negated: lower is better)
    best, best_loss, since_best = None, math.inf, 0
    watched = tc.early_stopping_metric
    start = time.perf_counter()
    window, window_n = 0.0, 0
    model.train()
    with Progress(total_steps, "train", enabled=progress) as bar:
        for epoch in range(epochs):
            epoch_sum, epoch_n = 0.0, 0
            for index in train_batches(train.lengths, tc.batch_size, tc.seed, epoch, tc.group_by_length):
                batch = {k: v.to(device) for k, v in collate([train.features[i] for i in index]).items()}
                step_loss = _step(model, handle, optimizer, batch, trainable, tc.max_grad_norm)
                if not math.isfinite(step_loss):
                    raise FloatingPointError(f"training loss became {step_loss} at step {result.steps}; lower "
                                             "training.lr")
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                result.steps += 1
                window += step_loss
                window_n += 1
                epoch_sum += step_loss * len(index)
                epoch_n += len(index)
                bar.update(1, loss=window / window_n)
                if result.steps % tc.log_every == 0 or result.steps == total_steps:
                    lr = scheduler.get_last_lr()[0]
                    log.write({"step": result.steps, "epoch": epoch + 1, "loss": window / window_n, "lr": lr,
                               "elapsed_s": time.perf_counter() - start},
                              f"step {result.steps}/{total_steps} epoch {epoch + 1} loss {window / window_n:.4f} "
                              f"lr {lr:.3g}")
                    window, window_n = 0.0, 0
                if evaluate is not None and result.steps in points:
                    point = {"step": result.steps, "epoch": epoch + 1, **evaluate(result.steps)}
                    result.curve.append(point)
                    log.write({"event": "eval", **point}, _curve_line(point))
                    model.train()
                    if tc.early_stopping:
                        score = point["validation"][watched]
                        loss = -score if watched == "accuracy" else score
                        if loss < best_loss:
                            best, best_loss, since_best = _snapshot(model, handle), loss, 0
                            result.restored_step = result.steps
                        else:
                            since_best += 1
                        if since_best >= tc.patience:
                            result.stopped_early = result.steps < total_steps
                            break
            result.epoch_losses.append(epoch_sum / max(epoch_n, 1))
            log.write({"event": "epoch", "epoch": epoch + 1, "train_loss": result.epoch_losses[-1]},
                      f"epoch {epoch + 1} mean training loss {result.epoch_losses[-1]:.4f}")
            if tc.early_stopping and since_best >= tc.patience:
                break
    if tc.early_stopping and best is not None:
        _restore(model, handle, best)
        log.write({"event": "early_stopping", "restored_step": result.restored_step, "stopped_at": result.steps},
                  f"early stopping: restored the evaluation point at step {result.restored_step} (validation "
                  f"{watched} {abs(best_loss):.4f}); stopped at step {result.steps}")
    return result


def _step(model, handle, optimizer, batch, trainable, max_grad_norm: float) -> float:
    """One optimizer step; returns the batch loss (mean over LoRA Dropout's passes)."""
    if handle is None:
        loss = model(**batch).loss
        loss.backward()
        value = loss.item()
    else:
        handle.begin_step()
        value = 0.0
        for inst in handle.train_instances():
            loss = model(**batch).loss
            inst.backward(loss)
            value += loss.item() / inst.n
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    if handle is None:
        optimizer.step()
    else:
        handle.optimizer_step(optimizer)
    return value


def _curve_line(point: dict[str, Any]) -> str:
    parts = [f"eval at step {point['step']}:"]
    for split, m in point.items():
        if isinstance(m, dict):
            acc = f" acc {m['accuracy']:.4f}" if "accuracy" in m else ""
            parts.append(f"{split}{acc} loss {m['loss']:.4f}")
    return " ".join(parts)
