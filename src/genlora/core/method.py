"""The base class of the four methods, and what the core hands them when they are attached."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..config import MethodConfig
from .lora_layers import LoraSlot
from .perturbed_linear import BaseWeightPerturber

if TYPE_CHECKING:
    from .handle import GenLoRAHandle


@dataclass(eq=False)
class AttachContext:
    model: nn.Module
    slots: list[LoraSlot]
    perturber: BaseWeightPerturber
    handle: GenLoRAHandle


class Method:
    """A generalization method: reacts to the per-step events the handle drives.

    Order inside one optimizer step (spec section 5.2): `begin_step` (methods in attach order; LoRASC first),
    forwards/backwards (with `regularizer()` added to each loss), gradient clipping, `pre_optimizer_step`
    (RM-LoRA's mask), `optimizer.step()`, `post_optimizer_step`.
    """

    config_class: ClassVar[type[MethodConfig]]
    order: ClassVar[int] = 50  # where begin_step runs among methods (spec 5.2: stage changes before noise)

    def __init__(self, config: MethodConfig | None = None, **options: Any) -> None:
        if config is not None and options:
            raise TypeError(f"{type(self).__name__}: pass either a config or keyword options, not both")
        if config is None:
            config = self.config_class(**options)
        elif not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.ctx: AttachContext | None = None

    @property
    def name(self) -> str:
        return self.config.method_name

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.config.to_dict().items())
        return f"{type(self).__name__}({opts})"

    # --- lifecycle -------------------------------------------------------------------------------------------
    def validate(self, model: nn.Module, slots: list[LoraSlot]) -> None:
        """Raise ValueError/TypeError if this method cannot act on these layers. Must not change any state."""

    def on_attach(self, ctx: AttachContext) -> None:
        self.ctx = ctx

    def on_detach(self) -> None:
        self.ctx = None

    # --- per-step events -------------------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        """Start of optimizer step `step` (0-based), before its first forward."""

    def regularizer(self) -> torch.Tensor | None:
        """A term to add to every training loss of this step (None: nothing to add)."""
        return None

    def pre_optimizer_step(self, step: int) -> None:
        """After backward and gradient clipping, before `optimizer.step()`."""

    def post_optimizer_step(self, step: int) -> None:
        """Right after `optimizer.step()`."""

    # --- export ----------------------------------------------------------------------------------------------
    def export_factors(self, slot: LoraSlot, factors: list[tuple[torch.Tensor, torch.Tensor]]):
        """Transform the low-rank terms [(U (n_out, k), V (k, n_in)), ...] that an exported plain PEFT adapter of
        `slot` must reproduce (U already includes the LoRA scaling). Default: unchanged. LoRASC prepends its slow
        experts; LoRA Dropout's expectation export rescales the trained term."""
        return factors

    # --- state -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
