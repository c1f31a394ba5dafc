"""Writing files so that a crash or a reader never sees half of one, and exact checksums of frozen weights."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable

import torch
from torch import nn


def write_atomic(path: str | os.PathLike, write: Callable[[Any], None], binary: bool = True) -> None:
    """Call `write(file)` on a temporary file in the same folder, then rename it to `path`: readers (and a crash)
    see either the old file or the whole new one, never half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_atomic(path, lambda f: json.dump(data, f, indent=2, sort_keys=True), binary=False)


def base_checksums(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Exact checksums of every frozen floating-point (or quantized) tensor: the bit patterns summed plainly and
    with position weights (int64, wrapping), so any changed bit changes them. One pass, no copy kept."""
    sums = {}
    int_views = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        data = p.detach()
        if type(data) is not torch.Tensor and hasattr(data, "data"):
            data = data.data  # bitsandbytes Params4bit / Int8Params: the packed payload
        bits = data.reshape(-1).view(int_views[data.element_size()]).to(torch.int64)
        weights = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) % 65521 + 1
        sums[name] = (int(bits.sum()), int((bits * weights).sum()))
    return sums
