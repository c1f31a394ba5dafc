"""Exact, transient perturbations of frozen base weights: y = x (W + eps)^T + b, with eps never written into W.

Flat-LoRA (per-step Gaussian noise) and LoRASC (per-stage uniform noise) both need the frozen weight perturbed
during training. Adding eps in place and subtracting it later is not exact in bf16/fp16 (W + eps - eps != W), so
instead the base layer's forward is replaced by `_PerturbedLinearFn`, which forms `W + eps` in a temporary buffer
in the forward and forms it again, from the same seeds, in the backward. Nothing of size (n_out, n_in) outlives a
call; the base weight is only ever read.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .lora_layers import LoraSlot


class NoiseDraw(Protocol):
    """One immutable noise draw for one layer: regenerating it gives the same tensor bit for bit.

    Optional fused paths (used by `PerturbedWeight.build`, which falls back to `sample_into` when they decline):
      * `triton_term() -> NoiseTerm | None`: the draw as a term ("normal" or "uniform", seed, scale) of the fused
        Triton kernel `genlora.kernels.flat_noise_triton.perturb`, which forms W + eps_1 (+ eps_2) in one pass. The
        draw's `sample_into` must then use the same kernel on the tensors the kernel supports
        (`kernel.row_noise` / `kernel.uniform_noise`), so fused and unfused builds agree bit for bit.
      * `perturb(weight) -> Tensor | None`: W + eps in W's dtype in one pass, for a layer's only draw.
    """

    def sample_into(self, out: torch.Tensor, accumulate: bool) -> None:
        """Write (accumulate=False) or add (accumulate=True) the noise into `out`, fp32 (n_out, n_in)."""


class NoiseSource(Protocol):
    """A method that perturbs base weights; asked once per forward for the draw of one layer (None: no noise)."""

    def draw_for(self, slot: LoraSlot) -> NoiseDraw | None: ...


class PerturbedWeight:
    """Builds W + sum of draws, in W's dtype. The sum is formed in fp32 and rounded once."""

    __slots__ = ("draws",)

    def __init__(self, draws: Sequence[NoiseDraw]):
        self.draws = tuple(draws)

    def build(self, weight: torch.Tensor) -> torch.Tensor:
        fused = fused_perturbation(self.draws, weight)
        if fused is not None:  # the Triton kernel: noise, scale and add in one pass over W, rounded once
            return fused
        if len(self.draws) == 1 and not hasattr(self.draws[0], "triton_term"):
            perturb = getattr(self.draws[0], "perturb", None)
            fused = perturb(weight) if perturb is not None else None
            if fused is not None:
                return fused
        buf = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)  # (n_out, n_in)
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


class _PerturbedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, perturbed: PerturbedWeight):
        # x: (..., n_in), weight: (n_out, n_in) frozen, bias: (n_out,) or None
        ctx.save_for_backward(weight)  # a reference, plus autograd's check that W is not modified in place
        ctx.perturbed = perturbed
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, perturbed.build(weight), bias)

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = ctx.perturbed.build(weight)  # regenerated from the same seeds: identical to the forward's
            grad_x = grad_out.matmul(w.to(grad_out.dtype)).to(ctx.x_dtype)  # (..., n_in)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, None


def perturbed_linear(x, weight, bias, draws: Sequence[NoiseDraw]) -> torch.Tensor:
    """F.linear(x, W + sum(draws), bias), differentiable in x and bias; W must be frozen."""
    return _PerturbedLinearFn.apply(x, weight, bias, PerturbedWeight(draws))


def check_full_weight(name: str, weight: torch.Tensor) -> None:
    """Noise scaled by full-row norms and regenerated in the backward needs the whole weight on this rank.

    Under DeepSpeed ZeRO-3 or FSDP the base weight is a shard (or an empty placeholder outside the gathered
    region), so the noise law cannot be honoured there: fail loudly instead of perturbing a shard.
    """
    sharded = weight.numel() == 0 or hasattr(weight, "ds_id") or type(weight).__name__ in ("DTensor", "FlatParameter")
    if sharded:
        raise RuntimeError(
            f"{name}: the base weight is sharded (FSDP / DeepSpeed ZeRO-3); genlora's weight-noise methods "
            "(Flat-LoRA, LoRASC noise) need full weights on every rank: use DDP or ZeRO-1/2"
        )


class BaseWeightPerturber:
    """Replaces the forward of each slot's base `nn.Linear` by a perturbed one while any noise source is active.

    The patch is an instance attribute (the mechanism accelerate's hooks use), so parameters, buffers and state
    dict keys stay untouched, and `unpatch` restores exactly what was there before.
    """

    def __init__(self, slots: Sequence[LoraSlot], guard: Callable[[], None]):
        self.slots = list(slots)
        self.sources: list[NoiseSource] = []
        self._guard = guard
        self._saved: dict[int, tuple[nn.Module, object]] = {}

    def add_source(self, source: NoiseSource) -> None:
        if not self._saved:
            self._patch()
        self.sources.append(source)

    def remove_source(self, source: NoiseSource) -> None:
        self.sources = [s for s in self.sources if s is not source]
        if not self.sources:
            self.unpatch()

    def _patch(self) -> None:
        for slot in self.slots:
            base = slot.base_layer
            self._saved[slot.index] = (base, base.__dict__.get("forward", None))
            base.forward = self._make_forward(slot, base)

    def unpatch(self) -> None:
        for base, previous in self._saved.values():
            if previous is None:
                del base.forward
            else:
                base.forward = previous
        self._saved.clear()

    def _make_forward(self, slot: LoraSlot, base: nn.Linear):
        original = base.forward  # bound method, or a previous instance-level patch

        def forward(x, *args, **kwargs):
            if not base.training:
                return original(x, *args, **kwargs)
            self._guard()
            draws = [d for d in (src.draw_for(slot) for src in self.sources) if d is not None]
            if not draws:
                return original(x, *args, **kwargs)
            check_full_weight(slot.name, base.weight)
            return perturbed_linear(x, base.weight, base.bias, draws)

        return forward
