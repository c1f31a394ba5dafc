#!/usr/bin/env python
"""genlora overhead benchmark: plain PEFT LoRA against each genlora method, in one process, on one model.

Builds a randomly initialised Llama from a config (no downloads), puts PEFT LoRA on all seven linear projections,
and trains it with AdamW on random tokens, once per *setup* (plain LoRA, each method, all methods together, Flat-LoRA
on its PyTorch noise path), then times LoRA Dropout's test-time ensemble against one plain forward; where
bitsandbytes is usable, the same on a QLoRA-style 4-bit NF4 base (a second model, with its own plain baseline).
Every setup starts from the same LoRA weights and shares the same frozen base model, which is checked bit for bit
after each setup.

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
  * ratios to the baseline (plain PEFT LoRA on the same base) of the same repeat (with `--repeats R` the setups run
    round-robin R times; the table shows the median of the per-repeat ratios and their min..max).
  * max |W_after - W_before| over every frozen parameter (and whether they are bit-identical).
LoRASC setups run `stages_before_timing` (default 4) stage boundaries first (fixed-length stages, `stage_steps`);
the timed steps then lie inside stage 4 (slow rank 4r), and the median extra time of a boundary step is amortised
over `amortize_over` (500) steps: amortised step = median step + boundary extra / 500.
The inference row times `n_test`=4 ensemble forwards (one call of `genlora.test_time_ensemble`) against one plain
forward, in eval mode under `torch.no_grad()`.

Setups are data (`DEFAULT_SETUPS`, or a JSON file via `--setups-file`): a name, a list of
`{"method": <registry name>, **options}`, optional targets, `env` (variables set while it runs), `base` ("4bit")
and `baseline`; setups whose methods are not in `genlora.registry.METHODS` are skipped and listed as such, so
methods added later are picked up by name. A method that refuses the 4-bit base (TypeError/ValueError at attach) is
skipped with its message; any other failure of a setup is recorded as an error (exit status 1) and the others run.

Time budget: with `--deadline`/`--time-budget` a setup whose estimated cost (measured in an earlier repeat, else
from the plain step time) would end after the deadline is not started; results.json/.md are rewritten after every
setup, and SIGTERM stops the run after writing them, so a caller's timeout loses at most the setup in flight.

Examples:
  python bench/bench.py --preset tiny --out bench/out/tiny                    # CPU smoke run, seconds
  python bench/bench.py --preset 1b --device cuda --dtype bf16 --out bench/out/1b
  python bench/bench.py --preset 150m --device cpu --batch-size 1 --seq-len 128 --steps 3 --warmup 1
  python bench/bench.py --preset tiny --profile-dir /tmp/prof --profile-stack --profile-no-trace   # CPU profile
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime
import gc
import io
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
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

# The setups: plain PEFT LoRA, each method, all four, the test-time ensemble, Flat-LoRA on its PyTorch noise path
# (GENLORA_TRITON=0, to measure the fused kernel against it), and the same on a QLoRA-style 4-bit base (bitsandbytes).
# Targets are the performance issue's (ratios to plain PEFT LoRA of the same base, same process, same GPU): step time,
# peak memory. "env": environment variables set while the setup runs. "base": "4bit" builds a second model whose
# frozen linears are bitsandbytes NF4 (bf16 compute); "baseline": the setup a row's ratios are taken against.
FLAT = {"method": "flat_lora", "sigma": 0.05, "schedule": "constant"}  # constant: noise on in every timed step
RM = {"method": "rm_lora", "reg_lambda": 0.1}  # k = r // 2
DROPOUT = {"method": "lora_dropout", "p": 0.1, "n_train": 1}
LORASC = {"method": "lorasc", "alpha": 0.5, "noise_lambda": 0.15}  # stage_steps set by the bench (see plan_steps)
# LoRA Dropout + LoRASC: LoRASC folds the fast expert's expectation, which needs the merged-expectation export.
ALL_FOUR = [LORASC, FLAT, RM, dict(DROPOUT, deploy="merged_expectation")]
TARGETS = {  # name: (step time, peak memory)
    "flat_lora": (1.03, 1.02), "rm_lora": (1.02, 1.01), "lora_dropout": (1.05, 1.05), "lorasc": (1.03, 1.05),
    "all": (1.10, 1.08),
}
LORASC_TIMING = {"stages_before_timing": 4, "amortize_over": 500}


def _train(name: str, methods: list[dict[str, Any]], target: str | None = None, **extra) -> dict[str, Any]:
    setup: dict[str, Any] = {"name": name, "methods": [dict(m) for m in methods], **extra}
    if target is not None:
        setup["target_time"], setup["target_mem"] = TARGETS[target]
    if any(m["method"] == "lorasc" for m in methods):
        setup.update(LORASC_TIMING)
    return setup


DEFAULT_SETUPS: list[dict[str, Any]] = [
    _train("plain", []),
    _train("flat_lora", [FLAT], "flat_lora"),
    _train("flat_lora_pytorch", [FLAT], env={"GENLORA_TRITON": "0"}, reference_for="flat_lora"),
    _train("rm_lora", [RM], "rm_lora"),
    _train("lora_dropout", [DROPOUT], "lora_dropout"),
    _train("lorasc", [LORASC], "lorasc"),
    _train("all", ALL_FOUR, "all"),
    {"name": "ensemble", "kind": "inference", "methods": [{"method": "lora_dropout", "p": 0.1, "n_test": 4}],
     "target_time": 4.2},
    _train("qlora_plain", [], base="4bit"),
    _train("qlora_flat_lora", [FLAT], "flat_lora", base="4bit", baseline="qlora_plain"),
    _train("qlora_rm_lora", [RM], "rm_lora", base="4bit", baseline="qlora_plain"),
    _train("qlora_lora_dropout", [DROPOUT], "lora_dropout", base="4bit", baseline="qlora_plain"),
    _train("qlora_lorasc", [LORASC], "lorasc", base="4bit", baseline="qlora_plain"),
    _train("qlora_all", ALL_FOUR, "all", base="4bit", baseline="qlora_plain"),
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


def _dist_version(dist: str) -> str | None:
    """An installed distribution's version without importing it (importing bitsandbytes prints to stderr)."""
    try:
        from importlib.metadata import version

        return version(dist)
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
        "triton": _dist_version("triton"),
        "bitsandbytes": _dist_version("bitsandbytes"),
        "GENLORA_TRITON": os.environ.get("GENLORA_TRITON", "(unset: off)"),
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
def _device_map(device: torch.device):
    if device.type == "cuda":
        return {"": device.index if device.index is not None else torch.cuda.current_device()}
    return {"": str(device)}


