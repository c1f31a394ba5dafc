"""Flat-LoRA: LoRA over a flat loss landscape in the full weight space (Li et al., ICML 2025, arXiv 2409.14396).

Instead of SAM's inner maximisation, the expected loss under random weight noise is minimised (paper Eq. 6):

    min_{A,B}  E_eps [ L(W + s*B*A + eps) ],   eps_ij ~ N(0, sigma_t^2 / n * ||W'_i||^2),  W' = W + s*B*A   (Eq. 7)

Noise is filter-wise: output row i gets Gaussian noise with std proportional to that row's norm; the 1/n factor
(n = fan-in) keeps the added output variance independent of width (Prop. 3.2). One draw per optimizer step,
shared by every gradient-accumulation micro-step (official `FlatLoraTrainer`), with sigma ramped up over the run.

Exactness: the noise is never written into W. `core.perturbed_linear` forms W + eps in the forward and regenerates
eps from its seed in the backward; only the per-row std (O(n_out) per layer) and a seed persist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..config import MethodConfig, check_choice, check_int, check_range
from ..core.lora_layers import LoraSlot
from ..core.method import AttachContext, Method
from ..core.perturbed_linear import fused_perturbation, noise_kernel
from ..core.seeding import GeneratorPool, derive_seed

SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class FlatLoRAConfig(MethodConfig):
    method_name = "flat_lora"

    sigma: float = field(
        default=0.05,
        metadata={
            "help": "Relative noise strength sigma (the official code's `rho`). Row i of the merged weight gets noise "
            "with std sigma_t * ||W'_i|| / sqrt(fan_in). Paper default 0.05; 0.10 is the other good value (App. D)."
        },
    )
    schedule: str = field(
        default="cosine",
        metadata={
            "help": "How sigma_t grows over the run: 'cosine' (sigma * (1 - cos(pi t / T)) / 2, the official code), "
            "'linear' (sigma * t / T) or 'constant' (sigma from the first step)."
        },
    )
    resample_every: int = field(
        default=1,
        metadata={"help": "Draw new noise every this many optimizer steps (the official code's interval T; 1)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of Flat-LoRA's own noise generator."})
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
        check_int("seed", self.seed, low=0)


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

    with U, V the concatenation of all low-rank terms. Costs one (n_out x n_in x k) product, like a LoRA forward.
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
    frozen weights (n_out, n_in) (separate tensors: they are never stacked, which would copy the model), and the
    stacked low-rank factors u (G, n_out, k), v (G, k, n_in) in fp32.

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
        except (RuntimeError, NotImplementedError, TypeError):  # a backend or dtype the op does not cover
            pass
    return [x @ y for x, y in zip(a, b)]


def _triton_kernel():
    """The fused Triton noise kernel module, or None (not installed, or disabled); imported on first use."""
    return noise_kernel()


class GaussianRowNoise:
    """eps (n_out, n_in) with eps_ij = std_i * z_ij, z ~ N(0, 1), a pure function of `seed`.

    On CUDA with Triton, z comes from the fused counter-based kernel (`genlora.kernels.flat_noise_triton`), which
    also forms W + eps in one pass (`triton_term` / `perturb`, used by `core.perturbed_linear`); elsewhere from
    `torch.randn` with a generator seeded with `seed`. The two paths draw different numbers with the same law; each
    regenerates its own draw bit for bit.
    """

    __slots__ = ("seed", "std", "pool")

    def __init__(self, seed: int, std: torch.Tensor, pool: GeneratorPool):
        self.seed, self.std, self.pool = seed, std, pool

    def sample_into(self, out: torch.Tensor, accumulate: bool) -> None:
        kernel = noise_kernel()
        if kernel is not None and kernel.usable(out):
            try:
                kernel.row_noise(out, self.std, self.seed, base=out if accumulate else None)
                return
            except Exception as err:  # pragma: no cover - needs a GPU whose Triton cannot compile the kernel
                kernel.disable(err)
        gen = self.pool.get(out.device, self.seed)
        if accumulate:
            out.addcmul_(torch.randn(out.shape, generator=gen, device=out.device), self.std[:, None])
        else:
            torch.randn(out.shape, generator=gen, device=out.device, out=out)
            out.mul_(self.std[:, None])

    def triton_term(self):
        """This draw as a term of the fused kernel: ("normal", seed, per-row std)."""
        from ..kernels.flat_noise_triton import NoiseTerm

        return NoiseTerm("normal", self.seed, self.std)

    def perturb(self, weight: torch.Tensor) -> torch.Tensor | None:
        """W + eps in W's dtype in one fused pass (fp32 sum, rounded once: the bits `sample_into` + add + cast
        give), or None where there is no fused path (the caller then builds it with `sample_into`)."""
        return fused_perturbation([self], weight)


class _NormGroup:
    """LoRA layers whose row norms are computed together: same weight shape, dtype and device, same rank and
    scaling (so s*B stacks exactly as the per-layer `s * B` would be computed)."""

    __slots__ = ("slots", "base_sq_norms", "scaling")

    def __init__(self, slots: list[LoraSlot], base_sq_norms: torch.Tensor, scaling: float):
        self.slots = slots
        self.base_sq_norms = base_sq_norms  # (G, n_out) fp32
        self.scaling = scaling


def _group_key(slot: LoraSlot):
    w = slot.base_layer.weight
    return (tuple(w.shape), w.dtype, w.device, slot.r, slot.scaling, slot.a_weight.dtype, slot.b_weight.dtype)


class FlatLoRA(Method):
    """Flat-LoRA (arXiv 2409.14396). Options: see `FlatLoRAConfig`."""

    config_class = FlatLoRAConfig
    order = 20  # after LoRASC's stage change, so row norms see the current slow weights (spec 5.2)
    config: FlatLoRAConfig

    def __init__(self, config: FlatLoRAConfig | None = None, **options):
        super().__init__(config, **options)
        self._pool = GeneratorPool()
        self._groups: list[_NormGroup] = []
        self._stds: dict[int, torch.Tensor] | None = None  # per slot (n_out,), fp32; None: no noise this step
        self._draw_id = -1
        self._seeds: tuple[tuple[int, int] | None, dict[int, int]] = (None, {})  # ((draw_id, rank), index -> seed)
        self.last_sigma = 0.0

    def validate(self, model, slots: list[LoraSlot]) -> None:
        for slot in slots:
            if not slot.is_linear:
                raise TypeError(
                    f"Flat-LoRA supports LoRA on float nn.Linear layers; {slot.name!r} wraps "
                    f"{type(slot.base_layer).__name__} (quantized, Conv, Embedding and Conv1D bases are not supported)"
                )
            if slot.base_layer.weight.requires_grad:
                raise ValueError(f"Flat-LoRA needs frozen base weights; {slot.name}.weight requires grad")

    def on_attach(self, ctx: AttachContext) -> None:
        super().on_attach(ctx)
        by_key: dict[tuple, list[LoraSlot]] = {}
        for slot in ctx.slots:
            by_key.setdefault(_group_key(slot), []).append(slot)
        with torch.no_grad():  # W is frozen, so ||W_i||^2 is computed once
            self._groups = [
                _NormGroup(group, torch.stack([_row_sq_norms(s.base_layer.weight) for s in group]), group[0].scaling)
                for group in by_key.values()
            ]
        ctx.perturber.add_source(self)

    def on_detach(self) -> None:
        self.ctx.perturber.remove_source(self)
        self._groups = []
        self._stds = None
        self._seeds = (None, {})
        super().on_detach()

    def begin_step(self, step: int) -> None:
        if step % self.config.resample_every != 0 and self._stds is not None:
            return  # keep the previous draw (and its norms, as the official code stores them)
        handle = self.ctx.handle
        self.last_sigma = sigma = sigma_at(self.config, step, handle.total_steps)
        self._draw_id = step // self.config.resample_every
        if sigma == 0.0:
            self._stds = None
            return
        self._stds = self._row_stds(sigma)

    @torch.no_grad()
    def _row_stds(self, sigma: float) -> dict[int, torch.Tensor]:
        """sigma * ||W'_i|| / sqrt(n_in) for every slot, computed per group of equal-shape layers."""
        handle = self.ctx.handle
        plain = not any(getattr(m, "extra_delta_factors", None) is not None for m in handle.methods)
        stds = {}
        for group in self._groups:
            weights = [s.base_layer.weight for s in group.slots]
            if plain:  # the factors are exactly [(s*B, A)] (handle.delta_factors): stack them directly
                u = (torch.stack([s.lora_B.weight for s in group.slots]) * group.scaling).float()
                v = torch.stack([s.lora_A.weight for s in group.slots]).float()
            else:  # other methods add frozen terms (LoRASC's slow experts): concatenate per layer, as before
                factors = [handle.delta_factors(s) for s in group.slots]
                us = [torch.cat([f[0] for f in fs], dim=1) for fs in factors]
                vs = [torch.cat([f[1] for f in fs], dim=0) for fs in factors]
                if len({x.shape[1] for x in us}) != 1:  # different ranks within the group: one layer at a time
                    norms = torch.stack(
                        [merged_row_norms(b, w, fs) for b, w, fs in zip(group.base_sq_norms, weights, factors)]
                    )
                    stds.update(self._scaled(group, norms, sigma))
                    continue
                u = torch.stack(us).float()
                v = torch.stack(vs).float()
            norms = batched_merged_row_norms(group.base_sq_norms, weights, u, v)
            stds.update(self._scaled(group, norms, sigma))
        return stds

    @staticmethod
    def _scaled(group: _NormGroup, norms: torch.Tensor, sigma: float) -> dict[int, torch.Tensor]:
        norms.mul_(sigma / math.sqrt(group.slots[0].base_layer.weight.shape[1]))
        return {s.index: row for s, row in zip(group.slots, norms.unbind(0))}

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
            seed = seeds[slot.index] = derive_seed(self.config.seed, "flat_lora", self._draw_id, slot.index, rank)
        return seed

    def draw_for(self, slot: LoraSlot) -> GaussianRowNoise | None:
        if self._stds is None:
            return None
        return GaussianRowNoise(self._seed(slot), self._stds[slot.index], self._pool)

    def noise(self, slot: LoraSlot) -> torch.Tensor | None:
        """The noise eps (n_out, n_in, fp32) of the current step for `slot`, regenerated; for tests and analysis."""
        draw = self.draw_for(slot)
        if draw is None:
            return None
        out = torch.empty(slot.base_layer.weight.shape, dtype=torch.float32, device=slot.base_layer.weight.device)
        draw.sample_into(out, accumulate=False)
        return out

    def state_dict(self):
        # Row norms are recomputed from the weights at the start of each draw, so the step counter (kept by the
        # handle) is the whole state, except between resamples, where the stored stds are needed.
        # Copies: the stds are rows of one tensor per layer group, and a saved view would drag its whole group along.
        stds = None if self._stds is None else {k: v.to("cpu", copy=True) for k, v in self._stds.items()}
        return {"draw_id": self._draw_id, "stds": stds}

    def load_state_dict(self, state):
        self._draw_id = state["draw_id"]
        stds = state["stds"]
        if stds is None:
            self._stds = None
        else:
            self._stds = {
                int(k): v.to(self.ctx.slots[int(k)].base_layer.weight.device) for k, v in stds.items()
            }


def _row_sq_norms(weight: torch.Tensor, rows_per_chunk: int = 4096) -> torch.Tensor:
    """||W_i||^2 in fp32, in row chunks so a bf16 weight is never upcast whole."""
    return torch.cat([c.float().pow(2).sum(1) for c in weight.detach().split(rows_per_chunk)])
