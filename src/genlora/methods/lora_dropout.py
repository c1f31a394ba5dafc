"""LoRA Dropout: dropout on LoRA's input and output dimensions, with a test-time ensemble (Lin et al., "LoRA Dropout
as a Sparsity Regularizer for Overfitting Control", arXiv 2404.09610).

For every LoRA module, Bernoulli keep-masks are drawn over the input dimension of A and the output dimension of B
(paper Sec. 3; spec section 4.1). The rank dimension is never dropped: that would lower the rank, not sparsify ΔW.

    Â = A · diag(m_A),   m_A ∈ {0,1}^{n_in}  ~ Bern(1 − p)
    B̂ = diag(m_B) · B,   m_B ∈ {0,1}^{n_out} ~ Bern(1 − p)
    ĥ = W x + s · B̂ Â x = W x + s · m_B ⊙ (B A (m_A ⊙ x))

so each entry of ΔŴ = s·B̂Â is zeroed with probability 1 − (1 − p)² = 2p − p² (the "sparsity" of the theory).

Training objective (paper Eq. 4): the loss averaged over N dropout instances of the same batch,

    L(x) = (1/N) Σ_k ℓ(x; θ₀ + Δθ(m_k)),

implemented as N forward/backward passes, each backpropagating ℓ_k / N, so peak memory does not grow with N.

Test time (paper Sec. 4.3, Theorem 4.5): average the post-softmax probabilities of N masked forwards; see
`genlora.ensemble`. For a merged, deterministic deployment, E[ΔŴ] = (1 − p)² · s·B·A (independent masks), or
s·B·A when each mask is rescaled by 1/(1 − p) ("inverted").

Masks are applied by a forward pre-hook on `lora_A` (input times m_A) and a forward hook on `lora_B` (output times
m_B); PEFT's own `lora_dropout` (element-wise dropout on the LoRA branch's input, a different method) is left alone.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from ..config import MethodConfig, check_choice, check_int, check_range
from ..core.lora_layers import LoraSlot
from ..core.method import AttachContext, Method
from ..core.seeding import GeneratorPool, derive_seed

RESCALES = ("none", "inverted")
DEPLOYS = ("ensemble", "merged_expectation")


@dataclass
class LoRADropoutConfig(MethodConfig):
    method_name = "lora_dropout"

    p: float = field(
        default=0.1,
        metadata={
            "help": "Drop probability of each input feature of A and each output feature of B, in [0, 1); each ΔW "
            "entry is then dropped with probability 2p - p^2. The paper's values were not recoverable; accuracy vs p "
            "is an inverted U (MRPC). Try 0.1, 0.2, 0.3, 0.5."
        },
    )
    n_train: int = field(
        default=1,
        metadata={
            "help": "Dropout instances the training loss is averaged over (paper's N; >= 1). Costs n_train forward/"
            "backward passes per batch, but no extra memory. n_train > 1 needs `train_instances()` in a plain loop, "
            "or `genlora.GenLoRATrainer` with transformers."
        },
    )
    n_test: int = field(
        default=4,
        metadata={
            "help": "Masked forwards averaged by the test-time ensemble (>= 1); accuracy grows with it (MRPC), and so "
            "does the cost, linearly."
        },
    )
    rescale: str = field(
        default="none",
        metadata={
            "help": "'none': 0/1 masks, as in the paper's equations; 'inverted': each mask is multiplied by 1/(1-p), "
            "so the expected ΔW equals the trained s*B*A."
        },
    )
    mask_per_example: bool = field(
        default=False,
        metadata={
            "help": "False (faithful): one mask pair per module and forward, shared by every example and token of the "
            "batch, because the masks act on the parameter matrices. True: an independent mask pair per example "
            "(leading batch dimension) during training; the test-time ensemble always uses shared masks."
        },
    )
    deploy: str = field(
        default="ensemble",
        metadata={
            "help": "'ensemble': `save_pretrained` writes the raw trained adapter and inference uses the test-time "
            "ensemble (needs genlora). 'merged_expectation': `save_pretrained` writes a plain PEFT adapter equal to "
            "the expectation over masks, (1-p)^2 * s*B*A for rescale='none' (s*B*A for 'inverted')."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of LoRA Dropout's own mask generator."})

    def __post_init__(self):
        check_range("p", self.p, low=0.0, high=1.0, high_open=True)
        check_int("n_train", self.n_train, low=1)
        check_int("n_test", self.n_test, low=1)
        check_choice("rescale", self.rescale, RESCALES)
        if not isinstance(self.mask_per_example, bool):
            raise TypeError(f"mask_per_example must be a bool, got {self.mask_per_example!r}")
        check_choice("deploy", self.deploy, DEPLOYS)
        check_int("seed", self.seed, low=0)


class TrainInstance:
    """Dropout instance `index` (0-based) of `n`, yielded by `LoRADropout.train_instances()`.

    Its loss must go through `backward(loss)` (= `(loss / n).backward()`) or, for your own backward (AMP scaler,
    accelerate), through `scale(loss)` (= `loss / n`): an instance whose loss went through neither raises.
    """

    __slots__ = ("index", "n", "used")

    def __init__(self, index: int, n: int):
        self.index, self.n, self.used = index, n, False

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss / n`: this instance's share of the loss averaged over the n dropout instances."""
        self.used = True
        return loss / self.n

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        """`(loss / n).backward(**kwargs)`."""
        self.scale(loss).backward(**kwargs)

    def __repr__(self) -> str:
        return f"TrainInstance({self.index} of {self.n})"


