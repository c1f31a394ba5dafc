"""LoRASC: LoRA slow cascade learning (Li et al., "Expressive and Generalizable Low-rank Adaptation for Large Models
via Slow Cascaded Learning", arXiv 2407.01491, Findings of EMNLP 2024). No official code was published; this follows
the reconstruction of spec section 3.2.

Training runs in stages t = 1..T (default: one epoch each). Stage t trains a fresh "fast" LoRA (B_t = 0, A_t Kaiming,
fresh optimizer state) on a noisy copy of the frozen backbone; at its end a portion of it is merged into a slow
accumulator S:

    noisy backbone (cascading noisy tuning, NoisyTune-style, per matrix):
        W~_t = W + S_{t-1} + xi_t,      xi_t = (U(-1/2, 1/2) elementwise) * lambda * std(W)
    slow-fast update (Lookahead reading, default):
        S_t = S_{t-1} + alpha * s * B_t A_t
    or, behind `slow_update="ema"`:
        S_t = (1 - alpha) * S_{t-1} + alpha * s * B_t A_t

so S is a weighted sum of rank-r experts (rank up to T*r): the "mixture of low-rank adaptations". alpha = 1 with the
Lookahead reading is ReLoRA/COLA merge-and-reinit chaining.

Exactness: nothing is ever written into the frozen W (it stays bit-identical, also in bf16). S is held by this
method as frozen low-rank factors U (n_out, K), V (K, n_in) and added to the LoRA layer's output by a forward hook,
out += (x V^T) U^T; they are not module parameters or buffers, so state dicts and PEFT saves are unchanged. The stage
noise goes through `core.perturbed_linear` (regenerated from its seed, never stored or added in place), so it is gone
exactly when the stage ends. Export: `handle.save_pretrained` writes a plain PEFT adapter of rank K + r reproducing
W + S + s*B*A; `save_merged` writes the dense model with that sum merged into the weights.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MethodConfig, check_choice, check_int, check_range
from ..core.export import merged_dense_copy
from ..core.lora_layers import LoraSlot
from ..core.method import AttachContext, Method
from ..core.perturbed_linear import noise_kernel
from ..core.seeding import GeneratorPool, derive_seed

SLOW_UPDATES = ("lookahead", "ema")
NOISE_MODES = ("transient", "persistent")


@dataclass
class LoRASCConfig(MethodConfig):
    method_name = "lorasc"

    alpha: float = field(
        default=0.5,
        metadata={
            "help": "Slow-fast pace alpha in (0, 1]: the share of each finished fast expert merged into the slow "
            "weights. The paper's value is unknown; 0.5 is Lookahead's default, the spec's grid is {0.5, 0.8, 1.0}; "
            "1.0 (with slow_update='lookahead') is ReLoRA/COLA merge-and-reinit chaining."
        },
    )
    slow_update: str = field(
        default="lookahead",
        metadata={
            "help": "'lookahead' (default): S += alpha * s*B*A, every expert kept with weight alpha. 'ema': "
            "S = (1 - alpha) * S + alpha * s*B*A, earlier experts decay (the spec's second reading)."
        },
    )
    stage_steps: int | None = field(
        default=None,
        metadata={
            "help": "Optimizer steps per cascade stage (>= 1). Default None: one epoch, taken from steps_per_epoch "
            "(below, or handle.steps_per_epoch, which the Trainer callback sets from the train dataloader)."
        },
    )
    steps_per_epoch: int | None = field(
        default=None,
        metadata={
            "help": "Optimizer steps per epoch (>= 1), e.g. len(train_loader) // grad_accum, for the default "
            "one-epoch stages in a plain loop. Default None: use handle.steps_per_epoch (set by GenLoRACallback)."
        },
    )
    noise_lambda: float = field(
        default=0.15,
        metadata={
            "help": "Cascading noisy tuning strength lambda >= 0: each stage perturbs every frozen matrix W by "
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
    seed: int = field(
        default=0, metadata={"help": "Seed of LoRASC's own generators (stage noise, fast-LoRA re-init)."}
    )

    def __post_init__(self):
        check_range("alpha", self.alpha, low=0.0, high=1.0, low_open=True)
        check_choice("slow_update", self.slow_update, SLOW_UPDATES)
        if self.stage_steps is not None:
            check_int("stage_steps", self.stage_steps, low=1)
        if self.steps_per_epoch is not None:
            check_int("steps_per_epoch", self.steps_per_epoch, low=1)
        check_range("noise_lambda", self.noise_lambda, low=0.0)
        check_choice("noise_mode", self.noise_mode, NOISE_MODES)
        check_int("seed", self.seed, low=0)


class UniformNoise:
    """xi (n_out, n_in) = (u - 1/2) * scale, u ~ U[0, 1) elementwise, a pure function of `seed`.

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


