"""The contract every registered method (and the combination of all of them) must keep, in the spirit of PEFT's
common tester: one battery, parametrized over `genlora.registry.METHODS` plus "all". A new method adds one file and
one row to ROWS: how to build it for the probe model, and the law that shows it acts.

The probe is a PEFT LoRA model with a wide first layer (fan-in 1024) and a large B, so that s*B*A changes the merged
rows' norms by tens of percent: a law check can tell W' from W.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import ListDataset
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from torch import nn

import genlora
from genlora.registry import METHODS

N_IN, HIDDEN, N_CLASSES, R = 1024, 64, 8, 4


class Probe(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.lin0 = nn.Linear(N_IN, HIDDEN, dtype=dtype)
        self.lin1 = nn.Linear(HIDDEN, N_CLASSES, dtype=dtype)

    def forward(self, x, labels=None):
        logits = self.lin1(torch.relu(self.lin0(x)))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.float(), labels)
        return out


def probe(seed=0, dtype=torch.float32) -> PeftModel:
    """The probe with its weights from `seed`; the global RNG (and so the methods' derived seeds) is left alone."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = get_peft_model(Probe(dtype), LoraConfig(r=R, lora_alpha=2 * R, target_modules=["lin0", "lin1"]))
    with torch.no_grad():  # a large B: s*B*A is comparable to W in the merged rows
        g = torch.Generator().manual_seed(seed + 100)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((0.5 * torch.randn(p.shape, generator=g)).to(p.dtype))
    return model


def batch(i: int, n: int = 8, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 + i)
    return {"x": torch.randn(n, N_IN, generator=g).to(dtype), "labels": torch.randint(0, N_CLASSES, (n,), generator=g)}


# --- the laws: each shows that its method acts, also next to the others ----------------------------------------------
def flat_law(model, handle, method):
    """Row i of eps has std sigma * ||W'_i|| / sqrt(n_in), W' = W + every live low-rank term, and the training forward
    of the base layer uses exactly W + eps."""
    slot = handle.slots[0]  # lin0: fan-in 1024
    eps = method.noise(slot)
    w = slot.base_layer.weight.float()
    merged = w + sum(u.float() @ v.float() for u, v in handle.live_factors(slot))
    expected = method.config.sigma * merged.norm(dim=1) / math.sqrt(N_IN)
    ratio = eps.std(dim=1) / expected
    assert (ratio - 1).abs().max() < 5 / math.sqrt(2 * N_IN), "per-row std off the law"
    assert abs(ratio.mean().item() - 1) < 5 / math.sqrt(2 * N_IN * HIDDEN), "pooled std off the law"
    plain_norm = w.norm(dim=1) * method.config.sigma / math.sqrt(N_IN)
    assert (eps.std(dim=1) / plain_norm - 1).abs().mean() > 0.1  # the law needs W', not W: the probe tells them apart
    x = torch.randn(3, N_IN)
    others = [m.draw_for(t, slot.dense_weight()) for m in handle.methods if m is not method and m.perturbs_base()
              for t in handle.perturber.targets[:1]]
    if not any(d is not None for d in others):
        assert torch.equal(slot.base_layer(x), F.linear(x, w + eps, slot.base_layer.bias))


def rm_law(model, handle, method):
    """After clipping, exactly k of r rank components of every A (and, v1, the same ones of B) keep a gradient; the
    regularizer is in the step's loss."""
    assert len(method.last_keep) == len(handle.slots)
    for slot, (keep_a, keep_b) in zip(handle.slots, method.last_keep):
        a_rows = slot.a_weight.grad.abs().sum(1) > 0
        b_cols = slot.b_weight.grad.abs().sum(0) > 0
        k = method.k_for(slot)
        assert int(a_rows.sum()) == k == int(keep_a.sum()) and torch.equal(a_rows, keep_a), slot.name
        assert torch.equal(b_cols, keep_b) and torch.equal(keep_a, keep_b), slot.name


def dropout_law(model, handle, method, seen):
    """The training forward fed lora_A the input times m_A and took lora_B's output times m_B (captured by hooks
    registered after attach, for the step's masks)."""
    kept = []
    for slot in handle.slots:
        x, x_masked, out = seen[slot.name]
        m_a, m_b = method.train_masks(slot, handle.global_step, 0, 0)
        assert torch.equal(x_masked, x * m_a), slot.name
        want = F.linear(F.linear(x_masked, slot.lora_A.weight), slot.lora_B.weight) * m_b
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
        kept += [m_a, m_b]
    kept = torch.cat(kept)  # 1024 + 64 + 64 + 8 features: the dropped share is p
    p = method.config.p
    assert abs((kept == 0).float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / kept.numel())


def lorasc_law(model, handle, method, before):
    """At the boundary S gains alpha * c * s*B*A of the finished expert (c: the expectation of the update it was
    trained with), B restarts at 0, and the stage noise has the uniform law (lambda std(W) / sqrt(12))."""
    assert method.stage == 1
    c = 1.0
    for m in handle.methods:
        if m is not method:
            c *= m.expected_update_scale()
    for slot, fast in zip(handle.slots, before):
        u, v = method.frozen_delta_factors(slot)[0]
        torch.testing.assert_close(u @ v, method.config.alpha * c * fast, rtol=1e-4, atol=1e-6)
        assert not slot.b_weight.any()
    slot = handle.slots[0]
    xi = method.noise(slot)
    w = slot.base_layer.weight.double()
    want = method.config.noise_lambda * w.std().item() / math.sqrt(12)
    assert abs(xi.std().item() / want - 1) < 0.02 and xi.abs().max() <= 0.5 * want * math.sqrt(12) + 1e-6


@dataclass
class Row:
    make: Callable[[bool], genlora.Method]  # combined -> method (the combination needs LoRA Dropout's expectation)
    law: Callable


ROWS: dict[str, Row] = {
    "flat_lora": Row(lambda combined: genlora.FlatLoRA(sigma=0.3, schedule="constant"), flat_law),
    "rm_lora": Row(lambda combined: genlora.RMLoRA(k=2, reg_lambda=0.1), rm_law),
    "lorasc": Row(lambda combined: genlora.LoRASC(alpha=0.5, stage_steps=2, noise_lambda=0.2), lorasc_law),
    "lora_dropout": Row(lambda combined: genlora.LoRADropout(
        p=0.3, deploy="merged_expectation" if combined else "ensemble"), dropout_law),
}
SETUPS = sorted(METHODS) + ["all"]


def methods_for(setup: str) -> list[genlora.Method]:
    if setup == "all":
        return [ROWS[name].make(True) for name in sorted(ROWS)]
    return [ROWS[setup].make(False)]


def attach(model, setup, total_steps=6, **kw):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    handle = genlora.attach(model, *methods_for(setup), total_steps=total_steps, optimizer=opt, **kw)
    return handle, opt


def train(model, handle, opt, steps, start=0):
    model.train()
    for i in range(start, start + steps):
        handle.begin_step()
        for inst in handle.train_instances():
            inst.backward(model(**batch(i))["loss"])
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        handle.optimizer_step(opt)
        opt.zero_grad()


def test_every_registered_method_has_a_contract_row():
    assert set(ROWS) == set(METHODS), "add a row to ROWS for every registered method"


# --- 1. the method acts (each member of the combination too) --------------------------------------------------------
@pytest.mark.parametrize("setup", SETUPS)
def test_the_method_acts_by_its_law(setup):
    model = probe()
    handle, opt = attach(model, setup)
    by_name = {m.name: m for m in handle.methods}
    train(model, handle, opt, 2)  # LoRASC: stage 0 ends here
    before = [u.float() @ v.float() for u, v in (s.trained_factors() for s in handle.slots)]
    seen = {}
    hooks = []
    if "lora_dropout" in by_name:
        for slot in handle.slots:
            def pre_layer(mod, args, _n=slot.name):
                seen[_n] = [args[0]]

            def pre_a(mod, args, _n=slot.name):
                seen[_n].append(args[0])

            def post_b(mod, args, out, _n=slot.name):
                seen[_n].append(out)

            hooks += [slot.layer.register_forward_pre_hook(pre_layer), slot.lora_A.register_forward_pre_hook(pre_a),
                      slot.lora_B.register_forward_hook(post_b)]
    model.train()
    handle.begin_step()
    if "lorasc" in by_name:
        lorasc_law(model, handle, by_name["lorasc"], before)
    if "flat_lora" in by_name:
        flat_law(model, handle, by_name["flat_lora"])
    for inst in handle.train_instances():
        inst.backward(model(**batch(9))["loss"])
    for h in hooks:
        h.remove()
    if "lora_dropout" in by_name:
        dropout_law(model, handle, by_name["lora_dropout"], seen)
    handle.pre_optimizer_step()
    if "rm_lora" in by_name:
        rm_law(model, handle, by_name["rm_lora"])
    opt.step()
    handle.post_optimizer_step()


@pytest.mark.parametrize("setup", SETUPS)
def test_the_step_differs_from_plain_lora(setup):
    """Attached, the first step's update differs from plain PEFT LoRA's on the same batch (every method changes the
    step: noise, masks, regularizer, or a fresh stage)."""
    def one_step(with_methods):
        model = probe()
        if with_methods:
            handle, opt = attach(model, setup, total_steps=2)
            train(model, handle, opt, 2)
        else:
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            for i in range(2):
                model(**batch(i))["loss"].backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad()
        return get_peft_model_state_dict(model)

    with_m, plain = one_step(True), one_step(False)
    assert any(not torch.allclose(with_m[k], plain[k]) for k in plain)


# --- 2. attach / detach ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setup", SETUPS)
def test_attach_then_detach_restores_the_model_exactly(setup):
    model = probe()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    attrs = {id(m): dict(m.__dict__) for m in model.modules()}
    x = batch(0)["x"]
    model.eval()
    with torch.no_grad():
        out = model(x=x)["logits"]
    handle, _ = attach(model, setup)
    handle.detach()
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    for m in model.modules():
        assert set(m.__dict__) == set(attrs[id(m)]), type(m).__name__  # no patched forward/save_pretrained left
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x=x)["logits"], out)