def build_model(preset: dict[str, Any], args, device: torch.device, dtype: torch.dtype, quant: str | None = None):
    """The random-init Llama of `preset` with PEFT LoRA on all seven projections. quant="4bit": the same weights
    (same seed), saved once to a temporary folder and reloaded with bitsandbytes NF4 linears (double quantization,
    compute in `dtype`), as QLoRA does."""
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
    if quant == "4bit":
        import tempfile

        from transformers import BitsAndBytesConfig

        with tempfile.TemporaryDirectory(prefix="genlora-bench-") as tmp:
            model.save_pretrained(tmp)
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype)
            model = LlamaForCausalLM.from_pretrained(tmp, quantization_config=qcfg, dtype=dtype,
                                                     device_map=_device_map(device))
    elif quant is not None:
        raise ValueError(f"unknown quantization {quant!r}")
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


def bitsandbytes_problem() -> str | None:
    """None if bitsandbytes imports, else why not (the 4-bit setups are then skipped with this reason)."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            import bitsandbytes  # noqa: F401
    except Exception as err:  # ImportError, or a build that does not match this CUDA/CPU
        return f"bitsandbytes is not usable here ({type(err).__name__}: {str(err)[:200]})"
    return None


# --------------------------------------------------------------------------------------------------------------
# setups
# --------------------------------------------------------------------------------------------------------------
def baseline_of(setup: dict[str, Any]) -> str:
    return setup.get("baseline", "qlora_plain" if setup.get("base") == "4bit" and setup.get("methods") else "plain")


def available_setups(setups: list[dict[str, Any]], wanted: list[str] | None):
    """The setups to run (in order; each chosen setup's baseline included) and the skipped ones with a reason."""
    from genlora.registry import METHODS

    chosen, skipped = [], []
    names = [s["name"] for s in setups]
    if wanted:
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise SystemExit(f"unknown setup(s) {unknown}; known: {names}")
        wanted = set(wanted) | {"plain"} | {baseline_of(s) for s in setups if s["name"] in wanted}
    for s in setups:
        if wanted and s["name"] not in wanted:
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
        profiled = getattr(args, "profile_steps", 2) if getattr(args, "profile_dir", None) else 0
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
    """Method objects of a setup. LoRASC gets explicit fixed-length stages (`stage_steps`), so "after 4 stages"
    means exactly that whatever the method's default stage count."""
    from genlora.registry import method_from_dict

    methods = []
    for spec in setup.get("methods", []):
        spec = dict(spec)
        if spec["method"] == "lorasc" and plan.get("stage_length") and "stage_steps" not in spec:
            spec["stage_steps"] = plan["stage_length"]
        methods.append(method_from_dict(spec))
    return methods


@contextlib.contextmanager
def setup_env(setup: dict[str, Any]):
    """The setup's environment variables (e.g. GENLORA_TRITON=0) while it runs; restored afterwards."""
    env = {k: str(v) for k, v in (setup.get("env") or {}).items()}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class SetupUnsupported(Exception):
    """The library refuses this setup (e.g. a method on a 4-bit base it does not support yet): skipped, not an
    error."""


class Stop(Exception):
    """SIGTERM (or SIGINT) during a run: the results so far are written, the rest is reported as not run."""


def _expected_unsupported(setup: dict[str, Any], err: Exception) -> bool:
    # A method refusing a quantized base is a documented limitation (skip with the reason); on the plain bf16 base
    # every method must attach, so there any exception is an error.
    return setup.get("base") == "4bit" and isinstance(err, (TypeError, ValueError, NotImplementedError))


class Runner:
    def __init__(self, args, device: torch.device, dtype: torch.dtype, quant: str | None = None):
        t0 = time.perf_counter()
        self.args = args
        self.device = device
        self.dtype = dtype
        self.quant = quant
        self.repeat = 0
        preset = copy.deepcopy(PRESETS[args.preset])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model, self.config, self.n_base, self.n_trainable = build_model(preset, args, device, dtype, quant)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.lora_init = [p.detach().clone() for p in self.trainable]
        # The frozen weights, copied to the CPU once (outside every measured window): each setup is checked
        # against them, parameter by parameter on the model's device.
        self.frozen = {n: _raw(p).to("cpu", copy=True) for n, p in self.model.named_parameters()
                       if not p.requires_grad}
        g = torch.Generator().manual_seed(args.seed + 1)
        n_batches = min(8, max(1, args.warmup + args.steps))
        self.batches = [torch.randint(1, self.config.vocab_size, (args.batch_size, args.seq_len), generator=g)
                        .to(device) for _ in range(n_batches)]
        self.build_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        self.base_diff()
        self.overhead_s = 2 * (time.perf_counter() - t1) + 0.2  # base check, attach/detach, memory meter
        self.step_estimate_s: float | None = None  # plain step time, from the burn-in, then from `plain`
        self.profile_cost_s = 3.0  # a profiled setup's extra seconds (steps + analysis): the largest seen so far
        self.walls: dict[str, list[float]] = {}

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
                now = _raw(p)
                ref = self.frozen[n]
                if now.shape != ref.shape or now.dtype != ref.dtype:
                    return math.inf, False
                ref = ref.to(now.device)
                if not torch.equal(now, ref):
                    identical = False
                    worst = max(worst, (now.double() - ref.double()).abs().max().item())
        return worst, identical

    def estimate_s(self, setup: dict[str, Any]) -> float:
        """Wall seconds this setup will take: measured in an earlier repeat, else from the plain step time."""
        if self.walls.get(setup["name"]):
            return max(self.walls[setup["name"]])
        step = self.step_estimate_s or 1.0
        args = self.args
        if setup.get("kind") == "inference":  # plain eval forwards (~1/3 step) + n_test-member ensembles
            return (args.warmup + args.steps) * step * (1 / 3 + 4 / 3) * 1.5 + self.overhead_s
        plan = plan_steps(setup, args)
        if _uses(setup, "lorasc"):
            factor = 2.0
        elif _uses(setup, "flat_lora"):
            factor = 1.5
        else:
            factor = 1.25 if setup.get("methods") else 1.0
        profiled = self.profile_cost_s + args.profile_steps * step * factor * 3 if args.profile_dir and \
            self.repeat == 0 and not args.profile_after else 0.0
        return plan["total"] * step * factor + profiled + self.overhead_s

    def _step(self, handle, optimizer, ids) -> torch.Tensor:
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
        return loss

    def _attach(self, setup: dict[str, Any], methods, total_steps: int | None = None):
        import genlora

        try:
            return genlora.attach(self.model, *methods, total_steps=total_steps) if methods else None
        except Exception as err:
            if _expected_unsupported(setup, err):
                raise SetupUnsupported(f"{type(err).__name__}: {err}") from err
            raise

    # --- training setups ---------------------------------------------------------------------------------------
    def train_setup(self, setup: dict[str, Any]) -> dict[str, Any]:
        args = self.args
        plan = plan_steps(setup, args)
        self.reset_lora()
        try:
            methods = make_methods(setup, plan)
        except Exception as err:
            if _expected_unsupported(setup, err):
                raise SetupUnsupported(f"{type(err).__name__}: {err}") from err
            raise
        optimizer = torch.optim.AdamW(self.trainable, lr=args.lr, weight_decay=0.0)
        handle = self._attach(setup, methods, plan["total"])
        try:
            return self._train(setup, plan, handle, optimizer)
        finally:
            if handle is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # LoRASC warns that detaching drops its slow experts
                    handle.detach()
            del optimizer, handle, methods
            self.reset_lora()

    def _train(self, setup, plan, handle, optimizer) -> dict[str, Any]:
        args, device = self.args, self.device
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
        profile = None
        if args.profile_dir and n_train == 1 and self.repeat == 0 and not args.profile_after:
            profile = self.profile(setup, handle, optimizer)
        slow_rank = lorasc.slow_rank(handle.slots[0]) if lorasc is not None else None  # before detach drops it
        timed = [times[i] for i in plan["timed"]]
        median = statistics.median(timed)
        row: dict[str, Any] = {
            "name": setup["name"],
            "kind": "train",
            "base": setup.get("base", self.args.dtype),
            "baseline": baseline_of(setup) if setup["name"] != baseline_of(setup) else None,
            "methods": [m["method"] for m in setup.get("methods", [])],
            "method_options": setup.get("methods", []),
            "env": setup.get("env") or {},
            "noise_path": noise_path_label(self.device) if _uses(setup, "flat_lora") or _uses(setup, "lorasc")
            else None,
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
            wanted = setup.get("stages_before_timing", 0)
            if len(bidx) != wanted:
                row["note"] = f"{len(bidx)} stage boundaries before the timed steps, wanted {wanted}"
        if profile:
            row["profile"] = profile
        return row

    def profile(self, setup, handle, optimizer) -> dict[str, Any] | None:
        """`--profile-steps` extra steps under torch.profiler (repeat 0, or the --profile-after pass): a summary in
        the row (per-op self times and counts per step, kernel launches, genlora's own Python functions with
        --profile-stack), and in --profile-dir the top-ops table (+ a Chrome trace unless --profile-no-trace)."""
        from torch.profiler import ProfilerActivity, profile

        steps = self.args.profile_steps
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        ids = self.batches[0]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sync(self.device)
                t0 = time.perf_counter()
                with profile(activities=activities, record_shapes=False, with_stack=self.args.profile_stack) as prof:
                    for _ in range(steps):
                        self._step(handle, optimizer, ids)
                    sync(self.device)
                wall = time.perf_counter() - t0
            averages = prof.key_averages()  # parsing the events is most of the profiler's cost: once
            summary = summarize_profile(prof, self.device, steps, stacks=self.args.profile_stack, averages=averages)
            summary["wall_ms_per_step"] = 1e3 * wall / steps
            summary["seconds_with_analysis"] = time.perf_counter() - t0
            os.makedirs(self.args.profile_dir, exist_ok=True)
            base = os.path.join(self.args.profile_dir, setup["name"])
            if not self.args.profile_no_trace:
                prof.export_chrome_trace(base + ".trace.json")
                summary["trace"] = base + ".trace.json"
            table = None
            keys = ("self_device_time_total", "self_cuda_time_total") if self.device.type == "cuda" else \
                ("self_cpu_time_total",)
            for key in keys:  # the device key's name differs across torch versions
                try:
                    table = averages.table(sort_by=key, row_limit=40)
                    break
                except Exception as err:  # noqa: PERF203
                    table = f"(no table: {type(err).__name__}: {err})"
            with open(base + ".top.txt", "w") as f:
                f.write(table)
                if summary.get("genlora_python"):
                    f.write("\n\ngenlora Python functions (exclusive of nested genlora frames, incl. the torch ops "
                            "they call), ms per step:\n")
                    for name, ms in summary["genlora_python"]:
                        f.write(f"  {ms:10.3f}  {name}\n")
            summary["top_table"] = base + ".top.txt"
            self.profile_cost_s = max(self.profile_cost_s, time.perf_counter() - t0)
            return summary
        except Stop:
            raise
        except Exception as err:  # a profiler problem must not cost the measurement
            return {"error": f"{type(err).__name__}: {err}"}

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
            handle = self._attach(setup, methods)
            try:
                n_test = handle.method("lora_dropout").config.n_test
                ensemble = genlora.test_time_ensemble(self.model, handle)
                with MemoryMeter(device) as mem_ens:
                    ens = timed(lambda: ensemble(input_ids=ids, use_cache=False).logits)
            finally:
                handle.detach()
        max_diff, identical = self.base_diff()
        p_med, e_med = statistics.median(plain), statistics.median(ens)
        return {
            "name": setup["name"],
            "kind": "inference",
            "base": setup.get("base", self.args.dtype),
            "baseline": None,
            "methods": [m["method"] for m in setup.get("methods", [])],
            "method_options": setup.get("methods", []),
            "env": setup.get("env") or {},
            "noise_path": None,
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


def _raw(p: torch.Tensor) -> torch.Tensor:
    """A parameter's storage as a plain tensor (bitsandbytes' Params4bit: the packed uint8 data)."""
    return p.data if type(p) is not torch.nn.Parameter and hasattr(p, "data") else p.detach()


# --------------------------------------------------------------------------------------------------------------
# profiles
# --------------------------------------------------------------------------------------------------------------
# genlora's own frames, and torch.optim's: handle.optimizer_step calls optimizer.step(), whose time is the optimizer's
# (plain LoRA pays it too), so it is split off as its own entry instead of being counted as genlora's.
_GENLORA_FRAME = re.compile(r"(genlora|torch/optim)/(?!.*bench\.py)(.+?\.py)\((\d+)\): (.+)$")
_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")


def summarize_profile(prof, device: torch.device, steps: int, top: int = 60, stacks: bool = False,
                      averages=None) -> dict[str, Any]:
    """Per-step numbers from a torch.profiler run: the top ops by self time (device time on CUDA), their counts,
    leaf ATen ops (on a GPU about one kernel each), kernel launches, and, when the profile has Python stacks, the
    time spent in each genlora function (exclusive of nested genlora frames, inclusive of the torch ops it calls)."""
    cuda = device.type == "cuda"
    ops = []
    cpu_total = dev_total = 0.0
    launches = 0
    for e in averages if averages is not None else prof.key_averages():
        name = e.key
        if ".py(" in name or name.startswith("<built-in") or name.startswith("ProfilerStep"):
            continue
        self_cpu = float(e.self_cpu_time_total)
        self_dev = float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0)
        cpu_total += self_cpu
        dev_total += self_dev if cuda else 0.0
        if name in _LAUNCHES:
            launches += e.count
        ops.append((name, e.count, self_cpu, self_dev))
    ops.sort(key=lambda o: -(o[3] if cuda else o[2]))
    events = list(prof.events() or [])
    leaf = 0
    frames = []
    for e in events:
        name = e.name
        if name.startswith("aten::"):
            if not any(c.name.startswith("aten::") for c in e.cpu_children):
                leaf += 1
            continue
        m = _GENLORA_FRAME.search(name)
        if m:
            fn = m.group(4) if not m.group(4).startswith("<") else f"{m.group(4)}@{m.group(3)}"  # <listcomp>@line
            key = f"{m.group(2)}:{fn}" if m.group(1) == "genlora" else f"torch.optim {m.group(2)}:{fn}"
            frames.append((e.thread, e.time_range.start, e.time_range.end, key))
    per_fn = _exclusive_frame_times(frames)
    optim = {k: v for k, v in per_fn.items() if k.startswith("torch.optim")}
    per_fn = {k: v for k, v in per_fn.items() if k not in optim}
    out: dict[str, Any] = {
        "steps": steps,
        "sort_key": "self_device_us" if cuda else "self_cpu_us",
        "ops": [{"name": n, "count_per_step": c / steps, "self_cpu_ms_per_step": sc / 1e3 / steps,
                 "self_device_ms_per_step": sd / 1e3 / steps} for n, c, sc, sd in ops[:top]],
        "op_self_cpu_ms_per_step": cpu_total / 1e3 / steps,
        "leaf_aten_ops_per_step": leaf / steps,
        "kernel_launches_per_step": launches / steps,
    }
    if cuda:
        out["device_busy_ms_per_step"] = dev_total / 1e3 / steps
    if frames or stacks:
        fns = sorted(per_fn.items(), key=lambda kv: -kv[1])
        out["genlora_python_ms_per_step"] = sum(per_fn.values()) / 1e3 / steps
        out["genlora_python"] = [(k, v / 1e3 / steps) for k, v in fns[:25]]
        out["torch_optim_ms_per_step"] = sum(optim.values()) / 1e3 / steps
    return out


def _exclusive_frame_times(frames: list[tuple]) -> dict[str, float]:
    """frames: (thread, start, end, key) of nested intervals; each key's time minus that of its nearest nested
    frames (so nothing is counted twice and the sum is the time under the outermost frames)."""
    total: dict[str, float] = {}
    frames = sorted(frames, key=lambda f: (f[0], f[1], -f[2]))
    stack: list[list] = []  # [thread, end, key, duration, nested]

    def pop():
        thread, end, key, dur, nested = stack.pop()
        total[key] = total.get(key, 0.0) + max(0.0, dur - nested)

    for thread, start, end, key in frames:
        while stack and (stack[-1][0] != thread or stack[-1][1] <= start):
            pop()
        if stack:
            stack[-1][4] += end - start
        stack.append([thread, end, key, end - start, 0.0])
    while stack:
        pop()
    return total


# --------------------------------------------------------------------------------------------------------------
# aggregation and output
# --------------------------------------------------------------------------------------------------------------
def aggregate(runs: list[dict[str, Any]], setups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per setup: medians over repeats, ratios against the same repeat's baseline run (plain PEFT LoRA on
    the same base)."""
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
        row.pop("wall_s", None)
        if "profile" not in row:
            prof = next((r["profile"] for r in reps if "profile" in r), None)
            if prof is not None:
                row["profile"] = prof
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
            base = baseline_of(setup)
            ratios_t, ratios_m = [], []
            for rep in by_repeat.values():
                if name in rep and base in rep:
                    ref = rep[base]
                    ratios_t.append(rep[name][time_key] / ref["step_s_median"])
                    ratios_m.append(rep[name]["peak_bytes"] / max(ref["peak_bytes"], 1))
            row["ratio_basis"] = ("plain PEFT LoRA training step (same repeat)" if base == "plain" else
                                  f"{base} training step (same repeat)")
        row["ratio_time"] = statistics.median(ratios_t) if ratios_t else None
        row["ratio_time_min"] = min(ratios_t) if ratios_t else None
        row["ratio_time_max"] = max(ratios_t) if ratios_t else None
        row["ratio_mem"] = statistics.median(ratios_m) if ratios_m else None
        row["target_time"] = setup.get("target_time")
        row["target_mem"] = setup.get("target_mem")
        if setup.get("reference_for"):
            row["reference_for"] = setup["reference_for"]
        rows.append(row)
    return rows


def _fmt(x, spec=".3f", none="–"):
    return none if x is None else format(x, spec)


def _millions(n, spec=".1f") -> str:
    return "?" if n is None else format(n / 1e6, spec)


def markdown(result: dict[str, Any]) -> str:
    meta, cfg = result["environment"], result["config"]
    mem_label = "peak MiB (CUDA max allocated)" if meta["device"].startswith("cuda") else "peak MiB (sampled RSS)"
    device = meta.get("gpu") or meta.get("cpu") or meta["device"]
    lines = [
        f"## genlora overhead benchmark: preset `{cfg['preset']}` on {device}",
        "",
        f"- model: random-init Llama, {_millions(cfg['n_base_params'])}M parameters "
        f"(hidden {cfg['model']['hidden_size']}, {cfg['model']['num_hidden_layers']} layers, "
        f"intermediate {cfg['model']['intermediate_size']}, {cfg['model']['num_attention_heads']} heads, "
        f"{cfg['model']['num_key_value_heads']} KV heads, vocab {cfg['model']['vocab_size']}); "
        f"LoRA r={cfg['lora_r']} on {', '.join(LORA_TARGETS)} "
        f"({_millions(cfg['n_trainable_params'], '.2f')}M trainable)",
        f"- batch {cfg['batch_size']} x {cfg['seq_len']} tokens, {cfg['dtype']} base weights, AdamW "
        f"(lr {cfg['lr']}), grad clip 1.0; {cfg['warmup']} warm-up + {cfg['steps']} timed steps per setup, "
        f"{cfg['repeats']} repeat(s) round-robin" + (f" (completed: {result.get('repeats_done')})"
                                                     if result.get("repeats_done") not in (None, cfg["repeats"])
                                                     else ""),
        f"- device {meta['device']}" + (f" ({meta.get('gpu')}, driver {meta.get('driver')}, CUDA {meta.get('cuda')})"
                                         if meta.get("gpu") else f" ({meta.get('cpu')}, {meta['torch_threads']} "
                                                                 "torch threads)"),
        f"- torch {meta['torch']}, transformers {meta['transformers']}, peft {meta['peft']}, "
        f"triton {meta['triton'] or 'not installed'}, bitsandbytes {meta.get('bitsandbytes') or 'not installed'}, "
        f"genlora {meta['genlora']} "
        f"(git {meta.get('genlora_git')}{', dirty' if meta.get('genlora_git_dirty') else ''}),"
        f" Python {meta['python']}; {meta['date_utc']}",
        f"- Flat-LoRA noise path: {result.get('flat_noise_path')} (GENLORA_TRITON={meta.get('GENLORA_TRITON')}); "
        "per setup in the methods column",
        "",
        f"| setup | methods | step ms (median) | min..max ms | tokens/s | {mem_label} | delta MiB | time x baseline "
        "(min..max) | mem x baseline | target time / mem | base max abs diff | bit-identical |",
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
        elif r.get("baseline") and (r["baseline"] != "plain" or r.get("base") == "4bit"):
            ratio += f" vs {r['baseline']}" + (" (bf16 base)" if r["baseline"] == "plain" else "")
        target = (f"{_fmt(r['target_time'], '.2f')} / {_fmt(r['target_mem'], '.2f')}"
                  if r.get("target_time") is not None else "")
        methods = " + ".join(r["methods"]) or "PEFT LoRA"
        if r.get("base") == "4bit":
            methods += " [4-bit NF4 base]"
        if r.get("noise_path"):
            methods += f" [noise: {r['noise_path']}]"
        if r.get("reference_for"):
            methods += f" (reference for {r['reference_for']})"
        if r.get("stage_boundaries"):
            methods += f" (after {r['stage_boundaries']} stages, slow rank {r.get('slow_rank')}; boundary " \
                       f"+{1e3 * r['boundary_extra_s']:.1f} ms / {r['amortize_over']} steps)"
        if r.get("note"):
            methods += f" NOTE: {r['note']}"
        lines.append(
            f"| {r['name']} | {methods} | {ms:.1f} | {span} | {r['tokens_per_s']:.0f} | "
            f"{r['peak_bytes'] / 2**20:.0f} | {r['peak_delta_bytes'] / 2**20:.0f} | {ratio} | "
            f"{_fmt(r['ratio_mem'])} | "
            f"{target} | {r['base_max_abs_diff']:.3g} | {'yes' if r['base_bit_identical'] else 'NO'} |"
        )
    if result["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{s['name']} ({s['reason']})" for s in result["skipped"])]
    if result.get("not_run"):
        lines += ["", "Not run (time budget or stop): " + "; ".join(
            f"{s['name']} repeat {s['repeat']} ({s['reason']})" for s in result["not_run"])]
    if result.get("errors"):
        lines += ["", "ERRORS: " + "; ".join(f"{e['name']} repeat {e['repeat']}: {e['error']}"
                                             for e in result["errors"])]
    if result.get("stopped"):
        lines += ["", f"Stopped early: {result['stopped']}"]
    phased = [r for r in result["rows"] if r.get("phase_s_median")]
    if phased:
        lines += ["", "Phase breakdown (ms, extra steps with a sync after each phase; not the timed steps):", "",
                  "| setup | begin_step | forward | backward | clip | optimizer step |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in phased:
            p = r["phase_s_median"]
            lines.append(f"| {r['name']} | " + " | ".join(f"{1e3 * p.get(k, math.nan):.2f}" for k in
                                                         ("begin_step", "forward", "backward", "clip", "optimizer"))
                         + " |")
    profiled = [r for r in result["rows"] if r.get("profile") and "error" not in r["profile"]]
    if profiled:
        cuda = meta["device"].startswith("cuda")
        lines += ["", f"Profile (torch.profiler, {cfg.get('profile_steps')} extra step(s) of repeat 0; per step; the "
                  "profiler slows steps down):",
                  "", "| setup | profiled ms | " + ("GPU busy ms | " if cuda else "")
                  + "op self-CPU ms | leaf ATen ops "
                  "| kernel launches | genlora Python ms | top ops by self " + ("GPU" if cuda else "CPU") + " time |",
                  "|---|---:|" + ("---:|" if cuda else "") + "---:|---:|---:|---:|---|"]
        for r in profiled:
            p = r["profile"]
            key = "self_device_ms_per_step" if cuda else "self_cpu_ms_per_step"
            top = ", ".join(f"{o['name']} {o[key]:.1f}" for o in p["ops"][:4])
            lines.append(f"| {r['name']} | {p['wall_ms_per_step']:.1f} | "
                         + (f"{p.get('device_busy_ms_per_step', 0):.1f} | " if cuda else "")
                         + f"{p['op_self_cpu_ms_per_step']:.1f} | {p['leaf_aten_ops_per_step']:.0f} | "
                         f"{p['kernel_launches_per_step']:.0f} | {_fmt(p.get('genlora_python_ms_per_step'), '.1f')} | "
                         f"{top} |")
    lines.append("")
    return "\n".join(lines)


def noise_path_label(device: torch.device) -> str:
    """Which path generates weight noise on `device` right now (under the current GENLORA_TRITON)."""
    try:
        from genlora.core.perturbed_linear import noise_kernel

        kernel = noise_kernel()
        probe = torch.empty(2, 2, device=device)
        if kernel is not None and kernel.usable(probe):
            return "triton"
    except Exception:
        pass
    return "pytorch"


def flat_noise_path(device: torch.device) -> str:
    if noise_path_label(device) == "triton":
        return "Triton fused kernel (counter-based Philox, fused scale + add)"
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
                   help="extra steps with a sync between phases, for the breakdown table (default 3 on CUDA, 0 on "
                        "CPU)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--lora-r", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--methods", default=None,
                   help="comma-separated setup names (plain, and each chosen setup's baseline, always run); default: "
                        "every setup whose methods exist")
    p.add_argument("--setups-file", default=None, help="JSON list of setups replacing the built-in ones")
    p.add_argument("--repeats", type=int, default=1, help="run all setups this many times, round-robin")
    p.add_argument("--burn-in", type=int, default=2, help="untimed plain-LoRA steps before the first setup")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads; default 1 on CPU (stable timings on a shared machine: with more "
                        "threads than free cores every OpenMP region can wait a scheduler tick), unchanged on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile-dir", default=None,
                   help="profile extra steps per training setup (repeat 0) with torch.profiler: summary in the "
                        "results, top-ops tables (and Chrome traces) in this folder")
    p.add_argument("--profile-steps", type=int, default=2, help="steps profiled per setup (default 2)")
    p.add_argument("--profile-stack", action="store_true",
                   help="record Python stacks while profiling: time per genlora function (slower steps)")
    p.add_argument("--profile-no-trace", action="store_true", help="no Chrome trace files (they can be large)")
    p.add_argument("--profile-after", action="store_true",
                   help="profile in a pass after the timed repeats instead of inside repeat 0: plain first, then the "
                        "setups that missed a target (worst first), then the rest, each on a short run (1 warm-up "
                        "step; LoRASC: 4 short stages first) while the deadline allows; measurements come first")
    p.add_argument("--deadline", type=float, default=None,
                   help="Unix time: start no setup whose estimated cost would end after it (results so far kept)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds from now; same as --deadline")
    p.add_argument("--out", default="bench/out", help="folder for results.json and results.md")
    p.add_argument("--quiet", action="store_true", help="do not print the Markdown table at the end")
    p.add_argument("--list", action="store_true", help="print the setups and exit")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    for key in ("steps", "warmup", "batch_size", "seq_len", "lora_r"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        p.error("--steps >= 1, --warmup >= 0 and --repeats >= 1 are required")
    if args.time_budget is not None:
        deadline = time.time() + args.time_budget
        args.deadline = deadline if args.deadline is None else min(args.deadline, deadline)
    return args


def profile_pass(runner: Runner, group: list[dict[str, Any]], runs: list[dict[str, Any]], result: dict[str, Any],
                 write) -> None:
    """--profile-after: profiles of the group's training setups on short runs, most useful first, within the
    deadline. The short runs' timings are discarded; their profiles go to result["profiles"] (and into the rows)."""
    args = runner.args
    rows = {r["name"]: r for r in aggregate(runs, group)}

    def miss(name) -> float:
        r = rows.get(name, {})
        worst = 0.0
        for ratio, target in ((r.get("ratio_time"), r.get("target_time")), (r.get("ratio_mem"), r.get("target_mem"))):
            if ratio is not None and target is not None:
                worst = max(worst, ratio / target)
        return worst

    train = [s for s in group if s.get("kind") != "inference" and s["name"] in rows]
    baselines = [s for s in train if not s.get("methods")]
    others = sorted((s for s in train if s.get("methods")), key=lambda s: -miss(s["name"]))
    short = copy.copy(args)
    short.steps, short.warmup, short.phase_steps, short.profile_after = 1, 1, 0, False
    saved_args, saved_repeat = runner.args, runner.repeat
    runner.args, runner.repeat = short, 0
    profiles = result.setdefault("profiles", {})
    try:
        for setup in baselines + others:
            step = rows[setup["name"]]["step_s_median"]
            est = plan_steps(setup, short)["total"] * step * 1.2 + runner.profile_cost_s + runner.overhead_s
            if args.deadline and time.time() + est > args.deadline:
                result.setdefault("profiles_not_run", []).append(setup["name"])
                continue
            t0 = time.perf_counter()
            try:
                with setup_env(setup):
                    row = runner.train_setup(setup)
            except Stop:
                raise
            except Exception as err:
                profiles[setup["name"]] = {"error": f"{type(err).__name__}: {err}"[:500]}
                continue
            prof = row.get("profile") or {"error": "no profile"}
            prof["short_run"] = {"steps_total": row["steps_total"], "wall_s": time.perf_counter() - t0,
                                 "slow_rank": row.get("slow_rank")}
            profiles[setup["name"]] = prof
            print(f"[bench] profiled {setup['name']:<18} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr,
                  flush=True)
            write()
    finally:
        runner.args, runner.repeat = saved_args, saved_repeat


def _raise_stop(signum, frame):
    raise Stop(f"signal {signal.Signals(signum).name}")


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
    threads_before = torch.get_num_threads()
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
    noise_path = flat_noise_path(device)  # under the process's own GENLORA_TRITON, before any setup changes it
    result: dict[str, Any] = {
        "environment": environment(device),
        "config": {
            "preset": args.preset, "model": PRESETS[args.preset]["model"], "n_base_params": None,
            "n_trainable_params": None, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "lora_r": args.lora_r, "dtype": args.dtype, "steps": args.steps, "warmup": args.warmup,
            "phase_steps": args.phase_steps, "repeats": args.repeats, "burn_in": args.burn_in, "lr": args.lr,
            "seed": args.seed, "deadline": args.deadline,
            "profile_steps": args.profile_steps if args.profile_dir else None, "profile_stack": args.profile_stack,
            "memory_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "sampled_rss",
            "argv": sys.argv[1:] if argv is None else list(argv),
        },
        "flat_noise_path": noise_path,
        "setups": [s["name"] for s in chosen],
        "rows": [], "runs": [], "skipped": skipped, "not_run": [], "errors": [], "stopped": None,
        "complete": False, "repeats_done": 0, "wall_s": 0.0,
    }
    runs: list[dict[str, Any]] = result["runs"]
    os.makedirs(args.out, exist_ok=True)

    def write() -> None:
        result["rows"] = aggregate(runs, chosen)
        for row in result["rows"]:  # profiles of a --profile-after pass
            if "profile" not in row and row["name"] in result.get("profiles", {}):
                row["profile"] = result["profiles"][row["name"]]
        result["wall_s"] = time.perf_counter() - t_start
        tmp = os.path.join(args.out, "results.json.tmp")
        slim = {k: v for k, v in result.items() if k != "profiles"}  # the profiles are in the rows
        slim["runs"] = [{k: v for k, v in r.items() if k != "profile"} for r in runs]
        with open(tmp, "w") as f:
            json.dump(slim, f, indent=2, default=str)
        os.replace(tmp, os.path.join(args.out, "results.json"))
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(markdown(result))

    def not_run(setup, repeat, reason):
        result["not_run"].append({"name": setup["name"], "repeat": repeat, "reason": reason})

    groups = [(None, [s for s in chosen if s.get("base") != "4bit"]),
              ("4bit", [s for s in chosen if s.get("base") == "4bit"])]
    old_term = signal.signal(signal.SIGTERM, _raise_stop) if threading.current_thread() is threading.main_thread() \
        else None
    build_s = None
    try:
        write()
        for quant, group in groups:
            if not group:
                continue
            if quant == "4bit":
                problem = bitsandbytes_problem()
                if problem is None and device.type == "cpu" and dtype == torch.float16:
                    problem = "4-bit base on CPU needs bf16/fp32 compute"
                if problem:
                    skipped.extend({"name": s["name"], "reason": problem} for s in group)
                    continue
                if args.deadline and build_s and time.time() + 3 * build_s > args.deadline:
                    for s in group:
                        not_run(s, 0, "time budget (4-bit model build)")
                    continue
            t_build = time.perf_counter()
            runner = Runner(args, device, dtype, quant)
            build_s = build_s or time.perf_counter() - t_build
            if quant is None:
                result["config"]["n_base_params"] = runner.n_base
                result["config"]["n_trainable_params"] = runner.n_trainable
            else:
                result["config"]["n_trainable_params_4bit"] = runner.n_trainable
            try:
                if args.burn_in:  # untimed plain steps first: allocator, kernel caches and clocks warm for all setups
                    burn = copy.copy(args)
                    burn.warmup, burn.steps, burn.phase_steps, burn.profile_dir = 0, args.burn_in, 0, None
                    saved, runner.args = runner.args, burn
                    try:
                        row = runner.train_setup({"name": "burn-in", "methods": []})
                        runner.step_estimate_s = row["step_s_min"]
                    finally:
                        runner.args = saved
                unsupported: set[str] = set()
                for repeat in range(args.repeats):
                    runner.repeat = repeat
                    cut = False
                    for setup in group:
                        if setup["name"] in unsupported:
                            continue
                        est = runner.estimate_s(setup)
                        if args.deadline and time.time() + est > args.deadline:
                            not_run(setup, repeat, f"time budget (estimated {est:.0f} s)")
                            cut = True
                            if setup["name"] in ("plain", "qlora_plain"):
                                break  # no baseline in this repeat: its ratios would be missing anyway
                            continue
                        t0 = time.perf_counter()
                        try:
                            with setup_env(setup):
                                row = (runner.ensemble_setup(setup) if setup.get("kind") == "inference"
                                       else runner.train_setup(setup))
                        except SetupUnsupported as err:
                            skipped.append({"name": setup["name"], "reason": str(err)[:500]})
                            unsupported.add(setup["name"])
                            continue
                        except Stop:
                            raise
                        except Exception as err:  # one broken setup must not cost the others
                            result["errors"].append({"name": setup["name"], "repeat": repeat,
                                                     "error": f"{type(err).__name__}: {err}"[:1000],
                                                     "traceback": traceback.format_exc()[-4000:]})
                            unsupported.add(setup["name"])
                            print(f"[bench] repeat {repeat} {setup['name']}: ERROR {type(err).__name__}: {err}",
                                  file=sys.stderr, flush=True)
                            continue
                        wall = time.perf_counter() - t0
                        row["repeat"] = repeat
                        row["wall_s"] = wall
                        runner.walls.setdefault(setup["name"], []).append(wall)
                        if setup["name"] == "plain" or (quant and setup["name"] == "qlora_plain"):
                            runner.step_estimate_s = row["step_s_median"]
                        runs.append(row)
                        print(f"[bench] repeat {repeat} {setup['name']:<18} {1e3 * row['step_s_median']:9.2f} ms/step"
                              f"  peak {row['peak_bytes'] / 2**20:9.1f} MiB  base diff {row['base_max_abs_diff']:.3g}"
                              f"  ({wall:.1f} s, estimated {est:.1f} s)", file=sys.stderr, flush=True)
                        write()
                    if quant is None and not cut:
                        result["repeats_done"] = repeat + 1
                    if cut:
                        break
                if args.profile_dir and args.profile_after:
                    profile_pass(runner, group, runs, result, write)
            finally:
                del runner
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        result["complete"] = True
    except (Stop, KeyboardInterrupt) as err:
        result["stopped"] = str(err) or type(err).__name__
        print(f"[bench] stopped: {result['stopped']}; writing the results so far", file=sys.stderr, flush=True)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if args.threads and device.type == "cpu" and argv is not None:
            torch.set_num_threads(threads_before)
    write()
    if not args.quiet:
        print(markdown(result))
    return result


if __name__ == "__main__":
    sys.exit(1 if main().get("errors") else 0)
