"""LoRA Dropout (arXiv 2404.09610): masks, seeding, n_train accumulation, the test-time ensemble, expectation export,
the Trainer mixin, and attach/detach."""

import copy
import inspect
import math
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import ListDataset, make_llama_peft, make_mlp_peft
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

import genlora
from genlora import LoRADropout, LoRADropoutConfig


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread avoids OpenMP hand-offs that stall for milliseconds on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mlp(seed=0, **lora_kwargs):
    """The toy MLP with a non-zero B (PEFT's gaussian init leaves B = 0, which would hide every mask)."""
    model = make_mlp_peft(seed=seed, **lora_kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def lora_b_outputs(model, slot):
    """Collect what slot.lora_B returns (after LoRA Dropout's m_B) in each forward."""
    seen = []
    hook = slot.lora_B.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    return seen, hook


def masked_params(handle, masks):
    """{parameter name: A diag(m_A) or diag(m_B) B}, for functional_call on an un-attached copy: masks by hand."""
    params = {}
    for slot, (m_a, m_b) in zip(handle.slots, masks):
        params[f"{slot.name}.lora_A.{slot.adapter}.weight"] = slot.lora_A.weight * m_a[None, :]
        params[f"{slot.name}.lora_B.{slot.adapter}.weight"] = slot.lora_B.weight * m_b[:, None]
    return params


def ref_params(ref, handle, masks):
    """Like masked_params, but on the parameters of `ref` (a deep copy taken before attach), keeping autograd."""
    named = dict(ref.named_parameters())
    params = {}
    for slot, (m_a, m_b) in zip(handle.slots, masks):
        a = f"{slot.name}.lora_A.{slot.adapter}.weight"
        b = f"{slot.name}.lora_B.{slot.adapter}.weight"
        params[a] = named[a] * m_a[None, :]
        params[b] = named[b] * m_b[:, None]
    return params


def doc_block(obj, must_contain):
    """The `::` code block of obj's docstring that contains `must_contain`, dedented."""
    lines = inspect.getdoc(obj).splitlines()
    for i, line in enumerate(lines):
        if not line.rstrip().endswith("::"):
            continue
        block = []
        for nxt in lines[i + 1 :]:
            if nxt.strip() and not nxt.startswith("    "):
                break
            block.append(nxt)
        code = textwrap.dedent("\n".join(block)).strip()
        if must_contain in code:
            return code
    raise AssertionError(f"no code block with {must_contain!r} in the docstring")


# --- masks ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rescale", ["none", "inverted"])
def test_each_delta_w_entry_is_dropped_with_probability_2p_minus_p2(rescale):
    p, n_forwards = 0.3, 800
    model = mlp()
    handle = genlora.attach(model, LoRADropout(p=p, rescale=rescale))
    slot = handle.slots[0]  # lin0: n_in = 16, n_out = 32
    plain = (slot.lora_B.weight @ slot.lora_A.weight).T.detach()  # (16, 32): row j = lora_B's output for x = e_j
    assert (plain != 0).all()
    seen, hook = lora_b_outputs(model, slot)
    model.train()
    handle.begin_step()
    with torch.no_grad():
        for _ in range(n_forwards):
            model(torch.eye(16))  # one forward of the whole model each: fresh masks
    hook.remove()
    eff = torch.stack(seen)  # (N, 16, 32): the masked ΔW^T / s of each forward
    dropped = (eff == 0).float()
    kept_scale = 1.0 if rescale == "none" else 1.0 / (1.0 - p) ** 2
    torch.testing.assert_close(eff * (1 - dropped), plain * kept_scale * (1 - dropped), rtol=1e-5, atol=1e-6)
    q = 2 * p - p * p
    std = math.sqrt(q * (1 - q) / n_forwards)  # binomial std of one entry's drop frequency
    freq = dropped.mean(0)
    assert (freq - q).abs().max() < 5 * std, (freq.min(), freq.max(), q)
    # the mean over entries has variance <= one entry's, so the same bound is conservative for it
    assert abs(freq.mean().item() - q) < 3 * std
    # the rank is never dropped: a dropped entry is a whole zero row (input j) or column (output i)
    rows = dropped.all(2)  # input feature j dropped
    cols = dropped.all(1)  # output feature i dropped
    assert torch.equal(dropped.bool(), rows[:, :, None] | cols[:, None, :])


def test_masks_shared_across_batch_by_default_and_per_example_when_asked():
    x = torch.randn(1, 16).repeat(8, 1)  # eight identical examples
    for per_example in (False, True):
        model = mlp()
        handle = genlora.attach(model, LoRADropout(p=0.5, mask_per_example=per_example))
        slot = handle.slots[0]
        seen, hook = lora_b_outputs(model, slot)
        model.train()
        handle.begin_step()
        with torch.no_grad():
            model(x)
        hook.remove()
        out = seen[0]  # (8, 32)
        same = all(torch.equal(out[0], out[i]) for i in range(8))
        assert same is not per_example
        # what the hooks applied is exactly what train_masks describes
        m_a, m_b = handle.method("lora_dropout").train_masks(slot, 0, 0, 0, batch_size=8 if per_example else None)
        assert m_a.shape == ((8, 16) if per_example else (16,))
        expected = ((x * m_a) @ slot.lora_A.weight.T @ slot.lora_B.weight.T) * m_b
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_masks_are_a_pure_function_of_seed_step_forward_instance_and_layer():
    x = torch.randn(4, 16)

    def first_forward(seed):
        model = mlp()
        handle = genlora.attach(model, LoRADropout(p=0.5, seed=seed))
        model.train()
        handle.begin_step()
        with torch.no_grad():
            return model(x), model(x), handle

    out_a0, out_a1, handle_a = first_forward(seed=3)
    out_b0, out_b1, _ = first_forward(seed=3)
    out_c0, _, _ = first_forward(seed=4)
    assert torch.equal(out_a0, out_b0) and torch.equal(out_a1, out_b1)  # same seed: same masks
    assert not torch.equal(out_a0, out_a1)  # next forward_index: new masks
    assert not torch.equal(out_a0, out_c0)  # other seed: other masks

    drop = handle_a.method("lora_dropout")
    s0 = handle_a.slots[0]

    def masks(slot, step, fwd, inst):
        return torch.cat(drop.train_masks(slot, step, fwd, inst))

    ref = masks(s0, 2, 5, 1)
    assert torch.equal(ref, masks(s0, 2, 5, 1))
    for other in (masks(s0, 3, 5, 1), masks(s0, 2, 6, 1), masks(s0, 2, 5, 0)):
        assert not torch.equal(ref, other)
    llama = genlora.attach(make_llama_peft(), LoRADropout(p=0.5)).method("lora_dropout")
    q0, q1 = [s for s in llama.ctx.slots if s.name.endswith("q_proj")]  # same shapes, two layers
    assert not torch.equal(torch.cat(llama.train_masks(q0, 0, 0, 0)), torch.cat(llama.train_masks(q1, 0, 0, 0)))
    # next optimizer step, same forward_index: new masks
    opt = torch.optim.SGD([p for p in handle_a.model.parameters() if p.requires_grad], lr=0.0)
    handle_a.optimizer_step(opt)
    handle_a.begin_step()
    with torch.no_grad():
        assert not torch.equal(handle_a.model(x), out_a0)
    assert not torch.equal(masks(s0, 1, 0, 0), masks(s0, 0, 0, 0))


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_checkpointed_layer_rerun_sees_the_same_masks():
    x, target = torch.randn(6, 16), torch.randn(6, 4)

    def run(use_checkpoint, bump_between=False):
        model = mlp()
        handle = genlora.attach(model, LoRADropout(p=0.5))
        inner = model.base_model.model
        calls = []
        handle.slots[0].lora_A.register_forward_pre_hook(lambda m, a: calls.append(1))
        if use_checkpoint:  # lin0 (a LoRA layer) is re-run in the backward
            inner.forward = lambda x: inner.lin1(inner.act(checkpoint(inner.lin0, x, use_reentrant=False)))
        model.train()
        handle.begin_step()
        loss = F.mse_loss(model(x), target)
        if bump_between:  # what a re-run keyed on anything but the forward's counters would see
            handle.forward_index += 1
        loss.backward()
        return grads_of(model), len(calls)

    plain, n_plain = run(False)
    ckpt, n_ckpt = run(True)
    assert (n_plain, n_ckpt) == (1, 2)  # the checkpointed layer really ran twice
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=0)
    wrong, _ = run(True, bump_between=True)  # the test can fail: other masks in the re-run change the grads
    assert any(not torch.allclose(wrong[n], plain[n]) for n in plain)


