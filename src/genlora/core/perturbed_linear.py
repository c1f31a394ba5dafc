"""Exact, transient perturbations of frozen base weights: a layer computes its output with W + eps, and eps is never
written into W.

Flat-LoRA (per-step Gaussian noise) and LoRASC (per-stage uniform noise) both need the frozen weight perturbed during
training. Adding eps in place and subtracting it later is not exact in bf16/fp16 (W + eps - eps != W), and impossible
on a quantized or sharded weight, so instead the layer's forward is replaced by `_PerturbedFn`, which forms W + eps in
a temporary buffer in the forward and forms it again, from the same seeds, in the backward (docs/methods.md,
"Exactness"). Nothing of W's size outlives a call; the base weight is only ever read. Every layer kind of
core/layers.py is supported: the buffer is built in W's storage layout (dequantized for bitsandbytes bases) and the
kind's own operator (linear, Conv1D, convolution, embedding lookup) is applied to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from torch import nn

from .layers import LayerKind, LinearKind
from .lora_layers import LoraSlot


class NoiseDraw(Protocol):
    """One immutable noise draw for one layer: regenerating it gives the same tensor bit for bit.

    Optional fused paths (used by `PerturbedWeight.build` for plain linear layers, which falls back to `sample_into`
    when they decline):
      * `triton_term() -> NoiseTerm | None`: the draw as a term ("normal" or "uniform", seed, scale) of the fused
        Triton kernel `genlora.kernels.flat_noise_triton.perturb`, which forms W + eps_1 (+ eps_2) in one pass. The
        draw's `sample_into` must then use the same kernel on the tensors the kernel supports
        (`kernel.row_noise` / `kernel.uniform_noise`), so fused and unfused builds agree bit for bit.
      * `perturb(weight) -> Tensor | None`: W + eps in W's dtype in one pass, for a layer's only draw.
    """

    def sample_into(self, out: torch.Tensor, accumulate: bool) -> None:
        """Write (accumulate=False) or add (accumulate=True) the noise into `out`, fp32, W's storage layout."""


@dataclass(eq=False)
class NoiseTarget:
    """A frozen layer whose weight noise sources may perturb: the base layer of a LoRA slot, or (LoRASC's
    noise_scope="all") any other frozen layer of a kind genlora maps."""

    index: int  # seeds the noise: LoRA slots first (slot.index), then the other layers in module order
    name: str
    module: nn.Module  # the layer whose forward is replaced
    kind: LayerKind
    slot: LoraSlot | None = None  # None for a layer without this adapter's LoRA


class NoiseSource(Protocol):
    """A method that perturbs base weights; asked once per training forward of each target for its draw."""

    def draw_for(self, target: NoiseTarget, weight: torch.Tensor) -> NoiseDraw | None:
        """The draw for `target` now (None: no noise). `weight` is W as the forward sees it (whole, dequantized)."""


class PerturbedWeight:
    """Builds W + sum of draws in W's dtype and storage layout. The sum is formed in fp32 and rounded once."""

    __slots__ = ("draws", "fusable")

    def __init__(self, draws: Sequence[NoiseDraw], fusable: bool = True):
        self.draws = tuple(draws)
        self.fusable = fusable  # a plain linear layer: the Triton kernel's (n_out, n_in) row layout

    def build(self, weight: torch.Tensor) -> torch.Tensor:
        if self.fusable:
            fused = fused_perturbation(self.draws, weight)
            if fused is not None:  # the Triton kernel: noise, scale and add in one pass over W, rounded once
                return fused
            if len(self.draws) == 1 and not hasattr(self.draws[0], "triton_term"):
                perturb = getattr(self.draws[0], "perturb", None)
                fused = perturb(weight) if perturb is not None else None
                if fused is not None:
                    return fused
        buf = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)  # W's storage layout
        for i, draw in enumerate(self.draws):
            draw.sample_into(buf, accumulate=i > 0)
        buf.add_(weight)
        return buf if weight.dtype == torch.float32 else buf.to(weight.dtype)


_KERNEL: object = False  # the Triton kernel module once looked up (None: unavailable)


def noise_kernel():
    """`genlora.kernels.flat_noise_triton` if triton imports and GENLORA_TRITON does not disable it, else None.
    Imported on first use, so CPU-only runs never import triton."""
    global _KERNEL
    if _KERNEL is False:
        try:
            from ..kernels import flat_noise_triton

            _KERNEL = flat_noise_triton if flat_noise_triton.available() else None
        except Exception:  # pragma: no cover - a broken triton install: PyTorch paths
            _KERNEL = None
    return _KERNEL


def fused_perturbation(draws: Sequence[NoiseDraw], weight: torch.Tensor) -> torch.Tensor | None:
    """W + sum(draws) in W's dtype from one pass of the Triton kernel, when every draw offers a `triton_term` (one
    or two of them) and the kernel runs on `weight`'s device; None otherwise (the caller then uses `sample_into`)."""
    if not 1 <= len(draws) <= 2 or not all(hasattr(d, "triton_term") for d in draws):
        return None
    kernel = noise_kernel()
    if kernel is None or not kernel.usable(weight):
        return None
    terms = [d.triton_term() for d in draws]
    if any(t is None for t in terms):
        return None
    try:
        out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        return kernel.perturb(out, terms, base=weight)
    except Exception as err:  # pragma: no cover - a GPU whose Triton cannot compile the kernel
        kernel.disable(err)
        return None


