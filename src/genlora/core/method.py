"""The contract between the core and a method: what a method declares, and what the core hands it.

A method declares its capabilities on this class instead of being probed with `hasattr`:

* `phase`: where its per-step work runs inside one optimizer step (docs/methods.md, "Composition"); methods run in
  phase order: the stage change (LoRASC) before the step's noise draw (Flat-LoRA, whose row norms must see the new
  slow weights and fresh fast LoRA), then the masks (LoRA Dropout), then the loss term and gradient mask (RM-LoRA).
* `requirements()`: what it needs from the training loop (the optimizer, the run length, the epoch length); the
  handle checks them before the first step and names what is missing.
* `perturbs_base()` + `draw_for()`: a noise source on frozen weights (core/perturbed_linear.py).
* `adds_loss_term()` + `regularizer()`: a term added once to the objective of every step.
* `frozen_delta_factors()`: low-rank terms the live model adds to W besides the trained adapter (LoRASC's slow
  experts); they enter Flat-LoRA's row norms, the spectra, and the deployed model.
* `deploy_factors()`: how the method turns the live terms into the deployed model (LoRASC: the last fast expert at
  weight alpha; LoRA Dropout's expectation export: (1-p)^2 * s*B*A). Every save path and eval-mode forward uses the
  result, so the saved adapter, the in-memory evaluation and `merged_model()` are one model.
* `expected_update_scale()`: E[update used in training] / (s*B*A) (LoRA Dropout without rescaling: (1-p)^2); a
  method that freezes the trained adapter (LoRASC's stage boundary) folds it at this scale.
* `passes_per_batch()`: forward/backward passes per batch whose losses are averaged (LoRA Dropout's n_train).

A method registers itself with `genlora.registry.register_method`; a fifth method is one new file.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..config import MethodConfig
from .lora_layers import LoraSlot
from .perturbed_linear import BaseWeightPerturber, NoiseDraw, NoiseTarget

if TYPE_CHECKING:
    from .handle import GenLoRAHandle

Factors = list[tuple[torch.Tensor, torch.Tensor]]  # [(U (n_out, k), V (k, n_in)), ...], U including any scaling


class Phase(enum.IntEnum):
    """Order of the methods' work inside one optimizer step (docs/methods.md, "Composition")."""

    STAGE = 10  # LoRASC: stage boundary (fold the fast expert, re-initialize it, reset its optimizer state)
    NOISE = 20  # Flat-LoRA: one noise draw per step, scaled by the rows of the current W + S + s*B*A
    MASKS = 30  # LoRA Dropout: masks on A's inputs and B's outputs, per forward
    GRADIENT = 40  # RM-LoRA: regularizer in the objective, rank mask on the clipped gradients


class Requirement(str, enum.Enum):
    """What a method needs from the training loop (`attach(...)` keywords / `handle.configure(...)`)."""

    OPTIMIZER = "optimizer"  # handle.bind_optimizer(optimizer): LoRASC resets the fast LoRA's optimizer state
    TOTAL_STEPS = "total_steps"  # ramped schedules, stages of equal length over the run
    STEPS_PER_EPOCH = "steps_per_epoch"  # one stage per epoch


@dataclass(eq=False)
class AttachContext:
    model: nn.Module
    slots: list[LoraSlot]
    perturber: BaseWeightPerturber
    handle: GenLoRAHandle


class Method:
    """A generalization method: declares its capabilities (above) and reacts to the per-step events the handle
    drives: `begin_step` (in phase order), forwards/backwards (with the objective's extra terms), gradient clipping,
    `pre_optimizer_step`, `optimizer.step()`, `post_optimizer_step`."""

    config_class: ClassVar[type[MethodConfig]]
    phase: ClassVar[Phase]

    def __init__(self, config: MethodConfig | None = None, **options: Any) -> None:
        if config is not None and options:
            raise TypeError(f"{type(self).__name__}: pass either a config or keyword options, not both")
        if config is None:
            config = self.config_class(**options)
        elif not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.ctx: AttachContext | None = None
        self.seed: int | None = None  # resolved at attach: config.seed, else derived from the global torch seed

    @property
    def name(self) -> str:
        return self.config.method_name

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.config.to_dict().items())
        return f"{type(self).__name__}({opts})"

    def resolved_config(self) -> dict[str, Any]:
        """The config as run: with the resolved seed (what `genlora_config.json` records)."""
        return {**self.config.to_dict(), "seed": self.seed if self.seed is not None else self.config.seed}

    # --- declared capabilities ---------------------------------------------------------------------------------
    def requirements(self) -> set[Requirement]:
        return set()

    def perturbs_base(self) -> bool:
        return False

    def adds_loss_term(self) -> bool:
        return False

    def passes_per_batch(self) -> int:
        return 1

    def expected_update_scale(self) -> float:
        return 1.0

    def adds_delta_terms(self) -> bool:
        """Whether the model this method defines differs from PEFT's W x + s*B*A x: frozen terms in training
        (`frozen_delta_factors`) or a deployed model other than the trained adapter (`deploy_factors`). The core
        then adds the difference in the layers' forwards."""
        return False

    # --- lifecycle -------------------------------------------------------------------------------------------
    def validate(self, model: nn.Module, slots: list[LoraSlot], others: list[Method]) -> None:
        """Raise ValueError/TypeError if this method cannot act on these layers (or next to `others`, the other
        methods of the same attach). Must not change any state."""

    def on_attach(self, ctx: AttachContext) -> None:
        self.ctx = ctx

    def noise_targets(self) -> list[NoiseTarget]:
        """Frozen layers besides the LoRA slots' base layers that this noise source perturbs (default none)."""
        return []

    def on_detach(self) -> None:
        self.ctx = None

    # --- per-step events -------------------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        """Start of optimizer step `step` (0-based), before its first forward."""

    def draw_for(self, target: NoiseTarget, weight: torch.Tensor) -> NoiseDraw | None:
        """A noise source's draw for `target` in the current training forward (see `perturbs_base`)."""
        return None

    def regularizer(self) -> torch.Tensor | None:
        """The step's extra objective term (see `adds_loss_term`), from the current adapter weights."""
        return None

    def pre_optimizer_step(self, step: int) -> None:
        """After backward and gradient clipping, before `optimizer.step()`."""

    def post_optimizer_step(self, step: int) -> None:
        """Right after `optimizer.step()`."""

    # --- the model the method defines ------------------------------------------------------------------------
    def frozen_delta_factors(self, slot: LoraSlot) -> Factors:
        """Low-rank terms the live (training) model adds to `slot`'s W besides the trained adapter."""
        return []

    def deploy_factors(self, slot: LoraSlot, factors: Factors) -> Factors:
        """Transform the terms of the deployed model of `slot` (the trained term, s*B*A, is last). Default:
        unchanged (return the same list object: the handle then knows the deployed model is the live one)."""
        return factors

    def dense_extra(self, slot: LoraSlot) -> torch.Tensor | None:
        """A full-rank term of the deployed model of `slot` (W's storage layout, fp32) that no adapter can hold
        (LoRASC's persistent noise); `merged_model()` adds it. Default None."""
        return None

    def deployable_as_adapter(self) -> str | None:
        """None if the deployed model is a sum of low-rank terms (a plain PEFT adapter holds it); else the reason
        it is not (LoRASC's persistent full-rank noise), which save paths raise."""
        return None

    # --- state -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
