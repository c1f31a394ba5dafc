"""Smoke tests of bench/bench.py: the tiny preset on CPU, 2 timed steps; no timing assertions."""

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("genlora_bench", os.path.join(ROOT, "bench", "bench.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _main(bench, argv):
    import torch

    threads = torch.get_num_threads()
    try:
        return bench.main(argv)
    finally:
        torch.set_num_threads(threads)  # the bench runs single-threaded on CPU


def test_tiny_preset_writes_a_row_per_setup(bench, tmp_path):
    result = _main(bench, ["--preset", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1",
                           "--out", str(tmp_path), "--quiet"])
    expected, skipped = bench.available_setups(bench.DEFAULT_SETUPS, None)
    names = [s["name"] for s in expected]
    assert {"plain", "flat_lora", "flat_lora_pytorch", "rm_lora", "lora_dropout", "lorasc", "all",
            "ensemble"} <= set(names)

    with open(tmp_path / "results.json") as f:
        data = json.load(f)
    assert data["complete"] and not data["errors"] and not data["not_run"] and data["stopped"] is None
    runtime_skipped = {s["name"]: s["reason"] for s in data["skipped"][len(skipped):]}
    assert [s["name"] for s in data["skipped"][:len(skipped)]] == [s["name"] for s in skipped]
    # only a method that refuses the 4-bit base may be skipped at run time (with the library's message)
    assert all(n.startswith("qlora_") and reason for n, reason in runtime_skipped.items()), runtime_skipped
    assert [r["name"] for r in data["rows"]] == [n for n in names if n not in runtime_skipped]
    for row in data["rows"]:
        for key in ("step_s", "step_s_median", "tokens_per_s", "peak_bytes", "ratio_time", "ratio_mem"):
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]) and row[key] > 0, (row["name"], key)
        assert row["base_max_abs_diff"] == 0 and row["base_bit_identical"], row["name"]
        assert row["losses_finite"], row["name"]
        assert row["steps_timed"] == 2
        if row["kind"] == "train" and "lorasc" in row["methods"]:
            assert row["stage_boundaries"] == 4 and math.isfinite(row["step_s_amortized"])
            assert row["slow_rank"] == 4 * data["config"]["lora_r"]  # timed inside stage 4: four experts merged
            assert "note" not in row
    rows = {r["name"]: r for r in data["rows"]}
    assert rows["plain"]["ratio_time"] == pytest.approx(1.0) and rows["plain"]["ratio_mem"] == pytest.approx(1.0)
    assert rows["flat_lora_pytorch"]["noise_path"] == "pytorch" and rows["flat_lora_pytorch"]["env"] == {
        "GENLORA_TRITON": "0"}
    assert rows["rm_lora"]["noise_path"] is None
    if "qlora_plain" in rows:
        assert rows["qlora_plain"]["base"] == "4bit"
        for name, row in rows.items():
            if name.startswith("qlora_") and name != "qlora_plain":
                assert row["baseline"] == "qlora_plain" and row["ratio_basis"].startswith("qlora_plain")
    for key in ("torch", "transformers", "peft", "date_utc", "device"):
        assert data["environment"][key]

    md = (tmp_path / "results.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| setup")]
    assert [line.split("|")[1].strip() for line in table if line.split("|")[1].strip() in rows] == list(rows)
    assert result["rows"][0]["name"] == "plain"


def test_unknown_methods_are_skipped_not_fatal(bench):
    setups = [{"name": "plain", "methods": []},
              {"name": "future", "methods": [{"method": "not_a_method_yet"}]}]
    chosen, skipped = bench.available_setups(setups, None)
    assert [s["name"] for s in chosen] == ["plain"]
    assert skipped[0]["name"] == "future" and "not_a_method_yet" in skipped[0]["reason"]


def test_choosing_a_setup_brings_its_baseline(bench):
    chosen, _ = bench.available_setups(bench.DEFAULT_SETUPS, ["qlora_rm_lora"])
    assert [s["name"] for s in chosen] == ["plain", "qlora_plain", "qlora_rm_lora"]
    with pytest.raises(SystemExit):
        bench.available_setups(bench.DEFAULT_SETUPS, ["no_such_setup"])


def test_lorasc_step_plan_times_steps_inside_one_stage(bench):
    args = bench.parse_args(["--preset", "tiny", "--steps", "3", "--warmup", "2"])
    args.phase_steps = 1
    for profile_dir in (None, "/tmp/x"):
        args.profile_dir = profile_dir
        plan = bench.plan_steps({"name": "x", "methods": [{"method": "lorasc"}], "stages_before_timing": 4}, args)
        length = plan["stage_length"]
        assert plan["boundaries"] == [length, 2 * length, 3 * length, 4 * length]
        assert all(4 * length < s < 5 * length for s in plan["timed"] + plan["phase"])
        profiled = args.profile_steps if profile_dir else 0
        assert plan["total"] + profiled <= 5 * length  # the profiled steps stay inside stage 4 too


