"""Checks of Flat-LoRA's Triton noise kernel, shared by the CUDA test and the CPU-interpreter run.

Run directly (`python tests/triton_noise_checks.py cpu`) under TRITON_INTERPRET=1 GENLORA_TRITON=interpret, or
call `run_all("cuda")` in-process on a GPU machine. Each check raises AssertionError on failure.
"""

from __future__ import annotations

import math
import sys

import torch


def normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def check_law(z: torch.Tensor) -> None:
    """z (rows, cols) must look like iid N(0, 1): moments, tails, Kolmogorov-Smirnov, and no correlation between
    neighbours, the Box-Muller partners (quarter blocks) and rows."""
    from genlora.kernels.flat_noise_triton import BLOCK

    z = z.double()
    n = z.numel()
    flat = z.reshape(-1)
    assert abs(flat.mean().item()) < 5 / math.sqrt(n), flat.mean()
    assert abs(flat.var().item() - 1) < 5 * math.sqrt(2 / n), flat.var()
    tail = (flat.abs() > 2.0).double().mean().item()  # P(|z| > 2) = 0.0455
    assert abs(tail - 0.0455) < 5 * math.sqrt(0.0455 * 0.9545 / n), tail
    assert abs(flat.pow(3).mean().item()) < 5 * math.sqrt(15 / n)  # skewness
    assert abs(flat.pow(4).mean().item() - 3) < 5 * math.sqrt(96 / n)  # kurtosis
    srt = flat.sort().values
    emp = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = (normal_cdf(srt) - emp).abs().max().item()
    assert ks < 1.95 / math.sqrt(n), ks  # KS critical value at alpha = 0.001

    def corr(a, b):
        a, b = a.reshape(-1), b.reshape(-1)
        return ((a - a.mean()) * (b - b.mean())).mean().item() / (a.std().item() * b.std().item())

    cols = z.shape[1]
    q = BLOCK // 4
    pairs = [(z[:, :-1], z[:, 1:]), (z[:-1], z[1:])]
    if cols >= 2 * q:
        pairs.append((z[:, :q], z[:, q : 2 * q]))  # z0/z1 come from the same uniform pair
    for a, b in pairs:
        assert abs(corr(a, b)) < 5 / math.sqrt(a.numel()), corr(a, b)


def check_kernel(device: str) -> None:
    from genlora.kernels.flat_noise_triton import row_noise

    g = torch.Generator().manual_seed(0)
    rows, cols = 40, 1300  # two column blocks, the second partial
    std = (torch.rand(rows, generator=g) + 0.25).to(device)
    seed = 0x5DEECE66D1234567
    out = torch.empty(rows, cols, device=device)
    row_noise(out, std, seed)
    check_law((out / std[:, None]).cpu())
    # per-row scale
    measured = out.std(dim=1) / std
    assert torch.all((measured - 1).abs() < 5 / math.sqrt(2 * cols)), measured
    # bit-exact regeneration, and a different seed gives different noise
    again = torch.empty_like(out)
    row_noise(again, std, seed)
    assert torch.equal(out, again)
    other = torch.empty_like(out)
    row_noise(other, std, seed + 1)
    assert not torch.equal(out, other)
    assert (out / std[:, None] - other / std[:, None]).abs().mean() > 0.5
    # accumulate (fp32, in place) = base + the same noise, bit for bit
    base = torch.randn(rows, cols, generator=g).to(device)
    acc = base.clone()
    row_noise(acc, std, seed, base=acc)
    assert torch.equal(acc, base + out)
    # fused W + eps in bf16/fp16: regenerates bit for bit; one rounding of the fp32 sum
    for dtype in (torch.bfloat16, torch.float16):
        w = torch.randn(rows, cols, generator=g).to(device=device, dtype=dtype)
        fused = row_noise(torch.empty_like(w), std, seed, base=w)
        assert torch.equal(fused, row_noise(torch.empty_like(w), std, seed, base=w))
        ref = (w.float() + out).to(dtype)
        if device == "cuda":
            assert torch.equal(fused, ref), (fused.float() - ref.float()).abs().max()
        else:  # Triton's interpreter rounds fp32 -> 16-bit by its own routine: allow one ulp
            ulp = ref.float().abs() * (2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10) + 1e-6
            assert torch.all((fused.float() - ref.float()).abs() <= ulp)
    # strided rows (a view with a row stride larger than its width)
    wide = torch.empty(rows, cols + 37, device=device)
    view = wide[:, :cols]
    row_noise(view, std, seed)
    assert torch.equal(view, out)


