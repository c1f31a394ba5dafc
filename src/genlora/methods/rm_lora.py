"""RM-LoRA: regularized and masked LoRA (Mao et al., arXiv 2407.12074; official code yz-mao/RM-LoRA;
docs/methods.md, "RM-LoRA").

Two mechanisms that raise the intrinsic dimension (effective rank) of the learned update:

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
from typing import Any

import torch

from ..config import MethodConfig, check_bool, check_choice, check_int, check_range, check_seed
from ..core.lora_layers import LoraSlot
from ..core.method import AttachContext, Method, Phase
from ..core.seeding import derive_seed
from ..registry import register_method

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
    seed: int | None = field(
        default=None,
        metadata={"help": "Seed of RM-LoRA's own rank-sampling generator; None: derived from torch.initial_seed() "
                          "at attach, recorded in genlora_config.json."},
    )

    def __post_init__(self):
        check_range("reg_lambda", self.reg_lambda, low=0.0)
        if self.k is not None:
            check_int("k", self.k, low=1)
        check_choice("variant", self.variant, VARIANTS)
        check_choice("mask_target", self.mask_target, MASK_TARGETS)
        check_bool("mask_all_trainable", self.mask_all_trainable)
        check_int("mask_start_step", self.mask_start_step, low=0)
        check_seed("seed", self.seed)


def orthogonality_regularizer(slots: list[LoraSlot]) -> torch.Tensor:
    """R(A, B) above: mean over all A and B factors of ||A A^T - I||_F and ||B^T B - I||_F."""
    return _batched_regularizer([(s.r, s.a_weight, s.b_weight) for s in slots])


def _factor_views(r: int, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A as (r, n_in) and B as (n_out, r) (core/layers.py's view): Conv's kernel dims folded into n_in, B's trailing
    1x1 dropped. Linear and Embedding factors are already 2-D and are used as they are (no extra autograd node)."""
    return (a if a.dim() == 2 else a.reshape(r, -1)), (b if b.dim() == 2 else b.reshape(b.shape[0], r))


