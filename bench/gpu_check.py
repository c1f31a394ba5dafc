#!/usr/bin/env python
"""The prepared GPU check of genlora's performance issue: one command, a fixed time budget, results on disk.

Run it through `bash bench/gpu_check.sh` (which sets PYTHONPATH to this checkout's src/ and unbuffered output).
Phases, each bounded in time, each followed by rewriting the results, so a kill loses at most the phase in flight:

  1. versions: python, torch (CUDA build, a visible GPU), transformers, peft (the ranges pyproject.toml allows),
     triton, pytest, the nvidia driver, and genlora importable from this checkout; anything missing stops the check
     here with exit status 2 and a list of what is wrong. bitsandbytes is optional (its setups are then skipped).
  2. GPU tests: tests/test_triton_noise.py::test_kernel_on_gpu (the kernel's noise law, bit-exact regeneration,
     fused == unfused bit for bit in bf16 and fp32, Flat-LoRA and LoRASC end to end on the kernel, and a small Llama
     trained through the fused and the unfused path with identical bits). A skip counts as a failure on a GPU.
  3. bench/bench.py on the 1b preset, then on the 150m preset: bf16 base, batch 4 x 2048, LoRA r=16 on all seven
     projections, GENLORA_TRITON=auto; every default setup (plain PEFT LoRA, each method, all four, the n_test=4
     ensemble, Flat-LoRA with the kernel and on the PyTorch path, and the 4-bit setups where bitsandbytes is usable),
     repeats round-robin while the budget lasts, then on 1b a torch.profiler pass (plain, then the setups that
     missed a target, worst first) in the time left. Each bench gets a deadline: it starts no setup it estimates
     would end after it (estimates: the setup's own earlier repeat, else the plain step time), and a hard timeout
     (SIGTERM: the bench writes what it has) backs that up.
  4. report: <out>/results.json (everything: versions, tests, both presets' raw bench results, the summary),
     <out>/results.md, <out>/gpu_check.log, <out>/profile.txt (the profiles); the summary, printed at the end,
     sets each ratio against the issue's targets (pass / miss / not measured).

Default out: bench/results/<UTC date>-<gpu name>/ ; `--copy-to DIR` also copies those files to DIR/<that name>/
after every phase (on the device machine: `--copy-to "$OUT"`).

`--dry-run` runs the same phases on the CPU with the tiny preset (1 timed step per setup; the GPU test is only
collected, so it must exist and skip) and writes to a temporary folder unless --out is given: CI runs it
(tests/test_gpu_check.py), so a renamed bench option or test breaks CI, not the rare GPU run.

Exit status: 0 the check ran (target misses are results, not failures); 1 a GPU test failed or a bench phase
crashed or reported a setup error; 2 the versions check failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "bench.py")
GPU_TESTS = ["tests/test_triton_noise.py::test_kernel_on_gpu"]

# The issue's targets (ratios to plain PEFT LoRA; the ensemble: to one plain forward). bench.py carries the same
# numbers on its setups; the summary reads them from here so a setup renamed in bench.py shows as "not measured".
TARGETS = [  # (setup, label, step time, peak memory)
    ("flat_lora", "Flat-LoRA", 1.03, 1.02),
    ("rm_lora", "RM-LoRA", 1.02, 1.01),
    ("lora_dropout", "LoRA Dropout, n_train = 1", 1.05, 1.05),
    ("lorasc", "LoRASC, after 4 stages", 1.03, 1.05),
    ("all", "all four together", 1.10, 1.08),
    ("ensemble", "test-time ensemble, n_test = 4 (x one forward)", 4.2, None),
]
INFO_SETUPS = [("flat_lora_pytorch", "Flat-LoRA on the PyTorch noise path (GENLORA_TRITON=0), reference")]
QLORA_PREFIX = "qlora_"

# Version floors/ceilings: pyproject.toml's dependency ranges.
REQUIRED = {"torch": ("2.4", "3"), "transformers": ("4.46", "6"), "peft": ("0.17", "0.30")}

# name -> bench preset and per-phase settings. Real run: the issue's shapes. Dry run: the tiny preset, same options.
PHASES = [
    # reserve_after_s: seconds kept for the phases after it. profile: a torch.profiler pass after the timed repeats
    # (bench.py --profile-after: plain, then the setups that missed a target, worst first, each on a short run of its
    # own, one profiled step), in whatever time the deadline leaves: the measurements always come first, and
    # parsing a 1b step's ~1e5 profiler events costs seconds of CPU per setup.
    {"label": "1b", "preset": "1b", "reserve_after_s": 50, "profile": True},
    {"label": "150m", "preset": "150m", "reserve_after_s": 0, "profile": False},
]
# 8 timed steps after 2 warm-ups (the first absorbs Triton's compile and cuBLAS's heuristics; GPU step times vary by
# well under 1%); LoRASC setups run 4 stages of 13 steps before theirs: 65 steps, the costliest setups.
REAL = {"device": "cuda", "batch_size": 4, "seq_len": 2048, "lora_r": 16, "steps": 8, "warmup": 2, "phase_steps": 2,
        "burn_in": 3}
DRY = {"device": "cpu", "batch_size": 2, "seq_len": 64, "lora_r": 8, "steps": 1, "warmup": 0, "phase_steps": 1,
       "burn_in": 1}
SUMMARY_RESERVE_S = 10


# --------------------------------------------------------------------------------------------------------------
# phase 1: versions (run in a child process: the orchestrator never imports torch or touches the GPU)
# --------------------------------------------------------------------------------------------------------------
def _vtuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])


def probe(dry_run: bool) -> dict[str, Any]:
    """Versions and problems, as JSON on stdout (`gpu_check.py --probe`)."""
    info: dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable, "problems": []}
    problems = info["problems"]
    for mod, (low, high) in REQUIRED.items():
        try:
            m = __import__(mod)
            v = m.__version__
            info[mod] = v
            if not (_vtuple(low) <= _vtuple(v) < _vtuple(high)):
                problems.append(f"{mod} {v} is outside the supported range >={low},<{high}")
        except Exception as err:
            info[mod] = None
            problems.append(f"{mod} does not import: {type(err).__name__}: {err}")
    for mod in ("triton", "pytest", "safetensors", "numpy"):
        try:
            info[mod] = getattr(__import__(mod), "__version__", "?")
        except Exception as err:
            info[mod] = None
            if mod != "triton" or not dry_run:
                problems.append(f"{mod} does not import: {type(err).__name__}: {err}")
    try:
        from importlib.metadata import version

        info["bitsandbytes"] = version("bitsandbytes")
    except Exception:
        info["bitsandbytes"] = None  # optional: the 4-bit setups are skipped
    try:
        import genlora
        from genlora.registry import METHODS

        info["genlora"] = getattr(genlora, "__version__", "?")
        info["genlora_file"] = genlora.__file__
        info["genlora_methods"] = sorted(METHODS)
        src = os.path.join(ROOT, "src") + os.sep
        if not os.path.abspath(genlora.__file__).startswith(src):
            problems.append(f"genlora is imported from {genlora.__file__}, not from this checkout's {src} "
                            "(run through bench/gpu_check.sh, which sets PYTHONPATH)")
        missing = {"flat_lora", "rm_lora", "lora_dropout", "lorasc"} - set(METHODS)
        if missing:
            problems.append(f"genlora.registry.METHODS lacks {sorted(missing)}")
    except Exception as err:
        info["genlora"] = None
        problems.append(f"genlora does not import from {ROOT}/src: {type(err).__name__}: {err}")
    try:
        import torch

        info["cuda_build"] = torch.version.cuda
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
            props = torch.cuda.get_device_properties(0)
            info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
            info["gpu_capability"] = f"{props.major}.{props.minor}"
        elif not dry_run:
            problems.append(f"torch {torch.__version__} sees no CUDA device (CUDA build: {torch.version.cuda})")
    except Exception as err:
        if not dry_run:
            problems.append(f"CUDA query failed: {type(err).__name__}: {err}")
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
            if out:
                name, driver, mem = [x.strip() for x in out[0].split(",")][:3]
                info.update(driver=driver, nvidia_smi_gpu=name, nvidia_smi_memory=mem)
        except Exception as err:
            info["driver"] = None
            info["nvidia_smi_error"] = str(err)
    if not dry_run and not info.get("driver"):
        problems.append("nvidia-smi is missing or did not report a driver version")
    return info


# --------------------------------------------------------------------------------------------------------------
# running children with deadlines, output to the console and the log
# --------------------------------------------------------------------------------------------------------------
class Log:
    def __init__(self, path: str):
        self.f = open(path, "a", buffering=1)

    def __call__(self, msg: str = "") -> None:
        print(msg, flush=True)
        self.f.write(msg + "\n")


def run_child(cmd: list[str], log: Log, timeout_s: float, env: dict[str, str] | None = None,
              grace_s: float = 20.0) -> tuple[int, float, bool]:
    """Run cmd, streaming its output to the console and the log; on timeout SIGTERM, then SIGKILL after grace_s.
    Returns (exit status, seconds, timed out)."""
    log("$ " + " ".join(cmd))
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    timed_out = False
    import threading

    def pump():
        for line in proc.stdout:
            log(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        timed_out = True
        log(f"[gpu_check] {os.path.basename(cmd[1]) if len(cmd) > 1 else cmd[0]}: time limit {timeout_s:.0f} s "
            "reached; SIGTERM")
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log("[gpu_check] still running; SIGKILL")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
    reader.join(timeout=5)
    return proc.returncode, time.monotonic() - t0, timed_out


# --------------------------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------------------------
def _verdict(value, target) -> str:
    if target is None:
        return ""
    if value is None:
        return "not measured"
    return "pass" if value <= target else "MISS"


def summarize(presets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per preset: one entry per target row (and the reference/4-bit rows), with pass / MISS / not measured."""
    out: dict[str, Any] = {"presets": {}, "counts": {"pass": 0, "MISS": 0, "not measured": 0}}
    for label, res in presets.items():
        rows = {r["name"]: r for r in (res or {}).get("rows", [])}
        skipped = {s["name"]: s["reason"] for s in (res or {}).get("skipped", [])}
        not_run = {s["name"]: s["reason"] for s in (res or {}).get("not_run", []) if s.get("repeat") == 0}
        errors = {e["name"]: e["error"] for e in (res or {}).get("errors", [])}
        entries = []

        def why(name):
            return errors.get(name) or skipped.get(name) or not_run.get(name) or "no result"

        for prefix in ("", QLORA_PREFIX):
            base = "qlora_plain" if prefix else "plain"
            for name, label_, t_time, t_mem in TARGETS:
                if prefix and name == "ensemble":
                    continue
                setup = prefix + name
                r = rows.get(setup)
                e: dict[str, Any] = {"setup": setup, "label": label_ + (" [4-bit base, vs plain QLoRA]" if prefix
                                                                         else ""),
                                     "target_time": t_time, "target_mem": t_mem, "baseline": base}
                if r is None:
                    e["status"] = "not measured"
                    e["reason"] = why(setup)
                    if not prefix or setup in rows or base in rows:
                        out["counts"]["not measured"] += 1
                    else:
                        e["counted"] = False  # the whole 4-bit group did not run: one line, not six misses
                    entries.append(e)
                    continue
                e.update(ratio_time=r.get("ratio_time"), ratio_time_min=r.get("ratio_time_min"),
                         ratio_time_max=r.get("ratio_time_max"), ratio_mem=r.get("ratio_mem"),
                         step_ms=1e3 * r["step_s"], repeats=r.get("repeats"),
                         base_bit_identical=r.get("base_bit_identical"), noise_path=r.get("noise_path"))
                verdicts = {"time": _verdict(r.get("ratio_time"), t_time), "mem": _verdict(r.get("ratio_mem"), t_mem)}
                if r.get("kind") == "train":
                    verdicts["base"] = "pass" if r.get("base_bit_identical") else "MISS"
                e["verdicts"] = verdicts
                for v in verdicts.values():
                    if v:
                        out["counts"][v] += 1
                e["status"] = "MISS" if "MISS" in verdicts.values() else (
                    "not measured" if "not measured" in verdicts.values() else "pass")
                entries.append(e)
        for name, label_ in INFO_SETUPS:
            r = rows.get(name)
            e = {"setup": name, "label": label_, "info": True}
            if r is None:
                e.update(status="not measured", reason=why(name))
            else:
                e.update(status="info", ratio_time=r.get("ratio_time"), ratio_mem=r.get("ratio_mem"),
                         step_ms=1e3 * r["step_s"], noise_path=r.get("noise_path"),
                         base_bit_identical=r.get("base_bit_identical"))
                kernel = rows.get("flat_lora")
                if kernel is not None and kernel.get("noise_path") == "triton" and r.get("noise_path") == "pytorch":
                    e["kernel_saves_ms_per_step"] = 1e3 * (r["step_s"] - kernel["step_s"])
                elif kernel is not None:
                    e["note"] = f"flat_lora ran on the {kernel.get('noise_path')} path: no kernel comparison"
            entries.append(e)
        qlora_plain = rows.get("qlora_plain")
        out["presets"][label] = {
            "entries": entries,
            "plain_step_ms": 1e3 * rows["plain"]["step_s"] if "plain" in rows else None,
            "qlora_plain_vs_plain": qlora_plain.get("ratio_time") if qlora_plain else None,
            "qlora_reason": None if qlora_plain else why("qlora_plain"),
            "repeats_done": (res or {}).get("repeats_done"),
            "stopped": (res or {}).get("stopped"),
            "errors": (res or {}).get("errors", []),
        }
    return out


