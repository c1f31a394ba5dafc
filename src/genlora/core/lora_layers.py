"""Finding the LoRA layers of a model for one adapter.

A `LoraSlot` is one (LoRA layer, adapter) pair the methods act on. Only PEFT's public surface is used:
`isinstance(module, LoraLayer)` and the adapter-keyed containers (`lora_A`/`lora_B` or `lora_embedding_A`/
`lora_embedding_B`, `r`, `scaling`, `active_adapters`, `disable_adapters`). The slot's `kind` (core/layers.py)
translates the layer type into the (n_out, n_in) view the methods are written for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from .layers import LayerKind, kind_of


@dataclass(eq=False)
class LoraSlot:
    index: int  # position in module order; seeds noise per layer, so it must be stable across ranks and resumes
    name: str  # qualified module name
    layer: LoraLayer
    adapter: str
    kind: LayerKind | None  # None: a PEFT layer type genlora cannot map (methods that need one refuse it)

    @property
    def is_embedding(self) -> bool:
        return self.adapter in getattr(self.layer, "lora_embedding_A", {})

    @property
    def lora_A(self) -> nn.Module:
        """The lora_A module (Linear/Conv); Embedding LoRA has none (its factors are plain parameters)."""
        return self.layer.lora_A[self.adapter]

    @property
    def lora_B(self) -> nn.Module:
        return self.layer.lora_B[self.adapter]

    @property
    def a_weight(self) -> nn.Parameter:
        """LoRA A, rank along dim 0: (r, n_in) for Linear, (r, in, *k) for Conv, (r, vocab) for Embedding."""
        if self.is_embedding:
            return self.layer.lora_embedding_A[self.adapter]
        return self.layer.lora_A[self.adapter].weight

    @property
    def b_weight(self) -> nn.Parameter:
        """LoRA B, rank along dim 1: (n_out, r) for Linear and Embedding, (out, r, 1, ...) for Conv."""
        if self.is_embedding:
            return self.layer.lora_embedding_B[self.adapter]
        return self.layer.lora_B[self.adapter].weight

    @property
    def r(self) -> int:
        return int(self.layer.r[self.adapter])

    @property
    def scaling(self) -> float:
        return float(self.layer.scaling[self.adapter])

    @property
    def base_layer(self) -> nn.Module:
        return self.layer.get_base_layer()

    @property
    def uses_variant(self) -> bool:
        """DoRA and PEFT's other LoRA variants (their forward is not just s*B*A)."""
        return self.adapter in getattr(self.layer, "lora_variant", {})

    @property
    def active(self) -> bool:
        """Whether this adapter's LoRA term takes part in the layer's forward now."""
        return not self.layer.disable_adapters and self.adapter in self.layer.active_adapters

    def factor_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B (n_out, r), A (r, n_in)), differentiable views of the adapter's parameters, no scaling."""
        return self.kind.factor_views(self)

    def trained_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(s*B (n_out, r), A (r, n_in)), detached: the low-rank term the adapter adds to W now."""
        b, a = self.factor_views()
        return self.scaling * b.detach(), a.detach()

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A in fp32, shape (n_out, n_in)."""
        u, v = self.trained_factors()
        return u.float() @ v.float()

    def dense_weight(self) -> torch.Tensor:
        """The frozen W in storage layout (dequantized for quantized bases)."""
        return self.kind.dense_weight(self.base_layer)


def resolve_adapter(model: nn.Module, adapter_name: str | None) -> str:
    """The adapter genlora acts on: the one given, else the single active adapter of the model."""
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise ValueError(
            "model has no LoRA layers: build it with peft.get_peft_model(model, LoraConfig(...)) "
            "(or inject_adapter_in_model) before attaching genlora methods"
        )
    available = set()
    for layer in layers:
        available.update(layer.lora_A.keys())
        available.update(getattr(layer, "lora_embedding_A", {}).keys())
    if adapter_name is not None:
        if adapter_name not in available:
            raise ValueError(f"adapter_name must be one of {sorted(available)}, got {adapter_name!r}")
        return adapter_name
    active = getattr(model, "active_adapters", None)
    if callable(active):  # LoraModel exposes it as a method in some PEFT versions
        active = active()
    if active is None:
        active = layers[0].active_adapters
    active = [a for a in active if a in available]
    if len(active) != 1:
        raise ValueError(
            f"genlora acts on one adapter, but the active adapters are {active}; pass adapter_name= to choose one"
        )
    return active[0]


def find_lora_slots(model: nn.Module, adapter_name: str) -> list[LoraSlot]:
    """All LoRA layers that carry `adapter_name`, in module order."""
    slots = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if adapter_name in module.lora_A or adapter_name in getattr(module, "lora_embedding_A", {}):
            if module.merged:
                raise ValueError(f"LoRA layer {name!r} has merged adapters; unmerge it before attaching genlora")
            slots.append(LoraSlot(index=len(slots), name=name, layer=module, adapter=adapter_name,
                                  kind=kind_of(module)))
    return slots