class _PerturbedFn(torch.autograd.Function):
    """out = op(x, W + eps) without bias, differentiable in x only (W is frozen); eps regenerated in the backward."""

    @staticmethod
    def forward(ctx, x, weight, kind: LayerKind, module: nn.Module, perturbed: PerturbedWeight):
        # x: (..., n_in) or (N, C, *spatial); weight: W in storage layout, frozen (a parameter or a dequantized copy)
        ctx.save_for_backward(weight, x if kind.grad_needs_input else None)  # W: a reference, plus autograd's in-place check
        ctx.kind, ctx.module, ctx.perturbed, ctx.x_meta = kind, module, perturbed, (x.dtype, x.shape)
        return kind.weight_op(module, x, perturbed.build(weight))

    @staticmethod
    def backward(ctx, grad_out):
        weight, x = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = ctx.perturbed.build(weight)  # regenerated from the same seeds: identical to the forward's
            grad_x = ctx.kind.weight_op_grad(ctx.module, x, w, grad_out, ctx.x_meta)
        return grad_x, None, None, None, None


def perturbed_forward(kind: LayerKind, module: nn.Module, x: torch.Tensor, weight: torch.Tensor,
                      draws: Sequence[NoiseDraw]) -> torch.Tensor:
    """The layer's output with W + sum(draws), differentiable in x and in the (trainable or frozen) bias."""
    perturbed = PerturbedWeight(draws, fusable=isinstance(kind, LinearKind))
    out = _PerturbedFn.apply(x, weight, kind, module, perturbed)
    return kind.add_bias(module, out)


def perturbed_linear(x, weight, bias, draws: Sequence[NoiseDraw]) -> torch.Tensor:
    """F.linear(x, W + sum(draws), bias), differentiable in x and bias; W must be frozen."""
    module = _BiasOnly(bias)
    return perturbed_forward(_LINEAR, module, x, weight, draws)


class _BiasOnly:
    __slots__ = ("bias",)

    def __init__(self, bias):
        self.bias = bias


_LINEAR = LinearKind()


def check_full_weight(name: str, weight: torch.Tensor) -> None:
    """Noise scaled by full-row norms and regenerated in the backward needs the whole weight, which FSDP and ZeRO-3
    provide inside the forward (the layer's parameters are gathered there). A weight that is still a shard there
    (an FSDP1 flat parameter or an FSDP2 DTensor outside its unit's forward, or an un-gathered ZeRO-3 placeholder)
    cannot honour the noise law: fail loudly instead of perturbing a shard."""
    ds_shape = getattr(weight, "ds_shape", None)
    sharded = (
        weight.numel() == 0
        or (ds_shape is not None and tuple(ds_shape) != tuple(weight.shape))
        or type(weight).__name__ in ("DTensor", "FlatParameter")
    )
    if sharded:
        raise RuntimeError(
            f"{name}: the base weight is a shard here (FSDP / DeepSpeed ZeRO-3 outside the layer's gathered "
            "forward); genlora's weight-noise methods (Flat-LoRA, LoRASC noise) need the whole weight: wrap the "
            "layers so that each is gathered in its own forward (FSDP2 fully_shard per block, ZeRO-3), or use DDP"
        )


class BaseWeightPerturber:
    """Replaces the forward of each target layer by a perturbed one while any noise source is active.

    The patch is an instance attribute (the mechanism accelerate's hooks use), so parameters, buffers and state
    dict keys stay untouched, and `unpatch` restores exactly what was there before.
    """

    def __init__(self, targets: Sequence[NoiseTarget], guard: Callable[[], None]):
        self.targets = list(targets)
        self.sources: list[NoiseSource] = []
        self._guard = guard
        self._saved: dict[int, tuple[nn.Module, object]] = {}

    def add_targets(self, targets: Sequence[NoiseTarget]) -> None:
        known = {id(t.module) for t in self.targets}
        new = [t for t in targets if id(t.module) not in known]
        self.targets.extend(new)
        if self._saved:
            for t in new:
                self._patch_one(t)

    def add_source(self, source: NoiseSource) -> None:
        if not self._saved:
            for t in self.targets:
                self._patch_one(t)
        self.sources.append(source)

    def remove_source(self, source: NoiseSource) -> None:
        self.sources = [s for s in self.sources if s is not source]
        if not self.sources:
            self.unpatch()

    def _patch_one(self, target: NoiseTarget) -> None:
        module = target.module
        self._saved[id(module)] = (module, module.__dict__.get("forward", None))
        module.forward = self._make_forward(target, module)

    def unpatch(self) -> None:
        for module, previous in self._saved.values():
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        self._saved.clear()

    def _make_forward(self, target: NoiseTarget, module: nn.Module):
        original = module.forward  # bound method, or a previous instance-level patch
        kind = target.kind

        def forward(x, *args, **kwargs):
            if not module.training or not self.sources:
                return original(x, *args, **kwargs)
            self._guard()
            weight = kind.dense_weight(module)
            check_full_weight(target.name, weight)
            draws = [d for d in (src.draw_for(target, weight) for src in self.sources) if d is not None]
            if not draws:
                return original(x, *args, **kwargs)
            return perturbed_forward(kind, module, x, weight, draws)

        forward.__genlora_patch__ = True
        return forward
