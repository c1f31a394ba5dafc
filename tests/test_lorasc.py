"""LoRASC: stage boundaries, slow-fast update math, fresh fast LoRA and optimizer state, exact stage noise, exports
(plain PEFT adapter loaded without genlora, dense merge), the docstring's plain-loop and Trainer usage."""

import copy
import inspect
import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import ListDataset, base_weights, make_llama_peft, make_mlp_peft, tiny_llama_config
from peft.tuners.lora import LoraLayer

import genlora
from genlora import LoRASC, LoRASCConfig
from genlora.core.seeding import derive_seed
from genlora.methods.flat_lora import merged_row_norms


# --- helpers --------------------------------------------------------------------------------------------------------
def mlp_data(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=g), torch.randn(n, 4, generator=g)


def adam(model, lr=1e-2):
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)


def mlp_step(model, handle, opt, x, y):
    handle.begin_step()
    loss = F.mse_loss(model(x), y)
    loss.backward()
    handle.optimizer_step(opt)
    opt.zero_grad()
    return loss.item()


def llama_steps(model, handle, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(steps):
        ids = torch.randint(1, 64, (2, 10), generator=g)
        handle.begin_step()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        handle.optimizer_step(opt)
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def slow_dense(lorasc, slot):
    """S (n_out, n_in) fp32 from the held factors; zeros before the first boundary."""
    terms = lorasc.extra_delta_factors(slot)
    if not terms:
        return torch.zeros(slot.base_layer.weight.shape)
    u, v = terms[0]
    return u @ v


def expected_noise(slot, stage, lam, seed=0):
    """NoisyTune noise of one stage, by hand: (U[0, 1) - 1/2) * lambda * std(W)."""
    w = slot.base_layer.weight
    g = torch.Generator().manual_seed(derive_seed(seed, "lorasc_noise", stage, slot.index))
    return (torch.rand(w.shape, generator=g) - 0.5) * (lam * w.double().std().item())


def hook_counts(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def docstring_block(title: str) -> str:
    """The code block that follows the paragraph starting with `title` in LoRASC's docstring."""
    doc = inspect.cleandoc(LoRASC.__doc__)
    match = re.search(rf"^{title}.*?::\n\n((?:    .*\n|\n)+)", doc + "\n", re.M)
    assert match, f"no '{title}' example in LoRASC's docstring"
    return textwrap.dedent(match.group(1))


def token_batches(n, batch=2, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 64, (batch, length), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


# --- config and bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, field, error",
    [
        ({"alpha": 0.0}, "alpha", ValueError),
        ({"alpha": 1.5}, "alpha", ValueError),
        ({"alpha": -0.2}, "alpha", ValueError),
        ({"alpha": float("nan")}, "alpha", ValueError),
        ({"alpha": "0.5"}, "alpha", TypeError),
        ({"stage_steps": 0}, "stage_steps", ValueError),
        ({"stage_steps": 2.5}, "stage_steps", TypeError),
        ({"steps_per_epoch": 0}, "steps_per_epoch", ValueError),
        ({"noise_lambda": -0.1}, "noise_lambda", ValueError),
        ({"noise_mode": "sometimes"}, "noise_mode", ValueError),
        ({"slow_update": "average"}, "slow_update", ValueError),
        ({"seed": -1}, "seed", ValueError),
    ],
)
def test_bad_options_raise_naming_the_field_before_any_change(options, field, error):
    model = make_mlp_peft()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = hook_counts(model)
    with pytest.raises(error, match=field):
        genlora.attach(model, LoRASC(**options))
    with pytest.raises(error, match=field):
        LoRASCConfig(**options)
    assert hook_counts(model) == hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # The range is in the message.
    if error is ValueError and field == "alpha":
        with pytest.raises(ValueError, match=r"\(0\.0, 1\.0\]"):
            LoRASC(**options)


def test_config_defaults_round_trip_and_registry():
    cfg = LoRASCConfig()
    assert (cfg.alpha, cfg.slow_update, cfg.num_stages, cfg.stage_steps, cfg.stage_per_epoch, cfg.noise_mode,
            cfg.noise_scope, cfg.seed) == (0.5, "lookahead", 3, None, False, "transient", "lora", None)
    assert all(LoRASCConfig.help().values())
    again = LoRASCConfig.from_json(LoRASCConfig(alpha=0.8, stage_steps=7, noise_lambda=0.0).to_json())
    assert again == LoRASCConfig(alpha=0.8, stage_steps=7, noise_lambda=0.0)
    assert isinstance(genlora.method_from_dict({"method": "lorasc", "alpha": 1.0}), LoRASC)
    assert LoRASC.phase < genlora.FlatLoRA.phase  # the stage change runs before the step's noise draw
    with pytest.raises(ValueError, match="stage_steps and stage_per_epoch"):
        LoRASCConfig(stage_steps=2, stage_per_epoch=True)


def test_unsupported_layers_are_refused_before_any_change():
    from peft import LoraConfig, get_peft_model

    from conftest import MLP

    torch.manual_seed(0)
    dora = get_peft_model(MLP(), LoraConfig(r=2, target_modules=["lin0"], use_dora=True))
    hooks = hook_counts(dora)
    with pytest.raises(ValueError, match="variant"):
        genlora.attach(dora, LoRASC(stage_steps=1))
    assert hook_counts(dora) == hooks


# --- stage boundaries -----------------------------------------------------------------------------------------------
def run_and_record(model, lorasc, steps, bind=True):
    handle = genlora.attach(model, lorasc)
    opt = adam(model)
    if bind:
        handle.bind_optimizer(opt)
    x, y = mlp_data()
    stages, b_zero = [], []
    for _ in range(steps):
        handle.begin_step()
        stages.append(lorasc.stage)
        b_zero.append(all(bool((s.lora_B.weight == 0).all()) for s in handle.slots))
        F.mse_loss(model(x), y).backward()
        handle.optimizer_step(opt)
        opt.zero_grad()
    return handle, stages, b_zero


def test_boundaries_every_n_steps():
    model = make_mlp_peft()
    lorasc = LoRASC(stage_steps=3, noise_lambda=0.0)
    handle, stages, b_zero = run_and_record(model, lorasc, 10)
    assert stages == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    # B is zero exactly in the steps that start a stage (it trains away from zero within one step)
    assert b_zero == [True, False, False, True, False, False, True, False, False, True]
    assert [lorasc.slow_rank(s) for s in handle.slots] == [3 * 4, 3 * 4]


def test_stage_length_options():
    """Default: num_stages=3 stages of equal length over the run; one stage per epoch and fixed lengths on request."""
    def stages_of(lorasc, steps, **loop):
        model = make_mlp_peft()
        opt = adam(model)
        handle = genlora.attach(model, lorasc, optimizer=opt, **loop)
        x, y = mlp_data()
        seen = []
        for _ in range(steps):
            mlp_step(model, handle, opt, x, y)
            seen.append(lorasc.stage)
        return seen

    assert stages_of(LoRASC(noise_lambda=0.0), 9, total_steps=9) == [0] * 3 + [1] * 3 + [2] * 3
    assert stages_of(LoRASC(noise_lambda=0.0), 10, total_steps=10) == [0] * 4 + [1] * 3 + [2] * 3
    assert stages_of(LoRASC(num_stages=2, noise_lambda=0.0), 5, total_steps=5) == [0] * 3 + [1] * 2
    # the stage count does not follow the data: 50 steps are still 3 stages, not one per epoch
    assert len(set(stages_of(LoRASC(noise_lambda=0.0), 50, total_steps=50, steps_per_epoch=2))) == 3
    per_epoch = stages_of(LoRASC(stage_per_epoch=True, noise_lambda=0.0), 5, steps_per_epoch=2)
    assert per_epoch == [0, 0, 1, 1, 2]
    assert stages_of(LoRASC(stage_per_epoch=True, steps_per_epoch=4, noise_lambda=0.0), 9) == [0] * 4 + [1] * 4 + [2]
    # a fixed length wins over num_stages and needs no run length
    assert stages_of(LoRASC(stage_steps=3, noise_lambda=0.0), 7) == [0, 0, 0, 1, 1, 1, 2]


def test_unknown_stage_length_raises_clearly():
    for lorasc, missing in ((LoRASC(), "total_steps"), (LoRASC(stage_per_epoch=True), "steps_per_epoch")):
        model = make_mlp_peft()
        handle = genlora.attach(model, lorasc, optimizer=adam(model))
        with pytest.raises(RuntimeError, match=missing):
            handle.begin_step()
        assert not handle.in_step


# --- fresh fast LoRA and optimizer state ----------------------------------------------------------------------------
def test_optimizer_state_reset_only_for_the_adapter():
    model = make_llama_peft(task="SEQ_CLS")  # the classifier head is trainable too (modules_to_save)
    lorasc = LoRASC(stage_steps=2, noise_lambda=0.0)
    handle = genlora.attach(model, lorasc)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    handle.bind_optimizer(opt)
    adapter = {id(p) for s in handle.slots for p in (s.lora_A.weight, s.lora_B.weight)}
    others = [p for p in params if id(p) not in adapter]
    assert others  # the score head
    g = torch.Generator().manual_seed(0)

    def step(begin=True):
        ids = torch.randint(1, 64, (2, 8), generator=g)
        if begin:
            handle.begin_step()
        model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
        handle.optimizer_step(opt)
        opt.zero_grad()

    model.train()
    step(), step()
    assert all(float(opt.state[p]["step"]) == 2 for p in params)
    head_state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in others}
    a_before = [s.lora_A.weight for s in handle.slots]
    handle.begin_step()  # step 2: stage boundary
    assert [s.lora_A.weight for s in handle.slots] == a_before  # same Parameter objects: the optimizer still has them
    for s in handle.slots:
        assert s.lora_A.weight not in opt.state and s.lora_B.weight not in opt.state
        assert bool((s.lora_B.weight == 0).all())
    for p in others:  # untouched
        assert all(torch.equal(head_state[id(p)][k], v) for k, v in opt.state[p].items())
    step(begin=False)
    for s in handle.slots:
        assert float(opt.state[s.lora_A.weight]["step"]) == 1 and float(opt.state[s.lora_B.weight]["step"]) == 1
    assert all(float(opt.state[p]["step"]) == 3 for p in others)


def test_fresh_a_is_peft_kaiming_from_own_generator():
    model = make_mlp_peft()
    lorasc = LoRASC(stage_steps=1, noise_lambda=0.0, seed=5)
    handle, _, _ = run_and_record(model, lorasc, 1)
    global_state = torch.random.get_rng_state()
    handle.begin_step()  # step 1: boundary
    assert torch.equal(torch.random.get_rng_state(), global_state)  # the global RNG is never touched
    for slot in handle.slots:
        ref = torch.empty_like(slot.lora_A.weight)
        g = torch.Generator().manual_seed(derive_seed(5, "lorasc_init", 1, slot.index))
        torch.nn.init.kaiming_uniform_(ref, a=math.sqrt(5), generator=g)  # PEFT's init_lora_weights=True
        assert torch.equal(slot.lora_A.weight, ref)
        assert not slot.lora_B.weight.any()


def test_missing_or_wrong_optimizer_raises_without_changes():
    model = make_mlp_peft()
    lorasc = LoRASC(stage_steps=1, noise_lambda=0.0)
    handle = genlora.attach(model, lorasc)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="bind_optimizer"):  # a declared requirement, checked before step 0
        handle.begin_step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert lorasc.stage is None and lorasc.extra_delta_factors(handle.slots[0]) == [] and not handle.in_step
    x, y = mlp_data()

    model = make_mlp_peft()
    lorasc = LoRASC(stage_steps=1, noise_lambda=0.0)
    handle = genlora.attach(model, lorasc)
    opt = adam(model)
    handle.bind_optimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1))
    mlp_step(model, handle, opt, x, y)
    with pytest.raises(RuntimeError, match="does not train the LoRA weights"):
        handle.begin_step()
    assert lorasc.stage == 0


