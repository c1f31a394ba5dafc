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

    def __post_init__(self):
        check_range("sigma", self.sigma, low=0.0)
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


class GaussianRowNoise:
    """eps (n_out, n_in) with eps_ij = std_i * z_ij, z ~ N(0, 1) from a generator seeded with `seed`."""

    __slots__ = ("seed", "std", "pool")

    def __init__(self, seed: int, std: torch.Tensor, pool: GeneratorPool):
        self.seed, self.std, self.pool = seed, std, pool

    def sample_into(self, out: torch.Tensor, accumulate: bool) -> None:
        gen = self.pool.get(out.device, self.seed)
        if accumulate:
            out.addcmul_(torch.randn(out.shape, generator=gen, device=out.device), self.std[:, None])
        else:
            torch.randn(out.shape, generator=gen, device=out.device, out=out)
            out.mul_(self.std[:, None])


class FlatLoRA(Method):
    """Flat-LoRA (arXiv 2409.14396). Options: see `FlatLoRAConfig`."""

    config_class = FlatLoRAConfig
    order = 20  # after LoRASC's stage change, so row norms see the current slow weights (spec 5.2)
    config: FlatLoRAConfig

    def __init__(self, config: FlatLoRAConfig | None = None, **options):
        super().__init__(config, **options)
        self._pool = GeneratorPool()
        self._base_sq_norms: dict[int, torch.Tensor] = {}
        self._stds: dict[int, torch.Tensor] | None = None  # per slot (n_out,), fp32; None: no noise this step
        self._draw_id = -1
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
        with torch.no_grad():
            for slot in ctx.slots:  # W is frozen, so ||W_i||^2 is computed once
                self._base_sq_norms[slot.index] = _row_sq_norms(slot.base_layer.weight)
        ctx.perturber.add_source(self)

    def on_detach(self) -> None:
        self.ctx.perturber.remove_source(self)
        self._base_sq_norms.clear()
        self._stds = None
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
        stds = {}
        for slot in self.ctx.slots:
            w = slot.base_layer.weight
            norms = merged_row_norms(self._base_sq_norms[slot.index], w, handle.delta_factors(slot))
            stds[slot.index] = norms.mul_(sigma / math.sqrt(w.shape[1]))
        self._stds = stds

    def draw_for(self, slot: LoraSlot) -> GaussianRowNoise | None:
        if self._stds is None:
            return None
        seed = derive_seed(self.config.seed, "flat_lora", self._draw_id, slot.index)
        return GaussianRowNoise(seed, self._stds[slot.index], self._pool)

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
        return {"draw_id": self._draw_id, "stds": None if self._stds is None else {k: v.cpu() for k, v in self._stds.items()}}

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
