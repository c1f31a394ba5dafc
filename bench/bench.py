#!/usr/bin/env python
"""genlora overhead benchmark: plain PEFT LoRA against each genlora method, in one process, on one model.

Builds a randomly initialised Llama from a config (no downloads), puts PEFT LoRA on all seven linear projections,
and trains it with AdamW on random tokens, once per *setup* (plain LoRA, each method, all methods together), then
times LoRA Dropout's test-time ensemble against one plain forward. Every setup starts from the same LoRA weights and
shares the same frozen base model, which is checked bit for bit after each setup.

Measured per training setup:
  * step time: wall clock of one whole optimizer step (begin_step, forward, backward, gradient clipping, the
    optimizer step and zero_grad), with a device synchronisation before and after; the median over `--steps` timed
    steps that follow `--warmup` untimed ones.
  * tokens/s: batch_size * seq_len / median step time.
  * peak memory: on CUDA `torch.cuda.max_memory_allocated()` (reset before the setup's first step; it includes the
    model, the optimizer state and activations); on CPU the peak resident set size (RSS, from /proc/self/statm)
    sampled every 5 ms by a background thread while the setup runs, after `malloc_trim(0)` (an approximation: the
    allocator may keep freed memory; CPU numbers are only indicative). `delta` columns subtract the value measured
    just before the setup's first step.
  * ratios to plain LoRA of the same repeat (with `--repeats R` the setups run round-robin R times; the table
    shows the median of the per-repeat ratios and their min..max).
  * max |W_after - W_before| over every frozen parameter (and whether they are bit-identical).
LoRASC setups run `stages_before_timing` (default 4) stage boundaries first; the timed steps then lie inside stage
4 (slow rank 4r), and the median extra time of a boundary step is amortised over `amortize_over` (500) steps:
  amortised step = median step + boundary extra / 500.
The inference row times `n_test`=4 ensemble forwards (one call of `genlora.test_time_ensemble`) against one plain
forward, in eval mode under `torch.no_grad()`.

Setups are data (`DEFAULT_SETUPS`, or a JSON file via `--setups-file`): a name, a list of
`{"method": <registry name>, **options}` and optional targets; setups whose methods are not in
`genlora.registry.METHODS` are skipped and listed as such, so methods added later are picked up by name.

Examples:
  python bench/bench.py --preset tiny --out bench/out/tiny                    # CPU smoke run, seconds
  python bench/bench.py --preset 1b --device cuda --dtype bf16 --out bench/out/1b
  python bench/bench.py --preset 150m --device cpu --batch-size 1 --seq-len 128 --steps 3 --warmup 1
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import warnings
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

PRESETS: dict[str, dict[str, Any]] = {
    # CPU smoke test: seconds for all setups.
    "tiny": {
        "model": dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2),
        "batch_size": 2, "seq_len": 64, "lora_r": 8, "steps": 3, "warmup": 1,
    },
    # ~153M parameters.
    "150m": {
        "model": dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=4),
        "batch_size": 4, "seq_len": 2048, "lora_r": 16, "steps": 20, "warmup": 5,
    },
    # TinyLlama-1.1B shapes: 1.10B parameters.
    "1b": {
        "model": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4),
        "batch_size": 4, "seq_len": 2048, "lora_r": 16, "steps": 20, "warmup": 5,
    },
}

# Targets from the performance issue (ratios to plain PEFT LoRA on a GPU): (step time, peak memory).
DEFAULT_SETUPS: list[dict[str, Any]] = [
    {"name": "plain", "methods": []},
    {"name": "flat_lora", "methods": [{"method": "flat_lora", "sigma": 0.05, "schedule": "constant"}],
     "target_time": 1.03, "target_mem": 1.02},
    {"name": "rm_lora", "methods": [{"method": "rm_lora", "reg_lambda": 0.1}],  # k = r // 2
     "target_time": 1.02, "target_mem": 1.01},
    {"name": "lora_dropout", "methods": [{"method": "lora_dropout", "p": 0.1, "n_train": 1}],
     "target_time": 1.05, "target_mem": 1.05},
    {"name": "lorasc", "methods": [{"method": "lorasc", "alpha": 0.5, "noise_lambda": 0.15}],
     "stages_before_timing": 4, "amortize_over": 500, "target_time": 1.03, "target_mem": 1.05},
    {"name": "all", "methods": [
        {"method": "lorasc", "alpha": 0.5, "noise_lambda": 0.15},
        {"method": "flat_lora", "sigma": 0.05, "schedule": "constant"},
        {"method": "rm_lora", "reg_lambda": 0.1},
        {"method": "lora_dropout", "p": 0.1, "n_train": 1},
    ], "stages_before_timing": 4, "amortize_over": 500, "target_time": 1.10, "target_mem": 1.08},
    {"name": "ensemble", "kind": "inference", "methods": [{"method": "lora_dropout", "p": 0.1, "n_test": 4}],
     "target_time": 4.2},
]


# --------------------------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------------------------
def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "?")
    except Exception:
        return None


def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip() or None
    except Exception:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    import genlora

    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "triton": _version("triton"),
        "genlora": getattr(genlora, "__version__", "?"),
        "genlora_git": _run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse", "--short", "HEAD"]),
        "genlora_git_dirty": bool(_run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "status",
                                        "--porcelain", "--untracked-files=no"])),
        "torch_threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            driver=_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
            allow_tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )
    return info


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


# --------------------------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


class MemoryMeter:
    """Peak memory of one setup: CUDA allocator peak, or sampled RSS on CPU (see the module docstring)."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device = device
        self.interval = interval
        self.start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> MemoryMeter:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = self.peak = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            self.start = self.peak = _rss_bytes()
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak = max(self.peak, _rss_bytes())

    @property
    def kind(self) -> str:
        return "cuda_max_memory_allocated" if self.device.type == "cuda" else "sampled_rss"