def test_transformers_gradient_checkpointing_gives_the_same_grads():
    ids = torch.randint(1, 60, (2, 10), generator=torch.Generator().manual_seed(0))

    def run(gc):
        model = make_llama_peft()
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        handle = genlora.attach(model, LoRADropout(p=0.3))
        model.train()
        handle.begin_step()
        model(input_ids=ids, labels=ids).loss.backward()
        return grads_of(model)

    plain, ckpt = run(False), run(True)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7)


# --- training objective ----------------------------------------------------------------------------------------------
def test_documented_plain_loop_averages_the_gradients_of_n_train_explicit_losses():
    n_train = 3
    model = make_llama_peft()
    ref = copy.deepcopy(model)  # un-attached twin: masks applied by hand
    handle = genlora.attach(model, LoRADropout(p=0.3, n_train=n_train, seed=7))
    dropout = handle.method("lora_dropout")
    ids = torch.randint(1, 60, (2, 10), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.SGD(trainable.values(), lr=1.0)  # so the update is minus the gradient
    model.train()
    ref.train()
    exec(doc_block(LoRADropout, "train_instances"), {"handle": handle, "model": model, "batch": batch,
                                                     "optimizer": optimizer})
    assert handle.global_step == 1 and handle.forward_index == n_train - 1
    # reference: instance k used the masks of (step 0, forward k, instance k)
    for k in range(n_train):
        masks = [dropout.train_masks(s, 0, k, k) for s in handle.slots]
        loss = functional_call(ref, ref_params(ref, handle, masks), kwargs=batch).loss
        (loss / n_train).backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert all(ref_grads[n].abs().sum() > 0 for n in trainable if "lora" in n)
    for name, p in trainable.items():
        torch.testing.assert_close(before[name] - p.detach(), ref_grads[name], rtol=1e-4, atol=1e-6)


def test_train_instances_misuse_raises():
    model = mlp()
    handle = genlora.attach(model, LoRADropout(p=0.2, n_train=2))
    dropout = handle.method("lora_dropout")
    x = torch.randn(3, 16)
    model.train()
    with pytest.raises(RuntimeError, match="begin_step"):
        next(iter(dropout.train_instances()))
    handle.begin_step()
    with pytest.raises(RuntimeError, match="n_train=2"):
        model(x)  # a training forward outside the instances
    with pytest.raises(RuntimeError, match="neither inst.backward"):
        for inst in dropout.train_instances():
            model(x).sum().backward()  # loss not divided by n_train
    with pytest.raises(RuntimeError, match="no training-mode forward"):
        for inst in dropout.train_instances():
            model.eval()
            inst.backward(model(x).sum())
    model.train()
    for inst in dropout.train_instances():  # the state is clean again after the errors
        inst.backward(model(x).sum())
    assert [inst.index, inst.n] == [1, 2]


def test_composes_with_flat_lora_and_rm_lora_in_one_step():
    model = make_llama_peft()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    handle = genlora.attach(model, genlora.FlatLoRA(sigma=0.05, schedule="constant"), genlora.RMLoRA(k=2),
                            LoRADropout(p=0.2, n_train=2))
    assert [m.name for m in handle.methods] == ["flat_lora", "lora_dropout", "rm_lora"]
    ids = torch.randint(1, 60, (2, 8), generator=torch.Generator().manual_seed(9))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(2):
        handle.begin_step()
        for inst in handle.method("lora_dropout").train_instances():
            inst.backward(model(input_ids=ids, labels=ids).loss)  # the RM-LoRA regularizer rides in each loss
        handle.optimizer_step(opt)
        opt.zero_grad()
    assert handle.global_step == 2
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if not p.requires_grad)