# --- 3. state round trip, 6. resume --------------------------------------------------------------------------------
@pytest.mark.parametrize("setup", SETUPS)
def test_resume_from_saved_training_state_is_bit_identical(setup, tmp_path):
    torch.manual_seed(5)
    model = probe()
    handle, opt = attach(model, setup)
    train(model, handle, opt, 6)
    full = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}

    torch.manual_seed(5)  # the same global seed: the same derived method seeds
    model = probe()
    handle, opt = attach(model, setup)
    train(model, handle, opt, 3)
    genlora.save_training_state(tmp_path / "ckpt.pt", handle, opt)
    torch.manual_seed(123)  # a resumed process may run under another global seed: the run's seeds come from the file
    model = probe()
    handle, opt = attach(model, setup)
    genlora.load_training_state(tmp_path / "ckpt.pt", handle, opt)
    assert handle.global_step == 3
    train(model, handle, opt, 3, start=3)
    resumed = get_peft_model_state_dict(model)
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


# --- 4. the frozen base ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_base_weights_stay_bit_identical(setup, dtype):
    model = probe(dtype=dtype)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    handle, opt = attach(model, setup, guard_base=True)
    model.train()
    for i in range(6):
        handle.begin_step()
        for inst in handle.train_instances():
            b = batch(i, dtype=dtype)
            inst.backward(model(**b)["loss"])
        handle.optimizer_step(opt)
        opt.zero_grad()
    handle.verify_base()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


