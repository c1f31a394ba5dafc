"""The step's extra objective terms (RM-LoRA's lambda * R(A, B)): where they are added, that they reached the
backpropagated loss exactly once per pass, and with which weight (docs/methods.md, "RM-LoRA").

A term is added to the model's returned loss by the handle's forward hook, or to a loss the user (or
`GenLoRATrainerMixin`) computed, through `handle.loss`. Each added term carries a gradient hook, so the handle knows
which terms were actually backpropagated: the check at `pre_optimizer_step` is about the objective that trained the
adapter, not about a loss that was computed and dropped (TRL's DPO and SFT losses are built from log-probabilities,
not from the model's returned loss).
"""

from __future__ import annotations

import torch


class ObjectiveTerms:
    """The regularizers of a handle's methods within one optimizer step."""

    def __init__(self, methods):
        self.methods = methods
        self.terms: list[torch.Tensor] = []
        self.backprops = {"outputs": 0, "hand": 0}  # terms that reached a backward, by where they were added
        self.probing = False  # the num_items_in_batch probe's own forwards
        self._normalized_by_items: bool | None = None

    @property
    def active(self) -> bool:
        return any(m.adds_loss_term() for m in self.methods)

    def begin_step(self) -> None:
        self.terms = []
        self.backprops = {"outputs": 0, "hand": 0}

    def value(self) -> torch.Tensor | None:
        """Sum of the methods' terms from the current weights; None if there are none."""
        terms = [t for t in (m.regularizer() for m in self.methods if m.adds_loss_term()) if t is not None]
        if not terms:
            return None
        return terms[0] if len(terms) == 1 else torch.stack([t.float() for t in terms]).sum()

    def add(self, loss: torch.Tensor, share: float, where: str) -> torch.Tensor:
        """`loss + share * value()`, the term tracked (where: "outputs" or "hand")."""
        reg = self.value()
        if reg is None:
            return loss
        term = reg * share
        if term.requires_grad:
            def backpropagated(grad, _where=where):
                self.backprops[_where] += 1

            term.register_hook(backpropagated)
            self.terms.append(term)
        return loss + term.to(loss.dtype)

    def contained_in(self, loss: torch.Tensor, since: int = 0) -> bool:
        """Whether `loss` depends on a term added in this step (the `since`-th and later). Asks autograd for the
        gradient of `loss` w.r.t. the terms: only the few nodes between them are run."""
        terms = self.terms[since:]
        if not terms or not loss.requires_grad:
            return False
        grads = torch.autograd.grad(loss, terms, retain_graph=True, allow_unused=True)
        return any(g is not None for g in grads)

    def check_step(self) -> None:
        """Before the optimizer step: the terms reached the backpropagated loss, from one place."""
        if not self.active:
            return
        if self.backprops["outputs"] == 0 and self.backprops["hand"] == 0:
            raise RuntimeError(
                "an attached method adds a loss term, but it reached no backpropagated loss in this step: the "
                "model returned no `loss`, or the loss you backpropagated is not the model's (a custom or TRL "
                "loss): compute `loss = handle.loss(your_loss)` before backward, or train with "
                "genlora.GenLoRATrainerMixin"
            )
        if self.backprops["outputs"] and self.backprops["hand"]:
            raise RuntimeError(
                "the regularizer was added twice: the model's returned loss already contains it, so do not "
                "also pass that loss through handle.loss()"
            )

    def share_in_model_loss(self, module, args, kwargs, accum: int) -> float:
        """Weight of the step's regularizer in one micro-step's model loss, so that it enters every optimizer step's
        gradient exactly like the task loss does (lambda must not depend on how the model's loss is coded).

        Plain loops and the Trainer with a model whose loss is a per-micro-batch mean: weight 1 (the Trainer, or
        the user, divides each micro-step's loss by the accumulation steps, or the objective is the sum of the
        micro-batch means; either way the regularizer stays at lambda relative to the task loss). When the Trainer
        passes `num_items_in_batch` (it then does not divide), a model that normalizes its loss by it makes each
        micro-step loss a share of the step's mean: weight 1/accumulation steps. Whether the model honours
        `num_items_in_batch` (causal LMs do, BERT's classifier ignores it) is measured once, by two no-grad
        eval-mode forwards of the batch with different counts."""
        if "num_items_in_batch" not in kwargs or accum <= 1:
            return 1.0
        if self._normalized_by_items is None:
            self._normalized_by_items = self._probe_items_normalization(module, args, kwargs)
        return 1.0 / accum if self._normalized_by_items else 1.0

    @torch.no_grad()
    def _probe_items_normalization(self, module, args, kwargs) -> bool:
        n = kwargs["num_items_in_batch"]
        modes = {m: m.training for m in module.modules()}
        self.probing = True
        try:
            module.eval()
            first = module(*args, **{**kwargs, "num_items_in_batch": n})
            second = module(*args, **{**kwargs, "num_items_in_batch": n * 2})
        finally:
            for m, mode in modes.items():
                m.training = mode
            self.probing = False
        l1, l2 = loss_of(first), loss_of(second)
        if l1 is None or l2 is None:
            return True  # cannot tell: the Trainer's own assumption (it passed the count, so it expects normalization)
        return not torch.allclose(l1.float(), l2.float(), rtol=1e-4, atol=0.0)


def loss_of(output) -> torch.Tensor | None:
    return output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
