"""LoRASC: LoRA slow cascade learning (Li et al., "Expressive and Generalizable Low-rank Adaptation for Large Models
via Slow Cascaded Learning", arXiv 2407.01491, Findings of EMNLP 2024). No official code was published; this follows
the reconstruction of docs/methods.md, "LoRASC".

Training runs in stages t = 1..T (default: 3 stages of equal length over the run). Stage t trains a fresh "fast" LoRA
(B_t = 0, A_t Kaiming, fresh optimizer state) on a noisy copy of the frozen backbone; at its end a portion of it is
merged into a slow accumulator S:

    noisy backbone (cascading noisy tuning, NoisyTune-style, per matrix):
        W~_t = W + S_{t-1} + xi_t,      xi_t = (U(-1/2, 1/2) elementwise) * lambda * std(W)
    slow-fast update (Lookahead reading, default):
        S_t = S_{t-1} + alpha * s * B_t A_t
    or, behind `slow_update="ema"`:
        S_t = (1 - alpha) * S_{t-1} + alpha * s * B_t A_t

so S is a weighted sum of rank-r experts (rank up to T*r): the "mixture of low-rank adaptations". alpha = 1 with the
Lookahead reading is ReLoRA/COLA merge-and-reinit chaining. The final model is W + S_T: the current fast expert
enters the deployed model at weight alpha (the slow-fast update of the last stage), never at 1.

Exactness: nothing is ever written into the frozen W (it stays bit-identical, also in bf16). S is held by this method
as frozen low-rank factors U (n_out, K), V (K, n_in) that the core adds to the LoRA layer's output (`frozen_delta_
factors`); they are not module parameters or buffers, so state dicts are unchanged. The stage noise goes through
`core.perturbed_linear` (regenerated from its seed, never stored or added in place), so it is gone exactly when the
stage ends. Every save path writes a plain PEFT adapter of rank K + r holding W + S + alpha*s*B*A.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import MethodConfig, check_bool, check_choice, check_int, check_range, check_seed
from ..core.layers import kind_of_base
from ..core.lora_layers import LoraSlot
from ..core.method import AttachContext, Method, Phase, Requirement
from ..core.perturbed_linear import NoiseTarget, noise_kernel
from ..core.seeding import GeneratorPool, derive_seed
from ..registry import register_method

SLOW_UPDATES = ("lookahead", "ema")
NOISE_MODES = ("transient", "persistent")
NOISE_SCOPES = ("lora", "all")


@dataclass
class LoRASCConfig(MethodConfig):
    method_name = "lorasc"

    alpha: float = field(
        default=0.5,
        metadata={
            "help": "Slow-fast pace alpha in (0, 1]: the share of each finished fast expert merged into the slow "
            "weights (the last expert too: the deployed model is W + S_T). The paper's value is unknown; 0.5 is "
            "Lookahead's default, the grid {0.5, 0.8, 1.0}; 1.0 with 'lookahead' is ReLoRA/COLA chaining."
        },
    )
    slow_update: str = field(
        default="lookahead",
        metadata={
            "help": "'lookahead' (default): S += alpha * s*B*A, every expert kept with weight alpha. 'ema': "
            "S = (1 - alpha) * S + alpha * s*B*A, earlier experts decay (the second reading)."
        },
    )
    num_stages: int | None = field(
        default=3,
        metadata={
            "help": "Cascade stages of equal length over the run (>= 1; needs total_steps). Default 3: a stage count "
            "per run, whatever the data size (one stage per epoch gives many short stages on small data, each "
            "restarting B at 0 with a reset optimizer). Unused when stage_steps or stage_per_epoch is set."
        },
    )
    stage_steps: int | None = field(
        default=None,
        metadata={"help": "Fixed stage length in optimizer steps (>= 1); overrides num_stages."},
    )
    stage_per_epoch: bool = field(
        default=False,
        metadata={
            "help": "One stage per epoch (the summaries' reading) instead of num_stages; the epoch length comes "
            "from steps_per_epoch (below) or the loop (attach(steps_per_epoch=...), set by GenLoRACallback)."
        },
    )
    steps_per_epoch: int | None = field(
        default=None,
        metadata={"help": "Optimizer steps per epoch for stage_per_epoch in a plain loop (>= 1); default None: the "
                          "loop's (genlora.attach(..., steps_per_epoch=N))."},
    )
    noise_lambda: float = field(
        default=0.15,
        metadata={
            "help": "Cascading noisy tuning strength lambda >= 0: each stage perturbs the frozen matrices W by "
            "U(-1/2, 1/2) * lambda * std(W), NoisyTune-style. Default 0.15 (NoisyTune's; LoRASC's value is "
            "unknown). 0 turns the noise off. Training-mode forwards only; evaluation sees no noise."
        },
    )
    noise_mode: str = field(
        default="transient",
        metadata={
            "help": "'transient' (default): stage t trains with its own draw xi_t only, which is gone when the stage "
            "ends. 'persistent': the draws of all stages so far stay (xi_1 + ... + xi_t), regenerated from their "
            "seeds, so stage t costs t uniform draws per layer and forward; exportable only as a dense model."
        },
    )
    noise_scope: str = field(
        default="lora",
        metadata={
            "help": "Which frozen matrices get the stage noise: 'lora' (default) the base weights of the LoRA-adapted "
            "layers; 'all' every frozen Linear, Conv1D, Conv and Embedding weight, as NoisyTune perturbs all of a "
            "model's matrices (a tied weight gets one noise wherever it is used)."
        },
    )
    seed: int | None = field(
        default=None,
        metadata={"help": "Seed of LoRASC's own generators (stage noise, fast-LoRA re-init); None: derived from "
                          "torch.initial_seed() at attach, recorded in genlora_config.json."},
    )

    def __post_init__(self):
        check_range("alpha", self.alpha, low=0.0, high=1.0, low_open=True)
        check_choice("slow_update", self.slow_update, SLOW_UPDATES)
        for key in ("num_stages", "stage_steps", "steps_per_epoch"):
            if getattr(self, key) is not None:
                check_int(key, getattr(self, key), low=1)
        check_bool("stage_per_epoch", self.stage_per_epoch)
        if self.stage_steps is not None and self.stage_per_epoch:
            raise ValueError("stage_steps and stage_per_epoch=True both set the stage length: choose one")
        if self.stage_steps is None and not self.stage_per_epoch and self.num_stages is None:
            raise ValueError("num_stages is None: set num_stages (>= 1), stage_steps, or stage_per_epoch=True")
        check_range("noise_lambda", self.noise_lambda, low=0.0)
        check_choice("noise_mode", self.noise_mode, NOISE_MODES)
        check_choice("noise_scope", self.noise_scope, NOISE_SCOPES)
        check_seed("seed", self.seed)


class UniformNoise:
    """xi = (u - 1/2) * scale in W's storage layout, u ~ U[0, 1) elementwise, a pure function of `seed`.

    On CUDA with the Triton kernel enabled (GENLORA_TRITON=auto), u comes from its counter-based generator, and
    `core.perturbed_linear` forms W + xi (+ Flat-LoRA's eps) in one pass through `triton_term`; elsewhere from
    `torch.rand` with a generator seeded with `seed`. Each path regenerates its own draw bit for bit."""

    __slots__ = ("seed", "scale", "pool")

    def __init__(self, seed: int, scale: float, pool: GeneratorPool):
        self.seed, self.scale, self.pool = seed, scale, pool

    def triton_term(self):
        """This draw as a term of the fused kernel: ("uniform", seed, scale)."""
        from ..kernels.flat_noise_triton import NoiseTerm

        return NoiseTerm("uniform", self.seed, self.scale)

    def sample_into(self, out: torch.Tensor, accumulate: bool) -> None:
        kernel = noise_kernel()
        if kernel is not None and kernel.usable(out):
            try:  # the same numbers the fused build draws, so fused and unfused builds agree bit for bit
                kernel.uniform_noise(out, self.scale, self.seed, base=out if accumulate else None)
                return
            except Exception as err:  # pragma: no cover - needs a GPU whose Triton cannot compile the kernel
                kernel.disable(err)
        gen = self.pool.get(out.device, self.seed)
        if accumulate:
            out.add_(torch.rand(out.shape, generator=gen, device=out.device).sub_(0.5).mul_(self.scale))
        else:
            torch.rand(out.shape, generator=gen, device=out.device, out=out)
            out.sub_(0.5).mul_(self.scale)


class SummedNoise:
    """The sum of several draws (persistent mode: every stage's noise so far), regenerated one after the other."""

    __slots__ = ("draws",)

    def __init__(self, draws: list[UniformNoise]):
        self.draws = draws

    def sample_into(self, out: torch.Tensor, accumulate: bool) -> None:
        for i, draw in enumerate(self.draws):
            draw.sample_into(out, accumulate or i > 0)


@register_method
class LoRASC(Method):
    """LoRASC slow cascade learning (arXiv 2407.01491). Options: see `LoRASCConfig`.

    Plain loop (`model` a PEFT LoRA model, `loader` yielding dict batches with labels)::

        lorasc = genlora.LoRASC(alpha=0.5, noise_lambda=0.15)        # 3 stages over the run
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        handle = genlora.attach(model, lorasc, total_steps=num_epochs * len(loader), optimizer=optimizer)
        for epoch in range(num_epochs):
            for batch in loader:
                handle.begin_step()         # first step of a stage: merge alpha*s*B*A into S, fresh A, B and state
                loss = model(**batch).loss
                loss.backward()
                handle.optimizer_step(optimizer)
                optimizer.zero_grad()
        model.save_pretrained(adapter_dir)  # a plain PEFT adapter of rank (stages)*r: W + S + alpha*s*B*A
        handle.save_merged(merged_dir)      # the same model, dense (transformers save_pretrained)

    Trainer (the callback binds the Trainer's optimizer and sets the run and epoch lengths)::

        handle = genlora.attach(model, genlora.LoRASC(alpha=0.5, noise_lambda=0.15))
        trainer = Trainer(model=model, args=args, train_dataset=train_dataset,
                          callbacks=[genlora.GenLoRACallback(handle)])
        trainer.train()
        trainer.save_model(adapter_dir)     # the deployed model, as every checkpoint-N/ holds it

    The slow experts live in this method object, not in the model: `detach()` drops them (with a warning), so
    export first. They are part of `handle.state_dict()`, so `handle.save_state(path)` / `load_state(path)` resume
    exactly (GenLoRACallback writes that file into every Trainer checkpoint).
    """

    config_class = LoRASCConfig
    phase = Phase.STAGE  # stage change first: Flat-LoRA's row norms of the same step see the new S and fresh B, A
    config: LoRASCConfig

    def __init__(self, config: LoRASCConfig | None = None, **options):
        super().__init__(config, **options)
        self._pool = GeneratorPool()
        self._stage: int | None = None  # None until the first begin_step
        self._slow: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> U (n_out, K), V (K, n_in), fp32
        self._std: dict[int, float] = {}  # noise target -> std(W), for the noise scale
        self._owner: dict[int, int] = {}  # noise target -> index seeding its noise (tied weights share one)
        self._extra_targets: list[NoiseTarget] = []

    # --- declared capabilities ---------------------------------------------------------------------------------
    def requirements(self):
        reqs = {Requirement.OPTIMIZER}
        if self.config.stage_steps is not None:
            return reqs
        if self.config.stage_per_epoch:
            return reqs if self.config.steps_per_epoch is not None else reqs | {Requirement.STEPS_PER_EPOCH}
        return reqs | {Requirement.TOTAL_STEPS}

    def perturbs_base(self) -> bool:
        return self.config.noise_lambda > 0

    def adds_delta_terms(self) -> bool:
        return True

    # --- queries -----------------------------------------------------------------------------------------------
    @property
    def stage(self) -> int | None:
        """Index of the current cascade stage (0-based); None before the first step."""
        return self._stage

    def stage_of(self, step: int) -> int:
        """The stage optimizer step `step` belongs to."""
        cfg, loop = self.config, self.ctx.handle.loop
        if cfg.stage_steps is not None:
            return step // cfg.stage_steps
        if cfg.stage_per_epoch:
            return step // (cfg.steps_per_epoch or loop.steps_per_epoch)
        total, n = loop.total_steps, cfg.num_stages
        return min(step * n // total, n - 1)

    def slow_rank(self, slot: LoraSlot) -> int:
        """K, the rank of the slow part S of `slot` (r per finished stage; 0 during the first stage)."""
        slow = self._slow.get(slot.index)
        return 0 if slow is None else slow[1].shape[0]

    def frozen_delta_factors(self, slot: LoraSlot) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(U (n_out, K), V (K, n_in))] with S = U V, or [] before the first stage boundary (fp32)."""
        slow = self._slow.get(slot.index)
        return [] if slow is None else [slow]

    extra_delta_factors = frozen_delta_factors

    def noise(self, slot: LoraSlot) -> torch.Tensor | None:
        """The stage noise that training forwards of `slot` add to W now, as (n_out, n_in) fp32, regenerated; None if
        there is none. For tests and analysis."""
        target = NoiseTarget(slot.index, slot.name, slot.base_layer, slot.kind, slot)
        weight = slot.dense_weight()
        draw = self.draw_for(target, weight)
        if draw is None:
            return None
        out = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
        draw.sample_into(out, accumulate=False)
        return slot.kind.as_linear(out)

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def validate(self, model, slots: list[LoraSlot], others) -> None:
        for slot in slots:
            if slot.kind is None:
                raise TypeError(
                    f"LoRASC supports PEFT LoRA on Linear, Conv1D, Conv, Embedding and bitsandbytes layers; "
                    f"{slot.name!r} is a {type(slot.layer).__name__}"
                )
            if getattr(slot.base_layer.weight, "requires_grad", False):
                raise ValueError(f"LoRASC needs frozen base weights; {slot.name}.weight requires grad")
            if slot.uses_variant:
                raise ValueError(
                    f"LoRASC folds each fast expert into low-rank slow factors; {slot.name!r} uses a LoRA variant "
                    "(DoRA's magnitude rescales whole output rows of W + s*B*A, a full-rank change no low-rank "
                    "factor can hold): set use_dora=False"
                )
            if getattr(slot.layer, "lora_bias", {}).get(slot.adapter, False):
                raise ValueError(f"LoRASC does not support lora_bias=True ({slot.name!r})")
            if type(slot.a_weight).__name__ == "DTensor":
                raise ValueError(
                    f"LoRASC rewrites the fast LoRA at stage boundaries and keeps its slow experts whole; {slot.name!r} "
                    "has sharded LoRA parameters (FSDP2 / ZeRO-3): train LoRASC with DDP"
                )
        for other in others:
            if other.name == "lora_dropout" and getattr(other.config, "deploy", None) == "ensemble":
                raise ValueError(
                    "LoRASC merges every fast expert at its expectation over LoRA Dropout's masks, so the deployed "
                    "model is deterministic: use LoRADropout(deploy='merged_expectation') with LoRASC"
                )

    def on_attach(self, ctx: AttachContext) -> None:
        super().on_attach(ctx)
        if self.perturbs_base() and self.config.noise_scope == "all":
            self._extra_targets = _other_frozen_layers(ctx.model, ctx.slots)
        targets = [NoiseTarget(s.index, s.name, s.base_layer, s.kind, s) for s in ctx.slots] + self._extra_targets
        owners: dict[int, int] = {}
        for t in targets:  # a tied weight (embedding = lm_head) gets one noise: seeded by its first user
            owners.setdefault(id(t.module.weight), t.index)
            self._owner[t.index] = owners[id(t.module.weight)]
        if self.perturbs_base():
            with torch.no_grad():  # W is frozen, so std(W) is computed once (lazily for shards: `draw_for`)
                for t in targets:
                    weight = t.kind.dense_weight(t.module)
                    if weight.numel() > 0 and type(weight).__name__ != "DTensor":
                        self._std[t.index] = _weight_std(weight)

    def noise_targets(self) -> list[NoiseTarget]:
        return list(self._extra_targets)

    def on_detach(self) -> None:
        if self._slow:
            warnings.warn(
                f"detaching LoRASC drops its slow experts (stage {self._stage}); the model keeps only the current "
                "fast LoRA. Export first with model.save_pretrained(...) or handle.save_merged(...)",
                stacklevel=3,
            )
        self._slow.clear()
        self._std.clear()
        self._owner.clear()
        self._extra_targets = []
        self._stage = None
        super().on_detach()

    # --- per-step events ---------------------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        stage = self.stage_of(step)
        if self._stage is None:
            if stage > 0:
                warnings.warn(
                    f"LoRASC starts at step {step} (stage {stage}) without saved state: the slow experts of earlier "
                    "stages are unknown. Restore handle.load_state_dict(...) from the run's checkpoint first",
                    stacklevel=3,
                )
            self._stage = stage
        elif stage < self._stage:
            raise RuntimeError(f"step {step} lies in stage {stage}, before LoRASC's current stage {self._stage}")
        elif stage > self._stage:
            self._start_stage(stage)

    def _start_stage(self, stage: int) -> None:
        """The stage boundary: fold the fast expert into S, re-initialize it, and drop its optimizer state."""
        optimizer = self._bound_optimizer()  # checked before anything changes
        if any(type(s.a_weight).__name__ == "DTensor" for s in self.ctx.slots):
            raise ValueError(
                "LoRASC rewrites the fast LoRA at stage boundaries and keeps its slow experts whole, but the LoRA "
                "parameters were sharded after attach (FSDP2 / ZeRO-3): train LoRASC with DDP"
            )
        with torch.no_grad():
            for slot in self.ctx.slots:
                self._fold_fast_expert(slot)
                # A fresh fast LoRA as PEFT creates one (init_lora_weights=True), from LoRASC's own generator.
                gen = self._pool.get(slot.a_weight.device, derive_seed(self.seed, "lorasc_init", stage, slot.index))
                slot.kind.reinit(slot, gen)
                # Adam-style optimizers recreate missing state lazily at the next step: fresh moments and step count.
                optimizer.state.pop(slot.a_weight, None)
                optimizer.state.pop(slot.b_weight, None)
        self._stage = stage

    def _fold_fast_expert(self, slot: LoraSlot) -> None:
        """S <- S + alpha c s B A (lookahead) or (1 - alpha) S + alpha c s B A (ema), as factors (concatenation); c is
        the expectation of the update the expert was trained with (LoRA Dropout without rescaling: (1-p)^2)."""
        alpha = self.config.alpha
        c = 1.0
        for m in self.ctx.handle.methods:
            if m is not self:
                c *= m.expected_update_scale()
        b, a = slot.factor_views()
        u_new = b.detach().to(torch.float32, copy=True).mul_(alpha * slot.scaling * c)  # (n_out, r)
        v_new = a.detach().to(torch.float32, copy=True)  # (r, n_in); A is re-initialized next
        old = self._slow.get(slot.index)
        if old is not None and self.config.slow_update == "ema":
            old = None if alpha == 1.0 else (old[0] * (1.0 - alpha), old[1])  # alpha = 1: S is the last expert
        if old is None:
            self._slow[slot.index] = (u_new, v_new)
        else:
            self._slow[slot.index] = (torch.cat([old[0], u_new], dim=1), torch.cat([old[1], v_new], dim=0))

    def _bound_optimizer(self) -> torch.optim.Optimizer:
        optimizer = self.ctx.handle.loop.optimizer
        if optimizer is None:
            raise RuntimeError(
                "LoRASC resets the fast LoRA's optimizer state at each stage boundary, but no optimizer is bound: "
                "call handle.bind_optimizer(optimizer) before training (GenLoRACallback does it for the Trainer)"
            )
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [s.name for s in self.ctx.slots if not {id(s.a_weight), id(s.b_weight)} <= held]
        if missing:
            raise RuntimeError(
                f"the optimizer bound to the handle does not train the LoRA weights of {missing[:3]}...: bind the "
                "optimizer that holds the adapter's parameters (flattened FSDP/DeepSpeed parameters are not supported)"
            )
        return optimizer

    # --- noise source ------------------------------------------------------------------------------------------
    def draw_for(self, target: NoiseTarget, weight: torch.Tensor) -> UniformNoise | SummedNoise | None:
        if not self.perturbs_base() or self._stage is None:
            return None
        slot = target.slot if target.slot is not None else self.ctx.slots[0]
        if slot.layer.disable_adapters:
            return None  # the adapter is switched off (a reference forward): the backbone as it was
        std = self._std.get(target.index)
        if std is None:  # a shard outside its forward at attach: its whole weight is here now
            std = self._std[target.index] = _weight_std(weight)
        scale = self.config.noise_lambda * std
        if self.config.noise_mode == "transient":
            return self._stage_draw(self._stage, target, scale)
        return SummedNoise([self._stage_draw(t, target, scale) for t in range(self._stage + 1)])

    def _stage_draw(self, stage: int, target: NoiseTarget, scale: float) -> UniformNoise:
        seed = derive_seed(self.seed, "lorasc_noise", stage, self._owner.get(target.index, target.index))
        return UniformNoise(seed, scale, self._pool)

    # --- the deployed model ------------------------------------------------------------------------------------
    def deploy_factors(self, slot: LoraSlot, factors):
        """W + S_T: the slow experts, then the current fast expert at weight alpha (the last slow-fast update)."""
        slow = self._slow.get(slot.index)
        alpha = self.config.alpha
        if slow is None and alpha == 1.0:
            return factors
        *others, (u, v) = factors
        kept = []
        if slow is not None and not (self.config.slow_update == "ema" and alpha == 1.0):
            kept = [slow] if self.config.slow_update == "lookahead" else [(slow[0] * (1.0 - alpha), slow[1])]
        return [*others, *kept, (u * alpha, v)]

    def deployable_as_adapter(self) -> str | None:
        if self.perturbs_base() and self.config.noise_mode == "persistent":
            return ("LoRASC with noise_mode='persistent' keeps full-rank noise in the model, which no low-rank adapter "
                    "can hold: export the dense model with handle.save_merged(directory) instead")
        return None

    def dense_extra(self, slot: LoraSlot) -> torch.Tensor | None:
        """The persistent stage noise of `slot` (storage layout, fp32), which the dense export merges; else None."""
        if not (self.perturbs_base() and self.config.noise_mode == "persistent") or self._stage is None:
            return None
        weight = slot.dense_weight()
        draw = self.draw_for(NoiseTarget(slot.index, slot.name, slot.base_layer, slot.kind, slot), weight)
        out = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
        draw.sample_into(out, accumulate=False)
        return out

    def merged_model(self) -> nn.Module:
        """`handle.merged_model()`: a dense copy of the deployed model."""
        return self._handle().merged_model()

    def save_merged(self, directory: str | os.PathLike, **kwargs: Any) -> None:
        """`handle.save_merged(directory)`: the deployed model as an ordinary transformers model."""
        self._handle().save_merged(directory, **kwargs)

    def _handle(self):
        if self.ctx is None:
            raise RuntimeError("LoRASC is not attached to a model (or was detached, which drops its slow experts)")
        return self.ctx.handle

    # --- state -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # S exists nowhere else (not in the model's state dict, not in PEFT checkpoints): it is the state to keep.
        return {
            "stage": self._stage,
            "slow": {index: (u.cpu(), v.cpu()) for index, (u, v) in self._slow.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        stage = state["stage"]
        if stage is not None:
            check_int("stage", stage, low=0)
        slow = {}
        for index, (u, v) in state["slow"].items():
            slot = self.ctx.slots[int(index)]
            b, a = slot.factor_views()
            n_out, n_in = b.shape[0], a.shape[1]
            if u.shape[0] != n_out or v.shape[1] != n_in or u.shape[1] != v.shape[0]:
                raise ValueError(f"saved slow experts of {slot.name!r} do not fit its ({n_out}, {n_in}) weight")
            device = a.device
            slow[slot.index] = (u.to(device, torch.float32), v.to(device, torch.float32))
        self._slow = slow
        self._stage = stage


def _other_frozen_layers(model: nn.Module, slots: list[LoraSlot]) -> list[NoiseTarget]:
    """Every frozen layer of a mapped kind that is not a LoRA slot's base layer nor inside a LoRA branch (NoisyTune
    perturbs all the model's matrices), in module order; indices continue after the slots'."""
    from peft.tuners.lora import LoraLayer

    taken = {id(s.base_layer) for s in slots}
    inside_lora = set()
    for m in model.modules():
        if isinstance(m, LoraLayer):
            for name in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
                container = getattr(m, name, None)
                if container is not None:
                    inside_lora.update(id(x) for x in container.modules())
    targets = []
    for name, m in model.named_modules():
        if id(m) in taken or id(m) in inside_lora or isinstance(m, LoraLayer):
            continue
        kind = kind_of_base(m)
        weight = getattr(m, "weight", None)
        if kind is None or weight is None or getattr(weight, "requires_grad", True):
            continue
        targets.append(NoiseTarget(len(slots) + len(targets), name, m, kind, None))
    return targets


@torch.no_grad()
def _weight_std(weight: torch.Tensor, chunk: int = 1 << 22) -> float:
    """Unbiased std over all entries of W (as torch.std), two passes over fp64 chunks: W is never upcast whole."""
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    if n < 2:
        return 0.0
    mean = sum(c.double().sum() for c in flat.split(chunk)) / n
    sq = sum((c.double() - mean).pow_(2).sum() for c in flat.split(chunk))
    return float((float(sq) / (n - 1)) ** 0.5)