# --- 5. every save path: the deployed model, loadable by plain PEFT ----------------------------------------------------
def reload_error(folder, live) -> float:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        base = Probe()  # the same base weights (seed 0)
    loaded = PeftModel.from_pretrained(base, folder).eval()  # no genlora involved
    x = batch(77)["x"]
    live.eval()
    with torch.no_grad():
        want, got = live(x=x)["logits"], loaded(x=x)["logits"]
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("setup", SETUPS)
def test_every_save_path_writes_the_deployed_model(setup, tmp_path):
    model = probe()
    handle, opt = attach(model, setup, total_steps=5)
    train(model, handle, opt, 5)  # LoRASC: 2 slow experts + the fast one
    handle.save_pretrained(tmp_path / "handle")
    model.save_pretrained(tmp_path / "model")  # the habit: PEFT's own call
    for path in ("handle", "model"):
        assert reload_error(tmp_path / path, model) < 1e-6, path
    merged = handle.merged_model().eval()
    with torch.no_grad():
        x = batch(77)["x"]
        torch.testing.assert_close(merged(x=x)["logits"], model.eval()(x=x)["logits"], rtol=1e-5, atol=1e-6)
    if handle.transforms_model():  # PEFT's own merge would give another model: refused
        with pytest.raises(RuntimeError, match="merged_model"):
            model.merge_and_unload()
        with pytest.raises(ValueError, match="deployed model"):  # and its deployed adapter is not a training state
            model.load_adapter(str(tmp_path / "model"), "default")