# --- slow-fast update math ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["lookahead", "ema"])
def test_slow_fast_update_math(rule):
    alpha = 0.3
    model = make_mlp_peft()
    lorasc = LoRASC(alpha=alpha, slow_update=rule, stage_steps=2, noise_lambda=0.0)
    handle = genlora.attach(model, lorasc)
    opt = adam(model)
    handle.bind_optimizer(opt)
    x, y = mlp_data()
    for step in range(7):
        if step > 0 and step % 2 == 0:  # about to cross a boundary: remember S and s*B*A
            s_old = [slow_dense(lorasc, s) for s in handle.slots]
            fast = [s.delta_weight() for s in handle.slots]
        mlp_step(model, handle, opt, x, y)
        if step > 0 and step % 2 == 0:
            for slot, so, f in zip(handle.slots, s_old, fast):
                want = so + alpha * f if rule == "lookahead" else (1 - alpha) * so + alpha * f
                torch.testing.assert_close(slow_dense(lorasc, slot), want, rtol=1e-5, atol=1e-6)
    assert lorasc.slow_rank(handle.slots[0]) == 3 * 4  # three boundaries, rank r each (both readings)


def test_ema_with_alpha_one_keeps_only_the_last_expert():
    model = make_mlp_peft()
    lorasc = LoRASC(alpha=1.0, slow_update="ema", stage_steps=1, noise_lambda=0.0)
    handle, _, _ = run_and_record(model, lorasc, 4)
    assert lorasc.slow_rank(handle.slots[0]) == 4


