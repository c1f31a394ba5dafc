"""Your own data: a local CSV/TSV/JSONL/JSON file with a text column and an integer label column, read verbatim.

Verbatim means no value is reinterpreted: a text that reads `NA`, `null`, `None` or `nan` stays that text (pandas
and `datasets` would turn them into missing values, then into ""). A row whose text is empty (or only whitespace) or
missing, or whose label is empty or missing, is an error that names its line numbers; with `drop_incomplete` such
rows are dropped instead, and their count and lines are reported (the run's log and metrics.json record them).

Formats: `.csv` (comma) and `.tsv` (tab), with a header row, read by the `csv` module as strings; `.jsonl` (one JSON
object per line); `.json` (a JSON array of objects, or JSON Lines). Line numbers are those of the file (the header
is line 1 of a CSV); for a `.json` array, the item number (1-based).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
MAX_LISTED = 10  # row numbers named in a message


class DataFileError(ValueError):
    """A local data file that cannot be used as it is; the message names the file, the column and the rows."""


@dataclass(frozen=True)
class Table:
    texts: tuple[str, ...]
    labels: np.ndarray | None  # int64 (n,), None when no label column was asked for
    lines: tuple[int, ...]  # the file line (or JSON item) of each kept row
    dropped: tuple[int, ...] = field(default=())  # lines of dropped incomplete rows


def _records(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """(columns, [(line, row)]) with values exactly as written (CSV: strings; JSON: JSON values)."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter="\t" if suffix == ".tsv" else ",")
            try:
                header = next(reader)
            except StopIteration:
                raise DataFileError(f"{path}: the file is empty (a header row is needed)") from None
            rows = []
            for values in reader:
                if not values:  # a blank line is not a row
                    continue
                row = {c: (values[i] if i < len(values) else None) for i, c in enumerate(header)}
                rows.append((reader.line_num, row))
        return header, rows
    if suffix not in (".jsonl", ".json"):
        raise DataFileError(f"{path}: data files must end in one of {list(SUFFIXES)}")
    text = path.read_text(encoding="utf-8")
    items: list[tuple[int, Any]] = []
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = [(i + 1, obj) for i, obj in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}: not valid JSON ({e})") from None
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataFileError(f"{path}:{lineno}: not a JSON object ({e.msg})") from None
    columns: list[str] = []
    for lineno, obj in items:
        if not isinstance(obj, dict):
            raise DataFileError(f"{path}:{lineno}: expected a JSON object with the text and label keys, got "
                                f"{type(obj).__name__}")
        columns += [k for k in obj if k not in columns]
    return columns, items


def _label(value: Any) -> int | None:
    """An integer label from a CSV string or a JSON value; None when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        s = value.strip()
        if s.lstrip("-").isdigit():
            return int(s)
    return None


def _lines(found: list[int]) -> str:
    shown = ", ".join(map(str, found[:MAX_LISTED]))
    return shown + (f" and {len(found) - MAX_LISTED} more" if len(found) > MAX_LISTED else "")


def read_table(path: str | os.PathLike, text_column: str, label_column: str | None, *,
               drop_incomplete: bool = False, text_key: str = "data.text_column",
               label_key: str = "data.label_column") -> Table:
    """The text (and label) column of a local file, verbatim; see the module docstring for the rules."""
    path = Path(path)
    columns, rows = _records(path)
    for key, col in ((text_key, text_column), (label_key, label_column)):
        if col is not None and col not in columns:
            raise DataFileError(f"{key}: column {col!r} is not in {path} (columns: {columns})")
    incomplete, bad_labels = [], []
    texts, labels, lines = [], [], []
    for line, row in rows:
        text = row.get(text_column)
        label = row.get(label_column) if label_column is not None else 0
        text_missing = not isinstance(text, str) or not text.strip()
        label_missing = label is None or (isinstance(label, str) and not label.strip())
        if text_missing and text is not None and not isinstance(text, str):
            raise DataFileError(f"{path}:{line}: {text_column!r} is {text!r}, not a string")
        if text_missing or label_missing:
            incomplete.append(line)
            continue
        value = _label(label)
        if value is None or value < 0:
            bad_labels.append((line, label))
            continue
        texts.append(text)
        labels.append(value)
        lines.append(line)
    if bad_labels:
        shown = ", ".join(f"line {ln}: {v!r}" for ln, v in bad_labels[:MAX_LISTED])
        raise DataFileError(f"{path}: {label_key} {label_column!r} must hold integers 0..num_labels-1; "
                            f"{len(bad_labels)} rows do not ({shown})")
    if incomplete and not drop_incomplete:
        raise DataFileError(
            f"{path}: {len(incomplete)} rows have an empty or missing text ({text_column!r}) or label "
            f"({label_column!r}) at lines {_lines(incomplete)}; fix the file, or set data.drop_incomplete: true to "
            "drop such rows (they are counted in the log)")
    if not texts:
        raise DataFileError(f"{path}: no usable rows")
    return Table(tuple(texts), np.asarray(labels, dtype=np.int64) if label_column is not None else None,
                 tuple(lines), tuple(incomplete))
