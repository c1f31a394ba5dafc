"""Kill a training process (SIGKILL) at arbitrary points, resume from its checkpoint file, and get the
bit-identical adapter of an uninterrupted run."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "kill_resume_train.py")
STEPS = 12


def run(out, *extra, env=None):
    return subprocess.run([sys.executable, SCRIPT, str(out), str(STEPS), *extra], check=True, env=env)


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    run(tmp_path / "full")
    full = torch.load(tmp_path / "full" / "final.pt")
    out = tmp_path / "killed"
    out.mkdir()
    env = {**os.environ, "STEP_SLEEP": "0.05"}
    rng = random.Random(0)
    kills = 0
    for _ in range(3):  # kill it three times at random instants, resuming each time
        proc = subprocess.Popen([sys.executable, SCRIPT, str(out), str(STEPS), "--resume"], env=env)
        deadline = time.time() + 60
        while not (out / "checkpoint.pt").exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        # whatever instant the kill hit, the checkpoint file is whole (a torn write would fail to load below)
    assert kills >= 1
    run(out, "--resume", env=env)
    resumed = torch.load(out / "final.pt")
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_corrupt_checkpoint_is_refused_and_kept(tmp_path):
    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import make_llama_peft

    import genlora
    from genlora.checkpoint import load_training_state, save_training_state

    model = make_llama_peft()
    handle = genlora.attach(model, genlora.FlatLoRA(sigma=0.1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    path = tmp_path / "ckpt.pt"
    save_training_state(path, handle, opt, extra={"next_step": 0})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="not a readable genlora checkpoint"):
        load_training_state(path, handle, opt)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    handle.detach()
    other = genlora.attach(model, genlora.RMLoRA(k=2))
    path.write_bytes(data)
    with pytest.raises(ValueError, match="saved state is for methods"):
        load_training_state(path, other, opt)
    assert path.read_bytes() == data