def summary_lines(report: dict[str, Any]) -> list[str]:
    env = report["versions"]
    lines = [
        f"genlora GPU check ({'DRY RUN, CPU, tiny preset' if report['dry_run'] else 'real run'}): "
        f"{env.get('gpu') or 'no GPU'}, driver {env.get('driver')}, torch {env.get('torch')} (CUDA "
        f"{env.get('cuda_build')}), transformers {env.get('transformers')}, peft {env.get('peft')}, "
        f"triton {env.get('triton')}, bitsandbytes {env.get('bitsandbytes') or 'not installed'}",
    ]
    t = report.get("tests")
    if t:
        lines.append(f"GPU tests: {t['status']} ({t.get('tests', 0)} run, {t.get('failures', 0)} failed, "
                     f"{t.get('errors', 0)} errors, {t.get('skipped', 0)} skipped, {t.get('seconds', 0):.0f} s)")
    s = report.get("summary")
    if not s:
        return lines
    for label, p in s["presets"].items():
        ph = report["phases"].get(label, {})
        lines.append("")
        lines.append(f"preset {label}" + (f" (run as {ph.get('preset')})" if ph.get("preset") != label else "")
                     + f": plain PEFT LoRA {_f(p['plain_step_ms'], '.1f')} ms/step, repeats {p['repeats_done']}"
                     + (f", stopped: {p['stopped']}" if p.get("stopped") else "")
                     + (f", bench exit {ph.get('rc')}" if ph.get("rc") not in (0, None) else "")
                     + (f", phase not run: {ph['skipped']}" if ph.get("skipped") else ""))
        lines.append(f"  {'setup':<22} {'time x base':>12} {'target':>7} {'':<5} {'mem x base':>10} {'target':>7} "
                     f"{'':<5} {'base bits':<9} {'noise':<8}")
        for e in p["entries"]:
            if e.get("counted") is False:
                continue
            if e["status"] == "not measured" and "verdicts" not in e:
                lines.append(f"  {e['setup']:<22} not measured: {str(e.get('reason'))[:110]}")
                continue
            if e.get("info"):
                extra = (f"; the kernel saves {e['kernel_saves_ms_per_step']:.1f} ms/step"
                         if e.get("kernel_saves_ms_per_step") is not None else f"; {e.get('note', '')}")
                lines.append(f"  {e['setup']:<22} {_f(e['ratio_time']):>12} {'':>7} {'info':<5} "
                             f"{_f(e['ratio_mem']):>10} {'':>7} {'':<5} {_yes(e['base_bit_identical']):<9} "
                             f"{e.get('noise_path') or '':<8}{extra}")
                continue
            v = e["verdicts"]
            lines.append(f"  {e['setup']:<22} {_f(e['ratio_time']):>12} {_f(e['target_time'], '.2f'):>7} "
                         f"{v.get('time', ''):<5} {_f(e['ratio_mem']):>10} {_f(e['target_mem'], '.2f'):>7} "
                         f"{v.get('mem', ''):<5} {v.get('base', '') or '':<9} {e.get('noise_path') or '':<8}")
        skipped_q = [e for e in p["entries"] if e.get("counted") is False]
        if skipped_q:
            lines.append(f"  4-bit (QLoRA) setups not run: {p['qlora_reason']}")
        for err in p["errors"]:
            lines.append(f"  ERROR {err['name']} (repeat {err['repeat']}): {err['error'][:200]}")
    c = s["counts"]
    lines += ["", f"targets: {c['pass']} pass, {c['MISS']} miss, {c['not measured']} not measured"
              + (" (dry run: CPU ratios mean nothing)" if report["dry_run"] else "")]
    lines.append(f"status: {report['status']}; results in {report['out']}")
    return lines