def test_alpha_one_equals_merge_and_reinit_chaining():
    """Reference by hand (ReLoRA's merge_and_reinit): W += s*B*A, A <- kaiming, B <- 0, drop Adam state."""
    steps, every = 7, 3
    x, y = mlp_data()
    model = make_mlp_peft()
    ref = copy.deepcopy(model)

    lorasc = LoRASC(alpha=1.0, stage_steps=every, noise_lambda=0.0, seed=2)
    handle = genlora.attach(model, lorasc)
    opt = adam(model)
    handle.bind_optimizer(opt)
    losses = [mlp_step(model, handle, opt, x, y) for _ in range(steps)]

    ref_opt = adam(ref)
    layers = [m for m in ref.modules() if isinstance(m, LoraLayer)]
    ref_losses = []
    for step in range(steps):
        if step > 0 and step % every == 0:
            with torch.no_grad():
                for index, layer in enumerate(layers):
                    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                    layer.get_base_layer().weight += layer.scaling["default"] * (b @ a)
                    g = torch.Generator().manual_seed(derive_seed(2, "lorasc_init", step // every, index))
                    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
                    b.zero_()
                    ref_opt.state.pop(a, None)
                    ref_opt.state.pop(b, None)
        loss = F.mse_loss(ref(x), y)
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        ref_losses.append(loss.item())

    assert losses == pytest.approx(ref_losses, rel=1e-5)
    model.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)
    for slot, layer in zip(handle.slots, layers):
        torch.testing.assert_close(slot.lora_A.weight, layer.lora_A["default"].weight, rtol=1e-5, atol=1e-6)


# --- cascading noisy tuning -----------------------------------------------------------------------------------------
def test_stage_noise_is_exact_transient_and_changes_with_the_stage():
    model = make_llama_peft(seed=3)
    before = base_weights(model)
    lorasc = LoRASC(stage_steps=2, noise_lambda=0.2, seed=1)
    handle = genlora.attach(model, lorasc)
    opt = adam(model, lr=1e-3)
    handle.bind_optimizer(opt)
    ids = torch.randint(1, 64, (2, 7))
    llama_steps(model, handle, opt, 2)
    x = torch.randn(3, 32)

    handle.begin_step()  # step 2: stage 1
    assert lorasc.stage == 1
    model.train()
    for slot in handle.slots[:4]:
        base, w = slot.base_layer, slot.base_layer.weight
        xi1 = lorasc.noise(slot)
        torch.testing.assert_close(xi1, expected_noise(slot, 1, 0.2, seed=1).float(), rtol=1e-5, atol=1e-7)
        got = base(x)
        assert torch.equal(got, F.linear(x, w + xi1, base.bias))  # the training forward uses W + xi_1, exactly
        xi0 = expected_noise(slot, 0, 0.2, seed=1).float()
        assert not torch.allclose(got, F.linear(x, w + xi0, base.bias))  # not the old stage's noise
        base.eval()
        assert torch.equal(base(x), F.linear(x, w, base.bias))  # evaluation: no noise at all
        base.train()
    model(input_ids=ids, labels=ids).loss.backward()
    handle.optimizer_step(opt)
    opt.zero_grad()
    after = base_weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_eval_outputs_are_the_deployed_model_without_noise():
    """Evaluation sees no stage noise, and the fast expert at weight alpha (W + S_T), as every save path writes."""
    model = make_llama_peft(seed=2)
    lorasc = LoRASC(alpha=0.6, stage_steps=5, noise_lambda=0.3)
    handle = genlora.attach(model, lorasc)
    opt = adam(model, lr=1e-3)
    handle.bind_optimizer(opt)
    llama_steps(model, handle, opt, 3)  # inside stage 0: noise active, no slow experts yet
    ids = torch.randint(1, 64, (2, 9))
    model.eval()
    with torch.no_grad():
        deployed = model(input_ids=ids).logits
    handle.detach()
    with torch.no_grad():
        for s in handle.slots:  # plain PEFT with the fast expert at weight alpha, no noise
            s.lora_B.weight.mul_(0.6)
        plain = model(input_ids=ids).logits
    torch.testing.assert_close(deployed, plain, rtol=1e-5, atol=1e-6)


def test_persistent_noise_accumulates_and_only_exports_dense(tmp_path):
    model = make_mlp_peft()
    lorasc = LoRASC(stage_steps=1, noise_lambda=0.5, noise_mode="persistent", seed=4)
    handle, _, _ = run_and_record(model, lorasc, 3)
    for slot in handle.slots:
        want = sum(expected_noise(slot, t, 0.5, seed=4) for t in range(3)).float()
        torch.testing.assert_close(lorasc.noise(slot), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="persistent"):
        handle.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()  # refused before anything is written
    merged = lorasc.merged_model()
    for slot in handle.slots:
        w = slot.base_layer.weight
        want = w + slow_dense(lorasc, slot) + lorasc.config.alpha * slot.delta_weight() + lorasc.noise(slot)
        name = slot.name.removeprefix("base_model.model.")
        torch.testing.assert_close(merged.get_submodule(name).weight, want, rtol=1e-5, atol=1e-6)


def test_base_weights_bit_identical_in_bf16_after_several_stages():
    model = make_llama_peft(dtype=torch.bfloat16)
    before = base_weights(model)
    lorasc = LoRASC(stage_steps=1, noise_lambda=0.15)
    handle = genlora.attach(model, lorasc)
    opt = adam(model, lr=1e-3)
    handle.bind_optimizer(opt)
    losses = llama_steps(model, handle, opt, 4)
    assert lorasc.stage == 3 and lorasc.slow_rank(handle.slots[0]) == 3 * 4
    assert all(math.isfinite(v) for v in losses)
    after = base_weights(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_same_seed_same_run():
    def run(seed):
        model = make_llama_peft()
        lorasc = LoRASC(stage_steps=2, noise_lambda=0.2, seed=seed)
        handle = genlora.attach(model, lorasc)
        opt = adam(model, lr=1e-3)
        handle.bind_optimizer(opt)
        losses = llama_steps(model, handle, opt, 5)
        factors = [lorasc.extra_delta_factors(s)[0] for s in handle.slots]
        return losses, factors, [s.lora_A.weight.clone() for s in handle.slots]

    l1, f1, a1 = run(0)
    l2, f2, a2 = run(0)
    assert l1 == l2
    assert all(torch.equal(u1, u2) and torch.equal(v1, v2) for (u1, v1), (u2, v2) in zip(f1, f2))
    assert all(torch.equal(x, y) for x, y in zip(a1, a2))
    l3, _, a3 = run(1)
    assert l3 != l1 and not torch.equal(a3[0], a1[0])


# --- attach / detach, composition, state ----------------------------------------------------------------------------
def test_attach_detach_restores_outputs_exactly():
    model = make_llama_peft(seed=4)
    ids = torch.randint(1, 64, (2, 9))
    hooks = hook_counts(model)
    forwards = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    handle = genlora.attach(model, LoRASC(alpha=1.0, stage_steps=3, noise_lambda=0.2), optimizer=adam(model))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)  # stage 0, alpha 1, eval: the plain adapter
    model.train()
    handle.begin_step()
    noisy = model(input_ids=ids).logits
    assert not torch.allclose(noisy, before)
    handle.detach()
    assert hook_counts(model) == hooks
    assert {n: m.__dict__.get("forward") for n, m in model.named_modules()} == forwards
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_detach_after_stages_warns_and_leaves_plain_peft():
    model = make_mlp_peft()
    lorasc = LoRASC(stage_steps=1, noise_lambda=0.1)
    handle, _, _ = run_and_record(model, lorasc, 3)
    x, _ = mlp_data(seed=1)
    model.eval()
    with torch.no_grad():
        with_slow = model(x)
        with model.disable_adapter():  # disabling the adapter disables its slow experts too
            base = model(x)
        assert torch.equal(base, F.linear(F.relu(model.base_model.model.lin0.base_layer(x)),
                                          model.base_model.model.lin1.base_layer.weight,
                                          model.base_model.model.lin1.base_layer.bias))
    with pytest.warns(UserWarning, match="slow experts"):
        handle.detach()
    with torch.no_grad():
        got = model(x)
        expected = x
        for slot in handle.slots:  # plain PEFT: W x + b + s B A x, with the current fast LoRA only
            lin = slot.base_layer
            fast = F.linear(F.linear(expected, slot.lora_A.weight), slot.lora_B.weight)
            expected = lin(expected) + slot.scaling * fast
            expected = F.relu(expected) if slot.index == 0 else expected
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, with_slow)
    assert lorasc.ctx is None and lorasc.extra_delta_factors(handle.slots[0]) == []


