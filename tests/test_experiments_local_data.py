"""Your own data (issue 15): local CSV/TSV/JSONL/JSON files are read verbatim; empty or missing texts and labels
stop with their line numbers, or are dropped with `data.drop_incomplete` and counted; the README's minimal YAMLs
work as written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from test_experiments import sentences, tiny  # noqa: F401  (the tiny BERT fixture)

from genlora import cli
from genlora.experiments.local_files import DataFileError, read_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_csv_values_stay_verbatim(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\nNA,0\nnull,1\nNone,0\nnan,1\n"  spaced  ",0\n"a, quoted ""one""",1\n')
    t = read_table(path, "text", "label")
    assert t.texts == ("NA", "null", "None", "nan", "  spaced  ", 'a, quoted "one"')
    assert t.labels.tolist() == [0, 1, 0, 1, 0, 1] and t.lines == (2, 3, 4, 5, 6, 7) and t.dropped == ()


def test_jsonl_and_json_values_stay_verbatim(tmp_path):
    rows = [{"text": "NA", "label": 0}, {"text": "null", "label": "1"}, {"text": "None", "label": 1.0}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    for name in ("d.jsonl", "d.json"):
        t = read_table(tmp_path / name, "text", "label")
        assert t.texts == ("NA", "null", "None") and t.labels.tolist() == [0, 1, 1]


@pytest.mark.parametrize("body, lines", [
    ("text,label\ngood,1\n,0\nbad,\n   ,1\nfine,1\n", [3, 4, 5]),  # empty text, empty label, whitespace text
    ("text,label\ngood,1\nshort row\n", [3]),  # a missing label field
])
def test_incomplete_csv_rows_are_errors_naming_lines(tmp_path, body, lines):
    path = tmp_path / "d.csv"
    path.write_text(body)
    with pytest.raises(DataFileError) as e:
        read_table(path, "text", "label")
    assert f"at lines {', '.join(map(str, lines))};" in str(e.value) and "drop_incomplete" in str(e.value)
    t = read_table(path, "text", "label", drop_incomplete=True)
    assert t.dropped == tuple(lines) and "" not in t.texts


def test_incomplete_jsonl_rows_are_errors_naming_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "good", "label": 1}\n{"label": 0}\n{"text": null, "label": 1}\n'
                    '{"text": "ok"}\n\n{"text": "fine", "label": 0}\n')
    with pytest.raises(DataFileError, match=r"3 rows .* at lines 2, 3, 4;"):
        read_table(path, "text", "label")
    t = read_table(path, "text", "label", drop_incomplete=True)
    assert t.texts == ("good", "fine") and t.lines == (1, 6) and t.dropped == (2, 3, 4)


def test_bad_labels_and_columns_name_rows_and_keys(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\ngood,1\nbad,neg\nok,-1\n")
    with pytest.raises(DataFileError, match=r"line 3: 'neg', line 4: '-1'"):
        read_table(path, "text", "label")
    with pytest.raises(DataFileError, match=r"data.text_column: column 'sentence' is not in"):
        read_table(path, "sentence", "label")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataFileError, match="must end in"):
        read_table(tmp_path / "d.txt", "text", "label")


def test_a_run_reports_dropped_rows(tiny, tmp_path):  # noqa: F811
    """With drop_incomplete, the dropped rows are counted in train.log and metrics.json; without, the run stops
    before any output folder exists, naming the lines."""
    rows = sentences(300, 3)
    lines = ["sentence,y"] + [f"{t},{y}" for t, y in rows] + [",1", "NA,0"]
    data = tmp_path / "mine.csv"
    data.write_text("\n".join(lines) + "\n")
    cfg = {"model": {"path": tiny["model"]}, "lora": {"r": 4, "lora_alpha": 8},
           "data": {"dataset": str(data), "text_column": "sentence", "label_column": "y", "train_size": 40,
                    "validation_size": 100, "test_size": 100, "max_length": 16},
           "training": {"epochs": 1, "batch_size": 8},
           "evaluation": {"curve_points": 0, "sharpness": False, "landscape_scales": [], "spectra": False},
           "output_dir": str(tmp_path / "run")}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["train", str(path), "--no-progress"]) == 2
    assert not (tmp_path / "run").exists()
    assert cli.main(["train", str(path), "--no-progress", "--data.drop_incomplete=true"]) == 0
    log = (tmp_path / "run" / "train.log").read_text()
    assert "mine: dropped 1 incomplete rows (lines [302])" in log
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["data"]["train"]["n"] == 40 and m["dropped_rows"] == {"mine": [302]}


def test_readme_your_own_data_yaml_runs(tiny, tmp_path):  # noqa: F811
    """The README's minimal CSV and JSONL configs parse and plan as written (paths and model swapped for tiny
    ones)."""
    from genlora.experiments.config import TrainConfig
    from genlora.experiments.parsing import parse_config
    from genlora.experiments.run import validate

    text = README.read_text()
    section = text[text.index("## Your own data"):]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)[:2]
    assert len(blocks) == 2
    rows = sentences(400, 4)
    (tmp_path / "reviews.csv").write_text("review,stars\n" + "".join(f"{t},{y}\n" for t, y in rows))
    (tmp_path / "reviews.jsonl").write_text("".join(json.dumps({"review": t, "stars": y}) + "\n" for t, y in rows))
    for block in blocks:
        cfg = yaml.safe_load(block)
        cfg["data"]["dataset"] = str(tmp_path / Path(cfg["data"]["dataset"]).name)
        cfg.setdefault("model", {})["path"] = tiny["model"]
        validate(parse_config(TrainConfig, cfg))