# --------------------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------------------
def build_model(preset: dict[str, Any], args, device: torch.device, dtype: torch.dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        **preset["model"],
        max_position_embeddings=max(args.seq_len, 128),
        tie_word_embeddings=False,
        use_cache=False,
        pad_token_id=0,
    )
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model.to(dtype)
    n_base = sum(p.numel() for p in model.parameters())
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model, cfg, n_base, n_trainable


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------------------
# setups
# --------------------------------------------------------------------------------------------------------------
def available_setups(setups: list[dict[str, Any]], wanted: list[str] | None):
    from genlora.registry import METHODS

    chosen, skipped = [], []
    names = [s["name"] for s in setups]
    if wanted:
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise SystemExit(f"unknown setup(s) {unknown}; known: {names}")
    for s in setups:
        if wanted and s["name"] not in wanted and s["name"] != "plain":
            continue
        missing = [m["method"] for m in s.get("methods", []) if m["method"] not in METHODS]
        if missing:
            skipped.append({"name": s["name"], "reason": f"methods {missing} not in genlora.registry.METHODS"})
            continue
        if s.get("kind") == "inference" and not _has_ensemble():
            skipped.append({"name": s["name"], "reason": "genlora has no test_time_ensemble"})
            continue
        chosen.append(s)
    if not any(s["name"] == "plain" for s in chosen):
        chosen.insert(0, {"name": "plain", "methods": []})
    return chosen, skipped


def _has_ensemble() -> bool:
    import genlora

    return hasattr(genlora, "test_time_ensemble")


def plan_steps(setup: dict[str, Any], args) -> dict[str, Any]:
    """Step layout of a training setup: total steps, which are timed, and LoRASC's stage length."""
    stages = setup.get("stages_before_timing", 0) if _uses(setup, "lorasc") else 0
    if stages:
        profiled = 2 if getattr(args, "profile_dir", None) else 0
        length = args.warmup + args.steps + args.phase_steps + profiled + 1  # timed steps lie inside one stage
        first_timed = stages * length + 1 + args.warmup
        total = first_timed + args.steps + args.phase_steps
        boundaries = [length * i for i in range(1, stages + 1)]
    else:
        length = None
        first_timed = args.warmup
        total = args.warmup + args.steps + args.phase_steps
        boundaries = []
    return {"total": total, "timed": list(range(first_timed, first_timed + args.steps)),
            "phase": list(range(first_timed + args.steps, total)), "stage_length": length, "boundaries": boundaries}


def _uses(setup: dict[str, Any], method: str) -> bool:
    return any(m["method"] == method for m in setup.get("methods", []))


