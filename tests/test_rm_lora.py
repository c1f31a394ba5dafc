"""RM-LoRA: the regularizer against a hand computation, the rank mask (exactly k components), variants, targets."""

import pytest
import torch
from conftest import make_llama_peft, make_mlp_peft

import genlora
from genlora.methods.rm_lora import orthogonality_regularizer


def hand_regularizer(model):
    """(1/K) [sum_A ||A A^T - I||_F + sum_B ||B^T B - I||_F], written out with loops over entries' squares."""
    terms = []
    for name, p in model.named_parameters():
        if "lora_A" in name:
            g = p @ p.T
        elif "lora_B" in name:
            g = p.T @ p
        else:
            continue
        g = g.detach()
        r = g.shape[0]
        total = 0.0
        for i in range(r):
            for j in range(r):
                total += float(g[i, j] - (1.0 if i == j else 0.0)) ** 2
        terms.append(total**0.5)
    return sum(terms) / len(terms)


def test_regularizer_equals_hand_computation():
    model = make_llama_peft(seed=3)
    handle = genlora.attach(model, genlora.RMLoRA(reg_lambda=0.25, k=2))
    reg = handle.method("rm_lora").regularizer()
    assert reg.item() == pytest.approx(0.25 * hand_regularizer(model), rel=1e-5)
    # B = 0 gives sqrt(r) for each B term (spec 1.2)
    fresh = make_mlp_peft(r=4)
    with torch.no_grad():
        for n, p in fresh.named_parameters():
            if "lora_B" in n:
                p.zero_()
    h2 = genlora.attach(fresh, genlora.RMLoRA(k=2))
    slots = h2.slots
    b_terms = [torch.linalg.matrix_norm(s.b_weight.T @ s.b_weight - torch.eye(4)) for s in slots]
    assert all(t.item() == pytest.approx(2.0) for t in b_terms)
    assert orthogonality_regularizer(slots).item() == pytest.approx(hand_regularizer(fresh), rel=1e-5)


def test_regularizer_reaches_model_loss():
    model = make_llama_peft()
    ids = torch.randint(1, 64, (2, 8))
    model.train()
    plain = model(input_ids=ids, labels=ids).loss
    handle = genlora.attach(model, genlora.RMLoRA(reg_lambda=0.5, k=2))
    handle.begin_step()
    with_reg = model(input_ids=ids, labels=ids).loss
    expected = plain + handle.method("rm_lora").regularizer()
    torch.testing.assert_close(with_reg, expected)


def one_step(model, handle, step_loss=True):
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(handle.global_step))
    handle.begin_step()
    model(input_ids=ids, labels=ids).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    handle.pre_optimizer_step()


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_exactly_k_components_get_gradient(variant):
    model = make_llama_peft(seed=1, task="SEQ_CLS")  # has a trainable, non-LoRA classifier head ("score")
    model.train()
    rm = genlora.RMLoRA(k=2, variant=variant, seed=4)
    handle = genlora.attach(model, rm)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    head = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert head, "the seq-cls model must have trainable non-LoRA parameters"
    same_b = []
    for step in range(4):
        ids = torch.randint(1, 64, (4, 8), generator=torch.Generator().manual_seed(step))
        handle.begin_step()
        model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        handle.pre_optimizer_step()
        if step == 0:  # mask_start_step = 1: the official code leaves step 0 unmasked
            assert rm.last_keep == []
        else:
            for slot, (keep_a, keep_b) in zip(handle.slots, rm.last_keep):
                a_rows = (slot.a_weight.grad.abs().sum(1) != 0).cpu()
                b_cols = (slot.b_weight.grad.abs().sum(0) != 0).cpu()
                assert int(keep_a.sum()) == 2 and int(keep_b.sum()) == 2
                assert torch.equal(a_rows, keep_a) and torch.equal(b_cols, keep_b), slot.name
                same_b.append(torch.equal(keep_a, keep_b))
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head)  # untouched by default
        opt.step()
        handle.post_optimizer_step()
        opt.zero_grad()
    assert all(same_b) if variant == "v1" else not all(same_b)


def test_masks_are_seeded_and_resampled_each_step():
    def masks(seed):
        model = make_mlp_peft(r=8)
        rm = genlora.RMLoRA(k=3, seed=seed, reg_lambda=0.0)
        genlora.attach(model, rm)
        return [rm.draw_keep_masks(step) for step in range(3)]

    a, b, c = masks(1), masks(1), masks(2)
    flat = lambda ms: torch.stack([torch.cat([ka, kb]) for step in ms for ka, kb in step])
    assert torch.equal(flat(a), flat(b))
    assert not torch.equal(flat(a), flat(c))
    assert not torch.equal(flat(a[1:2]), flat(a[2:3]))


def test_mask_frequency_uniform_over_components():
    model = make_mlp_peft(r=8)
    rm = genlora.RMLoRA(k=2, reg_lambda=0.0)
    genlora.attach(model, rm)
    counts = torch.zeros(8)
    steps = 2000
    for step in range(steps):
        counts += rm.draw_keep_masks(step)[0][0].float()
    expected = steps * 2 / 8
    std = (steps * (2 / 8) * (6 / 8)) ** 0.5
    assert torch.all((counts - expected).abs() < 5 * std)


def test_mask_all_trainable_reproduces_official_quirk():
    model = make_llama_peft(seed=1, task="SEQ_CLS")
    model.train()
    handle = genlora.attach(model, genlora.RMLoRA(k=2, mask_all_trainable=True, mask_start_step=0))
    handle.begin_step()
    model(input_ids=torch.randint(1, 64, (4, 8)), labels=torch.tensor([0, 1, 1, 0])).loss.backward()
    handle.pre_optimizer_step()
    head = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert all(torch.count_nonzero(p.grad) == 0 for p in head)


def test_update_target_freezes_masked_components():
    model = make_mlp_peft(r=4)
    model.train()
    rm = genlora.RMLoRA(k=1, mask_target="update", mask_start_step=0, reg_lambda=0.0)
    handle = genlora.attach(model, rm)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    x, y = torch.randn(8, 16), torch.randn(8, 4)
    for _ in range(3):
        before = [(s.a_weight.detach().clone(), s.b_weight.detach().clone()) for s in handle.slots]
        handle.begin_step()
        torch.nn.functional.mse_loss(model(x), y).backward()
        handle.optimizer_step(opt)
        opt.zero_grad()
        for (a0, b0), slot, (keep_a, keep_b) in zip(before, handle.slots, rm.last_keep):
            assert torch.equal(slot.a_weight[~keep_a], a0[~keep_a])  # momentum and decay did not move them
            assert torch.equal(slot.b_weight[:, ~keep_b], b0[:, ~keep_b])
            assert not torch.equal(slot.a_weight[keep_a], a0[keep_a])


def test_k_bounds_checked_per_layer():
    model = make_mlp_peft(r=4)
    with pytest.raises(ValueError, match=r"k must be in \[1, r\] = \[1, 4\]"):
        genlora.attach(model, genlora.RMLoRA(k=5))
    with pytest.raises(ValueError, match="k must be in"):
        genlora.RMLoRA(k=0)
