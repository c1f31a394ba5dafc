"""attach/detach, adapters, bad input, misuse of the step protocol, configs and state."""

import json

import pytest
import torch
from conftest import make_llama_peft, make_mlp_peft
from torch import nn

import genlora
from peft import get_peft_model_state_dict
from genlora import FlatLoRA, FlatLoRAConfig, RMLoRA, RMLoRAConfig


def hook_counts(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_attach_detach_restores_model_exactly():
    model = make_llama_peft(seed=4)
    ids = torch.randint(1, 64, (2, 9))
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks_before = hook_counts(model)
    forwards_before = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
    model.train()
    torch.manual_seed(0)
    out_train_before = model(input_ids=ids).logits
    model.eval()
    out_before = model(input_ids=ids).logits

    handle = genlora.attach(model, FlatLoRA(sigma=0.2, schedule="constant"), RMLoRA(k=2))
    assert hook_counts(model) > hooks_before
    model.train()
    handle.begin_step()
    model(input_ids=ids).logits.sum()  # a noisy forward
    handle.detach()

    assert hook_counts(model) == hooks_before
    assert {n: m.__dict__.get("forward") for n, m in model.named_modules()} == forwards_before
    state_after = model.state_dict()
    assert state_before.keys() == state_after.keys()
    assert all(torch.equal(state_before[k], state_after[k]) for k in state_before)
    model.eval()
    assert torch.equal(model(input_ids=ids).logits, out_before)
    model.train()
    torch.manual_seed(0)
    assert torch.equal(model(input_ids=ids).logits, out_train_before)
    # a detached handle refuses to drive, and the layers can be attached again
    with pytest.raises(RuntimeError, match="detached"):
        handle.begin_step()
    genlora.attach(model, FlatLoRA()).detach()


def test_respects_active_adapter_not_default():
    from peft import LoraConfig, get_peft_model

    from conftest import MLP

    torch.manual_seed(0)
    model = get_peft_model(MLP(), LoraConfig(r=2, target_modules=["lin0", "lin1"]), adapter_name="first")
    model.add_adapter("second", LoraConfig(r=6, target_modules=["lin0", "lin1"]))
    model.set_adapter("second")
    handle = genlora.attach(model, RMLoRA(k=5))
    assert handle.adapter_name == "second"
    assert all(s.r == 6 for s in handle.slots)
    handle.detach()
    handle = genlora.attach(model, RMLoRA(k=1), adapter_name="first")
    assert all(s.r == 2 for s in handle.slots)
    handle.detach()
    with pytest.raises(ValueError, match="adapter_name must be one of"):
        genlora.attach(model, RMLoRA(k=1), adapter_name="nope")


@pytest.mark.parametrize(
    "make, match, exc",
    [
        (lambda: FlatLoRA(sigma=-0.1), r"sigma must be in \[0.0, inf\]", ValueError),
        (lambda: FlatLoRA(sigma="big"), "sigma must be a number", TypeError),
        (lambda: FlatLoRA(schedule="step"), r"schedule must be one of \['cosine', 'linear', 'constant'\]", ValueError),
        (lambda: FlatLoRA(resample_every=0), r"resample_every must be in \[1, inf\]", ValueError),
        (lambda: RMLoRA(reg_lambda=-1.0), r"reg_lambda must be in \[0.0, inf\]", ValueError),
        (lambda: RMLoRA(k=0), r"k must be in \[1, inf\]", ValueError),
        (lambda: RMLoRA(k=2.5), "k must be an integer", TypeError),
        (lambda: RMLoRA(variant="v3"), r"variant must be one of \['v1', 'v2'\]", ValueError),
        (lambda: RMLoRA(mask_target="weights"), "mask_target must be one of", ValueError),
        (lambda: FlatLoRA(sigma=float("nan")), "sigma must be in", ValueError),
        (lambda: FlatLoRA(bogus=1), "unexpected keyword argument 'bogus'", TypeError),
    ],
)
def test_bad_options_raise_naming_the_field(make, match, exc):
    with pytest.raises(exc, match=match):
        make()


def test_bad_models_raise_before_anything_is_attached():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        genlora.attach("not a model", FlatLoRA())
    plain = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="model has no LoRA layers"):
        genlora.attach(plain, FlatLoRA())
    model = make_mlp_peft(r=4)
    hooks = hook_counts(model)
    with pytest.raises(ValueError, match="k must be in"):
        genlora.attach(model, FlatLoRA(), RMLoRA(k=9))  # FlatLoRA is valid, but nothing may be attached
    assert hook_counts(model) == hooks
    assert all(m.__dict__.get("forward") is None for m in model.modules())
    with pytest.raises(ValueError, match="at least one method"):
        genlora.attach(model)
    with pytest.raises(ValueError, match="each method may be attached once"):
        genlora.attach(model, FlatLoRA(), FlatLoRA())
    with pytest.raises(TypeError, match="genlora method objects"):
        genlora.attach(model, FlatLoRAConfig())
    with pytest.raises(ValueError, match="total_steps must be in"):
        genlora.attach(model, FlatLoRA(), total_steps=0)
    handle = genlora.attach(model, FlatLoRA())
    with pytest.raises(ValueError, match="already attached"):
        genlora.attach(model, RMLoRA(k=1))
    handle.detach()