def make_methods(setup: dict[str, Any], plan: dict[str, Any]):
    from genlora.registry import method_from_dict

    methods = []
    for spec in setup.get("methods", []):
        spec = dict(spec)
        if spec["method"] == "lorasc" and plan.get("stage_length") and "stage_steps" not in spec:
            spec["stage_steps"] = plan["stage_length"]
        methods.append(method_from_dict(spec))
    return methods


class Runner:
    def __init__(self, args, device: torch.device, dtype: torch.dtype):
        self.args = args
        self.device = device
        self.dtype = dtype
        preset = copy.deepcopy(PRESETS[args.preset])
        self.model, self.config, self.n_base, self.n_trainable = build_model(preset, args, device, dtype)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.lora_init = [p.detach().clone() for p in self.trainable]
        # The frozen weights, copied to the CPU once: every setup is checked against them.
        self.frozen = {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters()
                       if not p.requires_grad}
        g = torch.Generator().manual_seed(args.seed + 1)
        n_batches = min(8, max(1, args.warmup + args.steps))
        self.batches = [torch.randint(1, self.config.vocab_size, (args.batch_size, args.seq_len), generator=g)
                        .to(device) for _ in range(n_batches)]

    # --- helpers ---------------------------------------------------------------------------------------------
    def reset_lora(self) -> None:
        with torch.no_grad():
            for p, p0 in zip(self.trainable, self.lora_init):
                p.copy_(p0)
                p.grad = None

    def base_diff(self) -> tuple[float, bool]:
        worst, identical = 0.0, True
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if p.requires_grad:
                    continue
                now = p.detach().cpu()
                ref = self.frozen[n]
                identical = identical and torch.equal(now, ref)
                worst = max(worst, (now.double() - ref.double()).abs().max().item() if now.numel() else 0.0)
        return worst, identical

    # --- training setups ---------------------------------------------------------------------------------------
    def train_setup(self, setup: dict[str, Any]) -> dict[str, Any]:
        import genlora

        args, device = self.args, self.device
        plan = plan_steps(setup, args)
        self.reset_lora()
        methods = make_methods(setup, plan)
        optimizer = torch.optim.AdamW(self.trainable, lr=args.lr, weight_decay=0.0)
        handle = genlora.attach(self.model, *methods, total_steps=plan["total"]) if methods else None
        if handle is not None and hasattr(handle, "bind_optimizer"):
            handle.bind_optimizer(optimizer)
        dropout = handle.method("lora_dropout") if handle is not None and _uses(setup, "lora_dropout") else None
        n_train = dropout.config.n_train if dropout is not None else 1
        lorasc = handle.method("lorasc") if handle is not None and _uses(setup, "lorasc") else None
        self.model.train()
        times: list[float] = []
        begin_times: list[float] = []
        stage_change: list[bool] = []
        losses = []
        phases: dict[str, list[float]] = {"begin_step": [], "forward": [], "backward": [], "clip": [],
                                          "optimizer": []}
        with warnings.catch_warnings(), MemoryMeter(device) as mem:
            warnings.simplefilter("ignore")
            for step in range(plan["total"]):
                ids = self.batches[step % len(self.batches)]
                detail = step in plan["phase"]
                stage_before = lorasc.stage if lorasc is not None else None
                sync(device)
                t0 = time.perf_counter()
                if handle is not None:
                    handle.begin_step()
                if detail or step in plan["boundaries"]:  # boundary steps: time begin_step (the stage change)
                    sync(device)
                t_begin = time.perf_counter()
                if n_train > 1:
                    for inst in dropout.train_instances():
                        loss = self.model(input_ids=ids, labels=ids).loss
                        inst.backward(loss)
                    t_fwd = t_bwd = time.perf_counter()
                else:
                    loss = self.model(input_ids=ids, labels=ids).loss
                    if detail:
                        sync(device)
                    t_fwd = time.perf_counter()
                    loss.backward()
                    if detail:
                        sync(device)
                    t_bwd = time.perf_counter()
                torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
                if detail:
                    sync(device)
                t_clip = time.perf_counter()
                if handle is not None:
                    handle.optimizer_step(optimizer)
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                sync(device)
                t1 = time.perf_counter()
                times.append(t1 - t0)
                begin_times.append(t_begin - t0)
                stage_change.append(lorasc is not None and stage_before is not None and lorasc.stage != stage_before)
                losses.append(loss.detach().float())
                if detail:
                    for key, dt in zip(phases, (t_begin - t0, t_fwd - t_begin, t_bwd - t_fwd, t_clip - t_bwd,
                                                t1 - t_clip)):
                        phases[key].append(dt)
        losses = [float(x) for x in losses]
        max_diff, identical = self.base_diff()
        profile = self.profile(setup, handle, optimizer) if args.profile_dir and n_train == 1 else None
        slow_rank = lorasc.slow_rank(handle.slots[0]) if lorasc is not None else None  # before detach drops it
        if handle is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # LoRASC warns that detaching drops its slow experts
                handle.detach()
        del optimizer, handle, methods
        timed = [times[i] for i in plan["timed"]]
        median = statistics.median(timed)
        row: dict[str, Any] = {
            "name": setup["name"],
            "kind": "train",
            "methods": [m["method"] for m in setup.get("methods", [])],
            "method_options": setup.get("methods", []),
            "steps_total": plan["total"],
            "steps_timed": len(timed),
            "step_s_median": median,
            "step_s_min": min(timed),
            "step_s_max": max(timed),
            "step_s_all": timed,
            "tokens_per_step": args.batch_size * args.seq_len,
            "tokens_per_s": args.batch_size * args.seq_len / median,
            "peak_bytes": mem.peak,
            "peak_delta_bytes": mem.peak - mem.start,
            "memory_kind": mem.kind,
            "base_max_abs_diff": max_diff,
            "base_bit_identical": identical,
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "losses_finite": all(math.isfinite(x) for x in losses),
        }
        if plan["phase"]:
            row["phase_s_median"] = {k: statistics.median(v) for k, v in phases.items() if v}
        if lorasc is not None:
            bidx = [i for i, changed in enumerate(stage_change) if changed]
            extras = [times[i] - times[i - 1] for i in bidx if i > 0]
            extra = max(0.0, statistics.median(extras)) if extras else 0.0
            over = setup.get("amortize_over", 500)
            row.update(
                stage_boundaries=len(bidx),
                stage_length=plan["stage_length"],
                slow_rank=slow_rank,
                boundary_step_s=[times[i] for i in bidx],
                boundary_begin_step_s=[begin_times[i] for i in bidx],
                boundary_extra_s=extra,
                amortize_over=over,
                step_s_amortized=median + extra / over,
            )
        if profile:
            row["profile"] = profile
        return row

    def profile(self, setup, handle, optimizer) -> str | None:
        """Two extra steps under torch.profiler: a Chrome trace and the top ops, written to --profile-dir."""
        from torch.profiler import ProfilerActivity, profile

        os.makedirs(self.args.profile_dir, exist_ok=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        ids = self.batches[0]
        with profile(activities=activities, record_shapes=False) as prof:
            for _ in range(2):
                if handle is not None:
                    handle.begin_step()
                loss = self.model(input_ids=ids, labels=ids).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
                if handle is not None:
                    handle.optimizer_step(optimizer)
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            sync(self.device)
        base = os.path.join(self.args.profile_dir, setup["name"])
        prof.export_chrome_trace(base + ".trace.json")
        key = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        with open(base + ".top.txt", "w") as f:
            f.write(prof.key_averages().table(sort_by=key, row_limit=40))
        return base

    # --- inference: test-time ensemble -----------------------------------------------------------------------
    def ensemble_setup(self, setup: dict[str, Any]) -> dict[str, Any]:
        import genlora

        args, device = self.args, self.device
        self.reset_lora()
        ids = self.batches[0]
        self.model.eval()

        def timed(fn):
            out = []
            for i in range(args.warmup + args.steps):
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                if i >= args.warmup:
                    out.append(time.perf_counter() - t0)
            return out

        with torch.no_grad():
            with MemoryMeter(device) as mem_plain:
                plain = timed(lambda: self.model(input_ids=ids, use_cache=False).logits)
            methods = make_methods(setup, {})
            handle = genlora.attach(self.model, *methods)
            n_test = handle.method("lora_dropout").config.n_test
            ensemble = genlora.test_time_ensemble(self.model, handle)
            with MemoryMeter(device) as mem_ens:
                ens = timed(lambda: ensemble(input_ids=ids, use_cache=False).logits)
            handle.detach()
        max_diff, identical = self.base_diff()
        p_med, e_med = statistics.median(plain), statistics.median(ens)
        return {
            "name": setup["name"],
            "kind": "inference",
            "methods": [m["method"] for m in setup.get("methods", [])],
            "method_options": setup.get("methods", []),
            "n_test": n_test,
            "steps_timed": len(ens),
            "plain_forward_s_median": p_med,
            "step_s_median": e_med,
            "step_s_min": min(ens),
            "step_s_max": max(ens),
            "step_s_all": ens,
            "tokens_per_step": args.batch_size * args.seq_len,
            "tokens_per_s": args.batch_size * args.seq_len / e_med,
            "peak_bytes": mem_ens.peak,
            "peak_delta_bytes": mem_ens.peak - mem_ens.start,
            "plain_forward_peak_bytes": mem_plain.peak,
            "memory_kind": mem_ens.kind,
            "base_max_abs_diff": max_diff,
            "base_bit_identical": identical,
            "ratio_time_vs_one_forward": e_med / p_med,
            "ratio_mem_vs_one_forward": mem_ens.peak / max(mem_plain.peak, 1),
            "losses_finite": True,
        }


# --------------------------------------------------------------------------------------------------------------
# aggregation and output
# --------------------------------------------------------------------------------------------------------------
def aggregate(runs: list[dict[str, Any]], setups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per setup: medians over repeats, ratios against the same repeat's plain run."""
    by_repeat: dict[int, dict[str, dict[str, Any]]] = {}
    for r in runs:
        by_repeat.setdefault(r["repeat"], {})[r["name"]] = r
    rows = []
    for setup in setups:
        name = setup["name"]
        reps = [rep[name] for rep in by_repeat.values() if name in rep]
        if not reps:
            continue
        time_key = "step_s_amortized" if "step_s_amortized" in reps[0] else "step_s_median"
        row = dict(reps[-1])
        row.pop("repeat", None)
        medians = [r[time_key] for r in reps]
        row["step_s"] = statistics.median(medians)
        row["step_s_repeat_medians"] = medians
        row["step_s_min"] = min(r["step_s_min"] for r in reps)  # over every timed step of every repeat
        row["step_s_max"] = max(r["step_s_max"] for r in reps)
        row["tokens_per_s"] = row["tokens_per_step"] / row["step_s"]
        row["peak_bytes"] = statistics.median(r["peak_bytes"] for r in reps)
        row["peak_delta_bytes"] = statistics.median(r["peak_delta_bytes"] for r in reps)
        row["base_max_abs_diff"] = max(r["base_max_abs_diff"] for r in reps)
        row["base_bit_identical"] = all(r["base_bit_identical"] for r in reps)
        row["losses_finite"] = all(r["losses_finite"] for r in reps)
        row["repeats"] = len(reps)
        if row["kind"] == "inference":
            ratios_t = [r["ratio_time_vs_one_forward"] for r in reps]
            ratios_m = [r["ratio_mem_vs_one_forward"] for r in reps]
            row["ratio_basis"] = "one plain eval forward (same batch)"
        else:
            ratios_t, ratios_m = [], []
            for rep in by_repeat.values():
                if name in rep and "plain" in rep:
                    plain = rep["plain"]
                    ratios_t.append(rep[name][time_key] / plain["step_s_median"])
                    ratios_m.append(rep[name]["peak_bytes"] / max(plain["peak_bytes"], 1))
            row["ratio_basis"] = "plain PEFT LoRA training step (same repeat)"
        row["ratio_time"] = statistics.median(ratios_t) if ratios_t else None
        row["ratio_time_min"] = min(ratios_t) if ratios_t else None
        row["ratio_time_max"] = max(ratios_t) if ratios_t else None
        row["ratio_mem"] = statistics.median(ratios_m) if ratios_m else None
        row["target_time"] = setup.get("target_time")
        row["target_mem"] = setup.get("target_mem")
        rows.append(row)
    return rows


def _fmt(x, spec=".3f", none="–"):
    return none if x is None else format(x, spec)


def markdown(result: dict[str, Any]) -> str:
    meta, cfg = result["environment"], result["config"]
    mem_label = "peak MiB (CUDA max allocated)" if meta["device"].startswith("cuda") else "peak MiB (sampled RSS)"
    device = meta.get("gpu") or meta.get("cpu") or meta["device"]
    lines = [
        f"## genlora overhead benchmark: preset `{cfg['preset']}` on {device}",
        "",
        f"- model: random-init Llama, {cfg['n_base_params'] / 1e6:.1f}M parameters "
        f"(hidden {cfg['model']['hidden_size']}, {cfg['model']['num_hidden_layers']} layers, "
        f"intermediate {cfg['model']['intermediate_size']}, {cfg['model']['num_attention_heads']} heads, "
        f"{cfg['model']['num_key_value_heads']} KV heads, vocab {cfg['model']['vocab_size']}); "
        f"LoRA r={cfg['lora_r']} on {', '.join(LORA_TARGETS)} ({cfg['n_trainable_params'] / 1e6:.2f}M trainable)",
        f"- batch {cfg['batch_size']} x {cfg['seq_len']} tokens, {cfg['dtype']} base weights, AdamW "
        f"(lr {cfg['lr']}), grad clip 1.0; {cfg['warmup']} warm-up + {cfg['steps']} timed steps per setup, "
        f"{cfg['repeats']} repeat(s) round-robin",
        f"- device {meta['device']}" + (f" ({meta.get('gpu')}, driver {meta.get('driver')}, CUDA {meta.get('cuda')})"
                                         if meta.get("gpu") else f" ({meta.get('cpu')}, {meta['torch_threads']} "
                                                                 "torch threads)"),
        f"- torch {meta['torch']}, transformers {meta['transformers']}, peft {meta['peft']}, "
        f"triton {meta['triton'] or 'not installed'}, genlora {meta['genlora']} "
        f"(git {meta.get('genlora_git')}{', dirty' if meta.get('genlora_git_dirty') else ''}), "
        f"Python {meta['python']}; {meta['date_utc']}",
        f"- Flat-LoRA noise path: {result.get('flat_noise_path')}",
        "",
        f"| setup | methods | step ms (median) | min..max ms | tokens/s | {mem_label} | delta MiB | time x plain "
        "(min..max) | mem x plain | target time / mem | base max abs diff | bit-identical |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in result["rows"]:
        ms = 1e3 * r["step_s"]
        span = f"{1e3 * r['step_s_min']:.1f}..{1e3 * r['step_s_max']:.1f}"
        if r["kind"] == "inference":
            span += f" (1 fwd {1e3 * r['plain_forward_s_median']:.1f})"
        ratio = _fmt(r["ratio_time"])
        if r.get("ratio_time_min") is not None and r["repeats"] > 1:
            ratio += f" ({r['ratio_time_min']:.3f}..{r['ratio_time_max']:.3f})"
        if r["kind"] == "inference":
            ratio += " vs 1 fwd"
        target = f"{_fmt(r['target_time'], '.2f')} / {_fmt(r['target_mem'], '.2f')}" if r["name"] != "plain" else ""
        methods = " + ".join(r["methods"]) or "PEFT LoRA"
        if r.get("stage_boundaries"):
            methods += f" (after {r['stage_boundaries']} stages, slow rank {r.get('slow_rank')}; boundary " \
                       f"+{1e3 * r['boundary_extra_s']:.1f} ms / {r['amortize_over']} steps)"
        lines.append(
            f"| {r['name']} | {methods} | {ms:.1f} | {span} | {r['tokens_per_s']:.0f} | "
            f"{r['peak_bytes'] / 2**20:.0f} | {r['peak_delta_bytes'] / 2**20:.0f} | {ratio} | {_fmt(r['ratio_mem'])} | "
            f"{target} | {r['base_max_abs_diff']:.3g} | {'yes' if r['base_bit_identical'] else 'NO'} |"
        )
    if result["skipped"]:
        lines.append("")
        lines.append("Skipped: " + "; ".join(f"{s['name']} ({s['reason']})" for s in result["skipped"]))
    phased = [r for r in result["rows"] if r.get("phase_s_median")]
    if phased:
        lines += ["", "Phase breakdown (ms, extra steps with a sync after each phase; not the timed steps):", "",
                  "| setup | begin_step | forward | backward | clip | optimizer step |", "|---|---:|---:|---:|---:|---:|"]
        for r in phased:
            p = r["phase_s_median"]
            lines.append(f"| {r['name']} | " + " | ".join(f"{1e3 * p[k]:.2f}" for k in
                                                         ("begin_step", "forward", "backward", "clip", "optimizer"))
                         + " |")
    lines.append("")
    return "\n".join(lines)


def flat_noise_path(device: torch.device) -> str:
    try:
        from genlora.methods import flat_lora

        kernel = flat_lora._triton_kernel()
        probe = torch.empty(2, 2, device=device)
        if kernel is not None and kernel.usable(probe):
            return "Triton fused kernel (counter-based Philox, fused scale + add)"
    except Exception:
        pass
    return "PyTorch (torch.randn with a seeded generator, unfused)"


# --------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the frozen base weights")
    p.add_argument("--steps", type=int, default=None, help="timed steps per setup (preset default)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before them (preset default)")
    p.add_argument("--phase-steps", type=int, default=None,
                   help="extra steps with a sync between phases, for the breakdown table (default 3 on CUDA, 0 on CPU)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--lora-r", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--methods", default=None,
                   help="comma-separated setup names (plain always runs); default: every setup whose methods exist")
    p.add_argument("--setups-file", default=None, help="JSON list of setups replacing the built-in ones")
    p.add_argument("--repeats", type=int, default=1, help="run all setups this many times, round-robin")
    p.add_argument("--burn-in", type=int, default=2, help="untimed plain-LoRA steps before the first setup")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads; default 1 on CPU (stable timings on a shared machine: with more "
                        "threads than free cores every OpenMP region can wait a scheduler tick), unchanged on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile-dir", default=None, help="write a torch.profiler trace of 2 extra steps per setup")
    p.add_argument("--out", default="bench/out", help="folder for results.json and results.md")
    p.add_argument("--list", action="store_true", help="print the setups and exit")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    for key in ("steps", "warmup", "batch_size", "seq_len", "lora_r"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        p.error("--steps >= 1, --warmup >= 0 and --repeats >= 1 are required")
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    setups = DEFAULT_SETUPS
    if args.setups_file:
        with open(args.setups_file) as f:
            setups = json.load(f)
    if args.list:
        print(json.dumps(setups, indent=2))
        return {}
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads is None and device.type == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.phase_steps is None:
        args.phase_steps = 3 if device.type == "cuda" else 0
    dtype = DTYPES[args.dtype]
    wanted = [s.strip() for s in args.methods.split(",")] if args.methods else None
    chosen, skipped = available_setups(setups, wanted)

    t_start = time.perf_counter()
    runner = Runner(args, device, dtype)
    if args.burn_in:  # untimed plain steps first: allocator, kernel caches and clocks warm for every setup alike
        burn = copy.copy(args)
        burn.warmup, burn.steps, burn.phase_steps = 0, args.burn_in, 0
        saved, runner.args = runner.args, burn
        try:
            runner.train_setup({"name": "burn-in", "methods": []})
        finally:
            runner.args = saved
    runs = []
    for repeat in range(args.repeats):
        for setup in chosen:
            t0 = time.perf_counter()
            row = runner.ensemble_setup(setup) if setup.get("kind") == "inference" else runner.train_setup(setup)
            row["repeat"] = repeat
            runs.append(row)
            print(f"[bench] repeat {repeat} {setup['name']:<13} {1e3 * row['step_s_median']:9.2f} ms/step  "
                  f"peak {row['peak_bytes'] / 2**20:9.1f} MiB  base diff {row['base_max_abs_diff']:.3g}  "
                  f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    rows = aggregate(runs, chosen)
    result = {
        "environment": environment(device),
        "config": {
            "preset": args.preset, "model": PRESETS[args.preset]["model"], "n_base_params": runner.n_base,
            "n_trainable_params": runner.n_trainable, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "lora_r": args.lora_r, "dtype": args.dtype, "steps": args.steps, "warmup": args.warmup,
            "phase_steps": args.phase_steps, "repeats": args.repeats, "burn_in": args.burn_in, "lr": args.lr,
            "seed": args.seed,
            "memory_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "sampled_rss",
            "argv": sys.argv[1:] if argv is None else list(argv),
        },
        "flat_noise_path": flat_noise_path(device),
        "rows": rows,
        "runs": runs,
        "skipped": skipped,
        "wall_s": time.perf_counter() - t_start,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    md = markdown(result)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    print(md)
    return result


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