# --- test-time ensemble ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["SEQ_CLS", "CAUSAL_LM"])
def test_ensemble_averages_probabilities_of_explicitly_masked_forwards(task):
    n_test = 4
    model = make_llama_peft(task=task, num_labels=3)
    ref = copy.deepcopy(model)
    handle = genlora.attach(model, LoRADropout(p=0.3, n_test=n_test))
    dropout = handle.method("lora_dropout")
    ids = torch.randint(1, 60, (3, 9), generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 2, 1]) if task == "SEQ_CLS" else ids
    model.eval()
    ref.eval()
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        probs = 0
        for k in range(n_test):
            masks = [dropout.ensemble_masks(s, k) for s in handle.slots]
            logits = functional_call(ref, masked_params(handle, masks), kwargs={"input_ids": ids}).logits
            probs = probs + logits.double().softmax(-1) / n_test  # (3, C) or (3, T, V)
        with genlora.test_time_ensemble(model, handle):
            out = model(input_ids=ids, labels=labels)
        wrapped = genlora.test_time_ensemble(model, handle)(input_ids=ids, labels=labels)
        assert torch.equal(model(input_ids=ids).logits, plain)  # the context is over: plain forward again
    assert type(out).__name__.endswith(("SequenceClassifierOutputWithPast", "CausalLMOutputWithPast"))
    assert out.logits.shape == plain.shape
    torch.testing.assert_close(out.logits.double().exp(), probs, rtol=1e-4, atol=1e-6)
    assert torch.equal(out.logits, wrapped.logits) and torch.equal(out.loss, wrapped.loss)
    assert not torch.allclose(probs, plain.double().softmax(-1), atol=1e-4)  # the masks did something
    # loss = NLL of the mean probabilities (causal LM: position t predicts token t+1)
    if task == "SEQ_CLS":
        nll = -probs[torch.arange(3), labels].log().mean()
    else:
        nll = -probs[:, :-1].gather(-1, ids[:, 1:, None]).log().mean()
    torch.testing.assert_close(out.loss.double(), nll, rtol=1e-5, atol=1e-6)
    # with one member, the ensemble's loss is the model's own loss with that member's masks
    with torch.no_grad():
        single = genlora.test_time_ensemble(model, handle, n_test=1)(input_ids=ids, labels=labels)
        with dropout.ensemble_member(0):
            own = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(single.loss, own.loss, rtol=1e-5, atol=1e-6)


