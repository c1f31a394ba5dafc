"""The batched hot paths (Flat-LoRA row norms per shape group, RM-LoRA's batched regularizer and masks, the fused
perturbed-weight hook) compute what the per-layer formulas compute."""

import math

import pytest
import torch
from conftest import make_llama_peft, make_mlp_peft

import genlora
from genlora.core.perturbed_linear import PerturbedWeight, perturbed_linear
from genlora.methods.flat_lora import GaussianRowNoise, batched_merged_row_norms, merged_row_norms
from genlora.methods.rm_lora import orthogonality_regularizer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_row_norms_equal_per_layer(dtype):
    g = torch.Generator().manual_seed(0)
    G, n_out, n_in, k = 5, 24, 40, 6
    weights = [torch.randn(n_out, n_in, generator=g).to(dtype) for _ in range(G)]
    u = torch.randn(G, n_out, k, generator=g)
    v = torch.randn(G, k, n_in, generator=g)
    base_sq = torch.stack([w.float().pow(2).sum(1) for w in weights])
    got = batched_merged_row_norms(base_sq, weights, u, v)
    for i in range(G):
        per_layer = merged_row_norms(base_sq[i], weights[i], [(u[i], v[i])])
        torch.testing.assert_close(got[i], per_layer, rtol=1e-5, atol=1e-5)
        if dtype == torch.float32:
            dense = (weights[i] + u[i] @ v[i]).norm(dim=1)
            torch.testing.assert_close(got[i], dense, rtol=1e-4, atol=1e-4)


def reference_stds(handle, sigma):
    """sigma * ||W + sum U V||_row / sqrt(n_in), one layer at a time, densely."""
    out = {}
    for slot in handle.slots:
        w = slot.base_layer.weight.float()
        delta = sum(u.float() @ v.float() for u, v in handle.delta_factors(slot))
        out[slot.index] = sigma * (w + delta).norm(dim=1) / math.sqrt(w.shape[1])
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flat_lora_grouped_stds_equal_dense_reference(dtype):
    model = make_llama_peft(seed=3, dtype=dtype)
    flat = genlora.FlatLoRA(sigma=0.2, schedule="constant")
    handle = genlora.attach(model, flat)
    # q/o, k/v, gate/up and down_proj of the two layers form groups of equal shape
    assert len(flat._groups) < len(handle.slots)
    assert sorted(s.index for grp in flat._groups for s in grp.slots) == [s.index for s in handle.slots]
    handle.begin_step()
    ref = reference_stds(handle, 0.2)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: W V^T is a bf16 product, as in the per-layer formula
    for slot in handle.slots:
        torch.testing.assert_close(flat._stds[slot.index], ref[slot.index], rtol=tol, atol=tol)


@pytest.mark.skipif(not hasattr(genlora, "LoRASC"), reason="LoRASC not in this build")
def test_flat_lora_stds_include_slow_experts():
    """With LoRASC's frozen slow factors (extra delta terms), the grouped path concatenates them per layer."""
    model = make_llama_peft(seed=1)
    lorasc = genlora.LoRASC(stage_steps=1, alpha=0.5, noise_lambda=0.0)
    flat = genlora.FlatLoRA(sigma=0.1, schedule="constant")
    handle = genlora.attach(model, lorasc, flat)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    handle.bind_optimizer(opt)
    model.train()
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        handle.begin_step()
        model(input_ids=ids, labels=ids).loss.backward()
        handle.optimizer_step(opt)
        opt.zero_grad()
    handle.begin_step()
    assert all(len(handle.delta_factors(s)) == 2 for s in handle.slots)
    ref = reference_stds(handle, 0.1)
    for slot in handle.slots:
        torch.testing.assert_close(flat._stds[slot.index], ref[slot.index], rtol=1e-5, atol=1e-6)


def test_flat_lora_state_dict_holds_compact_copies():
    model = make_llama_peft()
    flat = genlora.FlatLoRA(sigma=0.1, schedule="constant", resample_every=2)
    handle = genlora.attach(model, flat)
    handle.begin_step()
    state = flat.state_dict()
    for k, v in state["stds"].items():
        assert v.untyped_storage().nbytes() == v.numel() * v.element_size()  # not a view of the group tensor
        assert torch.equal(v, flat._stds[k])


def test_fused_perturb_hook_is_used_for_a_single_draw():
    calls = []

    class FusedDraw:
        def __init__(self, eps):
            self.eps = eps

        def sample_into(self, out, accumulate):
            calls.append("sample")
            out.add_(self.eps) if accumulate else out.copy_(self.eps)

        def perturb(self, weight):
            calls.append("perturb")
            return (weight.float() + self.eps).to(weight.dtype)

    torch.manual_seed(0)
    w = torch.randn(6, 5).bfloat16()
    eps = 0.1 * torch.randn(6, 5)
    fused = PerturbedWeight([FusedDraw(eps)]).build(w)
    assert calls == ["perturb"]
    calls.clear()
    unfused = PerturbedWeight([FusedDraw(eps), FusedDraw(0 * eps)]).build(w)  # two draws: the general path
    assert calls == ["sample", "sample"]
    assert torch.equal(fused, unfused)
    x = torch.randn(3, 5, requires_grad=True)
    perturbed_linear(x.bfloat16(), w, None, [FusedDraw(eps)]).float().sum().backward()
    assert x.grad is not None