def test_slow_experts_feed_delta_factors_and_flat_lora_row_norms():
    model = make_mlp_peft()
    flat = genlora.FlatLoRA(sigma=0.1, schedule="constant")
    lorasc = LoRASC(stage_steps=2, noise_lambda=0.0)
    handle = genlora.attach(model, flat, lorasc)
    assert [m.name for m in handle.methods] == ["lorasc", "flat_lora"]  # LoRASC's stage change runs first
    opt = adam(model)
    handle.bind_optimizer(opt)
    x, y = mlp_data()
    for _ in range(2):
        mlp_step(model, handle, opt, x, y)
    handle.begin_step()  # boundary: S = alpha*s*B*A, B = 0, and Flat-LoRA's norms of this very step
    for slot in handle.slots:
        terms = handle.delta_factors(slot)
        assert len(terms) == 2 and terms[1][1].shape[0] == 4
        w = slot.base_layer.weight
        merged = w + slow_dense(lorasc, slot)  # fast term is zero right after the boundary
        want = merged.norm(dim=1) * 0.1 / math.sqrt(w.shape[1])
        torch.testing.assert_close(flat._stds[slot.index], want, rtol=1e-5, atol=1e-7)
        got = merged_row_norms(w.pow(2).sum(1), w, terms)
        torch.testing.assert_close(got, merged.norm(dim=1), rtol=1e-5, atol=1e-6)
    model(x).sum().backward()
    handle.optimizer_step(opt)


