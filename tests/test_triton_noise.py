"""Flat-LoRA's Triton noise kernel: the noise law, bit-exact regeneration, fused == unfused.

On a GPU the kernel runs for real (`gpu` marker). Without one, the same checks run on CPU tensors in Triton's
interpreter (TRITON_INTERPRET=1), in a subprocess because the interpreter is chosen when Triton compiles the kernel.
Both skip when triton is not installed (it is not a genlora dependency). The GPU run also trains a small Llama through
the fused and the unfused kernel path (bit-identical losses and gradients); that check's own code runs here with the
kernel off, so it cannot break unnoticed before the rare GPU run. `bash bench/gpu_check.sh` runs the GPU test.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from conftest import needs_install

HERE = os.path.dirname(os.path.abspath(__file__))
HAS_TRITON = importlib.util.find_spec("triton") is not None


@needs_install(HAS_TRITON, "triton (its CPU interpreter)", "bash scripts/setup.sh")
def test_kernel_in_triton_interpreter_on_cpu():
    env = dict(os.environ, TRITON_INTERPRET="1", GENLORA_TRITON="interpret", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "triton_noise_checks.py"), "cpu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0 and "Interpreter" in proc.stderr and "not supported" in proc.stderr:
        pytest.skip(f"this triton's interpreter cannot run the kernel: {proc.stderr[-500:]}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("OK")


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs triton and a CUDA device")
def test_kernel_on_gpu(monkeypatch):
    monkeypatch.setenv("GENLORA_TRITON", "auto")  # the kernel is opt-in until verified on a GPU
    sys.path.insert(0, HERE)
    import triton_noise_checks

    triton_noise_checks.run_all("cuda")


def test_model_check_itself_runs_on_cpu(monkeypatch):
    """The GPU-only model-level check (fused == unfused through a Llama's hooks) runs here with the kernel off, so a
    broken check is found before the rare GPU run, not during it."""
    monkeypatch.setenv("GENLORA_TRITON", "0")
    sys.path.insert(0, HERE)
    import triton_noise_checks

    triton_noise_checks.check_model_fused_vs_unfused("cpu", require_fused=False)
