"""Writing results so that nothing is ever half-written: every file goes to a temporary name beside its target and is
renamed over it (`os.replace` is atomic on POSIX), and a run's folder is built under a temporary name and renamed
when complete. An interrupted process leaves the previous file (or no file), never a truncated one."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any


def jsonable(x: Any) -> Any:
    """JSON-ready copy: NaN/inf -> None, numpy/torch scalars -> Python numbers, tuples -> lists, keys -> str."""
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", None) == 0:
        return jsonable(x.item())
    if hasattr(x, "to_dict") and callable(x.to_dict):  # method entries and other config objects
        return jsonable(x.to_dict())
    return x


def write_text(path: str | os.PathLike, text: str) -> None:
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, json.dumps(jsonable(data), indent=1) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def write_yaml(path: str | os.PathLike, data: Any) -> None:
    import yaml

    write_text(path, yaml.safe_dump(jsonable(data), sort_keys=False))


def replace_folder(tmp: Path, final: Path) -> None:
    """Move the complete folder `tmp` to `final`, replacing an older `final` only now that the new one is whole."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