def check_uniform_and_two_terms(device: str) -> None:
    """The centred-uniform term (LoRASC / NoisyTune stage noise) follows U(-1/2, 1/2) * scale, and a two-term fused
    perturbation equals the unfused accumulation (term 1, + term 2, + W) of the same kernel."""
    from genlora.kernels.flat_noise_triton import NoiseTerm, perturb, row_noise, uniform_noise

    g = torch.Generator().manual_seed(1)
    rows, cols = 24, 1100
    out = torch.empty(rows, cols, device=device)
    uniform_noise(out, 0.3, 77)
    u = (out / 0.3).double().cpu().reshape(-1)
    n = u.numel()
    assert u.min() >= -0.5 and u.max() < 0.5
    assert abs(u.mean().item()) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u.var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)
    hist = torch.histc(u.float(), bins=10, min=-0.5, max=0.5)
    assert torch.all((hist - n / 10).abs() < 5 * math.sqrt(n / 10)), hist
    again = torch.empty_like(out)
    assert torch.equal(uniform_noise(again, 0.3, 77), out)
    per_row = (torch.rand(rows, generator=g) + 0.5).to(device)
    row_scaled = uniform_noise(torch.empty_like(out), per_row, 77)
    assert torch.allclose(row_scaled, out / 0.3 * per_row[:, None], rtol=1e-6, atol=1e-7)

    std = (torch.rand(rows, generator=g) + 0.25).to(device)
    base32 = torch.randn(rows, cols, generator=g).to(device)
    terms = [NoiseTerm("uniform", 77, 0.3), NoiseTerm("normal", 123, std)]
    fused = perturb(torch.empty_like(base32), terms, base=base32)
    seq = uniform_noise(torch.empty_like(base32), 0.3, 77)
    row_noise(seq, std, 123, base=seq)
    seq += base32
    assert torch.equal(fused, seq)
    w = base32.to(torch.bfloat16)
    fused16 = perturb(torch.empty_like(w), terms, base=w)
    assert torch.equal(fused16, perturb(torch.empty_like(w), terms, base=w))
    ref = (uniform_noise(torch.empty_like(base32), 0.3, 77) + row_noise(torch.empty_like(base32), std, 123)
           + w.float()).to(torch.bfloat16)
    if device == "cuda":
        assert torch.equal(fused16, ref)
    else:
        assert torch.all((fused16.float() - ref.float()).abs() <= ref.float().abs() * 2.0**-7 + 1e-6)


