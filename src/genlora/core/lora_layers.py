"""Finding the LoRA layers of a model, for the adapter that is active.

A `LoraSlot` is one (LoRA layer, adapter) pair that the methods act on. Only PEFT's public surface is used:
`isinstance(module, LoraLayer)` and the adapter-keyed `lora_A` / `lora_B` / `scaling` containers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora import Linear as LoraLinear
from torch import nn


@dataclass(eq=False)
class LoraSlot:
    index: int  # position in module order; seeds noise per layer, so it must be stable across ranks and resumes
    name: str  # qualified module name
    layer: LoraLayer
    adapter: str

    @property
    def lora_A(self) -> nn.Module:  # weight (r, n_in)
        return self.layer.lora_A[self.adapter]

    @property
    def lora_B(self) -> nn.Module:  # weight (n_out, r)
        return self.layer.lora_B[self.adapter]

    @property
    def a_weight(self) -> nn.Parameter:
        """LoRA A, rank along dim 0: (r, n_in) for Linear, (r, n_in, *k) for Conv, (r, vocab) for Embedding."""
        if self.adapter in self.layer.lora_A:
            return self.layer.lora_A[self.adapter].weight
        return self.layer.lora_embedding_A[self.adapter]

    @property
    def b_weight(self) -> nn.Parameter:
        """LoRA B, rank along dim 1: (n_out, r) for Linear and Embedding, (n_out, r, 1...) for Conv."""
        if self.adapter in self.layer.lora_B:
            return self.layer.lora_B[self.adapter].weight
        return self.layer.lora_embedding_B[self.adapter]

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
    def is_linear(self) -> bool:
        """A PEFT `lora.Linear` around a plain float `nn.Linear` (not quantized, not transformers' Conv1D)."""
        base = self.base_layer
        return (
            isinstance(self.layer, LoraLinear)
            and type(base) is nn.Linear
            and not self.layer.fan_in_fan_out
            and base.weight.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
        )

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A in fp32, shape (n_out, n_in)."""
        a = self.lora_A.weight.float()
        b = self.lora_B.weight.float()
        return self.scaling * (b @ a)


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
            slots.append(LoraSlot(index=len(slots), name=name, layer=module, adapter=adapter_name))
    return slots
