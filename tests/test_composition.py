"""All four methods in one Trainer run (spec 5.2 order), saved and reloaded as a plain PEFT adapter."""

import os
import subprocess
import sys

import torch
from conftest import ListDataset, base_weights
from test_integrations import LOAD_WITH_PLAIN_PEFT, learnable_base, pattern_batches

import genlora


def test_all_four_through_the_trainer_save_and_reload_with_plain_peft(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    base = learnable_base()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    frozen = base_weights(model)
    lorasc = genlora.LoRASC(alpha=0.8, noise_lambda=0.05)  # 3 stages over the Trainer's max_steps
    flat = genlora.FlatLoRA(sigma=0.05)
    rm = genlora.RMLoRA(k=2, reg_lambda=0.1)
    dropout = genlora.LoRADropout(p=0.1, n_train=2, deploy="merged_expectation")
    handle = genlora.attach(model, dropout, rm, flat, lorasc, guard_base=True)
    # spec 5.2: the stage change first, then the step's Flat-LoRA draw (its row norms see the new slow weights)
    assert [m.name for m in handle.methods][:2] == ["lorasc", "flat_lora"]

    # Spy on the order of events inside each step.
    events = []
    for m in handle.methods:
        for hook in ("begin_step", "pre_optimizer_step"):
            original = getattr(m, hook)

            def spy(step, _orig=original, _name=f"{m.name}.{hook}"):
                events.append(_name)
                return _orig(step)

            setattr(m, hook, spy)

    examples = [{k: v[i] for k, v in b.items()} for b in pattern_batches(6, batch=8) for i in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
        max_grad_norm=1.0, learning_rate=1e-3, num_train_epochs=3, report_to=[], use_cpu=True, save_strategy="no",
        seed=0,
    )
    trainer = genlora.GenLoRATrainer(model=model, args=args, train_dataset=ListDataset(examples), genlora_handle=handle)
    trainer.train()
    assert handle.global_step == 18 and handle.steps_per_epoch == 6
    assert lorasc.stage == 2 and lorasc.slow_rank(handle.slots[0]) == 8  # two merged experts of rank 4
    names = [m.name for m in handle.methods]
    assert events[:8] == [f"{n}.begin_step" for n in names] + [f"{n}.pre_optimizer_step" for n in names]
    assert all(torch.equal(frozen[k], v) for k, v in base_weights(model).items())

    handle.save_pretrained(tmp_path / "adapter")
    import json

    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 12 and cfg["lora_alpha"] == 12  # rank T*r with scaling 1
    ids = pattern_batches(1, seed=7)[0]["input_ids"]
    torch.save(ids, tmp_path / "ids.pt")
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    script = tmp_path / "load.py"
    script.write_text(LOAD_WITH_PLAIN_PEFT)
    subprocess.run([sys.executable, str(script), str(tmp_path / "base"), str(tmp_path / "adapter"),
                    str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                   check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    got = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