def check_core_two_draw_build(device: str) -> None:
    """`PerturbedWeight.build` fuses LoRASC's stage noise and Flat-LoRA's noise into one kernel pass, with the bits of
    the unfused build (each draw's `sample_into` on the kernel, summed in fp32, + W, rounded once)."""
    from genlora.core.perturbed_linear import PerturbedWeight
    from genlora.core.seeding import GeneratorPool
    from genlora.kernels.flat_noise_triton import uniform_noise
    from genlora.methods.flat_lora import GaussianRowNoise
    from genlora.methods.lorasc import UniformNoise

    g = torch.Generator().manual_seed(2)
    pool = GeneratorPool()
    std = (0.1 * torch.rand(20, generator=g)).to(device)
    stage, gauss = UniformNoise(5, 0.2, pool), GaussianRowNoise(999, std, pool)
    single = torch.empty(20, 700, device=device)
    stage.sample_into(single, accumulate=False)  # LoRASC's draw comes from the kernel's generator
    assert torch.equal(single, uniform_noise(torch.empty_like(single), 0.2, 5))
    # bf16 only on a GPU: Triton's CPU interpreter truncates fp32 -> bf16 stores (measured: half of the elements one
    # bf16 ulp towards zero) where the compiled kernel rounds to nearest even, as torch's .to(bfloat16) does
    for dtype in (torch.float32, torch.bfloat16) if device == "cuda" else (torch.float32,):
        w = torch.randn(20, 700, generator=g).to(device=device, dtype=dtype)
        fused = PerturbedWeight([stage, gauss]).build(w)
        buf = torch.empty(w.shape, device=device)
        stage.sample_into(buf, accumulate=False)
        gauss.sample_into(buf, accumulate=True)
        assert torch.equal(fused, buf.add_(w).to(dtype)), dtype
        assert torch.equal(PerturbedWeight([stage]).build(w), (single + w).to(dtype)), dtype


def check_lorasc(device: str) -> None:
    """LoRASC + Flat-LoRA on the kernel: training steps across a stage boundary leave the base bit-identical, and the
    stage noise a layer sees is regenerated bit for bit."""
    from peft import LoraConfig, get_peft_model
    from torch import nn

    import genlora
    from genlora.core.perturbed_linear import noise_kernel

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 64), nn.Tanh(), nn.Linear(64, 8)).to(device)
    model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    handle = genlora.attach(model, genlora.LoRASC(stage_steps=2, noise_lambda=0.15, seed=3),
                            genlora.FlatLoRA(sigma=0.1, schedule="constant", seed=4))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    handle.bind_optimizer(opt)
    model.train()
    x = torch.randn(16, 40, device=device)
    for _ in range(5):
        handle.begin_step()
        model(x).pow(2).mean().backward()
        handle.optimizer_step(opt)
        opt.zero_grad()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, before[n]), n
    lorasc, slot = next(m for m in handle.methods if isinstance(m, genlora.LoRASC)), handle.slots[0]
    kernel = noise_kernel()
    assert kernel is not None and kernel.usable(slot.base_layer.weight), "Triton path not active"
    from genlora.core.perturbed_linear import NoiseTarget

    draw = lorasc.draw_for(NoiseTarget(slot.index, slot.name, slot.base_layer, slot.kind, slot),
                           slot.base_layer.weight)
    assert draw is not None and draw.triton_term() is not None
    first, again = (torch.empty_like(slot.base_layer.weight, dtype=torch.float32) for _ in range(2))
    draw.sample_into(first, accumulate=False)
    draw.sample_into(again, accumulate=False)
    assert torch.equal(first, again) and 0 < first.abs().max() <= draw.scale / 2


def check_flat_lora(device: str) -> None:
    """Flat-LoRA end to end on the kernel: the noise law through `noise()`, gradients equal to an explicit W + eps
    reference, and bit-identical base weights."""
    import copy

    from peft import LoraConfig, get_peft_model
    from torch import nn

    import genlora
    from genlora.core.perturbed_linear import noise_kernel

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 64), nn.Tanh(), nn.Linear(64, 8)).to(device)
    model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights="gaussian"))
    reference = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    flat = genlora.FlatLoRA(sigma=0.3, schedule="constant", seed=11)
    handle = genlora.attach(model, flat)
    kernel = noise_kernel()
    assert kernel is not None and kernel.usable(handle.slots[0].base_layer.weight), "Triton path not active"
    handle.begin_step()
    eps = flat.noise(handle.slots[0])
    assert torch.equal(eps, flat.noise(handle.slots[0]))
    w = handle.slots[0].base_layer.weight.float() + handle.slots[0].delta_weight()
    expected = 0.3 * w.norm(dim=1) / math.sqrt(w.shape[1])
    check_law((eps / expected[:, None]).cpu()[:, :40])
    x = torch.randn(16, 40, device=device)
    model.train()
    reference.train()
    model(x).pow(2).mean().backward()
    ref_modules = dict(reference.named_modules())
    with torch.no_grad():
        for slot in handle.slots:
            base = ref_modules[slot.name].base_layer
            base.weight.copy_(base.weight + flat.noise(slot))
    reference(x).pow(2).mean().backward()
    ref_params = dict(reference.named_parameters())
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref_params[n].grad, rtol=1e-5, atol=1e-7)
    handle.pre_optimizer_step()
    handle.post_optimizer_step()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, before[n]), n

