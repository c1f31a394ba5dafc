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


# --- the regularizer's weight under the Trainer's gradient accumulation ----------------------------------------------
def _reg_to_task_update_ratio(kind: str, accum: int, tmp_path) -> float:
    """||update from lambda*R|| / ||update from the task loss|| of one SGD step (lr 1, no clipping) over the same 4
    examples, as 1 batch of 4 or `accum` accumulated micro-batches. SGD is linear in the gradient, so the
    regularizer's part of the update is the difference of the runs with and without it."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    from conftest import ListDataset, make_llama_peft

    def model_and_data():
        if kind == "llama":  # normalizes its loss by num_items_in_batch
            model = make_llama_peft(seed=0)
            g = torch.Generator().manual_seed(3)
            data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(1, 64, (4, 6), generator=g)]
        else:  # BERT's classifier ignores num_items_in_batch (its loss is a per-batch mean)
            torch.manual_seed(0)
            cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64, num_labels=2, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0)
            model = get_peft_model(BertForSequenceClassification(cfg),
                                   LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS",
                                              init_lora_weights="gaussian"))
            g = torch.Generator().manual_seed(3)
            data = [{"input_ids": ids, "labels": torch.tensor(i % 2)}
                    for i, ids in enumerate(torch.randint(1, 64, (4, 6), generator=g))]
        return model, data

    def step(reg_lambda):
        model, data = model_and_data()
        before = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
        handle = genlora.attach(model, genlora.RMLoRA(k=4, reg_lambda=reg_lambda, seed=0))  # k = r: no masking
        args = TrainingArguments(output_dir=str(tmp_path / f"{kind}{accum}{reg_lambda}"), max_steps=1,
                                 per_device_train_batch_size=4 // accum, gradient_accumulation_steps=accum,
                                 learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
                                 weight_decay=0.0, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
        Trainer(model=model, args=args, train_dataset=ListDataset(data),
                callbacks=[genlora.GenLoRACallback(handle)]).train()
        after = get_peft_model_state_dict(model)
        keys = [k for k in before if "lora_" in k]
        return torch.cat([(after[k] - before[k]).flatten() for k in keys])

    with_reg, task_only = step(0.5), step(0.0)
    return ((with_reg - task_only).norm() / task_only.norm()).item()


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_regularizer_weight_per_step_does_not_depend_on_the_models_loss_code(kind, tmp_path):
    """With gradient accumulation the Trainer passes num_items_in_batch; BERT ignores it (its micro-batch losses are
    summed as means), a causal LM divides by it. Either way lambda keeps its weight relative to the task loss."""
    one = _reg_to_task_update_ratio(kind, 1, tmp_path)
    four = _reg_to_task_update_ratio(kind, 4, tmp_path)
    assert one > 0.01
    assert four == pytest.approx(one, rel=1e-3)


def test_embedding_lora_trains_and_saves(tmp_path):
    """RM-LoRA on an Embedding LoRA (lora_embedding_A/B): masks its rank components and saves a loadable adapter."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from torch import nn

    class Emb(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.out = nn.Linear(8, 3)

        def forward(self, ids):
            return self.out(self.emb(ids)).mean(1)

    torch.manual_seed(0)
    model = get_peft_model(Emb(), LoraConfig(r=4, lora_alpha=8, target_modules=["emb", "out"]))
    rm = genlora.RMLoRA(k=2, reg_lambda=0.1, mask_start_step=0)
    handle = genlora.attach(model, rm)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, 20, (4, 5))
    for _ in range(2):
        handle.begin_step()
        handle.loss(model(ids).pow(2).mean()).backward()
        handle.pre_optimizer_step()
        emb_slot = handle.slots[0]
        assert emb_slot.is_embedding and int((emb_slot.a_weight.grad.abs().sum(1) > 0).sum()) == 2
        opt.step()
        handle.post_optimizer_step()
        opt.zero_grad()
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(Emb(), tmp_path).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids))