def test_ensemble_on_a_model_returning_a_tensor_and_with_generate():
    model = mlp()
    handle = genlora.attach(model, LoRADropout(p=0.5, n_test=3))
    x = torch.randn(5, 16)
    model.eval()
    with torch.no_grad():
        out = genlora.test_time_ensemble(model, handle)(x)
        members = []
        for k in range(3):
            with handle.method("lora_dropout").ensemble_member(k):
                members.append(model(x).softmax(-1))
    assert isinstance(out, torch.Tensor) and out.shape == (5, 4)
    torch.testing.assert_close(out.exp(), torch.stack(members).mean(0))

    lm = make_llama_peft()
    lm_handle = genlora.attach(lm, LoRADropout(p=0.3, n_test=2))
    lm.eval()
    ids = torch.randint(1, 60, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), genlora.test_time_ensemble(lm, lm_handle):
        gen = lm.generate(input_ids=ids, max_new_tokens=3, do_sample=False, use_cache=False, pad_token_id=0)
        greedy = lm(input_ids=ids).logits[:, -1].argmax(-1)  # the ensemble's next token
    assert gen.shape == (2, 8) and torch.equal(gen[:, 5], greedy)
    with torch.no_grad(), genlora.test_time_ensemble(lm, lm_handle), pytest.raises(ValueError, match="KV cache"):
        lm(input_ids=ids, past_key_values=object())


