"""One-file training checkpoints for plain loops: the genlora training state (adapter, step, methods' state),
optimizer and LR scheduler together.

Written atomically (temporary file + rename), so a run killed at any instant leaves either the previous checkpoint
or the new one, never a torn file; loading validates everything before changing anything.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .core.handle import GenLoRAHandle, write_atomic

_FORMAT = "genlora-training-checkpoint-2"


def save_training_state(
    path: str | os.PathLike,
    handle: GenLoRAHandle,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Any | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Save what an exact resume needs, between two steps. `extra` holds your own loop state (epoch, data order)."""
    if handle.in_step:
        raise RuntimeError("save_training_state() between steps only")
    bad = [s.name for s in handle.slots if not all(bool(p.isfinite().all()) for p in (s.a_weight, s.b_weight))]
    if bad:
        raise ValueError(f"refusing to checkpoint: the adapter holds NaN/inf in {bad[:3]}")
    state = {
        "format": _FORMAT,
        "genlora": handle.state_dict(),  # the trained adapter, step counter, every method's state
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "lr_scheduler": None if lr_scheduler is None else lr_scheduler.state_dict(),
        "extra": extra or {},
    }
    write_atomic(path, lambda f: torch.save(state, f))


def load_training_state(
    path: str | os.PathLike,
    handle: GenLoRAHandle,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Any | None = None,
) -> dict[str, Any]:
    """Restore a `save_training_state` file into a freshly attached handle; returns its `extra` dict.

    A corrupt file, or one from another configuration, raises ValueError before any state is changed.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{path} is not a readable genlora checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a genlora training checkpoint")
    if (optimizer is None) != (state["optimizer"] is None):
        raise ValueError(f"{path}: optimizer state {'missing' if optimizer is not None else 'present but unused'}")
    if optimizer is not None:
        saved_groups = [len(g["params"]) for g in state["optimizer"]["param_groups"]]
        if saved_groups != [len(g["params"]) for g in optimizer.param_groups]:
            raise ValueError(f"{path}: the optimizer state is for other parameter groups ({saved_groups})")
    handle.load_state_dict(state["genlora"])  # validates methods and adapter layers before changing anything
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if lr_scheduler is not None and state["lr_scheduler"] is not None:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    return state["extra"]