def test_missed_calls_raise():
    model = make_mlp_peft()
    model.train()
    handle = genlora.attach(model, FlatLoRA(schedule="constant"), RMLoRA(k=2), total_steps=5)
    x = torch.randn(3, 16)
    with pytest.raises(RuntimeError, match="call handle.begin_step"):
        model(x)  # training forward before begin_step
    handle.begin_step()
    loss = model(x).pow(2).mean()  # the model returns no .loss: the regularizer must be added by hand
    loss.backward()
    with pytest.raises(RuntimeError, match="reached no backpropagated loss"):
        handle.pre_optimizer_step()
    with pytest.raises(RuntimeError, match="begin_step\\(\\) called twice"):
        handle.begin_step()
    handle.loss(model(x).pow(2).mean()).backward()
    handle.pre_optimizer_step()
    with pytest.raises(RuntimeError, match="training-mode forward"):
        model(x)  # between clipping and the optimizer step
    with pytest.raises(RuntimeError, match="post_optimizer_step\\(\\) was not called"):
        handle.begin_step()
    handle.post_optimizer_step()
    with pytest.raises(RuntimeError, match="needs begin_step"):
        handle.pre_optimizer_step()
    model.eval()
    model(x)  # evaluation between steps is fine


def test_regularizer_added_twice_is_caught():
    model = make_llama_peft()
    model.train()
    handle = genlora.attach(model, RMLoRA(k=2))
    ids = torch.randint(1, 64, (2, 6))
    handle.begin_step()
    handle.loss(model(input_ids=ids, labels=ids).loss).backward()
    with pytest.raises(RuntimeError, match="added twice"):
        handle.pre_optimizer_step()


def test_config_json_round_trip_and_help():
    for cfg in (FlatLoRAConfig(sigma=0.1, schedule="linear", seed=3), RMLoRAConfig(k=3, variant="v2")):
        again = type(cfg).from_json(cfg.to_json())
        assert again == cfg
        assert type(cfg).from_dict(cfg.to_dict()) == cfg
        assert all(text for text in type(cfg).help().values())
    with pytest.raises(ValueError, match="unknown FlatLoRAConfig field"):
        FlatLoRAConfig.from_dict({"sigma": 0.1, "rho": 0.2})
    with pytest.raises(ValueError, match="config is for method"):
        RMLoRAConfig.from_json(FlatLoRAConfig().to_json())