def test_state_round_trip_restores_the_slow_experts(tmp_path):
    x, y = mlp_data()
    model = make_mlp_peft()
    lorasc = LoRASC(stage_steps=2, noise_lambda=0.1)
    handle = genlora.attach(model, lorasc)
    opt = adam(model)
    handle.bind_optimizer(opt)
    for _ in range(5):
        mlp_step(model, handle, opt, x, y)
    handle.save_state(tmp_path / "state.pt")
    adapter_state = {k: v.clone() for k, v in model.state_dict().items()}

    twin = make_mlp_peft()
    twin.load_state_dict(adapter_state)
    twin_lorasc = LoRASC(stage_steps=2, noise_lambda=0.1)
    twin_handle = genlora.attach(twin, twin_lorasc)
    twin_handle.load_state(tmp_path / "state.pt")
    assert twin_lorasc.stage == 2 and twin_handle.global_step == 5
    model.eval(), twin.eval()
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))


# --- exports --------------------------------------------------------------------------------------------------------
LOAD_WITH_PLAIN_PEFT = r"""
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained(sys.argv[1])
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
ids = torch.load(sys.argv[3])
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, sys.argv[4])
merged = AutoModelForCausalLM.from_pretrained(sys.argv[5]).eval()
with torch.no_grad():
    torch.save(merged(input_ids=ids).logits, sys.argv[6])
assert not any(name.startswith("genlora") for name in sys.modules), "genlora was imported"
"""