class LoRASC(Method):
    """LoRASC slow cascade learning (arXiv 2407.01491). Options: see `LoRASCConfig`.

    Plain loop (`model` a PEFT LoRA model, `loader` yielding dict batches with labels)::

        lorasc = genlora.LoRASC(alpha=0.5, noise_lambda=0.15, steps_per_epoch=len(loader))
        handle = genlora.attach(model, lorasc)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        handle.bind_optimizer(optimizer)    # LoRASC resets the fast LoRA's optimizer state at each stage
        for epoch in range(num_epochs):
            for batch in loader:
                handle.begin_step()         # first step of a stage: merge alpha*s*B*A into S, fresh A, B and state
                loss = model(**batch).loss
                loss.backward()
                handle.optimizer_step(optimizer)
                optimizer.zero_grad()
        handle.save_pretrained(adapter_dir) # a plain PEFT adapter of rank (stages)*r: W + S + s*B*A
        lorasc.save_merged(merged_dir)      # the dense model W + S + s*B*A (transformers save_pretrained)

    Trainer (the callback binds the Trainer's optimizer and sets the epoch length from its train dataloader)::

        handle = genlora.attach(model, genlora.LoRASC(alpha=0.5, noise_lambda=0.15))
        trainer = Trainer(model=model, args=args, train_dataset=train_dataset,
                          callbacks=[genlora.GenLoRACallback(handle)])
        trainer.train()
        handle.save_pretrained(adapter_dir)
        handle.method("lorasc").save_merged(merged_dir)

    The slow experts live in this method object, not in the model: `detach()` drops them (with a warning), so
    export first. They are part of `handle.state_dict()`, so `handle.save_state(path)` / `load_state(path)` resume
    exactly (GenLoRACallback writes that file into every Trainer checkpoint).
    """

    config_class = LoRASCConfig
    order = 10  # stage change first: Flat-LoRA's row norms of the same step see the new S and fresh B, A (spec 5.2)
    config: LoRASCConfig

    def __init__(self, config: LoRASCConfig | None = None, **options):
        super().__init__(config, **options)
        self._pool = GeneratorPool()
        self._stage: int | None = None  # None until the first begin_step
        self._slow: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> U (n_out, K), V (K, n_in), fp32
        self._std: dict[int, float] = {}  # slot -> std(W), for the noise scale
        self._hooks: list = []
        self._noisy = False

    # --- queries -----------------------------------------------------------------------------------------------
    @property
    def stage(self) -> int | None:
        """Index of the current cascade stage (0-based); None before the first step."""
        return self._stage

    def stage_length(self) -> int:
        """Optimizer steps per stage: stage_steps, else the epoch length (config, then handle)."""
        if self.config.stage_steps is not None:
            return self.config.stage_steps
        if self.config.steps_per_epoch is not None:
            return self.config.steps_per_epoch
        epoch = getattr(self.ctx.handle, "steps_per_epoch", None) if self.ctx is not None else None
        if epoch is None:
            raise RuntimeError(
                "LoRASC's stage length is unknown: stages last one epoch by default, so pass "
                "LoRASC(steps_per_epoch=<optimizer steps per epoch>) (GenLoRACallback sets it from the Trainer's "
                "train dataloader), or LoRASC(stage_steps=N) for a stage every N optimizer steps"
            )
        check_int("handle.steps_per_epoch", epoch, low=1)
        return epoch

    def slow_rank(self, slot: LoraSlot) -> int:
        """K, the rank of the slow part S of `slot` (r per finished stage; 0 during the first stage)."""
        slow = self._slow.get(slot.index)
        return 0 if slow is None else slow[1].shape[0]

    def extra_delta_factors(self, slot: LoraSlot) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(U (n_out, K), V (K, n_in))] with S = U V, or [] before the first stage boundary (fp32)."""
        slow = self._slow.get(slot.index)
        return [] if slow is None else [slow]

    def noise(self, slot: LoraSlot) -> torch.Tensor | None:
        """The stage noise (n_out, n_in, fp32) that training forwards of `slot` add to W now, regenerated; None if
        there is none. For tests and analysis."""
        draw = self.draw_for(slot)
        if draw is None:
            return None
        weight = slot.base_layer.weight
        out = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
        draw.sample_into(out, accumulate=False)
        return out

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def validate(self, model, slots: list[LoraSlot]) -> None:
        for slot in slots:
            if not slot.is_linear:
                raise TypeError(
                    f"LoRASC supports LoRA on float nn.Linear layers; {slot.name!r} wraps "
                    f"{type(slot.base_layer).__name__} (quantized, Conv, Embedding and Conv1D bases are not supported)"
                )
            if slot.base_layer.weight.requires_grad:
                raise ValueError(f"LoRASC needs frozen base weights; {slot.name}.weight requires grad")
            if slot.adapter in getattr(slot.layer, "lora_variant", {}):  # DoRA & co. are not a sum of B A terms
                raise ValueError(f"LoRASC supports plain LoRA; {slot.name!r} uses a LoRA variant (DoRA, ...)")
            if getattr(slot.layer, "lora_bias", {}).get(slot.adapter, False):
                raise ValueError(f"LoRASC does not support lora_bias=True ({slot.name!r})")

    def on_attach(self, ctx: AttachContext) -> None:
        super().on_attach(ctx)
        for slot in ctx.slots:
            self._hooks.append(slot.layer.register_forward_hook(self._make_hook(slot), with_kwargs=True))
        if self.config.noise_lambda > 0:
            with torch.no_grad():  # W is frozen, so std(W) is computed once
                self._std = {slot.index: _weight_std(slot.base_layer.weight) for slot in ctx.slots}
            ctx.perturber.add_source(self)
            self._noisy = True

    def on_detach(self) -> None:
        if self._slow:
            warnings.warn(
                f"detaching LoRASC drops its slow experts (stage {self._stage}); the model keeps only the current "
                "fast LoRA. Export first with handle.save_pretrained(...) or LoRASC.save_merged(...)",
                stacklevel=3,
            )
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._noisy:
            self.ctx.perturber.remove_source(self)
            self._noisy = False
        self._slow.clear()
        self._std.clear()
        self._stage = None
        super().on_detach()

    def _make_hook(self, slot: LoraSlot):
        layer = slot.layer

        def add_slow_experts(module, args, kwargs, output):
            slow = self._slow.get(slot.index)
            if slow is None or layer.disable_adapters or slot.adapter not in layer.active_adapters:
                return output
            if kwargs.get("adapter_names") is not None:
                raise NotImplementedError("mixed-adapter batches (adapter_names=...) are not supported with LoRASC")
            x = args[0] if args else kwargs["x"]  # (..., n_in)
            u, v = slow  # (n_out, K), (K, n_in)
            dtype = slot.lora_A.weight.dtype  # compute like PEFT's own LoRA term: in the adapter's dtype
            delta = F.linear(F.linear(x.to(dtype), v.to(dtype)), u.to(dtype))  # (..., n_out)
            return (output + delta).to(output.dtype)  # added in the wider dtype, rounded once, as PEFT does

        return add_slow_experts

    # --- per-step events ---------------------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        stage = step // self.stage_length()
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
        with torch.no_grad():
            for slot in self.ctx.slots:
                self._fold_fast_expert(slot)
                # A fresh fast LoRA as PEFT creates one (init_lora_weights=True), from LoRASC's own generator.
                a = slot.lora_A.weight
                gen = self._pool.get(a.device, derive_seed(self.config.seed, "lorasc_init", stage, slot.index))
                nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
                nn.init.zeros_(slot.lora_B.weight)
                # Adam-style optimizers recreate missing state lazily at the next step: fresh moments and step count.
                optimizer.state.pop(a, None)
                optimizer.state.pop(slot.lora_B.weight, None)
        self._stage = stage

    def _fold_fast_expert(self, slot: LoraSlot) -> None:
        """S <- S + alpha s B A (lookahead) or (1 - alpha) S + alpha s B A (ema), as factors (concatenation)."""
        alpha = self.config.alpha
        # A fast expert trained under LoRA Dropout without rescaling is merged as its expectation over masks,
        # (1-p)^2 s B A (spec 5.2, "LoRASC + LoRA Dropout").
        weight = alpha * slot.scaling * self._dropout_expectation()
        u_new = slot.lora_B.weight.detach().to(torch.float32, copy=True).mul_(weight)  # (n_out, r)
        v_new = slot.lora_A.weight.detach().to(torch.float32, copy=True)  # (r, n_in); A is re-initialized next
        old = self._slow.get(slot.index)
        if old is not None and self.config.slow_update == "ema":
            old = None if alpha == 1.0 else (old[0] * (1.0 - alpha), old[1])  # alpha = 1: S is the last expert
        if old is None:
            self._slow[slot.index] = (u_new, v_new)
        else:
            self._slow[slot.index] = (torch.cat([old[0], u_new], dim=1), torch.cat([old[1], v_new], dim=0))

    def _dropout_expectation(self) -> float:
        dropout = next((m for m in self.ctx.handle.methods if m.name == "lora_dropout"), None)
        return 1.0 if dropout is None else dropout.expectation_scale

    def _bound_optimizer(self) -> torch.optim.Optimizer:
        optimizer = getattr(self.ctx.handle, "optimizer", None)
        if optimizer is None:
            raise RuntimeError(
                "LoRASC resets the fast LoRA's optimizer state at each stage boundary, but no optimizer is bound: "
                "call handle.bind_optimizer(optimizer) before training (GenLoRACallback does it for the Trainer)"
            )
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [s.name for s in self.ctx.slots if not {id(s.lora_A.weight), id(s.lora_B.weight)} <= held]
        if missing:
            raise RuntimeError(
                f"the optimizer bound to the handle does not train the LoRA weights of {missing[:3]}...: bind the "
                "optimizer that holds the adapter's parameters (flattened FSDP/DeepSpeed parameters are not supported)"
            )
        return optimizer

    # --- noise source ------------------------------------------------------------------------------------------
    def draw_for(self, slot: LoraSlot) -> UniformNoise | SummedNoise | None:
        if not self._noisy or self._stage is None:
            return None
        scale = self.config.noise_lambda * self._std[slot.index]
        if self.config.noise_mode == "transient":
            return self._stage_draw(self._stage, slot, scale)
        return SummedNoise([self._stage_draw(t, slot, scale) for t in range(self._stage + 1)])

    def _stage_draw(self, stage: int, slot: LoraSlot, scale: float) -> UniformNoise:
        return UniformNoise(derive_seed(self.config.seed, "lorasc_noise", stage, slot.index), scale, self._pool)

    # --- export ------------------------------------------------------------------------------------------------
    def export_factors(self, slot: LoraSlot, factors):
        if self._noisy and self.config.noise_mode == "persistent":
            raise ValueError(
                "LoRASC with noise_mode='persistent' keeps full-rank noise in the model, which no low-rank adapter "
                "can hold: export the dense model with LoRASC.save_merged(directory) instead"
            )
        return self._with_slow_experts(slot, factors)

    def _with_slow_experts(self, slot: LoraSlot, factors):
        slow = self._slow.get(slot.index)
        return factors if slow is None else [slow, *factors]

    def merged_model(self) -> nn.Module:
        """A deep copy of the base model with W + S + s*B*A (+ the persistent noise, in that mode) merged densely
        and no LoRA layers. The live model is not touched. Costs one model copy of memory."""
        handle = self._handle()
        factors = {}
        for slot in self.ctx.slots:
            terms = [(slot.scaling * slot.lora_B.weight.detach(), slot.lora_A.weight.detach())]
            for m in handle.methods:  # other methods' export transforms (e.g. LoRA Dropout's expectation) apply too
                terms = self._with_slow_experts(slot, terms) if m is self else m.export_factors(slot, terms)
            factors[slot.name] = terms
        persistent = self._noisy and self.config.noise_mode == "persistent"
        return merged_dense_copy(
            self.ctx.model,
            self.ctx.slots,
            factors,
            dense_extra=self.noise if persistent else None,
            share=(handle, *handle.methods),
        )

    def save_merged(self, directory: str | os.PathLike, **kwargs: Any) -> None:
        """`merged_model().save_pretrained(directory, **kwargs)`: an ordinary transformers model, no PEFT needed."""
        model = self._handle().model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not hasattr(base, "save_pretrained"):  # checked before paying for the copy
            raise TypeError(
                f"{type(base).__name__} has no save_pretrained; torch.save lorasc.merged_model().state_dict() instead"
            )
        self.merged_model().save_pretrained(directory, **kwargs)

    def _handle(self):
        if self.ctx is None:
            raise RuntimeError("LoRASC is not attached to a model (or was detached, which drops its slow experts)")
        handle = self.ctx.handle
        if handle.in_step:
            raise RuntimeError("export between steps, not in the middle of one")
        return handle

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
            n_out, n_in = slot.base_layer.weight.shape
            if u.shape[0] != n_out or v.shape[1] != n_in or u.shape[1] != v.shape[0]:
                raise ValueError(f"saved slow experts of {slot.name!r} do not fit its ({n_out}, {n_in}) weight")
            device = slot.lora_A.weight.device
            slow[slot.index] = (u.to(device, torch.float32), v.to(device, torch.float32))
        self._slow = slow
        self._stage = stage


@torch.no_grad()
def _weight_std(weight: torch.Tensor, chunk: int = 1 << 22) -> float:
    """Unbiased std over all entries of W (as torch.std), two passes over fp64 chunks: W is never upcast whole."""
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    if n < 2:
        return 0.0
    mean = sum(c.double().sum() for c in flat.split(chunk)) / n
    sq = sum((c.double() - mean).pow_(2).sum() for c in flat.split(chunk))
    return math.sqrt(float(sq) / (n - 1))