def test_eval_forward_outside_the_ensemble_is_the_plain_peft_output():
    model = make_llama_peft(task="SEQ_CLS")
    ids = torch.randint(1, 60, (2, 7), generator=torch.Generator().manual_seed(4))
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        handle = genlora.attach(model, LoRADropout(p=0.5))
        assert torch.equal(model(input_ids=ids).logits, before)
        handle.begin_step()  # even inside a training step
        assert torch.equal(model(input_ids=ids).logits, before)


def test_attach_detach_leaves_the_model_exactly_as_before():
    model = make_llama_peft()
    ids = torch.randint(1, 60, (2, 7), generator=torch.Generator().manual_seed(5))
    lora_modules = [m for n, m in model.named_modules() if n.endswith((".lora_A.default", ".lora_B.default"))]
    hooks_before = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in lora_modules]
    with torch.no_grad():
        eval_before = model.eval()(input_ids=ids).logits
        train_before = model.train()(input_ids=ids).logits  # deterministic: no PEFT or attention dropout
    handle = genlora.attach(model, LoRADropout(p=0.5, n_train=2))
    model.train()
    handle.begin_step()
    for inst in handle.method("lora_dropout").train_instances():
        with torch.no_grad():
            assert not torch.equal(model(input_ids=ids).logits, train_before)
        inst.scale(torch.zeros(()))
    model.eval()
    with pytest.raises(ZeroDivisionError), genlora.test_time_ensemble(model, handle):
        1 / 0  # the context restores the forward even when its body raises
    assert "forward" not in model.__dict__ and "forward" not in model.get_base_model().__dict__
    handle.detach()
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in lora_modules] == hooks_before
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, eval_before)
        assert torch.equal(model.train()(input_ids=ids).logits, train_before)
    with pytest.raises(RuntimeError, match="not attached"):
        genlora.test_time_ensemble(model, handle)


# --- export ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rescale", ["none", "inverted"])
def test_expectation_export_matches_monte_carlo_average_of_masked_delta_w(rescale):
    p, n_draws = 0.4, 4000
    model = mlp()
    handle = genlora.attach(model, LoRADropout(p=p, rescale=rescale, deploy="merged_expectation"))
    dropout = handle.method("lora_dropout")
    slot = handle.slots[0]
    with torch.no_grad():
        u, v = slot.scaling * slot.lora_B.weight, slot.lora_A.weight  # (32, 4), (4, 16)
        factors = [(u, v)]
        exported = dropout.deploy_factors(slot, factors)
        (eu, ev), = exported
        delta = u @ v
        mc = torch.zeros_like(delta)
        for i in range(n_draws):
            m_a, m_b = dropout.train_masks(slot, 0, i, 0)
            mc += m_b[:, None] * delta * m_a[None, :]
        mc /= n_draws
    keep = (1 - p) ** 2
    scale = 1.0 if rescale == "none" else 1.0 / keep  # each kept entry's value over ΔW
    std = delta.abs() * scale * math.sqrt(keep * (1 - keep) / n_draws)  # std of the Monte Carlo mean per entry
    assert ((eu @ ev - mc).abs() <= 5 * std + 1e-6).all()
    expected = keep if rescale == "none" else 1.0
    torch.testing.assert_close(eu @ ev, expected * delta)
    if rescale == "inverted":
        assert exported is factors  # nothing to rescale: the handle saves the plain adapter
    # frozen terms another method prepended (LoRASC's slow experts) are left alone; only the trained term scales
    slow = (torch.randn(32, 2), torch.randn(2, 16))
    both = dropout.deploy_factors(slot, [slow, (u, v)])
    assert both[0] is slow
    torch.testing.assert_close(both[1][0] @ both[1][1], expected * delta)
    ensemble = genlora.attach(mlp(seed=1), LoRADropout(p=p, deploy="ensemble")).method("lora_dropout")
    assert ensemble.deploy_factors(slot, factors) is factors