def test_state_dict_round_trip_and_mismatch(tmp_path):
    model = make_mlp_peft()
    model.train()
    handle = genlora.attach(model, FlatLoRA(sigma=0.1, resample_every=2, schedule="constant"), RMLoRA(k=2))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    x = torch.randn(4, 16)
    for _ in range(3):
        handle.begin_step()
        handle.loss(model(x).pow(2).mean()).backward()
        handle.optimizer_step(opt)
    state = handle.state_dict()
    assert state["global_step"] == 3
    json.dumps({k: v for k, v in state.items() if k not in ("method_states", "adapter")})  # descriptive part: JSON
    assert set(state["adapter"]) == set(get_peft_model_state_dict(model))  # the trained adapter travels with it
    handle.detach()
    other = genlora.attach(model, FlatLoRA(sigma=0.1, resample_every=2, schedule="constant"), RMLoRA(k=2))
    other.load_state_dict(state)
    assert other.global_step == 3
    other.detach()
    wrong = genlora.attach(model, FlatLoRA(sigma=0.2, resample_every=2, schedule="constant"), RMLoRA(k=2))
    with pytest.raises(ValueError, match="saved state is for methods"):
        wrong.load_state_dict(state)
    assert wrong.global_step == 0


def test_save_pretrained_writes_config_and_load_methods(tmp_path):
    model = make_mlp_peft()
    handle = genlora.attach(model, FlatLoRA(sigma=0.07), RMLoRA(k=3, variant="v2"), total_steps=10)
    handle.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").exists()
    assert (tmp_path / "adapter_model.safetensors").exists()
    saved = json.loads((tmp_path / genlora.GENLORA_CONFIG_NAME).read_text())
    seed = handle.methods[0].seed  # derived from the global torch seed at attach, and recorded
    assert isinstance(seed, int) and seed == saved["methods"][0]["seed"]
    assert saved["methods"][0] == {"method": "flat_lora", **FlatLoRAConfig(sigma=0.07, seed=seed).to_dict()}
    methods = genlora.load_methods(tmp_path)  # rebuilt with the run's seeds pinned
    assert [m.config.to_dict() for m in methods] == [m.resolved_config() for m in handle.methods]
    assert not list(tmp_path.glob(".tmp-*"))  # atomic writes leave no temporary files


def test_multiple_adapters_only_the_named_one_is_touched_and_a_switch_mid_run_raises(tmp_path):
    from peft import LoraConfig, PeftModel

    model = make_llama_peft()
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                          task_type="CAUSAL_LM"))
    model.set_adapter("default")
    other = {k: v.clone() for k, v in get_peft_model_state_dict(model, adapter_name="other").items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    handle = genlora.attach(model, FlatLoRA(sigma=0.1), RMLoRA(k=2), genlora.LoRASC(stage_steps=2),
                            genlora.LoRADropout(p=0.2, deploy="merged_expectation"), total_steps=4, optimizer=opt)
    assert handle.adapter_name == "default" and all(s.adapter == "default" for s in handle.slots)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(3):
        ids = torch.randint(1, 64, (2, 6), generator=g)
        handle.begin_step()
        model(input_ids=ids, labels=ids).loss.backward()
        handle.optimizer_step(opt)
        opt.zero_grad()
    after = get_peft_model_state_dict(model, adapter_name="other")
    assert all(torch.equal(other[k], after[k]) for k in other)  # the other adapter: bit-identical
    model.save_pretrained(tmp_path)  # both adapters; ours as its deployed model
    model.set_adapter("other")
    with pytest.raises(RuntimeError, match="active adapter"):
        handle.begin_step()
    assert not handle.in_step
    model.set_adapter("default")
    handle.begin_step()  # back on the adapter genlora acts on: the run continues
    loaded = PeftModel.from_pretrained(make_llama_peft().unload(), tmp_path / "other", adapter_name="other")
    assert set(get_peft_model_state_dict(loaded, adapter_name="other")) == set(other)
