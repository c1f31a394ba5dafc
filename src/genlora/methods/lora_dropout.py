"""LoRA Dropout: dropout on LoRA's input and output dimensions, with a test-time ensemble (Lin et al., "LoRA Dropout
as a Sparsity Regularizer for Overfitting Control", arXiv 2404.09610; docs/methods.md, "LoRA Dropout").

For every LoRA module, Bernoulli keep-masks are drawn over the input dimension of A and the output dimension of B
(paper Sec. 3). The rank dimension is never dropped: that would lower the rank, not sparsify ΔW.

    Â = A · diag(m_A),   m_A ∈ {0,1}^{n_in}  ~ Bern(1 − p)
    B̂ = diag(m_B) · B,   m_B ∈ {0,1}^{n_out} ~ Bern(1 − p)
    ĥ = W x + s · B̂ Â x = W x + s · m_B ⊙ (B A (m_A ⊙ x))

so each entry of ΔŴ = s·B̂Â is zeroed with probability 1 − (1 − p)² = 2p − p² (the "sparsity" of the theory).

Training objective (paper Eq. 4): the loss averaged over N dropout instances of the same batch,

    L(x) = (1/N) Σ_k ℓ(x; θ₀ + Δθ(m_k)),

implemented as N forward/backward passes (`handle.train_instances()`), each backpropagating ℓ_k / N, so peak memory
does not grow with N.

Test time (paper Sec. 4.3, Theorem 4.5): average the post-softmax probabilities of N masked forwards; see
`genlora.ensemble`. For a merged, deterministic deployment, E[ΔŴ] = (1 − p)² · s·B·A (independent masks), or
s·B·A when each mask is rescaled by 1/(1 − p) ("inverted").

Masks are applied by a forward pre-hook on `lora_A` (input features times m_A) and a forward hook on `lora_B` (output
features times m_B): the last axis for linear layers, the channel axis for convolutions. An embedding LoRA has no
lora_A/lora_B modules: its masks (m_A over the vocabulary, m_B over the embedding coordinates, the layer's (n_out,
n_in) view) are applied by a forward hook on the layer that replaces the LoRA term T by m_B * m_A[token] * T. PEFT's
own `lora_dropout` (element-wise dropout on the LoRA branch's input, a different method) is left alone.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from ..config import MethodConfig, check_bool, check_choice, check_int, check_range, check_seed
from ..core.handle import TrainInstance
from ..core.lora_layers import LoraSlot
from ..core.method import AttachContext, Method, Phase
from ..core.seeding import GeneratorPool, derive_seed
from ..registry import register_method

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
            "backward passes per batch, but no extra memory. n_train > 1 needs `handle.train_instances()` in a plain "
            "loop, or `genlora.GenLoRATrainer` with transformers."
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
            "help": "'ensemble': the deployed model is the raw trained adapter plus the test-time ensemble (needs "
            "genlora at inference); every save path writes the raw adapter. 'merged_expectation': the deployed model "
            "is the expectation over masks, (1-p)^2 * s*B*A for rescale='none' (s*B*A for 'inverted'): every save "
            "path writes it as a plain PEFT adapter and eval-mode forwards compute it. LoRASC folds every fast expert "
            "at its expectation, so it needs 'merged_expectation'."
        },
    )
    seed: int | None = field(
        default=None,
        metadata={"help": "Seed of LoRA Dropout's own mask generator; None: derived from torch.initial_seed() at "
                          "attach, recorded in genlora_config.json."},
    )

    def __post_init__(self):
        check_range("p", self.p, low=0.0, high=1.0, high_open=True)
        check_int("n_train", self.n_train, low=1)
        check_int("n_test", self.n_test, low=1)
        check_choice("rescale", self.rescale, RESCALES)
        check_bool("mask_per_example", self.mask_per_example)
        check_choice("deploy", self.deploy, DEPLOYS)
        check_seed("seed", self.seed)


@register_method
class LoRADropout(Method):
    """LoRA Dropout (arXiv 2404.09610). Options: see `LoRADropoutConfig`.

    Plain loop (one optimizer step; the loss is averaged over `n_train` masks, one forward/backward each)::

        handle.begin_step()
        for inst in handle.train_instances():        # n_train times, each with its own masks
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

    Test time (deploy="ensemble"): `with genlora.test_time_ensemble(model, handle): out = model(**batch)` (see
    `genlora.ensemble`). Outside the ensemble, eval-mode forwards are the deployed model's: the raw adapter for
    deploy="ensemble", the expectation for deploy="merged_expectation".

    Masks are a pure function of (seed, global_step, forward_index, instance, layer): the handle counts
    training-mode forwards of the whole model, so gradient checkpointing, which re-runs single layers in the
    backward, sees the same masks. Run each instance's backward before the next forward (as above); ensemble
    member k always uses the same masks, a function of (seed, k, layer), so a prediction does not depend on the
    batch it is in.
    """

    config_class = LoRADropoutConfig
    phase = Phase.MASKS  # masks per forward; the expectation export rescales the trained term after LoRASC's fold
    config: LoRADropoutConfig

    def __init__(self, config: LoRADropoutConfig | None = None, **options):
        super().__init__(config, **options)
        self._pool = GeneratorPool()
        self._hooks: list = []
        self._member: int | None = None  # ensemble member whose masks apply, None outside the ensemble

    # --- declared capabilities ---------------------------------------------------------------------------------
    def passes_per_batch(self) -> int:
        return self.config.n_train

    def expected_update_scale(self) -> float:
        """E[ΔŴ] / (s·B·A): (1-p)^2 for rescale='none' (independent masks), 1 for 'inverted'."""
        return 1.0 if self.config.rescale == "inverted" else (1.0 - self.config.p) ** 2

    expectation_scale = property(expected_update_scale)

    def adds_delta_terms(self) -> bool:
        return self.config.deploy == "merged_expectation" and self.expected_update_scale() != 1.0

    # --- attach ----------------------------------------------------------------------------------------------
    def validate(self, model, slots: list[LoraSlot], others) -> None:
        for slot in slots:
            if slot.kind is None:
                raise TypeError(
                    f"LoRA Dropout masks the features of PEFT LoRA on Linear, Conv1D, Conv and Embedding layers; "
                    f"{slot.name!r} is a {type(slot.layer).__name__}"
                )
            if slot.uses_variant:
                # DoRA normalizes the whole direction W + s*B*A by its column norms, computed from the unmasked
                # factors: masking A and B would change the update without changing the norm it is divided by.
                raise TypeError(
                    f"LoRA Dropout masks plain LoRA factors; layer {slot.name!r} uses the LoRA variant "
                    f"{type(slot.layer.lora_variant[slot.adapter]).__name__} (e.g. use_dora=True), whose magnitude "
                    "and direction norm would no longer match the masked update: set use_dora=False"
                )

    def on_attach(self, ctx: AttachContext) -> None:
        super().on_attach(ctx)
        for slot in ctx.slots:
            if slot.is_embedding:
                self._hooks.append(slot.layer.register_forward_hook(self._make_embedding_hook(slot)))
                continue
            self._hooks.append(slot.lora_A.register_forward_pre_hook(self._make_pre_a(slot)))
            self._hooks.append(slot.lora_B.register_forward_hook(self._make_post_b(slot)))

    def on_detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._member = None
        super().on_detach()

    # --- masks -------------------------------------------------------------------------------------------------
    @staticmethod
    def feature_sizes(slot: LoraSlot) -> tuple[int, int]:
        """(input features of A, output features of B): Linear in/out features, Conv channels, Embedding (vocab, dim),
        i.e. dim 1 of A ((r, n_in, *k)) and dim 0 of B ((n_out, r, ...)) for every layer kind."""
        return slot.a_weight.shape[1], slot.b_weight.shape[0]

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
        device = slot.a_weight.device
        n_in, n_out = self.feature_sizes(slot)
        return (
            self._mask(slot, stream, counters, 0, n_in, batch_size, device),
            self._mask(slot, stream, counters, 1, n_out, batch_size, device),
        )

    def _mask(self, slot, stream, counters, which, n, batch_size, device) -> torch.Tensor:
        # m_A and m_B get seeds of their own, so each hook regenerates its mask independently, with no state
        # carried between the two hooks (or between a forward and its checkpointed re-run).
        gen = self._pool.get(device, derive_seed(self.seed, stream, *counters, slot.index, which))
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
        handle = self.ctx.handle
        if handle.instance is None and self.config.n_train > 1:
            raise RuntimeError(
                f"LoRA Dropout with n_train={self.config.n_train} averages the loss over {self.config.n_train} masks: "
                "run training forwards inside `for inst in handle.train_instances(): inst.backward(model(**batch)"
                ".loss)`, or train with genlora.GenLoRATrainer (the plain Trainer runs one forward per batch)"
            )
        counters = (handle.global_step, handle.forward_index, handle.instance or 0)
        return "lora_dropout.train", counters, self.config.mask_per_example

    def _apply(self, slot, which: int, t: torch.Tensor, current) -> torch.Tensor:
        """t * mask over its feature axis (last for linear, 1 for conv); per-example masks over the batch axis."""
        stream, counters, per_example = current
        axis = slot.kind.feature_axis % t.dim()
        batch = t.shape[0] if per_example and t.dim() >= 2 and axis != 0 else None
        # on t's device: with offloading (accelerate) the weight may not be on a compute device yet
        mask = self._mask(slot, stream, counters, which, t.shape[axis], batch, t.device)
        return t * _broadcastable(mask, t, axis).to(t.dtype)

    def _make_pre_a(self, slot: LoraSlot):
        def pre_a(module, args):
            current = self._current(module)
            if current is None:
                return None
            return (self._apply(slot, 0, args[0], current), *args[1:])

        return pre_a

    def _make_post_b(self, slot: LoraSlot):
        def post_b(module, args, out):
            current = self._current(module)
            if current is None:
                return None
            return self._apply(slot, 1, out, current)

        return post_b

    def _make_embedding_hook(self, slot: LoraSlot):
        layer = slot.layer

        def masked_embedding_lora(module, args, output):
            if layer.merged or not slot.active:
                return None
            current = self._current(module)
            if current is None:
                return None
            stream, counters, per_example = current
            ids = args[0]  # (..., ) token ids
            n_in, n_out = self.feature_sizes(slot)
            batch = ids.shape[0] if per_example and ids.dim() >= 2 else None
            m_a = self._mask(slot, stream, counters, 0, n_in, batch, ids.device)  # over the vocabulary
            m_b = self._mask(slot, stream, counters, 1, n_out, batch, ids.device)  # over the embedding coordinates
            u, v = slot.scaling * slot.b_weight, slot.a_weight  # (dim, r), (r, vocab): differentiable
            term = slot.kind.apply_lowrank(slot, ids, u, v)  # (..., dim), PEFT's own LoRA term recomputed
            if batch is None:
                keep = m_a[ids].unsqueeze(-1) * m_b  # (..., dim)
            else:
                rows = m_a.gather(1, ids.reshape(batch, -1)).reshape(ids.shape)  # m_A[b, ids[b, ...]]
                keep = rows.unsqueeze(-1) * m_b.reshape(batch, *([1] * (ids.dim() - 1)), n_out)
            # the layer's output already holds W[x] + T; replacing T by keep * T exactly:
            return output + ((keep - 1.0).to(term.dtype) * term).to(output.dtype)

        return masked_embedding_lora

    # --- training ----------------------------------------------------------------------------------------------
    def train_instances(self) -> Iterator[TrainInstance]:
        """`handle.train_instances()`: the `n_train` dropout instances of the current batch (see the class
        docstring for the loop)."""
        if self.ctx is None:
            raise RuntimeError("train_instances() needs the method attached: genlora.attach(model, LoRADropout(...))")
        return self.ctx.handle.train_instances()

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

    # --- the deployed model ------------------------------------------------------------------------------------
    def deploy_factors(self, slot: LoraSlot, factors):
        if not self.adds_delta_terms():
            return factors  # the same object: the deployed model is the trained adapter (with the ensemble)
        # The trained adapter is the last term: methods that add frozen terms (LoRASC's slow experts) prepend them
        # and have already folded theirs at this expectation; only the trained term is still masked.
        *frozen, (u, v) = factors  # u: (n_out, r) with the scaling s, v: (r, n_in)
        return [*frozen, (u * self.expected_update_scale(), v)]


def _broadcastable(mask: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
    """A (n,) mask over `like`'s feature axis, or a per-example (batch, n) one over its batch and feature axes,
    reshaped to broadcast against `like` ((..., n) for linear layers, (batch, n, *spatial) for convolutions)."""
    shape = [1] * like.dim()
    shape[axis] = mask.shape[-1]
    if mask.dim() == 2:
        shape[0] = mask.shape[0]
    return mask.reshape(shape)