def test_save_pretrained_with_ensemble_deploy_writes_the_raw_adapter(tmp_path):
    model = make_llama_peft()
    handle = genlora.attach(model, LoRADropout(p=0.3))
    handle.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    methods = genlora.load_methods(tmp_path / "adapter")
    assert isinstance(methods[0], LoRADropout)
    assert methods[0].config.to_dict() == handle.method("lora_dropout").resolved_config()


def test_save_pretrained_with_merged_expectation_is_a_plain_adapter_of_the_expectation(tmp_path):
    pytest.importorskip("genlora.core.export")
    from peft import PeftModel

    p = 0.3
    model = make_llama_peft()
    base = copy.deepcopy(model).unload()  # the plain transformers model, same base weights
    handle = genlora.attach(model, LoRADropout(p=p, deploy="merged_expectation"))
    handle.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    handle.detach()
    with torch.no_grad():
        for s in handle.slots:
            s.lora_B.weight.mul_((1 - p) ** 2)
        ids = torch.randint(1, 60, (2, 6), generator=torch.Generator().manual_seed(6))
        torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits, rtol=1e-4,
                                   atol=1e-5)


# --- transformers Trainer --------------------------------------------------------------------------------------------
def trainer_args(tmp_path, **kw):
    from transformers import TrainingArguments

    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=1,
                   optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", weight_decay=0.0,
                   max_grad_norm=0.0, report_to=[], use_cpu=True, save_strategy="no")  # update = -lr * gradient
    return TrainingArguments(**{**options, **kw})


def test_genlora_trainer_runs_n_train_instances_and_evaluates_with_the_ensemble(tmp_path):
    n_train = 2
    model = make_llama_peft()
    ref = copy.deepcopy(model)
    handle = genlora.attach(model, LoRADropout(p=0.3, n_train=n_train, n_test=3))
    dropout = handle.method("lora_dropout")
    ids = torch.randint(1, 60, (4, 8), generator=torch.Generator().manual_seed(7))
    examples = [{"input_ids": ids[i], "labels": ids[i]} for i in range(4)]
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    trainer = genlora.GenLoRATrainer(model=model, args=trainer_args(tmp_path), train_dataset=ListDataset(examples),
                                     eval_dataset=ListDataset(examples), genlora_handle=handle)
    assert sum(isinstance(cb, genlora.GenLoRACallback) for cb in trainer.callback_handler.callbacks) == 1
    trainer.train()
    assert handle.global_step == 1 and handle.forward_index == n_train - 1
    ref.train()
    for k in range(n_train):  # one batch of all four examples; masks shared by the batch, so its order is moot
        loss = functional_call(ref, ref_params(ref, handle, [dropout.train_masks(s, 0, k, k) for s in handle.slots]),
                               kwargs={"input_ids": ids, "labels": ids}).loss
        (loss / n_train).backward()
    for name, p in trainable.items():
        torch.testing.assert_close(before[name] - p.detach(), dict(ref.named_parameters())[name].grad, rtol=1e-4,
                                   atol=1e-6)
    # evaluation: the ensemble's NLL (deploy="ensemble" turns it on), or the plain loss when switched off
    model.eval()
    with torch.no_grad():
        ens_loss = genlora.test_time_ensemble(model, handle)(input_ids=ids, labels=ids).loss.item()
        plain_loss = model(input_ids=ids, labels=ids).loss.item()
    assert trainer.evaluate()["eval_loss"] == pytest.approx(ens_loss, rel=1e-5)
    trainer.genlora_eval_ensemble = False
    assert trainer.evaluate()["eval_loss"] == pytest.approx(plain_loss, rel=1e-5)