def check_model_fused_vs_unfused(device: str, require_fused: bool = True) -> None:
    """A small Llama trained two steps with LoRASC + Flat-LoRA (stage noise and Gaussian noise on every projection,
    a stage boundary in between): the fused kernel path (W + xi + eps formed in one pass) and the unfused kernel path
    (each draw's `sample_into`, summed in fp32, + W, rounded once) give the same losses and LoRA gradients bit for
    bit, in bf16 and fp32. Run on a GPU (`run_all("cuda")`); in the interpreter (one Python loop per kernel program)
    it would take minutes even on a small model, and its 16-bit stores truncate (see above). require_fused=False runs
    the same comparison where the kernel is off (both runs then take the PyTorch path), to check this check itself
    on CPU without triton."""
    import contextlib
    import warnings
    from unittest import mock

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import genlora
    from genlora.core import perturbed_linear

    original = perturbed_linear.fused_perturbation
    fused_calls = []

    def counting(draws, weight):
        out = original(draws, weight)
        fused_calls.append(out is not None)
        return out

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for dtype in (torch.bfloat16, torch.float32) if device == "cuda" else (torch.float32,):
        runs = []
        for fused in (True, False):
            fused_calls.clear()
            torch.manual_seed(0)
            size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2) if device == "cuda" else \
                dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1)
            cfg = LlamaConfig(vocab_size=128, **size, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=64, pad_token_id=0,
                              attn_implementation="eager")  # eager: a deterministic backward
            model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                     init_lora_weights="gaussian"))
            handle = genlora.attach(model, genlora.LoRASC(stage_steps=1, noise_lambda=0.15, seed=5),
                                    genlora.FlatLoRA(sigma=0.1, schedule="constant", seed=6), total_steps=4)
            trainable = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(trainable, lr=1e-3)
            handle.bind_optimizer(opt)
            ids = torch.randint(1, 128, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
            model.train()
            losses, grads = [], []
            patch = (mock.patch.object(perturbed_linear, "fused_perturbation", counting) if fused else
                     mock.patch.object(perturbed_linear, "fused_perturbation", lambda draws, weight: None))
            with patch, contextlib.ExitStack():
                for _ in range(2):
                    handle.begin_step()
                    loss = model(input_ids=ids, labels=ids).loss
                    loss.backward()
                    losses.append(loss.detach())
                    grads.append([p.grad.detach().clone() for p in trainable])
                    handle.optimizer_step(opt)
                    opt.zero_grad()
            if fused and require_fused:
                assert any(fused_calls), "the fused kernel path did not run"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # LoRASC: detaching drops the slow experts (nothing to keep here)
                handle.detach()
            runs.append((losses, grads))
        (l1, g1), (l2, g2) = runs
        for a, b in zip(l1, l2):
            assert torch.equal(a, b), (dtype, a.item(), b.item())
        for step_a, step_b in zip(g1, g2):
            for a, b in zip(step_a, step_b):
                assert torch.equal(a, b), (dtype, (a.float() - b.float()).abs().max().item())


def run_all(device: str) -> None:
    check_kernel(device)
    check_uniform_and_two_terms(device)
    check_core_two_draw_build(device)
    check_flat_lora(device)
    check_lorasc(device)
    if device == "cuda":  # in the interpreter this takes minutes; there the checks above cover the same paths
        check_model_fused_vs_unfused(device)


if __name__ == "__main__":
    run_all(sys.argv[1] if len(sys.argv) > 1 else "cpu")
    print("OK")