def test_gaussian_noise_cpu_has_no_fused_path():
    draw = GaussianRowNoise(123, torch.ones(4), genlora.methods.flat_lora.GeneratorPool())
    assert draw.perturb(torch.zeros(4, 3)) is None  # CPU: PyTorch path, built by sample_into


def test_batched_regularizer_value_and_gradients_equal_per_factor_loop():
    model = make_llama_peft(seed=5)
    handle = genlora.attach(model, genlora.RMLoRA(reg_lambda=0.3, k=2))
    rm = handle.method("rm_lora")
    reg = rm.regularizer()
    reg.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    terms = []
    for slot in handle.slots:
        a, b = slot.a_weight, slot.b_weight
        eye = torch.eye(slot.r)
        terms += [torch.linalg.matrix_norm(a @ a.T - eye), torch.linalg.matrix_norm(b.T @ b - eye)]
    ref = 0.3 * torch.stack(terms).mean()
    ref.backward()
    torch.testing.assert_close(reg, ref, rtol=1e-6, atol=1e-7)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-8)
    assert orthogonality_regularizer(handle.slots).item() == pytest.approx(ref.item() / 0.3, rel=1e-6)


def reference_masks(rm, handle, step):
    """The per-slot loop of the first implementation (official-style): randperm(r)[:k] per slot."""
    from genlora.core.seeding import derive_seed

    gen = torch.Generator().manual_seed(derive_seed(rm.config.seed, "rm_lora", step))
    out = []
    for slot in handle.slots:
        k = rm.k_for(slot)
        keep_a = torch.zeros(slot.r, dtype=torch.bool)
        keep_a[torch.randperm(slot.r, generator=gen)[:k]] = True
        if rm.config.variant == "v1":
            keep_b = keep_a
        else:
            keep_b = torch.zeros(slot.r, dtype=torch.bool)
            keep_b[torch.randperm(slot.r, generator=gen)[:k]] = True
        out.append((keep_a, keep_b))
    return out


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_mask_draws_equal_per_slot_loop_with_mixed_ranks(variant):
    from peft import LoraConfig, get_peft_model

    from conftest import MLP

    torch.manual_seed(0)
    model = get_peft_model(MLP(), LoraConfig(r=4, rank_pattern={"lin1": 6}, target_modules=["lin0", "lin1"]))
    handle = genlora.attach(model, genlora.RMLoRA(k=None, variant=variant, seed=9))
    rm = handle.method("rm_lora")
    assert sorted(s.r for s in handle.slots) == [4, 6]
    for step in range(5):
        got = rm.draw_keep_masks(step)
        ref = reference_masks(rm, handle, step)
        for (ga, gb), (ra, rb) in zip(got, ref):
            assert torch.equal(ga, ra) and torch.equal(gb, rb)


@pytest.mark.parametrize("policy", ["skip", "off"])
def test_grouped_gradient_masking_equals_indexed_zeroing(policy):
    """The foreach path (finite gradients) and the index-fill path (on_nonfinite='off') zero exactly the dropped
    rank components, as `grad[drop] = 0` did."""
    model = make_llama_peft(seed=2)
    handle = genlora.attach(model, genlora.RMLoRA(k=2, variant="v2", mask_start_step=0, reg_lambda=0.0),
                            on_nonfinite=policy)
    rm = handle.method("rm_lora")
    model.train()
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    handle.begin_step()
    model(input_ids=ids, labels=ids).loss.backward()
    before = {id(p): p.grad.clone() for p in model.parameters() if p.requires_grad}
    handle.pre_optimizer_step()
    for slot, (keep_a, keep_b) in zip(handle.slots, rm.last_keep):
        a, b = slot.a_weight, slot.b_weight
        ref_a, ref_b = before[id(a)].clone(), before[id(b)].clone()
        ref_a[~keep_a] = 0
        ref_b[:, ~keep_b] = 0
        assert torch.equal(a.grad, ref_a) and torch.equal(b.grad, ref_b), slot.name
    handle.post_optimizer_step()


def test_masks_survive_missing_gradients():
    model = make_mlp_peft(r=4)
    handle = genlora.attach(model, genlora.RMLoRA(k=1, mask_start_step=0, reg_lambda=0.0))
    model.train()
    handle.begin_step()
    model(torch.randn(3, 16)).sum().backward()
    handle.slots[0].a_weight.grad = None  # e.g. a layer that took no part in this step's loss
    handle.pre_optimizer_step()
    assert handle.slots[0].a_weight.grad is None
    assert int((handle.slots[1].a_weight.grad.abs().sum(1) != 0).sum()) <= 1
    handle.post_optimizer_step()