def test_plain_trainer_with_callback_works_for_n_train_1_and_refuses_more(tmp_path):
    from transformers import Trainer

    ids = torch.randint(1, 60, (4, 8), generator=torch.Generator().manual_seed(8))
    examples = [{"input_ids": ids[i], "labels": ids[i]} for i in range(4)]
    model = make_llama_peft()
    handle = genlora.attach(model, LoRADropout(p=0.3))
    Trainer(model=model, args=trainer_args(tmp_path, max_grad_norm=1.0), train_dataset=ListDataset(examples),
            callbacks=[genlora.GenLoRACallback(handle)]).train()
    assert handle.global_step == 1 and handle.forward_index == 0
    model = make_llama_peft()
    handle = genlora.attach(model, LoRADropout(p=0.3, n_train=2))
    trainer = Trainer(model=model, args=trainer_args(tmp_path), train_dataset=ListDataset(examples),
                      callbacks=[genlora.GenLoRACallback(handle)])
    with pytest.raises(RuntimeError, match="GenLoRATrainer"):
        trainer.train()


# --- bad input -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, exc, match",
    [
        ({"p": -0.1}, ValueError, r"p must be in \[0.0, 1.0\)"),
        ({"p": 1.0}, ValueError, r"p must be in \[0.0, 1.0\)"),
        ({"p": float("nan")}, ValueError, "p must be in"),
        ({"p": "0.1"}, TypeError, "p must be a number"),
        ({"n_train": 0}, ValueError, r"n_train must be in \[1, inf\]"),
        ({"n_train": 2.0}, TypeError, "n_train must be an integer"),
        ({"n_test": 0}, ValueError, r"n_test must be in \[1, inf\]"),
        ({"rescale": "sqrt"}, ValueError, "rescale must be one of"),
        ({"deploy": "merged"}, ValueError, "deploy must be one of"),
        ({"mask_per_example": 1}, TypeError, "mask_per_example must be a bool"),
        ({"seed": -1}, ValueError, "seed must be in"),
    ],
)
def test_bad_options_raise_naming_the_field(options, exc, match):
    with pytest.raises(exc, match=match):
        LoRADropoutConfig(**options)
    with pytest.raises(exc, match=match):
        LoRADropout(**options)


def test_bad_uses_raise_clearly():
    dora = mlp(use_dora=True)
    with pytest.raises(TypeError, match="LoRA variant"):
        genlora.attach(dora, LoRADropout())
    assert all(not m._forward_pre_hooks for n, m in dora.named_modules() if n.endswith("lora_A.default"))
    model = mlp()
    no_dropout = genlora.attach(model, genlora.RMLoRA(k=2))
    with pytest.raises(ValueError, match="needs a LoRADropout"):
        genlora.test_time_ensemble(model, no_dropout)
    no_dropout.detach()
    handle = genlora.attach(model, LoRADropout(p=0.2))
    with pytest.raises(ValueError, match=r"n_test must be in \[1, inf\]"):
        genlora.test_time_ensemble(model, handle, n_test=0)
    with pytest.raises(ValueError, match="task must be one of"):
        genlora.test_time_ensemble(model, handle, task="regression")
    with pytest.raises(ValueError, match="does not contain"):
        genlora.test_time_ensemble(mlp(seed=2), handle)
    with pytest.raises(RuntimeError, match=r"model.eval\(\)"):
        genlora.test_time_ensemble(model.train(), handle)(torch.randn(2, 16))
