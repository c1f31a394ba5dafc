"""Every PEFT LoRA layer type x every method (and all four together): the table of docs/methods.md, "Layer types",
rebuilt by tests. Each cell trains a few steps, keeps the frozen base bit-identical, changes the step against plain
LoRA, and saves a deployed adapter that plain PEFT reloads to the live model's outputs; or it is a documented
refusal raised before anything changes. Per kind, the laws that depend on the layout: Flat-LoRA's row axis and
fan-in, the exact perturbed forward, LoRA Dropout's feature axes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from torch import nn

import genlora

def _has_bnb() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


# --- the models, one per layer type ---------------------------------------------------------------------------------
class ConvNet(nn.Module):
    def __init__(self, dim: int, groups: int = 1):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
        self.dim = dim
        self.c0 = conv(4, 8, 3, padding=1)
        self.c1 = conv(8, 8, 3, padding=1, padding_mode="reflect", groups=groups)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.c1(torch.relu(self.c0(x)))
        return self.out(h.flatten(2).mean(2))


class EmbedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 16, padding_idx=0)
        self.out = nn.Linear(16, 3)

    def forward(self, ids):
        return self.out(self.emb(ids).mean(1))


class QNet(nn.Module):
    """A frozen quantized bitsandbytes layer (QLoRA) followed by a float head."""

    def __init__(self, quant: str):
        super().__init__()
        import bitsandbytes as bnb

        ref = nn.Linear(64, 32)
        if quant == "int8":
            self.lin = bnb.nn.Linear8bitLt(64, 32, bias=True, has_fp16_weights=False)
            self.lin.weight = bnb.nn.Int8Params(ref.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        else:
            qtype, double = quant.split("-") if "-" in quant else (quant, "")
            self.lin = bnb.nn.Linear4bit(64, 32, bias=True, compute_dtype=torch.float32, quant_type=qtype,
                                         compress_statistics=double == "dq")
            self.lin.weight = bnb.nn.Params4bit(ref.weight.data.clone(), requires_grad=False, quant_type=qtype,
                                                compress_statistics=double == "dq")
        self.lin.bias = nn.Parameter(ref.bias.data.clone(), requires_grad=False)
        self.lin = self.lin.to("cpu")  # quantizes
        self.out = nn.Linear(32, 3)
        self.is_loaded_in_4bit, self.is_loaded_in_8bit = quant != "int8", quant == "int8"

    def forward(self, x):
        return self.out(self.lin(x))


@dataclass
class Kind:
    build: Callable[[], nn.Module]  # the base model, deterministic
    targets: list[str]
    inputs: Callable[[int], dict]
    lora: dict
    needs: Callable[[], bool] = lambda: True

    def peft(self) -> PeftModel:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            base = self.build()
            model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=self.targets, **self.lora))
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():  # a nonzero B (and embedding A) so the merged weights differ from W
                for name, p in model.named_parameters():
                    if "lora_B" in name or "lora_embedding" in name:
                        p.copy_(0.2 * torch.randn(p.shape, generator=g))
        return model

    def fresh_base(self) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return self.build()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def _llama():
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(tiny_llama_config())


def _ids(i, vocab=64, shape=(2, 6)):
    return torch.randint(1, vocab, shape, generator=torch.Generator().manual_seed(100 + i))


def _images(dim):
    def make(i):
        g = torch.Generator().manual_seed(200 + i)
        return {"x": torch.randn(2, 4, *([6] * dim), generator=g)}

    return make


KINDS: dict[str, Kind] = {
    "linear": Kind(lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3)), ["0", "2"],
                   lambda i: {"input": torch.randn(4, 16, generator=torch.Generator().manual_seed(i))}, {}),
    "conv1d_t (GPT-2 Conv1D)": Kind(_gpt2, ["c_attn", "c_proj", "c_fc"], lambda i: {"input_ids": _ids(i)},
                                    {"fan_in_fan_out": True}),
    "conv1d": Kind(lambda: ConvNet(1), ["c0", "c1"], _images(1), {}),
    "conv2d": Kind(lambda: ConvNet(2), ["c0", "c1"], _images(2), {}),
    "conv3d": Kind(lambda: ConvNet(3), ["c0", "c1"], _images(3), {}),
    "embedding": Kind(EmbedNet, ["emb", "out"], lambda i: {"ids": _ids(i, vocab=40, shape=(3, 5))}, {}),
    "lm_head": Kind(_llama, ["lm_head", "q_proj"], lambda i: {"input_ids": _ids(i)}, {}),
    "bnb nf4": Kind(lambda: QNet("nf4"), ["lin"], lambda i: {"x": torch.randn(4, 64)}, {}, _has_bnb),
    "bnb fp4 double-quant": Kind(lambda: QNet("fp4-dq"), ["lin"], lambda i: {"x": torch.randn(4, 64)}, {}, _has_bnb),
    "bnb int8": Kind(lambda: QNet("int8"), ["lin"], lambda i: {"x": torch.randn(4, 64)}, {}, _has_bnb),
    "dora (Linear)": Kind(lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3)), ["0", "2"],
                          lambda i: {"input": torch.randn(4, 16, generator=torch.Generator().manual_seed(i))},
                          {"use_dora": True}),
}

SETUPS = {
    "flat_lora": lambda: [genlora.FlatLoRA(sigma=0.2, schedule="constant")],
    "rm_lora": lambda: [genlora.RMLoRA(k=2, reg_lambda=0.1, mask_start_step=0)],
    "lorasc": lambda: [genlora.LoRASC(stage_steps=2, alpha=0.6, noise_lambda=0.2)],
    "lora_dropout": lambda: [genlora.LoRADropout(p=0.3, deploy="merged_expectation")],
    "all four": lambda: [genlora.FlatLoRA(sigma=0.2, schedule="constant"), genlora.RMLoRA(k=2, mask_start_step=0),
                         genlora.LoRASC(stage_steps=2, alpha=0.6, noise_lambda=0.2),
                         genlora.LoRADropout(p=0.3, deploy="merged_expectation")],
}
# Documented refusals (docs/methods.md): kind -> {setup: error message fragment}.
REFUSED = {
    "dora (Linear)": {"lorasc": "DoRA", "lora_dropout": "use_dora", "all four": "DoRA"},
}


def _output(out):
    if isinstance(out, torch.Tensor):
        return out
    return out["logits"] if isinstance(out, dict) else out.logits


def _loss(out):
    return _output(out).float().pow(2).mean()


def _frozen(model):
    out = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            data = p.data if type(p.data) is torch.Tensor else p.data.data
            out[n] = data.detach().clone()
    return out


def _train(model, kind: Kind, setup, steps=4):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    handle = genlora.attach(model, *SETUPS[setup](), total_steps=steps, optimizer=opt, guard_base=True) if setup else None
    model.train()
    for i in range(steps):
        if handle is not None:
            handle.begin_step()
        loss = _loss(model(**kind.inputs(i)))
        (handle.loss(loss) if handle is not None and handle.objective.active else loss).backward()
        if handle is not None:
            handle.optimizer_step(opt)
        else:
            opt.step()
        opt.zero_grad()
    return handle


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("kind_name", list(KINDS))
def test_layer_type_by_method(kind_name, setup, tmp_path):
    kind = KINDS[kind_name]
    if not kind.needs():
        pytest.skip("missing install: bitsandbytes (run `bash scripts/setup.sh`)")
    model = kind.peft()
    frozen = _frozen(model)
    refusal = REFUSED.get(kind_name, {}).get(setup)
    if refusal is not None:
        hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
        with pytest.raises((TypeError, ValueError), match=refusal):
            genlora.attach(model, *SETUPS[setup]())
        assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
        return
    handle = _train(model, kind, setup)
    handle.verify_base()
    assert all(torch.equal(v, _frozen(model)[k]) for k, v in frozen.items())
    plain = kind.peft()
    _train(plain, kind, None)
    trained, reference = get_peft_model_state_dict(model), get_peft_model_state_dict(plain)
    assert any(not torch.allclose(trained[k], reference[k]) for k in reference)  # the method acted

    model.save_pretrained(tmp_path)  # the deployed model
    loaded = PeftModel.from_pretrained(kind.fresh_base(), tmp_path).eval()
    model.eval()
    x = kind.inputs(50)
    with torch.no_grad():
        want, got = _output(model(**x)), _output(loaded(**x))
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_grouped_convolutions_and_multihead_attention_are_refused():
    grouped = get_peft_model(ConvNet(2, groups=2), LoraConfig(r=4, target_modules=["c1"]))
    for method in (genlora.FlatLoRA(), genlora.LoRASC(), genlora.LoRADropout(), genlora.RMLoRA()):
        with pytest.raises(TypeError):
            genlora.attach(grouped, method)


# --- per-kind laws ---------------------------------------------------------------------------------------------------
WIDE = {  # layers with a large fan-in, so that per-row statistics are tight
    "linear": (lambda: nn.Linear(1024, 24), lambda: torch.randn(3, 1024)),
    "conv2d": (lambda: nn.Conv2d(64, 12, 4), lambda: torch.randn(2, 64, 5, 5)),  # fan-in 64 * 16 = 1024
    "embedding": (lambda: nn.Embedding(1024, 12), lambda: torch.randint(0, 1024, (3, 7))),  # fan-in = vocab
    "conv1d_t": (None, lambda: torch.randn(3, 1024)),
}


def _wide(kind_name):
    from transformers.pytorch_utils import Conv1D

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = Conv1D(24, 1024) if kind_name == "conv1d_t" else WIDE[kind_name][0]()

        def forward(self, x):
            return self.layer(x)

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = get_peft_model(Wrap(), LoraConfig(r=4, lora_alpha=8, target_modules=["layer"],
                                                  fan_in_fan_out=kind_name == "conv1d_t"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("kind_name", list(WIDE))
def test_flat_lora_noise_follows_each_kinds_rows_and_fan_in_and_the_forward_is_exact(kind_name):
    model = _wide(kind_name)
    flat = genlora.FlatLoRA(sigma=0.3, schedule="constant", seed=1)
    handle = genlora.attach(model, flat)
    slot = handle.slots[0]
    model.train()
    handle.begin_step()
    eps = flat.noise(slot)  # (n_out, n_in) view
    w = slot.base_layer.weight
    lin = slot.kind.as_linear(w).float()
    merged = lin + slot.delta_weight()
    n_out, n_in = merged.shape
    assert n_in == 1024 and n_out in (12, 24)
    expected = 0.3 * merged.norm(dim=1) / math.sqrt(n_in)
    ratio = eps.std(dim=1) / expected
    assert (ratio - 1).abs().max() < 5 / math.sqrt(2 * n_in)
    assert ((eps.std(dim=1) / (0.3 * lin.norm(dim=1) / math.sqrt(n_in))) - 1).abs().mean() > 0.05  # W' != W here
    x = WIDE[kind_name][1]()
    noisy_w = w + slot.kind.from_linear(eps, w)  # the noise in storage layout
    got = slot.base_layer(x)
    if kind_name == "embedding":
        want = F.embedding(x, noisy_w)
    elif kind_name == "conv1d_t":
        want = x @ noisy_w + slot.base_layer.bias
    elif kind_name == "conv2d":
        want = F.conv2d(x, noisy_w, slot.base_layer.bias)
    else:
        want = F.linear(x, noisy_w, slot.base_layer.bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if kind_name != "embedding":  # the backward regenerates the same W + eps
        xg = x.clone().requires_grad_(True)
        slot.base_layer(xg).sum().backward()
        xr = x.clone().requires_grad_(True)
        (F.conv2d(xr, noisy_w, None) if kind_name == "conv2d" else xr @ slot.kind.as_linear(noisy_w).T).sum().backward()
        torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-5, atol=1e-5)


def test_lora_dropout_masks_conv_channels_and_embedding_tokens_and_coordinates():
    # conv: input channels of A, output channels of B
    model = KINDS["conv2d"].peft()
    dropout = genlora.LoRADropout(p=0.4, seed=3)
    handle = genlora.attach(model, dropout)
    slot = handle.slots[0]
    seen = {}
    slot.layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    slot.lora_A.register_forward_pre_hook(lambda m, a: seen.__setitem__("xa", a[0]))
    slot.lora_B.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))
    model.train()
    handle.begin_step()
    model(**KINDS["conv2d"].inputs(0))
    m_a, m_b = dropout.train_masks(slot, 0, 0, 0)
    assert m_a.shape == (4,) and m_b.shape == (8,)
    assert torch.equal(seen["xa"], seen["x"] * m_a[None, :, None, None])
    want = slot.lora_B(slot.lora_A(seen["xa"])) * m_b[None, :, None, None]
    torch.testing.assert_close(seen["out"], want)

    # embedding: tokens (A's inputs) and coordinates (B's outputs): the LoRA term becomes m_B * m_A[token] * T
    model = KINDS["embedding"].peft()
    dropout = genlora.LoRADropout(p=0.4, seed=3)
    handle = genlora.attach(model, dropout)
    slot = next(s for s in handle.slots if s.is_embedding)
    ids = _ids(0, vocab=40, shape=(3, 5))
    model.train()
    handle.begin_step()
    got = slot.layer(ids)
    m_a, m_b = dropout.train_masks(slot, 0, -1, 0)  # a layer called directly: forward_index of the step start
    term = F.embedding(ids, slot.a_weight.T, padding_idx=0) @ slot.b_weight.T * slot.scaling
    want = slot.base_layer(ids) + m_a[ids].unsqueeze(-1) * m_b * term
    torch.testing.assert_close(got, want)


def test_quantized_base_merge_dequantizes_and_says_so():
    if not _has_bnb():
        pytest.skip("missing install: bitsandbytes (run `bash scripts/setup.sh`)")
    kind = KINDS["bnb nf4"]
    model = kind.peft()
    handle = _train(model, kind, "lorasc")
    with pytest.warns(UserWarning, match="dequantized"):
        merged = handle.merged_model()
    assert type(merged.lin) is nn.Linear and merged.lin.weight.dtype == torch.float32
    slot = handle.slots[0]
    want = slot.dense_weight().float() + sum(u @ v for u, v in handle.deployed_factors(slot))  # dequantized W + S_T
    torch.testing.assert_close(merged.lin.weight, want, rtol=1e-5, atol=1e-6)
    assert type(slot.base_layer.weight).__name__ == "Params4bit"  # the live model keeps its quantized base
