"""Smoke test of bench/bench.py: the tiny preset on CPU, 2 timed steps; no timing assertions."""

import importlib.util
import json
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("genlora_bench", os.path.join(ROOT, "bench", "bench.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_preset_writes_a_row_per_setup(bench, tmp_path):
    import torch

    threads = torch.get_num_threads()
    try:
        result = bench.main(["--preset", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1",
                             "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # the bench runs single-threaded on CPU
    expected, skipped = bench.available_setups(bench.DEFAULT_SETUPS, None)
    names = [s["name"] for s in expected]
    assert {"plain", "flat_lora", "rm_lora"} <= set(names)

    with open(tmp_path / "results.json") as f:
        data = json.load(f)
    assert [r["name"] for r in data["rows"]] == names
    assert [s["name"] for s in data["skipped"]] == [s["name"] for s in skipped]
    for row in data["rows"]:
        for key in ("step_s", "step_s_median", "tokens_per_s", "peak_bytes", "ratio_time", "ratio_mem"):
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]) and row[key] > 0, (row["name"], key)
        assert row["base_max_abs_diff"] == 0 and row["base_bit_identical"], row["name"]
        assert row["losses_finite"], row["name"]
        assert row["steps_timed"] == 2
        if row["kind"] == "train" and "lorasc" in row["methods"]:
            assert row["stage_boundaries"] == 4 and math.isfinite(row["step_s_amortized"])
            assert row["slow_rank"] == 4 * data["config"]["lora_r"]  # timed inside stage 4: four experts merged
    plain = next(r for r in data["rows"] if r["name"] == "plain")
    assert plain["ratio_time"] == pytest.approx(1.0) and plain["ratio_mem"] == pytest.approx(1.0)
    for key in ("torch", "transformers", "peft", "date_utc", "device"):
        assert data["environment"][key]

    md = (tmp_path / "results.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| setup")]
    assert [line.split("|")[1].strip() for line in table if line.split("|")[1].strip() in names] == names
    assert result["rows"][0]["name"] == "plain"


def test_unknown_methods_are_skipped_not_fatal(bench):
    setups = [{"name": "plain", "methods": []},
              {"name": "future", "methods": [{"method": "not_a_method_yet"}]}]
    chosen, skipped = bench.available_setups(setups, None)
    assert [s["name"] for s in chosen] == ["plain"]
    assert skipped[0]["name"] == "future" and "not_a_method_yet" in skipped[0]["reason"]


def test_lorasc_step_plan_times_steps_inside_one_stage(bench):
    args = bench.parse_args(["--preset", "tiny", "--steps", "3", "--warmup", "2"])
    args.phase_steps = 1
    plan = bench.plan_steps({"name": "x", "methods": [{"method": "lorasc"}], "stages_before_timing": 4}, args)
    length = plan["stage_length"]
    assert plan["boundaries"] == [length, 2 * length, 3 * length, 4 * length]
    assert all(4 * length < s < 5 * length for s in plan["timed"] + plan["phase"])
    assert plan["total"] <= 5 * length
