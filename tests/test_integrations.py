"""The plain loop of the README (run verbatim), the transformers Trainer, and save/load with plain PEFT."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ListDataset, base_weights, tiny_llama_config

import genlora

ROOT = Path(__file__).resolve().parents[1]


def readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README has no python block after <!-- {marker} -->"
    return match.group(1)


CYCLE = torch.tensor([5, 9, 13, 2, 31, 47])


def pattern_batches(n_batches, batch=8, length=12, seed=0):
    """A learnable language: every sequence walks a fixed cycle of six tokens from a random phase."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        phase = torch.randint(0, len(CYCLE), (batch, 1), generator=g)
        ids = CYCLE[(phase + torch.arange(length)) % len(CYCLE)]
        out.append({"input_ids": ids, "labels": ids})
    return out


def learnable_base(seed=0):
    """A tiny random Llama whose weights are large enough (init std 0.2) for LoRA to move its loss in ~50 steps."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_llama_config()
    cfg.initializer_range = 0.2
    return LlamaForCausalLM(cfg)


def eval_loss(model, batches):
    model.eval()
    with torch.no_grad():
        return sum(model(**b).loss.item() for b in batches) / len(batches)


def test_readme_plain_loop_runs_verbatim_and_learns(tmp_path, monkeypatch):
    base_model = learnable_base()
    num_steps = 60
    train_loader = pattern_batches(num_steps)
    held_out = pattern_batches(4, seed=99)
    before_base = base_weights(base_model)
    loss_before = eval_loss(base_model, held_out)
    monkeypatch.chdir(tmp_path)
    namespace = {"base_model": base_model, "num_steps": num_steps, "train_loader": train_loader}
    exec(readme_block("plain-loop-example"), namespace)
    model, handle = namespace["model"], namespace["handle"]
    assert handle.global_step == num_steps
    assert eval_loss(model, held_out) < 0.8 * loss_before
    rm = handle.method("rm_lora")
    assert rm.last_keep and all(int(ka.sum()) == 4 for ka, _ in rm.last_keep)
    assert handle.method("flat_lora").last_sigma > 0.04  # ramped up to sigma = 0.05 by the end
    after_base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in base_weights(model).items()}
    assert all(torch.equal(before_base[k], after_base[k]) for k in before_base)
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "my-adapter" / genlora.GENLORA_CONFIG_NAME).exists()


def test_readme_accelerate_loop_runs_verbatim_and_learns(tmp_path, monkeypatch):
    base_model = learnable_base()
    num_steps = 40
    examples = [{k: v[i] for k, v in b.items()} for b in pattern_batches(num_steps) for i in range(8)]
    train_loader = torch.utils.data.DataLoader(ListDataset(examples), batch_size=8)
    held_out = pattern_batches(4, seed=99)
    loss_before = eval_loss(base_model, held_out)
    monkeypatch.chdir(tmp_path)
    namespace = {"base_model": base_model, "num_steps": num_steps, "train_loader": train_loader}
    exec(readme_block("accelerate-example"), namespace)
    handle, accelerator = namespace["handle"], namespace["accelerator"]
    model = accelerator.unwrap_model(namespace["model"])
    assert handle.global_step == num_steps and handle.passes_per_batch() == 2
    assert eval_loss(model, held_out) < 0.8 * loss_before
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(learnable_base(), tmp_path / "my-adapter")
    ids = held_out[0]["input_ids"]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, model(input_ids=ids).logits)


def test_trainer_with_grad_accumulation_and_clipping(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(learnable_base(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    examples = [{k: v[i] for k, v in b.items()} for b in pattern_batches(40, batch=8) for i in range(8)]
    held_out = pattern_batches(4, seed=99)
    loss_before = eval_loss(model, held_out)
    before = base_weights(model)
    flat = genlora.FlatLoRA(sigma=0.05)
    rm = genlora.RMLoRA(k=4, reg_lambda=0.1)
    handle = genlora.attach(model, flat, rm)
    seen_steps = []
    orig_begin = handle.begin_step

    def spy_begin():
        seen_steps.append((handle.global_step, handle.forward_index))
        orig_begin()

    handle.begin_step = spy_begin
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_grad_norm=1.0,
        learning_rate=1e-3,
        num_train_epochs=1,
        lr_scheduler_type="constant",
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ListDataset(examples), callbacks=[genlora.GenLoRACallback(handle)])
    trainer.train()
    assert handle.total_steps == trainer.state.max_steps == 40
    assert handle.global_step == 40 and len(seen_steps) == 40
    assert handle.forward_index == 1  # two micro-steps per optimizer step, one begin_step for both
    assert handle.in_step is False
    assert flat.last_sigma > 0.04 and rm.last_keep
    assert eval_loss(model, held_out) < 0.8 * loss_before
    after = base_weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    saved = json.loads((tmp_path / "out" / genlora.GENLORA_CONFIG_NAME).read_text())
    assert [m["method"] for m in saved["methods"]] == ["flat_lora", "rm_lora"]


def test_trainer_without_model_loss_fails_clearly(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(tiny_llama_config()), LoraConfig(r=4, target_modules=["q_proj"]))
    handle = genlora.attach(model, genlora.RMLoRA(k=2))
    examples = [{k: v[i] for k, v in b.items()} for b in pattern_batches(2, batch=4) for i in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
                             use_cpu=True, save_strategy="no", label_smoothing_factor=0.1)
    trainer = Trainer(model=model, args=args, train_dataset=ListDataset(examples), callbacks=[genlora.GenLoRACallback(handle)])
    with pytest.raises(RuntimeError, match="reached no backpropagated loss"):
        trainer.train()


LOAD_WITH_PLAIN_PEFT = r"""
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained(sys.argv[1])
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
ids = torch.load(sys.argv[3])
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, sys.argv[4])
assert not any(name.startswith("genlora") for name in sys.modules), "genlora was imported"
"""


def test_saved_adapter_loads_with_plain_peft_in_fresh_process(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config())
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]))
    handle = genlora.attach(model, genlora.FlatLoRA(sigma=0.1, schedule="constant"), genlora.RMLoRA(k=2))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for batch in pattern_batches(8):
        handle.begin_step()
        model(**batch).loss.backward()
        handle.optimizer_step(opt)
        opt.zero_grad()
    handle.save_pretrained(tmp_path / "adapter")
    ids = pattern_batches(1, seed=5)[0]["input_ids"]
    torch.save(ids, tmp_path / "ids.pt")
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    script = tmp_path / "load.py"
    script.write_text(LOAD_WITH_PLAIN_PEFT)
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "ids.pt"),
         str(tmp_path / "out.pt")],
        check=True, env=env, cwd=tmp_path,
    )
    got = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the trained adapter differs from the initial one, so the check is not vacuous
    assert handle.slots[0].b_weight.abs().sum() > 0