def test_exported_adapter_and_dense_model_load_without_genlora(tmp_path):
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config())
    base.save_pretrained(tmp_path / "base")
    r, stages = 4, 3
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    before = base_weights(model)
    lorasc = LoRASC(alpha=0.7, stage_steps=2, noise_lambda=0.15)
    handle = genlora.attach(model, lorasc)
    opt = adam(model, lr=1e-2)
    handle.bind_optimizer(opt)
    llama_steps(model, handle, opt, 2 * stages)
    assert lorasc.stage == stages - 1

    handle.save_pretrained(tmp_path / "adapter")
    lorasc.save_merged(tmp_path / "merged")
    assert all(torch.equal(before[k], v) for k, v in base_weights(model).items())  # live base untouched

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == stages * r
    assert config["use_rslora"] is False and config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved.keys() == get_peft_model_state_dict(model).keys()  # PEFT's key names
    assert all(v.shape[0 if ".lora_A." in k else 1] == stages * r for k, v in saved.items())

    ids = torch.randint(1, 64, (2, 11))
    torch.save(ids, tmp_path / "ids.pt")
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    script = tmp_path / "load.py"
    script.write_text(LOAD_WITH_PLAIN_PEFT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    out = [str(tmp_path / f) for f in ("base", "adapter", "ids.pt", "out.pt", "merged", "merged_out.pt")]
    subprocess.run([sys.executable, str(script), *out], check=True, env=env, cwd=tmp_path)
    for name in ("out.pt", "merged_out.pt"):
        got = torch.load(tmp_path / name)
        rel = ((got - expected).norm() / expected.norm()).item()
        assert rel <= 1e-5, (name, rel)


def test_export_with_layer_ranks_that_differ(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from conftest import MLP

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], rank_pattern={"lin1": 2})
    model = get_peft_model(MLP(), config)
    lorasc = LoRASC(stage_steps=1, noise_lambda=0.1)
    handle = genlora.attach(model, lorasc)
    opt = adam(model)
    handle.bind_optimizer(opt)
    x, y = mlp_data()
    for _ in range(3):
        mlp_step(model, handle, opt, x, y)
    handle.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (12, 12)
    assert config["rank_pattern"] == config["alpha_pattern"] == {"lin1": 6}

    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(MLP(), tmp_path).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)
    assert isinstance(lorasc.merged_model(), MLP)
    with pytest.raises(TypeError, match="save_pretrained"):
        lorasc.save_merged(tmp_path / "dense")


