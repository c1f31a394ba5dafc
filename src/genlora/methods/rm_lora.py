"""RM-LoRA: regularized and masked LoRA (Mao et al., arXiv 2407.12074; official code yz-mao/RM-LoRA).

Two mechanisms that raise the intrinsic dimension (effective rank) of the learned update (spec section 1):

1. Orthogonality regularizer (`Custom_Trainer.compute_loss` -> `compute_svd_orth_regu`), added to every loss:

       R = (1/K) * [ sum_A ||A A^T - I_r||_F + sum_B ||B^T B - I_r||_F ]      (plain, not squared, Frobenius norm)

   K counts A and B matrices separately, so R is the mean over all LoRA factors.
2. Random rank-subset gradient mask, once per optimizer step, after gradient clipping and before
   `optimizer.step()` (the official `_inner_training_loop`): for each module keep the gradient of k of its r rank
   components (rows of A, columns of B) and zero the rest. v1: B keeps A's components; v2: B draws its own.
   Only the new gradient is masked, so Adam's momentum still moves masked components (faithful); the "update"
   target masks the update itself instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import MethodConfig, check_choice, check_int, check_range
from ..core.lora_layers import LoraSlot
from ..core.method import AttachContext, Method
from ..core.seeding import derive_seed

VARIANTS = ("v1", "v2")
MASK_TARGETS = ("gradient", "update")


@dataclass
class RMLoRAConfig(MethodConfig):
    method_name = "rm_lora"

    reg_lambda: float = field(
        default=0.1,
        metadata={"help": "Weight lambda of the orthogonality regularizer (official `reg_orth_coef`; 0.1). 0 turns it off."},
    )
    k: int | None = field(
        default=None,
        metadata={
            "help": "Rank components per module that receive gradient each step (official `random_rank`), "
            "1 <= k <= r. Default: r // 2 (the official scripts' typical k = r/2). k = r turns masking off."
        },
    )
    variant: str = field(
        default="v1",
        metadata={"help": "'v1': B keeps the same rank components as its A; 'v2': B draws its own, independently."},
    )
    mask_target: str = field(
        default="gradient",
        metadata={
            "help": "'gradient' zeroes the new gradient only, so optimizer momentum still moves masked components "
            "(official behaviour); 'update' (strict) leaves masked components unchanged by the optimizer step."
        },
    )
    mask_all_trainable: bool = field(
        default=False,
        metadata={
            "help": "Also zero the gradient of every other trainable parameter (classifier head, ...), as the "
            "official code does, apparently unintentionally. Default False: only LoRA A/B are masked."
        },
    )
    mask_start_step: int = field(
        default=1,
        metadata={"help": "First optimizer step (0-based) that is masked; the official code skips step 0."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of RM-LoRA's own rank-sampling generator."})

    def __post_init__(self):
        check_range("reg_lambda", self.reg_lambda, low=0.0)
        if self.k is not None:
            check_int("k", self.k, low=1)
        check_choice("variant", self.variant, VARIANTS)
        check_choice("mask_target", self.mask_target, MASK_TARGETS)
        if not isinstance(self.mask_all_trainable, bool):
            raise TypeError(f"mask_all_trainable must be a bool, got {self.mask_all_trainable!r}")
        check_int("mask_start_step", self.mask_start_step, low=0)
        check_int("seed", self.seed, low=0)


def orthogonality_regularizer(slots: list[LoraSlot]) -> torch.Tensor:
    """R(A, B) above: mean over all A and B factors of ||A A^T - I||_F and ||B^T B - I||_F."""
    terms = []
    for slot in slots:
        a = slot.a_weight.reshape(slot.r, -1)  # (r, n_in)
        b = slot.b_weight.reshape(slot.b_weight.shape[0], slot.r)  # (n_out, r); Conv's trailing 1x1 dims dropped
        eye = torch.eye(slot.r, device=a.device, dtype=a.dtype)
        terms.append(torch.linalg.matrix_norm(a @ a.T - eye))
        terms.append(torch.linalg.matrix_norm(b.T @ b - eye))
    return torch.stack(terms).mean()


class RMLoRA(Method):
    """RM-LoRA (arXiv 2407.12074). Options: see `RMLoRAConfig`."""

    config_class = RMLoRAConfig
    order = 40
    config: RMLoRAConfig

    def __init__(self, config: RMLoRAConfig | None = None, **options):
        super().__init__(config, **options)
        self._ks: list[int] = []
        self._saved_for_update_mask: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.last_keep: list[tuple[torch.Tensor, torch.Tensor]] = []  # per slot (keep_A, keep_B), bool (r,)

    @property
    def has_regularizer(self) -> bool:
        return self.config.reg_lambda > 0

    def k_for(self, slot: LoraSlot) -> int:
        return self.config.k if self.config.k is not None else max(1, slot.r // 2)

    def validate(self, model, slots: list[LoraSlot]) -> None:
        for slot in slots:
            if self.config.k is not None and self.config.k > slot.r:
                raise ValueError(f"k must be in [1, r] = [1, {slot.r}] for LoRA layer {slot.name!r}, got {self.config.k}")
            if slot.b_weight.shape[1] != slot.r or slot.b_weight[0].numel() != slot.r:
                raise TypeError(f"RM-LoRA needs B factors of shape (n_out, r); {slot.name!r} has {tuple(slot.b_weight.shape)}")

    def on_attach(self, ctx: AttachContext) -> None:
        super().on_attach(ctx)
        self._ks = [self.k_for(s) for s in ctx.slots]

    def regularizer(self) -> torch.Tensor | None:
        if not self.has_regularizer:
            return None
        return self.config.reg_lambda * orthogonality_regularizer(self.ctx.slots)

    def draw_keep_masks(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per slot, boolean (r,) masks of the rank components of A and of B that keep their gradient."""
        gen = torch.Generator().manual_seed(derive_seed(self.config.seed, "rm_lora", step))
        masks = []
        for slot, k in zip(self.ctx.slots, self._ks):
            keep_a = torch.zeros(slot.r, dtype=torch.bool)
            keep_a[torch.randperm(slot.r, generator=gen)[:k]] = True
            if self.config.variant == "v1":
                keep_b = keep_a
            else:
                keep_b = torch.zeros(slot.r, dtype=torch.bool)
                keep_b[torch.randperm(slot.r, generator=gen)[:k]] = True
            masks.append((keep_a, keep_b))
        return masks

    @torch.no_grad()
    def pre_optimizer_step(self, step: int) -> None:
        self.last_keep = []
        self._saved_for_update_mask = []
        if step < self.config.mask_start_step:
            return
        self.last_keep = self.draw_keep_masks(step)
        strict = self.config.mask_target == "update"
        for slot, (keep_a, keep_b) in zip(self.ctx.slots, self.last_keep):
            a, b = slot.a_weight, slot.b_weight  # (r, n_in), (n_out, r)
            drop_a = ~keep_a.to(a.device, non_blocking=True)
            drop_b = ~keep_b.to(b.device, non_blocking=True)
            if a.grad is not None:
                a.grad[drop_a] = 0
            if b.grad is not None:
                b.grad[:, drop_b] = 0
            if strict:
                self._saved_for_update_mask.append((a.detach().clone(), b.detach().clone(), drop_a, drop_b))
        if self.config.mask_all_trainable:
            lora_params = {id(p) for s in self.ctx.slots for p in (s.a_weight, s.b_weight)}
            for p in self.ctx.model.parameters():
                if p.requires_grad and id(p) not in lora_params and p.grad is not None:
                    p.grad.zero_()

    @torch.no_grad()
    def post_optimizer_step(self, step: int) -> None:
        # Strict mode: masked components get their pre-step values back, so neither momentum nor weight decay
        # moves them.
        for slot, (a0, b0, drop_a, drop_b) in zip(self.ctx.slots, self._saved_for_update_mask):
            slot.a_weight[drop_a] = a0[drop_a]
            slot.b_weight[:, drop_b] = b0[:, drop_b]
        self._saved_for_update_mask = []
