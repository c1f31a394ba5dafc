"""Flat-LoRA: noise law, schedule, seeding, exact base weights, gradients against an explicit W + eps reference."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import base_weights, make_llama_peft, make_mlp_peft

import genlora
from genlora.methods.flat_lora import FlatLoRAConfig, merged_row_norms, sigma_at


def train_steps(model, handle, steps, lr=1e-2, seed=0):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(steps):
        ids = torch.randint(1, 64, (2, 12), generator=g)
        handle.begin_step()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        handle.optimizer_step(opt)
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_schedules():
    cfg = FlatLoRAConfig(sigma=0.1, schedule="cosine")
    assert sigma_at(cfg, 0, 100) == 0.0
    assert sigma_at(cfg, 50, 100) == pytest.approx(0.05)
    assert sigma_at(cfg, 25, 100) == pytest.approx(0.1 * 0.5 * (1 - math.cos(math.pi / 4)))
    assert sigma_at(cfg, 100, 100) == pytest.approx(0.1)
    assert sigma_at(cfg, 150, 100) == pytest.approx(0.1)  # clamped past the end
    lin = FlatLoRAConfig(sigma=0.1, schedule="linear")
    assert sigma_at(lin, 30, 100) == pytest.approx(0.03)
    const = FlatLoRAConfig(sigma=0.1, schedule="constant")
    assert sigma_at(const, 0, None) == 0.1
    with pytest.raises(RuntimeError, match="total_steps"):
        sigma_at(cfg, 3, None)


def test_merged_row_norms_match_dense():
    torch.manual_seed(0)
    w = torch.randn(40, 24)
    u1, v1 = torch.randn(40, 4), torch.randn(4, 24)
    u2, v2 = torch.randn(40, 3), torch.randn(3, 24)
    dense = (w + u1 @ v1 + u2 @ v2).norm(dim=1)
    got = merged_row_norms(w.pow(2).sum(1), w, [(u1, v1), (u2, v2)])
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)


def test_noise_law_per_row_std():
    model = make_llama_peft(seed=1)
    flat = genlora.FlatLoRA(sigma=0.2, schedule="constant", seed=3)
    handle = genlora.attach(model, flat)
    handle.begin_step()
    for slot in handle.slots[:4]:
        eps = flat.noise(slot)  # (n_out, n_in)
        w_merged = slot.base_layer.weight.float() + slot.delta_weight()
        n = w_merged.shape[1]
        expected = 0.2 * w_merged.norm(dim=1) / math.sqrt(n)
        measured = eps.std(dim=1)
        # sample std of n normals: relative std error ~ 1/sqrt(2n); allow 5 sigma
        tol = 5 / math.sqrt(2 * n)
        assert torch.all((measured / expected - 1).abs() < tol), slot.name
        assert eps.mean().abs() < 5 * expected.mean() / math.sqrt(eps.numel())
        # pooled over rows, normalised noise is standard normal
        z = eps / expected[:, None]
        assert z.var().item() == pytest.approx(1.0, abs=5 * math.sqrt(2 / z.numel()))


def test_same_seed_same_noise_and_steps_differ():
    def noises(seed, steps):
        model = make_llama_peft(seed=0)
        flat = genlora.FlatLoRA(sigma=0.1, schedule="constant", seed=seed)
        handle = genlora.attach(model, flat)
        out = []
        for _ in range(steps):
            handle.begin_step()
            out.append(flat.noise(handle.slots[0]))
            handle.pre_optimizer_step()
            handle.post_optimizer_step()
        return out

    a, b, c = noises(7, 2), noises(7, 2), noises(8, 1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a[0], c[0])


def test_global_rng_untouched():
    model = make_llama_peft()
    handle = genlora.attach(model, genlora.FlatLoRA(sigma=0.1, schedule="constant"), genlora.RMLoRA(k=2))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_steps(model, handle, 2)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_base_weights_bit_identical(dtype):
    model = make_llama_peft(dtype=dtype)
    before = base_weights(model)
    handle = genlora.attach(model, genlora.FlatLoRA(sigma=0.1, schedule="constant"), genlora.RMLoRA(k=2))
    steps = 100 if dtype == torch.bfloat16 else 20
    train_steps(model, handle, steps, lr=1e-3)
    after = base_weights(model)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_lora_gradients_equal_explicit_reference():
    """Gradients of A and B equal those of a copy whose base weights are explicitly W + eps, through F.linear."""
    model = make_llama_peft(seed=2)
    reference = copy.deepcopy(model)
    flat = genlora.FlatLoRA(sigma=0.3, schedule="constant", seed=5)
    handle = genlora.attach(model, flat)
    ids = torch.randint(1, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    model.train()
    reference.train()
    handle.begin_step()
    ref_modules = dict(reference.named_modules())
    with torch.no_grad():
        for slot in handle.slots:
            base = ref_modules[slot.name].base_layer
            base.weight.copy_(base.weight + flat.noise(slot))  # fp32: W + eps formed once, as the op does
    model(input_ids=ids, labels=ids).loss.backward()
    reference(input_ids=ids, labels=ids).loss.backward()
    ref_params = dict(reference.named_parameters())
    n_checked = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-5, atol=1e-7)
            n_checked += 1
    assert n_checked == 2 * len(handle.slots)


def test_perturbed_linear_matches_f_linear_bias_grad():
    from genlora.core.perturbed_linear import perturbed_linear

    class Draw:
        def __init__(self, eps):
            self.eps = eps

        def sample_into(self, out, accumulate):
            out.add_(self.eps) if accumulate else out.copy_(self.eps)

    torch.manual_seed(0)
    w = torch.randn(6, 5)
    eps = 0.1 * torch.randn(6, 5)
    b = torch.randn(6, requires_grad=True)
    x = torch.randn(3, 4, 5, requires_grad=True)
    y = perturbed_linear(x, w, b, [Draw(eps)])
    x2 = x.detach().clone().requires_grad_()
    b2 = b.detach().clone().requires_grad_()
    y2 = F.linear(x2, w + eps, b2)
    assert torch.equal(y, y2)
    gy = torch.randn_like(y)
    y.backward(gy)
    y2.backward(gy)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


def test_noise_shared_by_micro_steps_and_checkpoint_reruns():
    """One draw per optimizer step: every micro-step (and a gradient-checkpointing re-run) sees the same eps."""
    model = make_llama_peft(seed=0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    reference = make_llama_peft(seed=0)
    flat_a = genlora.FlatLoRA(sigma=0.3, schedule="constant")
    flat_b = genlora.FlatLoRA(sigma=0.3, schedule="constant")
    ha = genlora.attach(model, flat_a)
    hb = genlora.attach(reference, flat_b)
    ids = torch.randint(1, 64, (4, 10), generator=torch.Generator().manual_seed(1))
    model.train()
    reference.train()
    ha.begin_step()
    hb.begin_step()
    for half in (ids[:2], ids[2:]):  # two micro-steps under checkpointing
        (model(input_ids=half, labels=half).loss / 2).backward()
    (reference(input_ids=ids[:2], labels=ids[:2]).loss / 2).backward()  # no checkpointing
    (reference(input_ids=ids[2:], labels=ids[2:]).loss / 2).backward()
    ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref[name].grad, rtol=1e-5, atol=1e-7)


def test_cosine_first_step_is_noise_free_and_eval_is_clean():
    model = make_mlp_peft()
    flat = genlora.FlatLoRA(sigma=0.5)
    handle = genlora.attach(model, flat, total_steps=10)
    handle.begin_step()
    assert flat.noise(handle.slots[0]) is None  # sigma_0 = 0 under the cosine ramp
    x = torch.randn(5, 16)
    model.eval()
    with torch.no_grad():
        clean = model(x)
    handle.pre_optimizer_step()
    handle.post_optimizer_step()
    handle.begin_step()
    assert flat.noise(handle.slots[0]) is not None
    with torch.no_grad():
        assert torch.equal(model(x), clean)  # eval-mode forwards never see noise
        model.train()
        assert not torch.equal(model(x), clean)


def test_unsupported_layer_kind():
    """A PEFT LoRA type genlora does not map (MultiheadAttention) is refused before anything changes."""
    from peft import LoraConfig, get_peft_model
    from torch import nn

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x)[0]

    peft_model = get_peft_model(Attn(), LoraConfig(r=2, target_modules=["mha"]))
    with pytest.raises(TypeError, match="Flat-LoRA supports PEFT LoRA on Linear"):
        genlora.attach(peft_model, genlora.FlatLoRA())
    assert "forward" not in peft_model.base_model.model.mha.__dict__