def test_merged_copy_is_clean_and_matches():
    model = make_llama_peft()
    lorasc = LoRASC(stage_steps=2, noise_lambda=0.2)
    handle = genlora.attach(model, lorasc)
    opt = adam(model, lr=1e-2)
    handle.bind_optimizer(opt)
    llama_steps(model, handle, opt, 5)
    before = base_weights(model)
    merged = lorasc.merged_model()
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert hook_counts(merged) == 0 and not any("forward" in m.__dict__ for m in merged.modules())
    ids = torch.randint(1, 64, (2, 9))
    merged.train()
    merged(input_ids=ids)  # a training-mode forward outside any genlora step: nothing of genlora is left in it
    model.eval(), merged.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in base_weights(model).items())


# --- the docstring's usage, verbatim --------------------------------------------------------------------------------
def test_docstring_plain_loop_runs_verbatim(tmp_path):
    model = make_llama_peft()
    loader = token_batches(3)
    ns = {"genlora": genlora, "torch": torch, "model": model, "loader": loader, "lr": 1e-2, "num_epochs": 3,
          "adapter_dir": str(tmp_path / "adapter"), "merged_dir": str(tmp_path / "merged")}
    model.train()
    exec(docstring_block("Plain loop"), ns)
    lorasc, handle = ns["lorasc"], ns["handle"]
    assert handle.global_step == 9 and lorasc.stage == 2
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 3 * 4
    assert (tmp_path / "merged" / "config.json").exists()


def test_docstring_trainer_usage_runs_verbatim(tmp_path, monkeypatch):
    from transformers import Trainer, TrainingArguments

    model = make_llama_peft()
    examples = [{k: v[i] for k, v in b.items()} for b in token_batches(5, batch=2) for i in range(2)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        num_train_epochs=2, learning_rate=1e-3, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )  # 5 batches per epoch, accumulation 2: optimizer steps of 2, 2, 1 batches, so 3 steps per epoch
    boundaries = []
    original = LoRASC._start_stage

    def spy(self, stage):
        boundaries.append((self.ctx.handle.global_step, stage))
        original(self, stage)

    monkeypatch.setattr(LoRASC, "_start_stage", spy)
    ns = {"genlora": genlora, "Trainer": Trainer, "model": model, "args": args,
          "train_dataset": ListDataset(examples), "adapter_dir": str(tmp_path / "adapter"),
          "merged_dir": str(tmp_path / "merged")}
    exec(docstring_block("Trainer"), ns)
    handle, trainer = ns["handle"], ns["trainer"]
    assert handle.steps_per_epoch == 3 and trainer.state.max_steps == 6 and handle.global_step == 6
    assert boundaries == [(2, 1), (4, 2)]  # three stages of equal length over the 6 steps
    for slot in handle.slots:  # the Trainer's (accelerate-wrapped) optimizer restarted the state at step 4
        assert float(handle.optimizer.state[slot.lora_A.weight]["step"]) == 2
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 3 * 4