class LoRADropout(Method):
    """LoRA Dropout (arXiv 2404.09610). Options: see `LoRADropoutConfig`.

    Plain loop (one optimizer step; the loss is averaged over `n_train` masks, one forward/backward each)::

        dropout = handle.method("lora_dropout")      # or the LoRADropout object you attached
        handle.begin_step()
        for inst in dropout.train_instances():       # n_train times, each with its own masks
            loss = model(**batch).loss
            inst.backward(loss)                      # = (loss / n_train).backward()
        handle.optimizer_step(optimizer)
        optimizer.zero_grad()

    With gradient accumulation, run the `for` loop once per micro-batch. For your own backward (AMP scaler,
    accelerate) write `accelerator.backward(inst.scale(loss))`. With n_train == 1 the loop is optional: every
    training-mode forward gets masks. Misuse raises instead of training something else: with n_train > 1, a
    training-mode forward outside `train_instances()`; an instance with no training-mode forward of the model, or
    whose loss went through neither `inst.backward` nor `inst.scale`.

    transformers: `genlora.GenLoRATrainer(model=..., args=..., genlora_handle=handle)` runs the n_train instances in
    each `training_step` and evaluates with the test-time ensemble; with n_train == 1 the plain `Trainer` with
    `genlora.GenLoRACallback(handle)` also works.

    Test time: `with genlora.test_time_ensemble(model, handle): out = model(**batch)` (see `genlora.ensemble`).
    Outside the ensemble, eval-mode forwards are the plain PEFT model's.

    Masks are a pure function of (seed, global_step, forward_index, instance, layer): the handle counts
    training-mode forwards of the whole model, so gradient checkpointing, which re-runs single layers in the
    backward, sees the same masks. Run each instance's backward before the next forward (as above); ensemble
    member k always uses the same masks, a function of (seed, k, layer), so a prediction does not depend on the
    batch it is in.
    """

    config_class = LoRADropoutConfig
    order = 30  # begin_step order is irrelevant (nothing drawn there); export runs after LoRASC prepends its experts
    config: LoRADropoutConfig

    def __init__(self, config: LoRADropoutConfig | None = None, **options):
        super().__init__(config, **options)
        self._pool = GeneratorPool()
        self._hooks: list = []
        self._instance: int | None = None  # index inside train_instances(), None outside
        self._member: int | None = None  # ensemble member whose masks apply, None outside the ensemble

    # --- attach ----------------------------------------------------------------------------------------------
    def validate(self, model, slots: list[LoraSlot]) -> None:
        for slot in slots:
            a = slot.layer.lora_A[slot.adapter] if slot.adapter in slot.layer.lora_A else None
            b = slot.layer.lora_B[slot.adapter] if slot.adapter in slot.layer.lora_B else None
            if not isinstance(a, nn.Linear) or not isinstance(b, nn.Linear):
                raise TypeError(
                    f"LoRA Dropout masks the features of Linear lora_A/lora_B; LoRA layer {slot.name!r} "
                    f"({type(slot.layer).__name__}) has none (Embedding and Conv LoRA are not supported: leave them "
                    "out of target_modules)"
                )
            if slot.adapter in getattr(slot.layer, "lora_variant", {}):
                # DoRA & co. use the unmasked weights outside lora_A/lora_B (weight norm), so masks would be partial.
                raise TypeError(
                    f"LoRA Dropout supports plain LoRA; layer {slot.name!r} uses the LoRA variant "
                    f"{type(slot.layer.lora_variant[slot.adapter]).__name__} (e.g. use_dora=True)"
                )

    def on_attach(self, ctx: AttachContext) -> None:
        super().on_attach(ctx)
        for slot in ctx.slots:
            self._hooks.append(slot.lora_A.register_forward_pre_hook(self._make_pre_a(slot)))
            self._hooks.append(slot.lora_B.register_forward_hook(self._make_post_b(slot)))

    def on_detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._instance = self._member = None
        super().on_detach()

    def begin_step(self, step: int) -> None:
        # A loop abandoned by an exception leaves its instance index behind; a new step starts clean.
        self._instance = None

    # --- masks -------------------------------------------------------------------------------------------------
    def train_masks(
        self, slot: LoraSlot, step: int, forward_index: int, instance: int, batch_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(m_A, m_B) of a training forward, fp32 on the layer's device, rescale included: shapes (n_in,), (n_out,),
        or (batch_size, n_in), (batch_size, n_out) with `mask_per_example`. Exactly what the hooks apply."""
        return self._masks(slot, "lora_dropout.train", (step, forward_index, instance), batch_size)

    def ensemble_masks(self, slot: LoraSlot, member: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(m_A (n_in,), m_B (n_out,)) of test-time ensemble member `member`, shared across the batch."""
        return self._masks(slot, "lora_dropout.ensemble", (member,), None)

    def _masks(self, slot, stream, counters, batch_size):
        device = slot.lora_A.weight.device
        return (
            self._mask(slot, stream, counters, 0, slot.lora_A.in_features, batch_size, device),
            self._mask(slot, stream, counters, 1, slot.lora_B.out_features, batch_size, device),
        )

    def _mask(self, slot, stream, counters, which, n, batch_size, device) -> torch.Tensor:
        # m_A and m_B get seeds of their own, so each hook regenerates its mask independently, with no state
        # carried between the two hooks (or between a forward and its checkpointed re-run).
        gen = self._pool.get(device, derive_seed(self.config.seed, stream, *counters, slot.index, which))
        shape = (n,) if batch_size is None else (batch_size, n)
        keep = torch.empty(shape, dtype=torch.float32, device=device).bernoulli_(1.0 - self.config.p, generator=gen)
        if self.config.rescale == "inverted":
            keep.mul_(1.0 / (1.0 - self.config.p))
        return keep

    def _current(self, module: nn.Module):
        """(stream, counters, per_example) of the masks the forward now running must use; None: no masks."""
        if self.config.p == 0.0:
            return None  # all-ones masks: skip the work
        if self._member is not None:
            return "lora_dropout.ensemble", (self._member,), False
        if not module.training:
            return None
        if self._instance is None and self.config.n_train > 1:
            raise RuntimeError(
                f"LoRA Dropout with n_train={self.config.n_train} averages the loss over {self.config.n_train} masks: "
                "run training forwards inside `for inst in dropout.train_instances(): inst.backward(model(**batch)"
                ".loss)`, or train with genlora.GenLoRATrainer (the plain Trainer runs one forward per batch)"
            )
        handle = self.ctx.handle
        counters = (handle.global_step, handle.forward_index, self._instance or 0)
        return "lora_dropout.train", counters, self.config.mask_per_example

    def _make_pre_a(self, slot: LoraSlot):
        def pre_a(module, args):
            current = self._current(module)
            if current is None:
                return None
            stream, counters, per_example = current
            x = args[0]  # (..., n_in)
            batch = x.shape[0] if per_example and x.dim() >= 2 else None
            # on x's device: with offloading (accelerate) the weight may not be on a compute device yet
            mask = self._mask(slot, stream, counters, 0, x.shape[-1], batch, x.device)
            return (x * _broadcastable(mask, x).to(x.dtype), *args[1:])

        return pre_a

    def _make_post_b(self, slot: LoraSlot):
        def post_b(module, args, out):
            current = self._current(module)
            if current is None:
                return None
            stream, counters, per_example = current
            batch = out.shape[0] if per_example and out.dim() >= 2 else None  # out: (..., n_out)
            mask = self._mask(slot, stream, counters, 1, out.shape[-1], batch, out.device)
            return out * _broadcastable(mask, out).to(out.dtype)

        return post_b

    # --- training ----------------------------------------------------------------------------------------------
    def train_instances(self) -> Iterator[TrainInstance]:
        """Yield the `n_train` dropout instances of the current batch; see the class docstring for the loop."""
        if self.ctx is None:
            raise RuntimeError("train_instances() needs the method attached: genlora.attach(model, LoRADropout(...))")
        handle = self.ctx.handle
        if not handle.in_step:
            raise RuntimeError("train_instances() runs inside a step: call handle.begin_step() first")
        n = self.config.n_train
        try:
            for k in range(n):
                inst = TrainInstance(k, n)
                self._instance = k
                start = handle.forward_index
                yield inst
                if handle.forward_index == start:
                    raise RuntimeError(
                        f"dropout instance {k} ran no training-mode forward of the attached model (model.train()?), "
                        "so no masks were applied"
                    )
                if not inst.used:
                    raise RuntimeError(
                        f"the loss of dropout instance {k} went through neither inst.backward(loss) nor "
                        f"inst.scale(loss); each of the {n} instances must contribute loss / {n}"
                    )
        finally:
            self._instance = None

    # --- test time ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def ensemble_member(self, member: int):
        """Apply the masks of ensemble member `member` to every forward inside the block, in any mode (the
        building block of `genlora.test_time_ensemble`)."""
        if self.ctx is None:
            raise RuntimeError("this LoRADropout is not attached (or was detached)")
        check_int("member", member, low=0)
        previous, self._member = self._member, member
        try:
            yield
        finally:
            self._member = previous

    # --- export ------------------------------------------------------------------------------------------------
    @property
    def expectation_scale(self) -> float:
        """E[ΔŴ] / (s·B·A): (1-p)^2 for rescale='none' (independent masks), 1 for 'inverted'."""
        return 1.0 if self.config.rescale == "inverted" else (1.0 - self.config.p) ** 2

    def export_factors(self, slot: LoraSlot, factors):
        if self.config.deploy != "merged_expectation" or self.expectation_scale == 1.0:
            return factors  # the same object: the handle then saves the plain adapter
        # The trained adapter is the last term: methods that add frozen terms (LoRASC's slow experts) prepend them,
        # and only the trained term was masked.
        *frozen, (u, v) = factors  # u: (n_out, r) with the scaling s, v: (r, n_in)
        return [*frozen, (u * self.expectation_scale, v)]


def _broadcastable(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(n,) stays (n,); a per-example (batch, n) becomes (batch, 1, ..., n) to match `like` (batch, ..., n)."""
    if mask.dim() == 1:
        return mask
    return mask.reshape(mask.shape[0], *([1] * (like.dim() - 2)), mask.shape[1])
