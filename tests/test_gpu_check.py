"""bench/gpu_check.sh, the prepared GPU check, exercised on the CPU so it cannot rot between the rare GPU runs.

The dry run is the real script with `--dry-run`: the same phases, the same bench.py command line (tiny preset, one
timed step), the GPU test collected (it must exist and skip here). A renamed bench option, a renamed GPU test, a
setup that errors or a broken report makes it fail.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return _load("genlora_gpu_check", os.path.join(ROOT, "bench", "gpu_check.py"))


@pytest.fixture(scope="module")
def bench():
    return _load("genlora_bench_for_gpu_check", os.path.join(ROOT, "bench", "bench.py"))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check_dry_run")
    proc = subprocess.run(["bash", SCRIPT, "--dry-run", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    return proc, out


@pytest.mark.slow
def test_dry_run_runs_every_phase_and_writes_the_results(dry_run, gpu_check, bench):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    for name in ("results.json", "results.md", "profile.txt", "gpu_check.log"):
        assert (out / name).is_file(), name
    report = json.loads((out / "results.json").read_text())
    assert report["dry_run"] and report["status"] == "ok"
    for key in ("torch", "transformers", "peft", "python"):
        assert report["versions"][key], key

    # phase 2: the GPU test exists (collected) and skips on this machine
    tests = report["tests"]
    assert tests["tests"] == len(gpu_check.GPU_TESTS) and tests["skipped"] == tests["tests"], tests
    assert not tests["failures"] and not tests["errors"]

    # phase 3: both bench phases ran every default setup: a row each, or (4-bit base only) a skip with its reason
    chosen, pre_skipped = bench.available_setups(bench.DEFAULT_SETUPS, None)
    assert not pre_skipped, pre_skipped  # every method is registered
    assert [p["label"] for p in gpu_check.PHASES] == list(report["phases"])
    for label, phase in report["phases"].items():
        res = phase["result"]
        assert phase["rc"] == 0 and res["complete"], (label, phase["rc"])
        assert not res["errors"] and not res["stopped"], (label, res["errors"], res["stopped"])
        assert res["config"]["preset"] == "tiny" and res["config"]["steps"] == 1
        rows = {r["name"]: r for r in res["rows"]}
        skipped = {s["name"]: s["reason"] for s in res["skipped"]}
        for setup in chosen:
            name = setup["name"]
            if setup.get("base") == "4bit":
                assert name in rows or skipped.get(name), (label, name)
                continue
            assert name in rows, (label, name, skipped.get(name))
            row = rows[name]
            assert row["base_bit_identical"] and row["losses_finite"], (label, name)
            assert row["ratio_time"] > 0 and (row["ratio_mem"] or 0) > 0
        assert rows["flat_lora_pytorch"]["noise_path"] == "pytorch"  # GENLORA_TRITON=0 while it ran
        assert rows["all"]["stage_boundaries"] == 4 and rows["lorasc"]["stage_boundaries"] == 4
        assert rows["ensemble"]["n_test"] == 4
        profiled = [r for r in res["rows"] if r.get("profile")]
        if next(p for p in gpu_check.PHASES if p["label"] == label)["profile"]:
            assert {r["name"] for r in profiled} >= {"plain", "flat_lora", "lorasc", "all"}, label
            assert all("error" not in r["profile"] for r in profiled), [r["profile"] for r in profiled]
        else:
            assert not profiled

    # phase 4: the summary against every target, in the JSON, the Markdown and on stdout
    summary = report["summary"]
    for label in report["phases"]:
        entries = {e["setup"]: e for e in summary["presets"][label]["entries"]}
        for name, _, t_time, t_mem in gpu_check.TARGETS:
            e = entries[name]
            assert e["status"] in ("pass", "MISS"), e
            assert e["verdicts"]["time"] in ("pass", "MISS") and e["target_time"] == t_time
    counts = summary["counts"]
    assert counts["pass"] + counts["MISS"] >= 2 * (2 * 5 + 1)  # time + mem per training target, per preset
    md = (out / "results.md").read_text()
    assert "Summary against the issue's targets" in md and "DRY RUN" in md
    assert "targets:" in proc.stdout and "flat_lora" in proc.stdout
    assert "==== preset 1b, setup plain" in (out / "profile.txt").read_text()


def test_the_real_run_stops_at_the_versions_check_without_a_gpu(tmp_path):
    """Here (no CUDA) the real run must fail clearly before anything is measured or written."""
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the real run would start")
    proc = subprocess.run(["bash", SCRIPT, "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu_check: FAILED: the versions check found" in proc.stderr
    assert "sees no CUDA device" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_failing_bench_fails_the_check(gpu_check, tmp_path, monkeypatch):
    """A bench that rejects its command line (e.g. a renamed option) makes the check fail, with the reason logged."""
    fake = tmp_path / "bench.py"
    fake.write_text("import sys\nprint('bench.py: error: unrecognized arguments: --deadline', file=sys.stderr)\n"
                    "sys.exit(2)\n")
    monkeypatch.setattr(gpu_check, "BENCH", str(fake))
    out = tmp_path / "out"
    rc = gpu_check.main(["--dry-run", "--skip-tests", "--presets", "150m", "--out", str(out)])
    assert rc == 1
    report = json.loads((out / "results.json").read_text())
    assert report["status"] == "FAILED" and report["phases"]["150m"]["rc"] == 2
    assert "unrecognized arguments" in (out / "gpu_check.log").read_text()


def test_summary_verdicts(gpu_check):
    def row(name, t, m, identical=True, kind="train", **kw):
        return {"name": name, "kind": kind, "ratio_time": t, "ratio_mem": m, "step_s": 0.1 * t,
                "base_bit_identical": identical, **kw}

    res = {"rows": [row("plain", 1.0, 1.0), row("flat_lora", 1.02, 1.03, noise_path="triton"),
                    row("rm_lora", 1.01, 1.0, identical=False), row("ensemble", 4.5, 1.2, kind="inference"),
                    row("flat_lora_pytorch", 1.10, 1.0, noise_path="pytorch")],
           "skipped": [{"name": "qlora_plain", "reason": "bitsandbytes is not usable here"}],
           "not_run": [{"name": "all", "repeat": 0, "reason": "time budget (estimated 40 s)"}],
           "errors": [{"name": "lorasc", "repeat": 0, "error": "RuntimeError: boom"}], "repeats_done": 1}
    s = gpu_check.summarize({"1b": res})
    e = {x["setup"]: x for x in s["presets"]["1b"]["entries"]}
    assert e["flat_lora"]["verdicts"] == {"time": "pass", "mem": "MISS", "base": "pass"}
    assert e["rm_lora"]["verdicts"]["base"] == "MISS" and e["rm_lora"]["status"] == "MISS"
    assert e["ensemble"]["verdicts"] == {"time": "MISS", "mem": ""}
    assert e["all"]["status"] == "not measured" and "time budget" in e["all"]["reason"]
    assert e["lorasc"]["reason"] == "RuntimeError: boom"
    assert e["flat_lora_pytorch"]["kernel_saves_ms_per_step"] == pytest.approx(8.0)
    assert e["qlora_flat_lora"].get("counted") is False  # the 4-bit group as a whole did not run: one line
    assert s["presets"]["1b"]["qlora_reason"] == "bitsandbytes is not usable here"
    assert s["counts"] == {"pass": 4, "MISS": 3, "not measured": 3}
    report = {"versions": {}, "dry_run": False, "tests": None, "summary": s, "phases": {"1b": {"preset": "1b"}},
              "status": "ok", "out": "x"}
    text = "\n".join(gpu_check.summary_lines(report))
    assert "4-bit (QLoRA) setups not run: bitsandbytes is not usable here" in text
    assert "ERROR lorasc" in text and "targets: 4 pass, 3 miss, 3 not measured" in text


def test_bench_and_check_agree_on_the_targets(gpu_check, bench):
    setups = {s["name"]: s for s in bench.DEFAULT_SETUPS}
    for name, _, t_time, t_mem in gpu_check.TARGETS:
        assert setups[name]["target_time"] == t_time and setups[name].get("target_mem") == t_mem, name
        q = setups.get(gpu_check.QLORA_PREFIX + name)
        if name != "ensemble":
            assert q is not None and q["base"] == "4bit" and q["target_time"] == t_time, name
    for name, _ in gpu_check.INFO_SETUPS:
        assert name in setups


def test_script_is_the_documented_entry_point():
    text = open(SCRIPT).read()
    assert "gpu_check.py" in text and 'PYTHONPATH="$PWD/src' in text
    proc = subprocess.run(["bash", SCRIPT, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--dry-run" in proc.stdout and "--copy-to" in proc.stdout
    assert sys.executable  # the script uses $PYTHON or python3 from PATH