def test_fast_expert_trained_under_lora_dropout_merges_as_its_expectation():
    """Spec 5.2: without rescaling, the stage-end merge takes E[masked expert] = (1-p)^2 s B A."""
    from conftest import make_mlp_peft

    model = make_mlp_peft(r=4)
    lorasc = genlora.LoRASC(stage_steps=1, alpha=1.0, noise_lambda=0.0)
    handle = genlora.attach(model, lorasc, genlora.LoRADropout(p=0.3, deploy="merged_expectation"))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    handle.bind_optimizer(opt)
    slot = handle.slots[0]
    expected = 0.7**2 * slot.delta_weight()
    model.train()
    handle.begin_step()
    handle.loss(model(torch.randn(2, 16)).sum()).backward()
    handle.optimizer_step(opt)
    handle.begin_step()  # stage boundary: the fast expert is folded into S
    u, v = lorasc.extra_delta_factors(slot)[0]
    torch.testing.assert_close(u @ v, expected, rtol=1e-5, atol=1e-6)


def test_failed_begin_step_can_be_retried():
    from conftest import make_mlp_peft

    model = make_mlp_peft(r=4)
    handle = genlora.attach(model, genlora.LoRASC(stage_steps=1, noise_lambda=0.0))
    model.train()
    with pytest.raises(RuntimeError, match="bind_optimizer"):
        handle.begin_step()
    handle.bind_optimizer(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    handle.begin_step()  # not "called twice"


def test_noise_scope_all_perturbs_every_frozen_matrix_exactly_and_tied_weights_alike():
    """NoisyTune perturbs all of a model's matrices: with noise_scope='all' the frozen embedding and lm_head (not
    LoRA-adapted here, and tied) get the stage noise in training forwards, exactly and transiently; a tied weight gets
    one noise wherever it is used."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = tiny_llama_config()
    cfg.tie_word_embeddings = True
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    inner = model.base_model.model
    assert inner.lm_head.weight is inner.model.embed_tokens.weight
    before = base_weights(model)
    lorasc = LoRASC(stage_steps=2, noise_lambda=0.2, noise_scope="all", seed=1)
    handle = genlora.attach(model, lorasc, optimizer=adam(model))
    names = {t.name for t in handle.perturber.targets}
    assert {"base_model.model.lm_head", "base_model.model.model.embed_tokens"} <= names
    assert "base_model.model.model.layers.0.self_attn.k_proj" in names  # a frozen Linear without LoRA
    model.train()
    handle.begin_step()
    emb, head = inner.model.embed_tokens, inner.lm_head
    targets = {t.name: t for t in handle.perturber.targets}
    t_emb, t_head = targets["base_model.model.model.embed_tokens"], targets["base_model.model.lm_head"]
    owner = t_emb.index  # the embedding comes first in module order: its index seeds the tied weight's noise
    w = emb.weight
    g = torch.Generator().manual_seed(derive_seed(1, "lorasc_noise", 0, owner))
    xi = (torch.rand(w.shape, generator=g) - 0.5) * (0.2 * w.double().std().item())
    ids = torch.randint(1, 64, (2, 5))
    assert torch.equal(emb(ids), F.embedding(ids, w + xi.float()))
    h = torch.randn(2, 5, 32)
    assert torch.equal(head(h), F.linear(h, w + xi.float()))  # the same noise on the tied weight
    assert t_head.index != owner and lorasc._owner[t_head.index] == owner
    emb.eval(), head.eval()
    assert torch.equal(emb(ids), F.embedding(ids, w)) and torch.equal(head(h), F.linear(h, w))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    handle.optimizer_step(handle.optimizer)
    assert all(torch.equal(before[k], v) for k, v in base_weights(model).items())
    other = make_llama_peft()  # the default scope: the LoRA layers' base weights only
    lora_only = genlora.attach(other, LoRASC(stage_steps=2, noise_lambda=0.2), optimizer=adam(other))
    assert [t.module for t in lora_only.perturber.targets] == [s.base_layer for s in lora_only.slots]