def _f(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def _yes(b) -> str:
    return "-" if b is None else ("yes" if b else "NO")


def write_markdown(report: dict[str, Any], path: str) -> None:
    env = report["versions"]
    lines = [
        f"# genlora GPU check: {env.get('gpu') or 'CPU (dry run)'}, {report['date_utc']}",
        "",
        "- " + ("**DRY RUN** (CPU, tiny preset: checks the script, measures nothing)" if report["dry_run"]
                else "real run") +
        f"; status **{report['status']}**; {report['wall_s']:.0f} s in all (budget {report['budget_s']:.0f} s)",
        f"- GPU {env.get('gpu')} ({env.get('gpu_memory_gib')} GiB, capability {env.get('gpu_capability')}), driver "
        f"{env.get('driver')}, CUDA {env.get('cuda_build')}",
        f"- Python {env.get('python')}, torch {env.get('torch')}, transformers {env.get('transformers')}, peft "
        f"{env.get('peft')}, triton {env.get('triton')}, bitsandbytes {env.get('bitsandbytes') or 'not installed'}, "
        f"genlora {env.get('genlora')} ({env.get('git') or 'no git'})",
        f"- command: `{report['command']}`",
        "",
        "## Summary against the issue's targets",
        "",
        "```",
        *summary_lines(report),
        "```",
    ]
    t = report.get("tests")
    if t and t.get("failed_cases"):
        lines += ["", "## Failed GPU tests", ""]
        for case in t["failed_cases"]:
            lines += [f"### {case['name']}", "", "```", case["message"][-3000:], "```"]
    for label, ph in report["phases"].items():
        md = ph.get("markdown")
        if md:
            lines += ["", f"## Preset {label}: bench.py's table", "", md.replace("## genlora overhead", "### genlora "
                                                                                  "overhead")]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_profiles(report: dict[str, Any], path: str) -> None:
    """All profile summaries in one text file: per preset and setup, the top ops and genlora's Python functions."""
    out = []
    for label, ph in report["phases"].items():
        res = ph.get("result") or {}
        for r in res.get("rows", []):
            p = r.get("profile")
            if not p:
                continue
            out.append(f"==== preset {label}, setup {r['name']} ({' + '.join(r['methods']) or 'PEFT LoRA'}) ====")
            if "error" in p:
                out.append(f"profile failed: {p['error']}")
                continue
            out.append(f"profiled wall {p['wall_ms_per_step']:.2f} ms/step; "
                       + (f"GPU busy {p['device_busy_ms_per_step']:.2f} ms/step; "
                          if p.get("device_busy_ms_per_step") is not None else "")
                       + f"op self-CPU {p['op_self_cpu_ms_per_step']:.2f} ms/step; leaf ATen ops "
                       f"{p['leaf_aten_ops_per_step']:.0f}/step; kernel launches {p['kernel_launches_per_step']:.0f}"
                       f"/step; genlora Python {_f(p.get('genlora_python_ms_per_step'), '.2f')} ms/step")
            out.append(f"{'self device ms':>15} {'self CPU ms':>12} {'calls':>8}  op (per step)")
            for o in p["ops"]:
                out.append(f"{o['self_device_ms_per_step']:15.3f} {o['self_cpu_ms_per_step']:12.3f} "
                           f"{o['count_per_step']:8.1f}  {o['name'][:120]}")
            if p.get("genlora_python"):
                out.append("genlora functions (ms/step, exclusive of nested genlora frames, with the ops they call):")
                for name, ms in p["genlora_python"]:
                    out.append(f"{ms:15.3f}  {name}")
            out.append("")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def parse_junit(path: str) -> dict[str, Any]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    res = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed_cases": [], "skipped_cases": []}
    for s in suites:
        for k in ("tests", "failures", "errors", "skipped"):
            res[k] += int(s.get(k, 0))
        for case in s.iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            for child in case:
                if child.tag in ("failure", "error"):
                    res["failed_cases"].append({"name": name, "message": (child.get("message") or "") + "\n"
                                                + (child.text or "")})
                elif child.tag == "skipped":
                    res["skipped_cases"].append({"name": name, "message": child.get("message") or ""})
    return res


# --------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny preset: check the script (CI)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole check (default 300 on a GPU, 900 for a dry run); the benches get "
                        "deadlines inside it")
    p.add_argument("--out", default=None, help="results folder (default bench/results/<date>-<gpu>/, or a "
                                                "temporary folder for --dry-run)")
    p.add_argument("--copy-to", default=None, help="also copy the results to DIR/<folder name>/ after every phase")
    p.add_argument("--repeats", type=int, default=None,
                   help="at most this many round-robin repeats per preset (default 3 on a GPU, 1 for a dry run)")
    p.add_argument("--presets", default=None, help="comma-separated phases to run (default: 1b,150m)")
    p.add_argument("--skip-tests", action="store_true", help="skip the GPU tests phase")
    p.add_argument("--no-profile", action="store_true",
                   help="no torch.profiler pass on the 1b preset (by default it runs after the timed repeats, in "
                        "the time left before the phase's deadline: plain, then the worst misses first)")
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "gpu"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args.dry_run)))
        return 0
    t0 = time.monotonic()
    if args.repeats is None:
        args.repeats = 1 if args.dry_run else 3
    budget = args.budget if args.budget is not None else (900.0 if args.dry_run else 300.0)
    end = t0 + budget
    py = sys.executable
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.join(ROOT, "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.dry_run:
        env.setdefault("GENLORA_TRITON", "auto")  # the kernel is opt-in; this check measures it

    # --- phase 1: versions ---------------------------------------------------------------------------------------
    print("[gpu_check] phase 1: versions", flush=True)
    cmd = [py, os.path.abspath(__file__), "--probe"] + (["--dry-run"] if args.dry_run else [])
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
        versions = json.loads(proc.stdout.strip().splitlines()[-1])
    except Exception as err:
        print(f"gpu_check: FAILED: the versions probe did not run ({type(err).__name__}: {err})\n"
              f"{getattr(locals().get('proc'), 'stderr', '')[-3000:]}", file=sys.stderr)
        return 2
    for k in ("python", "torch", "cuda_build", "gpu", "gpu_memory_gib", "driver", "transformers", "peft", "triton",
              "pytest", "bitsandbytes", "genlora", "genlora_file"):
        print(f"  {k:<14} {versions.get(k)}")
    if versions["problems"]:
        print("gpu_check: FAILED: the versions check found:", file=sys.stderr)
        for prob in versions["problems"]:
            print(f"  - {prob}", file=sys.stderr)
        return 2
    versions["git"] = _git()

    date = datetime.datetime.now(datetime.timezone.utc)
    if args.out:
        out = os.path.abspath(args.out)
    elif args.dry_run:
        out = tempfile.mkdtemp(prefix="genlora-gpu-check-dry-run-")
    else:
        out = os.path.join(ROOT, "bench", "results", f"{date:%Y-%m-%d}-{_slug(versions.get('gpu') or 'gpu')}")
        base, n = out, 2
        while os.path.exists(out):
            out, n = f"{base}-{n}", n + 1
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="genlora-gpu-check-work-")
    log = Log(os.path.join(out, "gpu_check.log"))
    log(f"[gpu_check] {'dry run' if args.dry_run else 'GPU run'}; budget {budget:.0f} s; results in {out}")
    report: dict[str, Any] = {
        "dry_run": args.dry_run, "date_utc": f"{date:%Y-%m-%d %H:%M:%S} UTC", "budget_s": budget, "out": out,
        "command": "bash bench/gpu_check.sh " + " ".join(argv if argv is not None else sys.argv[1:]),
        "versions": versions, "tests": None, "phases": {}, "summary": None, "status": "running", "wall_s": 0.0,
    }
    failed = False

    def save(final: bool = False) -> None:
        report["wall_s"] = time.monotonic() - t0
        presets = {k: ph.get("result") for k, ph in report["phases"].items()}
        report["summary"] = summarize(presets) if presets else None
        if final:
            report["status"] = "FAILED" if failed else "ok"
        with open(os.path.join(out, "results.json.tmp"), "w") as f:
            json.dump(report, f, indent=2, default=str)
        os.replace(os.path.join(out, "results.json.tmp"), os.path.join(out, "results.json"))
        write_markdown(report, os.path.join(out, "results.md"))
        if any((ph.get("result") or {}).get("config", {}).get("profile_steps") for ph in report["phases"].values()):
            write_profiles(report, os.path.join(out, "profile.txt"))
        if args.copy_to:
            dest = os.path.join(args.copy_to, os.path.basename(out.rstrip(os.sep)))
            os.makedirs(dest, exist_ok=True)
            for name in ("results.json", "results.md", "profile.txt", "gpu_check.log"):
                src = os.path.join(out, name)
                if os.path.exists(src):
                    shutil.copyfile(src, os.path.join(dest, name))

    # --- phase 2: GPU tests ----------------------------------------------------------------------------------------
    if not args.skip_tests:
        log("[gpu_check] phase 2: GPU tests")
        xml = os.path.join(work, "tests.xml")
        limit = min(180.0, end - time.monotonic() - 60)
        rc, secs, timed_out = run_child([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                                         f"--junitxml={xml}", *GPU_TESTS], log, limit, env)
        tests: dict[str, Any] = {"nodeids": GPU_TESTS, "rc": rc, "seconds": secs, "timed_out": timed_out}
        if os.path.exists(xml):
            tests.update(parse_junit(xml))
        ok = rc == 0 and not timed_out and tests.get("tests", 0) >= len(GPU_TESTS) and not tests.get("failures") \
            and not tests.get("errors")
        if not args.dry_run and tests.get("skipped"):
            ok = False  # on a GPU the kernel test must run
        tests["status"] = "passed" if ok and not args.dry_run else ("collected and skipped (dry run)" if ok else
                                                                    "FAILED")
        failed = failed or not ok
        report["tests"] = tests
        save()

    # --- phase 3: the benches ------------------------------------------------------------------------------------
    wanted = [p.strip() for p in args.presets.split(",")] if args.presets else [p["label"] for p in PHASES]
    unknown = set(wanted) - {p["label"] for p in PHASES}
    if unknown:
        log(f"gpu_check: unknown preset(s) {sorted(unknown)}")
        return 2
    phases = [p for p in PHASES if p["label"] in wanted]
    s = DRY if args.dry_run else REAL
    for i, phase in enumerate(phases):
        reserve = phase["reserve_after_s"] if i < len(phases) - 1 else 0  # time kept for the phases after it
        deadline_mono = end - SUMMARY_RESERVE_S - reserve
        left = deadline_mono - time.monotonic()
        label = phase["label"]
        preset = "tiny" if args.dry_run else phase["preset"]
        ph: dict[str, Any] = {"preset": preset, "result": None}
        report["phases"][label] = ph
        if left < 20:
            ph["skipped"] = f"time budget: {left:.0f} s left for this phase"
            log(f"[gpu_check] phase 3 ({label}): skipped, {ph['skipped']}")
            continue
        bench_out = os.path.join(work, f"bench-{label}")
        cmd = [py, BENCH, "--preset", preset, "--device", s["device"], "--dtype", "bf16",
               "--batch-size", str(s["batch_size"]), "--seq-len", str(s["seq_len"]), "--lora-r", str(s["lora_r"]),
               "--steps", str(s["steps"]), "--warmup", str(s["warmup"]), "--phase-steps", str(s["phase_steps"]),
               "--burn-in", str(s["burn_in"]), "--repeats", str(args.repeats),
               "--deadline", f"{time.time() + left:.1f}", "--out", bench_out, "--quiet"]
        if phase["profile"] and not args.no_profile:
            cmd += ["--profile-dir", os.path.join(work, f"profile-{label}"), "--profile-steps", "1",
                    "--profile-no-trace", "--profile-after"]
        log(f"[gpu_check] phase 3 ({label}): bench.py --preset {preset}, {left:.0f} s until its deadline")
        rc, secs, timed_out = run_child(cmd, log, left + 45, env)
        ph.update(rc=rc, seconds=secs, timed_out=timed_out, command=" ".join(cmd[1:]))
        path = os.path.join(bench_out, "results.json")
        if os.path.exists(path):
            with open(path) as f:
                ph["result"] = json.load(f)
            md = os.path.join(bench_out, "results.md")
            if os.path.exists(md):
                with open(md) as f:
                    ph["markdown"] = f.read()
        if rc != 0 and not timed_out:
            failed = True
            log(f"[gpu_check] phase 3 ({label}): bench.py exited with status {rc}")
        elif ph["result"] is None:
            failed = True
            log(f"[gpu_check] phase 3 ({label}): no results.json")
        save()

    # --- phase 4: report -------------------------------------------------------------------------------------------
    save(final=True)
    log("")
    for line in summary_lines(report):
        log(line)
    save(final=True)  # the log with the summary, copied too
    shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


def _git() -> str | None:
    try:
        sha = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"git {sha}{' (dirty)' if dirty else ''}" if sha else None
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
