"""Trains a tiny model with all methods, checkpointing after every step; used by test_kill_resume.py.

usage: python kill_resume_train.py OUT_DIR STEPS [--resume]
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_llama_peft  # noqa: E402
from peft import get_peft_model_state_dict  # noqa: E402

import genlora  # noqa: E402
from genlora.checkpoint import load_training_state, save_training_state  # noqa: E402

out, steps, resume = sys.argv[1], int(sys.argv[2]), "--resume" in sys.argv
os.makedirs(out, exist_ok=True)
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
model = make_llama_peft(seed=0)
methods = [genlora.LoRASC(stage_steps=4, alpha=0.7), genlora.FlatLoRA(sigma=0.1), genlora.RMLoRA(k=2),
           genlora.LoRADropout(p=0.1, deploy="merged_expectation")]
handle = genlora.attach(model, *methods, total_steps=steps)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.1, total_iters=steps)
handle.bind_optimizer(opt)
ckpt = os.path.join(out, "checkpoint.pt")
start = 0
if resume and os.path.exists(ckpt):
    start = load_training_state(ckpt, handle, opt, sched)["next_step"]
g = torch.Generator().manual_seed(0)
data = [torch.randint(1, 64, (2, 10), generator=g) for _ in range(steps)]
model.train()
for step in range(start, steps):
    handle.begin_step()
    model(input_ids=data[step], labels=data[step]).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    handle.optimizer_step(opt)
    opt.zero_grad()
    sched.step()
    save_training_state(ckpt, handle, opt, sched, extra={"next_step": step + 1})
    time.sleep(float(os.environ.get("STEP_SLEEP", "0")))
torch.save(get_peft_model_state_dict(model), os.path.join(out, "final.pt"))