def _batched_regularizer(factors: list[tuple[int, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """`orthogonality_regularizer` from (r, A, B) triples, batched: the factors of equal shape, dtype and device are
    stacked, and their Gram matrices and norms are a few batched kernels (stack, bmm, subtract, norm) per group
    instead of six small kernels per factor. The same terms as computing each ||A A^T - I||_F alone; only the
    order of the final mean's summation differs."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for r, a, b in factors:
        a2, b2 = _factor_views(r, _whole(a), _whole(b))
        groups.setdefault(("A", tuple(a2.shape), a2.dtype, a2.device), []).append(a2)
        groups.setdefault(("B", tuple(b2.shape), b2.dtype, b2.device), []).append(b2)
    norms = []
    for (kind, shape, dtype, device), mats in groups.items():
        stack = mats[0].unsqueeze(0) if len(mats) == 1 else torch.stack(mats)  # (G, r, n_in) or (G, n_out, r)
        if kind == "A":
            gram = torch.bmm(stack, stack.transpose(1, 2))  # A A^T: (G, r, r)
        else:
            gram = torch.bmm(stack.transpose(1, 2), stack)  # B^T B: (G, r, r)
        eye = torch.eye(gram.shape[-1], device=device, dtype=dtype)
        norms.append(torch.linalg.matrix_norm(gram - eye))  # (G,)
    return torch.cat(norms).mean()


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP2 DTensor) factor gathered, differentiably (its gradient flows back to the local shard); LoRA
    factors are small, so this costs little. Plain tensors are returned as they are."""
    return t.full_tensor() if type(t).__name__ == "DTensor" else t


def _like(mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`mask` (t's global shape, or broadcastable to it) as a tensor that multiplies `t`: for a sharded DTensor,
    the mask sharded the same way, cut from the full mask every rank holds (the masks are drawn identically on all
    ranks), without communication."""
    if type(t).__name__ != "DTensor":
        return mask
    from torch.distributed.tensor import distribute_tensor

    full = mask.expand(t.shape).to(t.dtype).contiguous()
    return distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=None)


def _sharded(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def _owner(slot: LoraSlot, which: str) -> tuple[Any, str]:
    """(object, key) with object._parameters[key] the LoRA factor: a cheap handle to look it up again."""
    if which == "A":
        if slot.adapter in slot.layer.lora_A:
            return slot.layer.lora_A[slot.adapter], "weight"
        return slot.layer.lora_embedding_A, slot.adapter
    if slot.adapter in slot.layer.lora_B:
        return slot.layer.lora_B[slot.adapter], "weight"
    return slot.layer.lora_embedding_B, slot.adapter


class _MaskGroup:
    """LoRA factors of one kind (A or B), shape, dtype and device, whose gradients are masked together."""

    __slots__ = ("kind", "positions", "index", "params", "rank_dim", "r")

    def __init__(self, kind: str, positions: list[int], params: list[torch.nn.Parameter], r: int):
        self.kind = kind  # "A": rank along dim 0; "B": rank along dim 1
        self.positions = positions  # positions of the slots in ctx.slots
        self.index = torch.tensor(positions)
        self.params = params
        self.rank_dim = 0 if kind == "A" else 1
        self.r = r

    def expand(self, keep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """keep (G, r) -> (G, *param shape), broadcast along every dim but the rank dim."""
        shape = [1] * like.dim()
        shape[self.rank_dim] = self.r
        return keep.reshape(keep.shape[0], *shape).expand(keep.shape[0], *like.shape)


@register_method
class RMLoRA(Method):
    """RM-LoRA (arXiv 2407.12074). Options: see `RMLoRAConfig`."""

    config_class = RMLoRAConfig
    phase = Phase.GRADIENT  # the mask acts on the step's clipped gradients, after everything else drew
    config: RMLoRAConfig

    def __init__(self, config: RMLoRAConfig | None = None, **options):
        super().__init__(config, **options)
        self._ks: list[int] = []
        self._rs: list[int] = []
        self._rank_groups: list[tuple[int, int, torch.Tensor]] = []  # (r, k, slot positions) in first-seen order
        self._r_max = 0
        self._factors: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (r, A, B) per slot, refreshed each step
        self._owners: list[tuple[tuple[Any, str], tuple[Any, str]]] = []  # where A and B live: (module, name)
        self._mask_groups: list[_MaskGroup] = []
        self._saved_for_update_mask: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.last_keep: list[tuple[torch.Tensor, torch.Tensor]] = []  # per slot (keep_A, keep_B), bool (r,)

    def adds_loss_term(self) -> bool:
        return self.config.reg_lambda > 0

    def k_for(self, slot: LoraSlot) -> int:
        return self.config.k if self.config.k is not None else max(1, slot.r // 2)

    def validate(self, model, slots: list[LoraSlot], others) -> None:
        for slot in slots:
            if self.config.k is not None and self.config.k > slot.r:
                raise ValueError(f"k must be in [1, r] = [1, {slot.r}] for LoRA layer {slot.name!r}, got {self.config.k}")
            if slot.b_weight.shape[1] != slot.r or slot.b_weight[0].numel() != slot.r:
                raise TypeError(f"RM-LoRA needs B factors of shape (n_out, r); {slot.name!r} has {tuple(slot.b_weight.shape)}")

    def on_attach(self, ctx: AttachContext) -> None:
        super().on_attach(ctx)
        self._ks = [self.k_for(s) for s in ctx.slots]
        self._rs = [s.r for s in ctx.slots]
        by_rank: dict[tuple[int, int], list[int]] = {}
        for pos, (slot, k) in enumerate(zip(ctx.slots, self._ks)):
            by_rank.setdefault((slot.r, k), []).append(pos)
        self._rank_groups = [(r, k, torch.tensor(pos)) for (r, k), pos in by_rank.items()]
        self._r_max = max(s.r for s in ctx.slots)
        self._refresh()

    def on_detach(self) -> None:
        self._factors = []
        self._owners = []
        self._mask_groups = []
        self._saved_for_update_mask = []
        super().on_detach()

    def _refresh(self) -> None:
        """Look the LoRA parameters up (at attach and once per step, not per forward) and group them for the masks;
        the grouping is rebuilt only when a parameter object changed (e.g. a module was replaced)."""
        slots = self.ctx.slots
        if not self._owners:
            self._owners = [(_owner(s, "A"), _owner(s, "B")) for s in slots]
        params = [(a[0]._parameters[a[1]], b[0]._parameters[b[1]]) for a, b in self._owners]
        if self._factors and all(p is f[1] and q is f[2] for (p, q), f in zip(params, self._factors)):
            return
        self._owners = [(_owner(s, "A"), _owner(s, "B")) for s in slots]
        self._factors = [(s.r, s.a_weight, s.b_weight) for s in slots]
        groups: dict[tuple, tuple[list[int], list[torch.nn.Parameter]]] = {}
        for pos, (r, a, b) in enumerate(self._factors):
            for kind, p in (("A", a), ("B", b)):
                pos_list, params_ = groups.setdefault((kind, tuple(p.shape), p.dtype, p.device, r), ([], []))
                pos_list.append(pos)
                params_.append(p)
        self._mask_groups = [_MaskGroup(key[0], pos, params_, key[4]) for key, (pos, params_) in groups.items()]

    def begin_step(self, step: int) -> None:
        self._refresh()

    def regularizer(self) -> torch.Tensor | None:
        if not self.adds_loss_term():
            return None
        return self.config.reg_lambda * _batched_regularizer(self._factors)

    def _draw_keep(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep_A, keep_B), each (n_slots, r_max) bool on the CPU: row i keeps k_i of slot i's r_i components
        (columns past r_i are False); v1: keep_B is keep_A. The draws are those of the official-style loop (one
        generator per step; per slot `randperm(r)[:k]` for A, then for B in v2), written with one scatter per rank
        group instead of an indexed assignment per slot."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "rm_lora", step))
        v2 = self.config.variant == "v2"
        idx_a, idx_b = [], []
        for r, k in zip(self._rs, self._ks):
            idx_a.append(torch.randperm(r, generator=gen)[:k])
            if v2:
                idx_b.append(torch.randperm(r, generator=gen)[:k])
        n = len(self._rs)
        keep_a = torch.zeros(n, self._r_max, dtype=torch.bool)
        keep_b = torch.zeros(n, self._r_max, dtype=torch.bool) if v2 else keep_a
        for keep, idx in ((keep_a, idx_a), (keep_b, idx_b)) if v2 else ((keep_a, idx_a),):
            for r, k, positions in self._rank_groups:
                rows = torch.stack([idx[p] for p in positions.tolist()])  # (G, k)
                keep[positions, :r] = torch.zeros(len(rows), r, dtype=torch.bool).scatter_(1, rows, True)
        return keep_a, keep_b

    def draw_keep_masks(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per slot, boolean (r,) masks of the rank components of A and of B that keep their gradient."""
        return self._per_slot(*self._draw_keep(step))

    def _per_slot(self, keep_a: torch.Tensor, keep_b: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        rows_a, rows_b = keep_a.unbind(0), keep_b.unbind(0)
        r_max = self._r_max
        return [(a, b) if r == r_max else (a[:r], b[:r]) for a, b, r in zip(rows_a, rows_b, self._rs)]

    def _device_masks(self, keep_a: torch.Tensor, keep_b: torch.Tensor) -> list[torch.Tensor]:
        """Per mask group, its (G, r) keep mask on the group's device: one host-to-device copy per device."""
        per_group = [(keep_a if g.kind == "A" else keep_b)[g.index, : g.r] for g in self._mask_groups]
        out: list[torch.Tensor | None] = [None] * len(per_group)
        devices = {}
        for i, g in enumerate(self._mask_groups):
            devices.setdefault(g.params[0].device, []).append(i)
        for device, idx in devices.items():
            if device.type == "cpu":
                for i in idx:
                    out[i] = per_group[i]
                continue
            flat = torch.cat([per_group[i].reshape(-1) for i in idx])
            if device.type == "cuda":
                flat = flat.pin_memory()
            flat = flat.to(device, non_blocking=True)
            for i, part in zip(idx, flat.split([per_group[i].numel() for i in idx])):
                out[i] = part.view(per_group[i].shape)
        return out

    @torch.no_grad()
    def pre_optimizer_step(self, step: int) -> None:
        self.last_keep = []
        self._saved_for_update_mask = []
        if step < self.config.mask_start_step:
            return
        keep_a, keep_b = self._draw_keep(step)
        self.last_keep = self._per_slot(keep_a, keep_b)
        # Gradients the handle let through are finite (its on_nonfinite check), so multiplying by 0/1 zeroes exactly
        # what `grad[drop] = 0` zeroed; with on_nonfinite="off" a NaN/inf may remain, so index-fill instead.
        exact = self.ctx.handle.on_nonfinite == "off"
        strict = self.config.mask_target == "update"
        device_masks = self._device_masks(keep_a, keep_b)
        for group, keep in zip(self._mask_groups, device_masks):
            present = [(p, m) for p, m in zip(group.params, keep.unbind(0)) if p.grad is not None]
            if present and _sharded(present[0][0].grad):
                for p, m in present:  # FSDP2: each rank masks its shard of the gradient
                    p.grad.mul_(_like(self._broadcast(group, m, p), p.grad))
            elif present:
                grads = [p.grad for p, _ in present]
                if exact:
                    for g, m in zip(grads, [m for _, m in present]):
                        g.masked_fill_(self._broadcast(group, ~m, g), 0)
                else:  # one mask tensor for the group, materialised in the gradients' layout: a fused foreach
                    rows = keep if len(present) == len(group.params) else torch.stack([m for _, m in present])
                    masks = group.expand(rows, grads[0]).to(grads[0].dtype).contiguous()
                    torch._foreach_mul_(grads, list(masks.unbind(0)))
            if strict:
                for p, m in zip(group.params, keep.unbind(0)):
                    keep_p = self._broadcast(group, m, p)
                    if _sharded(p):
                        keep_p = _like(keep_p, p).bool()
                    self._saved_for_update_mask.append((p, p.detach().clone(), keep_p))
        if self.config.mask_all_trainable:
            lora_params = {id(p) for _, a, b in self._factors for p in (a, b)}
            others = [
                p.grad
                for p in self.ctx.model.parameters()
                if p.requires_grad and id(p) not in lora_params and p.grad is not None
            ]
            if others:
                torch._foreach_zero_(others)

    @staticmethod
    def _broadcast(group: _MaskGroup, mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(r,) -> broadcastable against a parameter of the group (rank along dim 0 for A, dim 1 for B)."""
        shape = [1] * like.dim()
        shape[group.rank_dim] = group.r
        return mask.reshape(shape)

    @torch.no_grad()
    def post_optimizer_step(self, step: int) -> None:
        # Strict mode: masked components get their pre-step values back, so neither momentum nor weight decay
        # moves them.
        for p, before, keep in self._saved_for_update_mask:
            p.copy_(torch.where(keep, p, before))
        self._saved_for_update_mask = []
