"""Flat-LoRA: LoRA over a flat loss landscape in the full weight space (Li et al., ICML 2025, arXiv 2409.14396;
docs/methods.md, "Flat-LoRA").

Instead of SAM's inner maximisation, the expected loss under random weight noise is minimised (paper Eq. 6):

    min_{A,B}  E_eps [ L(W + s*B*A + eps) ],   eps_ij ~ N(0, sigma_t^2 / n * ||W'_i||^2),  W' = W + s*B*A   (Eq. 7)

Noise is filter-wise: output row i gets Gaussian noise with std proportional to that row's norm; the 1/n factor
(n = fan-in) keeps the added output variance independent of width (Prop. 3.2). One draw per optimizer step,
shared by every gradient-accumulation micro-step (official `FlatLoraTrainer`), with sigma ramped up over the run.
Rows and fan-in follow the layer's (n_out, n_in) view (core/layers.py): Conv1D rows are output features whatever the
storage layout, a convolution's filter is an output channel (fan-in in_channels x kernel), an embedding's rows are
its coordinates (fan-in = vocabulary size); quantized bases are read dequantized.

Exactness: the noise is never written into W. `core.perturbed_linear` forms W + eps in the forward and regenerates
eps from its seed in the backward; only the per-row std (O(n_out) per layer) and a seed persist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..config import MethodConfig, check_choice, check_int, check_range, check_seed
from ..core.layers import LinearKind
from ..core.lora_layers import LoraSlot
from ..core.method import AttachContext, Method, Phase, Requirement
from ..core.perturbed_linear import NoiseTarget, fused_perturbation, noise_kernel
from ..core.seeding import GeneratorPool, derive_seed
from ..registry import register_method

SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class FlatLoRAConfig(MethodConfig):
    method_name = "flat_lora"

    sigma: float = field(
        default=0.05,
        metadata={
            "help": "Relative noise strength sigma (the official code's `rho`). Row i of the merged weight gets noise "
            "with std sigma_t * ||W'_i|| / sqrt(fan_in). Paper default 0.05; 0.10 is the other good value (App. D), "
            "0.15 for vision."
        },
    )
    schedule: str = field(
        default="cosine",
        metadata={
            "help": "How sigma_t grows over the run: 'cosine' (sigma * (1 - cos(pi t / T)) / 2, the official code), "
            "'linear' (sigma * t / T) or 'constant' (sigma from the first step). The ramps need total_steps."
        },
    )
    resample_every: int = field(
        default=1,
        metadata={"help": "Draw new noise every this many optimizer steps (the official code's interval T; 1)."},
    )
    seed: int | None = field(
        default=None,
        metadata={"help": "Seed of Flat-LoRA's own noise generator; None: derived from torch.initial_seed() at "
                          "attach (so torch.manual_seed changes it), recorded in genlora_config.json."},
    )
    noise_per_rank: bool = field(
        default=False,
        metadata={
            "help": "Under torch.distributed: False (default) draws the same noise on every rank, i.e. one "
            "perturbation of the shared weights per step, as a single process with the global batch would; True "
            "draws independent noise per rank (more perturbations averaged per step)."
        },
    )

    def __post_init__(self):
        check_range("sigma", self.sigma, low=0.0)
        if not isinstance(self.noise_per_rank, bool):
            raise TypeError(f"noise_per_rank must be a bool, got {self.noise_per_rank!r}")
        check_choice("schedule", self.schedule, SCHEDULES)
        check_int("resample_every", self.resample_every, low=1)
        check_seed("seed", self.seed)


def sigma_at(config: FlatLoRAConfig, step: int, total_steps: int | None) -> float:
    """sigma_t for optimizer step `step` (0-based) of `total_steps`."""
    if config.schedule == "constant":
        return config.sigma
    if total_steps is None:
        raise RuntimeError(
            f"Flat-LoRA's {config.schedule!r} schedule needs the run length: pass total_steps= to genlora.attach "
            "(the Trainer callback sets it from max_steps), or use schedule='constant'"
        )
    frac = min(step / total_steps, 1.0)
    if config.schedule == "linear":
        return config.sigma * frac
    return config.sigma * 0.5 * (1.0 - math.cos(math.pi * frac))


@torch.no_grad()
def merged_row_norms(base_sq_norms: torch.Tensor, weight: torch.Tensor, factors) -> torch.Tensor:
    """||W'_i|| for W' = W + sum_j U_j V_j without forming W' (n_out, n_in):

        ||W'_i||^2 = ||W_i||^2 + 2 <W_i, (U V)_i> + ||(U V)_i||^2
                   = ||W_i||^2 + 2 sum_k U_ik (W V^T)_ik + sum_k (U (V V^T))_ik U_ik

    with U, V the concatenation of all low-rank terms; `weight` is W as (n_out, n_in) (any strides). Costs one
    (n_out x n_in x k) product, like a LoRA forward.
    """
    u = torch.cat([f[0] for f in factors], dim=1).float()  # (n_out, k)
    v = torch.cat([f[1] for f in factors], dim=0).float()  # (k, n_in)
    wv = (weight @ v.to(weight.dtype).T).float()  # (n_out, k)
    gram = v @ v.T  # (k, k)
    sq = base_sq_norms + 2.0 * (u * wv).sum(1) + ((u @ gram) * u).sum(1)
    return sq.clamp_min_(0.0).sqrt_()


@torch.no_grad()
def batched_merged_row_norms(
    base_sq_norms: torch.Tensor, weights: list[torch.Tensor], u: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """`merged_row_norms` for G layers of one shape at once: (G, n_out) norms from base_sq_norms (G, n_out), the G
    frozen weights as (n_out, n_in) (separate tensors: never stacked, which would copy the model), and the stacked
    low-rank factors u (G, n_out, k), v (G, k, n_in) in fp32.

    Only the W V^T products run per layer (one `_foreach_mm`, or one mm each); everything else is a handful of
    batched kernels for the whole group, instead of ~a dozen small kernels per layer.
    """
    v_w = v.to(weights[0].dtype)  # (G, k, n_in), one cast for the group
    wv = _mm_each(weights, [m.T for m in v_w.unbind(0)])  # G x (n_out, k) in W's dtype
    wv = torch.stack(wv).float()  # (G, n_out, k)
    gram = torch.bmm(v, v.transpose(1, 2))  # (G, k, k)
    sq = base_sq_norms + 2.0 * (u * wv).sum(2) + (torch.bmm(u, gram) * u).sum(2)
    return sq.clamp_min_(0.0).sqrt_()


def _mm_each(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
    """[a_i @ b_i]: one call into the C++ loop (or a grouped GEMM) of `torch._foreach_mm` where torch has it."""
    foreach_mm = getattr(torch, "_foreach_mm", None)
    if foreach_mm is not None and len(a) > 1:
        try:
            return list(foreach_mm(a, b))
        except (RuntimeError, NotImplementedError, TypeError):  # a backend, dtype or layout the op does not cover
            pass
    return [x @ y for x, y in zip(a, b)]


class GaussianRowNoise:
    """eps in W's storage layout with eps = std (along the output axis) * z, z ~ N(0, 1) i.i.d., a pure function of
    `seed`.

    On CUDA with Triton, for a plain linear layer, z comes from the fused counter-based kernel
    (`genlora.kernels.flat_noise_triton`), which also forms W + eps in one pass (`triton_term` / `perturb`, used by
    `core.perturbed_linear`); elsewhere from `torch.randn` with a generator seeded with `seed`. The two paths draw
    different numbers with the same law; each regenerates its own draw bit for bit.
    """

    __slots__ = ("seed", "std", "pool", "row_shape", "rows_first")

    def __init__(self, seed: int, std: torch.Tensor, pool: GeneratorPool, row_shape=(-1, 1), rows_first=True):
        self.seed, self.std, self.pool, self.row_shape = seed, std, pool, row_shape
        self.rows_first = rows_first  # (n_out, n_in) storage: the kernel's layout

    def sample_into(self, out: torch.Tensor, accumulate: bool) -> None:
        kernel = noise_kernel()
        if self.rows_first and kernel is not None and kernel.usable(out):
            try:
                kernel.row_noise(out, self.std, self.seed, base=out if accumulate else None)
                return
            except Exception as err:  # pragma: no cover - needs a GPU whose Triton cannot compile the kernel
                kernel.disable(err)
        gen = self.pool.get(out.device, self.seed)
        std = self.std.reshape(self.row_shape)
        if accumulate:
            out.addcmul_(torch.randn(out.shape, generator=gen, device=out.device), std)
        else:
            torch.randn(out.shape, generator=gen, device=out.device, out=out)
            out.mul_(std)

    def triton_term(self):
        """This draw as a term of the fused kernel: ("normal", seed, per-row std)."""
        from ..kernels.flat_noise_triton import NoiseTerm

        return NoiseTerm("normal", self.seed, self.std)

    def perturb(self, weight: torch.Tensor) -> torch.Tensor | None:
        """W + eps in W's dtype in one fused pass (fp32 sum, rounded once: the bits `sample_into` + add + cast
        give), or None where there is no fused path (the caller then builds it with `sample_into`)."""
        return fused_perturbation([self], weight)


class _NormGroup:
    """LoRA layers whose row norms are computed together: same (n_out, n_in) shape, dtype and device, same rank."""

    __slots__ = ("slots", "base_sq_norms")

    def __init__(self, slots: list[LoraSlot], base_sq_norms: torch.Tensor):
        self.slots = slots
        self.base_sq_norms = base_sq_norms  # (G, n_out) fp32


def _lin_weight(slot: LoraSlot) -> torch.Tensor:
    return slot.kind.as_linear(slot.dense_weight())


def _group_key(slot: LoraSlot):
    w = _lin_weight(slot)
    b, a = slot.factor_views()
    return (tuple(w.shape), w.dtype, w.device, slot.r, a.dtype, b.dtype, slot.kind.name)


def _is_whole(weight: torch.Tensor) -> bool:
    """A weight that holds all its rows here (not an FSDP/ZeRO-3 shard seen outside the layer's forward)."""
    return weight.numel() > 0 and type(weight).__name__ not in ("DTensor", "FlatParameter") and (
        getattr(weight, "ds_shape", None) is None or tuple(weight.ds_shape) == tuple(weight.shape))


@register_method
class FlatLoRA(Method):
    """Flat-LoRA (arXiv 2409.14396). Options: see `FlatLoRAConfig`."""

    config_class = FlatLoRAConfig
    phase = Phase.NOISE  # after LoRASC's stage change, so row norms see the current slow weights (docs: Composition)
    config: FlatLoRAConfig

    def __init__(self, config: FlatLoRAConfig | None = None, **options):
        super().__init__(config, **options)
        self._pool = GeneratorPool()
        self._groups: list[_NormGroup] = []
        self._lazy: list[LoraSlot] = []  # sharded bases: row norms computed inside the forward, where W is whole
        self._base_sq: dict[int, torch.Tensor] = {}  # ||W_i||^2 of lazy slots, once
        self._stds: dict[int, torch.Tensor] | None = None  # per slot (n_out,), fp32; None: no noise this step
        self._sigma = 0.0
        self._draw_id = -1
        self._seeds: tuple[tuple[int, int] | None, dict[int, int]] = (None, {})  # ((draw_id, rank), index -> seed)
        self.last_sigma = 0.0

    # --- declared capabilities ---------------------------------------------------------------------------------
    def requirements(self):
        return set() if self.config.schedule == "constant" else {Requirement.TOTAL_STEPS}

    def perturbs_base(self) -> bool:
        return True

    def validate(self, model, slots: list[LoraSlot], others) -> None:
        for slot in slots:
            if slot.kind is None:
                raise TypeError(
                    f"Flat-LoRA supports PEFT LoRA on Linear, Conv1D, Conv1d/2d/3d, Embedding and bitsandbytes "
                    f"4/8-bit layers; {slot.name!r} is a {type(slot.layer).__name__} around "
                    f"{type(slot.base_layer).__name__}"
                )
            if getattr(slot.base_layer.weight, "requires_grad", False):
                raise ValueError(f"Flat-LoRA needs frozen base weights; {slot.name}.weight requires grad")

    def on_attach(self, ctx: AttachContext) -> None:
        super().on_attach(ctx)
        by_key: dict[tuple, list[LoraSlot]] = {}
        for slot in ctx.slots:
            if _is_whole(slot.base_layer.weight):
                by_key.setdefault(_group_key(slot), []).append(slot)
            else:
                self._lazy.append(slot)
        with torch.no_grad():  # W is frozen, so ||W_i||^2 is computed once
            self._groups = [
                _NormGroup(group, torch.stack([_row_sq_norms(_lin_weight(s)) for s in group]))
                for group in by_key.values()
            ]

    def on_detach(self) -> None:
        self._groups, self._lazy, self._base_sq = [], [], {}
        self._stds = None
        self._seeds = (None, {})
        super().on_detach()

    # --- per step ------------------------------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        if step % self.config.resample_every != 0 and self._stds is not None:
            return  # keep the previous draw (and its norms, as the official code stores them)
        self.last_sigma = self._sigma = sigma_at(self.config, step, self.ctx.handle.total_steps)
        self._draw_id = step // self.config.resample_every
        self._stds = None if self._sigma == 0.0 else self._row_stds(self._sigma)

    @torch.no_grad()
    def _row_stds(self, sigma: float) -> dict[int, torch.Tensor]:
        """sigma * ||W'_i|| / sqrt(n_in) for every slot with a whole weight, computed per group of equal-shape layers
        (sharded layers get theirs inside their forward: `_lazy_std`)."""
        handle = self.ctx.handle
        stds = {}
        for group in self._groups:
            weights = [_lin_weight(s) for s in group.slots]
            if not all(_is_whole(w) for w in weights):
                continue  # sharded since attach (FSDP2 / ZeRO-3): computed in the layers' forwards (`_lazy_std`)
            factors = [handle.live_factors(s) for s in group.slots]  # [(s*B, A)], after LoRASC's slow experts
            us = [torch.cat([f[0] for f in fs], dim=1) if len(fs) > 1 else fs[0][0] for fs in factors]
            vs = [torch.cat([f[1] for f in fs], dim=0) if len(fs) > 1 else fs[0][1] for fs in factors]
            if len({x.shape[1] for x in us}) != 1:  # different ranks within the group: one layer at a time
                norms = torch.stack(
                    [merged_row_norms(b, w, fs) for b, w, fs in zip(group.base_sq_norms, weights, factors)]
                )
            else:
                norms = batched_merged_row_norms(group.base_sq_norms, weights, torch.stack(us).float(),
                                                 torch.stack(vs).float())
            stds.update(self._scaled(group.slots, norms, sigma))
        return stds

    @staticmethod
    def _scaled(slots: list[LoraSlot], norms: torch.Tensor, sigma: float) -> dict[int, torch.Tensor]:
        norms.mul_(sigma / math.sqrt(slots[0].kind.fan_in(slots[0].base_layer)))
        return {s.index: row for s, row in zip(slots, norms.unbind(0))}

    @torch.no_grad()
    def _lazy_std(self, slot: LoraSlot, weight: torch.Tensor) -> torch.Tensor:
        """The std of a sharded layer, from its whole weight as the forward sees it (FSDP2 / ZeRO-3 gather it there,
        with the layer's A and B): no extra gather. Once per draw; cached for the step's other micro-steps and the
        backward."""
        lin = slot.kind.as_linear(weight)
        base_sq = self._base_sq.get(slot.index)
        if base_sq is None:
            base_sq = self._base_sq[slot.index] = _row_sq_norms(lin)
        norms = merged_row_norms(base_sq, lin, self.ctx.handle.live_factors(slot))
        std = norms.mul_(self._sigma / math.sqrt(lin.shape[1]))
        self._stds[slot.index] = std
        return std

    @property
    def _rank(self) -> int:
        if not self.config.noise_per_rank:
            return 0
        dist = torch.distributed
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def _seed(self, slot: LoraSlot) -> int:
        key, seeds = self._seeds
        rank = self._rank
        if key != (self._draw_id, rank):  # derived once per draw (and rank), not on every forward and backward
            seeds = {}
            self._seeds = ((self._draw_id, rank), seeds)
        seed = seeds.get(slot.index)
        if seed is None:
            seed = seeds[slot.index] = derive_seed(self.seed, "flat_lora", self._draw_id, slot.index, rank)
        return seed

    def draw_for(self, target: NoiseTarget, weight: torch.Tensor) -> GaussianRowNoise | None:
        slot = target.slot
        if self._stds is None or slot is None or not slot.active:
            return None  # no noise this step, a layer without this adapter, or the adapter disabled (a reference)
        std = self._stds.get(slot.index)
        if std is None:
            std = self._lazy_std(slot, weight)
        return GaussianRowNoise(self._seed(slot), std, self._pool, slot.kind.row_shape(weight),
                                rows_first=isinstance(slot.kind, LinearKind))

    def noise(self, slot: LoraSlot) -> torch.Tensor | None:
        """The noise eps of the current step for `slot` as (n_out, n_in) fp32, regenerated; for tests and analysis."""
        weight = slot.dense_weight()
        target = NoiseTarget(slot.index, slot.name, slot.base_layer, slot.kind, slot)
        draw = self.draw_for(target, weight)
        if draw is None:
            return None
        out = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
        draw.sample_into(out, accumulate=False)
        return slot.kind.as_linear(out)

    # --- state ---------------------------------------------------------------------------------------------------
    def state_dict(self):
        # Row norms are recomputed from the weights at the start of each draw, so the step counter (kept by the
        # handle) is the whole state, except between resamples, where the stored stds are needed.
        # Copies: the stds are rows of one tensor per layer group, and a saved view would drag its whole group along.
        stds = None if self._stds is None else {k: v.to("cpu", copy=True) for k, v in self._stds.items()}
        return {"draw_id": self._draw_id, "sigma": self._sigma, "stds": stds}

    def load_state_dict(self, state):
        self._draw_id = state["draw_id"]
        self._sigma = state.get("sigma", 0.0)
        stds = state["stds"]
        if stds is None:
            self._stds = None
        else:
            self._stds = {int(k): v.to(self.ctx.slots[int(k)].a_weight.device) for k, v in stds.items()}


def _row_sq_norms(weight: torch.Tensor, rows_per_chunk: int = 4096) -> torch.Tensor:
    """||W_i||^2 in fp32 of W as (n_out, n_in), in row chunks so a bf16 weight is never upcast whole."""
    return torch.cat([c.float().pow(2).sum(1) for c in weight.detach().split(rows_per_chunk)])