def test_a_failing_setup_is_an_error_row_not_a_crash(bench, tmp_path):
    setups = [{"name": "plain", "methods": []},
              {"name": "broken", "methods": [{"method": "rm_lora", "no_such_option": 1}]},
              {"name": "rm_lora", "methods": [{"method": "rm_lora"}]}]
    path = tmp_path / "setups.json"
    path.write_text(json.dumps(setups))
    result = _main(bench, ["--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--burn-in", "0",
                           "--setups-file", str(path), "--out", str(tmp_path), "--quiet"])
    assert [r["name"] for r in result["rows"]] == ["plain", "rm_lora"]
    assert [e["name"] for e in result["errors"]] == ["broken"]
    assert "ERRORS: broken" in (tmp_path / "results.md").read_text()


def test_deadline_keeps_what_fits(bench, tmp_path):
    result = _main(bench, ["--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--burn-in", "1",
                           "--methods", "rm_lora", "--time-budget", "0", "--out", str(tmp_path), "--quiet"])
    assert result["rows"] == [] and result["complete"]
    assert [s["name"] for s in result["not_run"]] == ["plain"]  # no baseline: the repeat stops there
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["not_run"][0]["reason"].startswith("time budget")


def test_sigterm_writes_the_results_so_far(tmp_path):
    """The GPU check's hard timeout sends SIGTERM: the bench must write what it measured, then stop."""
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "bench", "bench.py"), "--preset", "tiny", "--device",
                             "cpu", "--steps", "40", "--warmup", "0", "--burn-in", "0", "--methods", "lorasc",
                             "--out", str(tmp_path), "--quiet"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stderr:
            if "repeat 0 plain" in line:
                proc.send_signal(signal.SIGTERM)  # now inside LoRASC's 4 stages of 41 steps before its timed ones
                break
        rest = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["stopped"] == "signal SIGTERM" and not data["complete"]
    assert [r["name"] for r in data["rows"]] == ["plain"]


def test_exclusive_frame_times(bench):
    frames = [(1, 0, 100, "outer"), (1, 10, 40, "inner"), (1, 20, 30, "leaf"), (1, 50, 60, "inner"),
              (2, 0, 5, "outer")]
    t = bench._exclusive_frame_times(frames)
    assert t == {"outer": 60 + 5, "inner": 20 + 10, "leaf": 10}
    assert sum(t.values()) == 100 + 5  # the time under the outermost frames, counted once


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (the 4-bit setups are then skipped)")
def test_qlora_setups_run_or_skip_with_the_reason(bench, tmp_path):
    result = _main(bench, ["--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--burn-in", "0",
                           "--methods", "qlora_rm_lora,qlora_flat_lora", "--out", str(tmp_path), "--quiet"])
    assert not result["errors"], result["errors"]
    rows = {r["name"]: r for r in result["rows"]}
    skipped = {s["name"]: s["reason"] for s in result["skipped"]}
    assert "qlora_plain" in rows or "bitsandbytes" in skipped.get("qlora_plain", "")
    if "qlora_plain" in rows:
        assert rows["qlora_plain"]["base"] == "4bit" and rows["qlora_plain"]["base_bit_identical"]
        for name in ("qlora_rm_lora", "qlora_flat_lora"):
            assert name in rows or skipped.get(name), name


def test_profile_summaries_and_report(bench, tmp_path):
    result = _main(bench, ["--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--burn-in", "0",
                           "--methods", "flat_lora", "--profile-dir", str(tmp_path / "prof"), "--profile-stack",
                           "--profile-no-trace", "--profile-steps", "1", "--out", str(tmp_path), "--quiet"])
    rows = {r["name"]: r for r in result["rows"]}
    for name in ("plain", "flat_lora"):
        p = rows[name]["profile"]
        assert "error" not in p, p
        assert p["steps"] == 1 and p["ops"] and p["leaf_aten_ops_per_step"] > 0 and p["wall_ms_per_step"] > 0
        assert (tmp_path / "prof" / f"{name}.top.txt").is_file()
    assert rows["plain"]["profile"]["genlora_python_ms_per_step"] == 0  # no genlora code in a plain step
    assert rows["flat_lora"]["profile"]["genlora_python_ms_per_step"] > 0
    assert any("flat_lora.py" in name for name, _ in rows["flat_lora"]["profile"]["genlora_python"])
    spec = importlib.util.spec_from_file_location("genlora_profile_report",
                                                  os.path.join(ROOT, "bench", "profile_report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    text = report.report(json.loads((tmp_path / "results.json").read_text()))
    assert "| flat_lora |" in text and "**flat_lora**" in text and "genlora functions" in text