@pytest.mark.parametrize("setup", SETUPS)
def test_trainer_checkpoints_and_save_model_are_the_deployed_model(setup, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = probe()
    handle = genlora.attach(model, *methods_for(setup))
    data = [{"x": b["x"][i], "labels": b["labels"][i]} for b in (batch(i, n=4) for i in range(6)) for i in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=6,
                             save_steps=3, save_strategy="steps", learning_rate=1e-2, report_to=[], use_cpu=True,
                             disable_tqdm=True, save_only_model=True)
    trainer_cls = genlora.GenLoRATrainer if handle.passes_per_batch() > 1 else Trainer
    kw = {"genlora_handle": handle} if trainer_cls is not Trainer else {"callbacks": [genlora.GenLoRACallback(handle)]}
    trainer = trainer_cls(model=model, args=args, train_dataset=ListDataset(data), **kw)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert reload_error(tmp_path / "final", model) < 1e-6
    assert (tmp_path / "out" / "checkpoint-6" / "genlora_state.pt").exists()
    assert reload_error(tmp_path / "out" / "checkpoint-6", model) < 1e-6


# --- 7. seeds follow the run -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setup", SETUPS)
def test_seeds_follow_the_global_seed_unless_pinned(setup):
    def run(global_seed, pin=None):
        torch.manual_seed(global_seed)
        model = probe()
        methods = methods_for(setup)
        if pin is not None:
            for m in methods:
                m.config.seed = pin
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        handle = genlora.attach(model, *methods, total_steps=6, optimizer=opt)
        train(model, handle, opt, 3)
        return [m.seed for m in handle.methods], get_peft_model_state_dict(model)

    seeds_a, a = run(1)
    seeds_b, b = run(1)
    seeds_c, c = run(2)
    assert seeds_a == seeds_b and all(torch.equal(a[k], b[k]) for k in a)  # the same seed: the same run
    assert all(x != y for x, y in zip(seeds_a, seeds_c))  # a new global seed: every method's stream changes
    assert any(not torch.equal(a[k], c[k]) for k in a)
    pinned_1, p1 = run(1, pin=7)
    pinned_2, p2 = run(2, pin=7)
    assert pinned_1 == pinned_2 == [7] * len(pinned_1)
