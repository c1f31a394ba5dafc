"""`attach(model, *methods)`: the one call that puts genlora methods on a PEFT LoRA model, and the handle that
drives them step by step (from a plain loop or from the Trainer callback) and takes them off again.

The handle owns the step protocol (begin_step -> forwards/backwards -> clipping -> optimizer_step), the loop facts
the methods declared they need (`LoopInfo`), the objective's extra terms, the run's state and seeds. What the run's
model is, whatever the save path, is `core/deployment.py`'s.
"""

from __future__ import annotations

import os
import warnings
import weakref
from dataclasses import dataclass
from enum import Enum
from typing import Any, Iterator

import torch
from torch import nn

from ..config import check_choice, check_int
from .deployment import GENLORA_CONFIG_NAME, GENLORA_STATE_NAME, Deployment
from .files import base_checksums, write_atomic, write_json_atomic  # noqa: F401 - re-exported
from .lora_layers import LoraSlot, find_lora_slots, resolve_adapter
from .method import AttachContext, Factors, Method, Requirement
from .objective import ObjectiveTerms, loss_of
from .perturbed_linear import BaseWeightPerturber, NoiseTarget
from .seeding import derive_seed

NONFINITE_POLICIES = ("skip", "raise", "off")
_STATE_FORMAT = 2

# LoRA layers that carry attached methods; a layer can belong to one handle at a time.
_ATTACHED_LAYERS: weakref.WeakSet = weakref.WeakSet()


class _Phase(Enum):
    IDLE = "between steps"
    FORWARD = "inside a step (after begin_step)"
    OPTIMIZER = "between pre_optimizer_step and post_optimizer_step"


@dataclass
class LoopInfo:
    """Facts about the training loop that methods declared they need (`Method.requirements`)."""

    total_steps: int | None = None  # optimizer steps of the whole run
    steps_per_epoch: int | None = None  # optimizer steps per epoch
    grad_accum_steps: int = 1  # micro-batches per optimizer step (set by the Trainer callback)
    optimizer: torch.optim.Optimizer | None = None


def attach(
    model: nn.Module,
    *methods: Method,
    adapter_name: str | None = None,
    total_steps: int | None = None,
    steps_per_epoch: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    on_nonfinite: str = "skip",
    guard_base: bool = False,
) -> GenLoRAHandle:
    """Attach one or several genlora methods to a PEFT LoRA model and return the handle that drives them.

    Args:
        model: a `peft.PeftModel`, or any module containing PEFT `LoraLayer`s.
        methods: method objects, e.g. `FlatLoRA(sigma=0.05)`, `RMLoRA(k=4, reg_lambda=0.1)`.
        adapter_name: the LoRA adapter to act on; default: the model's single active adapter.
        total_steps: optimizer steps of the run (ramped schedules, LoRASC's stages); the Trainer callback sets it
            from `TrainingArguments` when left out.
        steps_per_epoch: optimizer steps per epoch (LoRASC with `stage_per_epoch=True`); the callback sets it.
        optimizer: the optimizer that trains the adapter (LoRASC resets its state at stage boundaries); also
            `handle.bind_optimizer(optimizer)`; the callback binds the Trainer's.
        on_nonfinite: what `pre_optimizer_step` does when a trainable gradient holds NaN/inf: "skip" the update
            (gradients are set to None, so the optimizer leaves those parameters alone; compatible with fp16 loss
            scaling, whose overflow steps look the same), "raise" a `FloatingPointError`, or "off" (no check).
        guard_base: take an exact checksum of every frozen weight now; `verify_base()` (also run by the Trainer
            callback at the end of training) raises if any of them changed.

    Methods whose `seed` is None draw it from `torch.initial_seed()` now (so `torch.manual_seed` /
    `transformers.set_seed` before attach changes every random stream), recorded in the saved config; under
    torch.distributed all ranks use rank 0's. Everything is validated before anything is changed: on error the
    model is untouched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module carrying PEFT LoRA layers, got {type(model).__name__}")
    if not methods:
        raise ValueError("attach needs at least one method, e.g. attach(model, genlora.FlatLoRA(sigma=0.05))")
    for m in methods:
        if not isinstance(m, Method):
            raise TypeError(f"methods must be genlora method objects (FlatLoRA, RMLoRA, ...), got {type(m).__name__}")
        if m.ctx is not None:
            raise ValueError(f"{m!r} is already attached to a model; create a new method object")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"each method may be attached once, got {names}")
    for key, value in (("total_steps", total_steps), ("steps_per_epoch", steps_per_epoch)):
        if value is not None:
            check_int(key, value, low=1)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    check_choice("on_nonfinite", on_nonfinite, NONFINITE_POLICIES)
    if not isinstance(guard_base, bool):
        raise TypeError(f"guard_base must be a bool, got {guard_base!r}")
    adapter = resolve_adapter(model, adapter_name)
    slots = find_lora_slots(model, adapter)
    if not slots:
        raise ValueError(f"no LoRA layer carries adapter {adapter!r}")
    busy = [s.name for s in slots if s.layer in _ATTACHED_LAYERS]
    if busy:
        raise ValueError(f"genlora methods are already attached to layers {busy[:3]}...; detach that handle first")
    for m in methods:
        m.validate(model, slots, [o for o in methods if o is not m])
    loop = LoopInfo(total_steps=total_steps, steps_per_epoch=steps_per_epoch, optimizer=optimizer)
    handle = GenLoRAHandle(model, sorted(methods, key=lambda m: m.phase), slots, adapter, loop)
    handle.on_nonfinite = on_nonfinite
    if guard_base:
        handle.base_checksums = base_checksums(model)
    return handle


class TrainInstance:
    """Pass `index` (0-based) of `n` over the same batch, yielded by `handle.train_instances()` (LoRA Dropout's
    n_train dropout instances: paper Eq. 4 averages the loss over them).

    Its loss must go through `backward(loss)` (= `(loss / n).backward()`) or, for your own backward (AMP scaler,
    accelerate), through `scale(loss)` (= `loss / n`): an instance whose loss went through neither raises.
    """

    __slots__ = ("index", "n", "used")

    def __init__(self, index: int, n: int):
        self.index, self.n, self.used = index, n, False

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss / n`: this pass's share of the loss averaged over the n passes."""
        self.used = True
        return loss / self.n

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        """`(loss / n).backward(**kwargs)`."""
        self.scale(loss).backward(**kwargs)

    def __repr__(self) -> str:
        return f"TrainInstance({self.index} of {self.n})"


class GenLoRAHandle:
    """Drives attached methods through the optimizer steps of a run.

    Plain loop (one optimizer step; gradient accumulation = several forward/backward between the two calls)::

        handle.begin_step()
        loss = model(**batch).loss          # the RM-LoRA regularizer is already in a model-returned loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        handle.optimizer_step(optimizer)    # masks (RM-LoRA), optimizer.step(), bookkeeping
        optimizer.zero_grad()

    With a method that averages several passes per batch (LoRA Dropout's n_train > 1), run the forward/backward
    inside `for inst in handle.train_instances(): inst.backward(model(**batch).loss)`.

    A missed call raises instead of silently skipping a method: a training-mode forward outside a step, a second
    `begin_step` without an optimizer step, or a step in which a regularizer never reached the loss.
    """

    def __init__(self, model, methods, slots, adapter_name, loop: LoopInfo):
        self.model = model
        self.methods: list[Method] = list(methods)
        self.slots: list[LoraSlot] = slots
        self.adapter_name: str = adapter_name
        self.loop = loop
        self.global_step = 0  # completed optimizer steps
        self.forward_index = -1  # training-mode forwards of the whole model since begin_step (keys per-forward draws)
        self.instance: int | None = None  # index inside train_instances(), None outside
        self.on_nonfinite = "skip"
        self.skipped_steps: list[int] = []  # steps whose update was skipped for non-finite gradients
        self.base_checksums: dict[str, tuple[int, int]] | None = None
        self._phase = _Phase.IDLE
        self.objective = ObjectiveTerms(self.methods)  # the regularizers' terms of the step
        self._requirements_checked = False
        self._seeds_synced = False
        self._resolve_seeds()
        targets = [NoiseTarget(s.index, s.name, s.base_layer, s.kind, s) for s in slots if s.kind is not None]
        self.perturber = BaseWeightPerturber(targets, guard=self._require_step)
        ctx = AttachContext(model=model, slots=slots, perturber=self.perturber, handle=self)
        for m in self.methods:
            m.on_attach(ctx)
            if m.perturbs_base():
                self.perturber.add_targets(m.noise_targets())
                self.perturber.add_source(m)
        self._hooks = [
            model.register_forward_pre_hook(self._pre_forward_hook),
            model.register_forward_hook(self._forward_hook, with_kwargs=True),
        ]
        self.deployment = Deployment(self)
        for s in slots:
            _ATTACHED_LAYERS.add(s.layer)
        self._attached = True

    # --- loop facts (compatibility accessors for LoopInfo) -----------------------------------------------------
    @property
    def total_steps(self) -> int | None:
        return self.loop.total_steps

    @total_steps.setter
    def total_steps(self, value: int | None) -> None:
        self.configure(total_steps=value)

    @property
    def steps_per_epoch(self) -> int | None:
        return self.loop.steps_per_epoch

    @steps_per_epoch.setter
    def steps_per_epoch(self, value: int | None) -> None:
        self.configure(steps_per_epoch=value)

    @property
    def grad_accum_steps(self) -> int:
        return self.loop.grad_accum_steps

    @grad_accum_steps.setter
    def grad_accum_steps(self, value: int) -> None:
        self.configure(grad_accum_steps=value)

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self.loop.optimizer

    def configure(self, *, total_steps: int | None = None, steps_per_epoch: int | None = None,
                  grad_accum_steps: int | None = None) -> None:
        """Set loop facts (those given; None leaves a fact as it is)."""
        for key, value in (("total_steps", total_steps), ("steps_per_epoch", steps_per_epoch),
                           ("grad_accum_steps", grad_accum_steps)):
            if value is not None:
                check_int(key, value, low=1)
                setattr(self.loop, key, value)

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Tell the handle which optimizer trains the adapter (LoRASC resets its state at stage boundaries)."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.loop.optimizer = optimizer

    # --- queries -----------------------------------------------------------------------------------------------
    def method(self, name: str) -> Method:
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(f"no attached method {name!r}; attached: {[m.name for m in self.methods]}")

    @property
    def in_step(self) -> bool:
        return self._phase is not _Phase.IDLE

    def live_factors(self, slot: LoraSlot) -> Factors:
        """Low-rank terms (U (n_out, k), V (k, n_in)) the layer adds to its base weight in training now: the frozen
        terms methods keep (LoRASC's slow experts), then the trained adapter's (s*B, A)."""
        terms: Factors = []
        for m in self.methods:
            terms.extend(m.frozen_delta_factors(slot))
        terms.append(slot.trained_factors())
        return terms

    def delta_factors(self, slot: LoraSlot) -> Factors:
        """Alias of `live_factors` (the trained term last)."""
        return self.live_factors(slot)

    def deployed_factors(self, slot: LoraSlot) -> Factors:
        """Low-rank terms of the deployed model of `slot` (what every save path writes and eval forwards compute)."""
        return self.deployment.factors(slot)[0]

    def transforms_model(self) -> bool:
        """Whether the model the methods define differs from PEFT's view of the live adapter."""
        return self.deployment.differs_from_peft()

    # --- step protocol -----------------------------------------------------------------------------------------
    def begin_step(self) -> None:
        """Start optimizer step `global_step`: call once before the first forward of the step."""
        self._check_attached()
        if self._phase is _Phase.FORWARD:
            raise RuntimeError(
                f"begin_step() called twice: step {self.global_step} never reached the optimizer; call "
                "handle.optimizer_step(optimizer) (or pre_optimizer_step/post_optimizer_step) after backward"
            )
        if self._phase is _Phase.OPTIMIZER:
            raise RuntimeError(f"post_optimizer_step() was not called after step {self.global_step}'s optimizer step")
        self._check_requirements()
        self._check_active_adapter()
        self._sync_seeds()
        self._phase = _Phase.FORWARD
        self.objective.begin_step()
        self.forward_index = -1
        self.instance = None
        try:
            for m in self.methods:
                m.begin_step(self.global_step)
        except BaseException:
            self._phase = _Phase.IDLE  # the step never started: a corrected retry must not see "called twice"
            raise

    def passes_per_batch(self) -> int:
        return max(m.passes_per_batch() for m in self.methods)

    def train_instances(self) -> Iterator[TrainInstance]:
        """Yield the passes over the current batch whose losses are averaged (LoRA Dropout's n_train; one pass
        otherwise). Each pass must run a training-mode forward and put its loss through `inst.backward(loss)` or
        `inst.scale(loss)`."""
        self._check_attached()
        if not self.in_step:
            raise RuntimeError("train_instances() runs inside a step: call handle.begin_step() first")
        n = self.passes_per_batch()
        try:
            for k in range(n):
                inst = TrainInstance(k, n)
                self.instance = k
                start = self.forward_index
                yield inst
                if self.forward_index == start:
                    raise RuntimeError(
                        f"pass {k} ran no training-mode forward of the attached model (model.train()?), so none of "
                        "the methods acted on it"
                    )
                if not inst.used:
                    raise RuntimeError(
                        f"the loss of pass {k} went through neither inst.backward(loss) nor inst.scale(loss); each of "
                        f"the {n} passes must contribute loss / {n}"
                    )
        finally:
            self.instance = None

    def regularizer(self) -> torch.Tensor | None:
        """Sum of the attached methods' objective terms (e.g. RM-LoRA's lambda * R(A, B)); None if there are none."""
        return self.objective.value()

    def loss(self, loss: torch.Tensor, share: float = 1.0) -> torch.Tensor:
        """`loss` plus the regularizers (times `share`: this loss's part of the step's objective, e.g. 1/n for one of
        n accumulated micro-batch losses that are each divided by n): use this when you compute the loss yourself
        instead of the model."""
        self._require_step()
        return self.objective.add(loss, share, "hand")

    def regularizer_in(self, loss: torch.Tensor, since: int = 0) -> bool:
        """Whether `loss` depends on a regularizer term added in this step (the `since`-th and later): the
        objective a trainer backpropagates may not be the model's returned loss (TRL)."""
        return self.objective.contained_in(loss, since)

    @property
    def regularizer_terms(self) -> int:
        """Regularizer terms added so far in this step (model outputs and handle.loss)."""
        return len(self.objective.terms)

    def pre_optimizer_step(self) -> None:
        """After backward and gradient clipping, right before `optimizer.step()`."""
        self._check_attached()
        if self._phase is not _Phase.FORWARD:
            raise RuntimeError(f"pre_optimizer_step() needs begin_step() first (the handle is {self._phase.value})")
        self.objective.check_step()
        self._phase = _Phase.OPTIMIZER
        if self.on_nonfinite != "off" and not self._gradients_finite():
            if self.on_nonfinite == "raise":
                raise FloatingPointError(
                    f"non-finite gradient at step {self.global_step} (NaN/inf loss or gradient); training stopped. "
                    "Pass on_nonfinite='skip' to genlora.attach to skip such steps instead"
                )
            # Skip: optimizers leave parameters whose grad is None untouched (no update, no momentum, no decay).
            for p in self.model.parameters():
                if p.requires_grad:
                    p.grad = None
            self.skipped_steps.append(self.global_step)
            warnings.warn(f"genlora: skipped the update of step {self.global_step}: non-finite gradients")
            return
        for m in self.methods:
            m.pre_optimizer_step(self.global_step)

    def post_optimizer_step(self) -> None:
        """Right after `optimizer.step()`; ends the step."""
        self._check_attached()
        if self._phase is not _Phase.OPTIMIZER:
            raise RuntimeError(f"post_optimizer_step() needs pre_optimizer_step() first ({self._phase.value})")
        for m in self.methods:
            m.post_optimizer_step(self.global_step)
        self.global_step += 1
        self._phase = _Phase.IDLE

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """`pre_optimizer_step()`, `optimizer.step()`, `post_optimizer_step()` in one call."""
        self.pre_optimizer_step()
        optimizer.step()
        self.post_optimizer_step()

    def _gradients_finite(self) -> bool:
        grads = [p.grad for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        if not grads:
            return True
        # One fused reduction and a single host sync per step.
        return bool(torch.stack([n.float() for n in torch._foreach_norm(grads)]).isfinite().all())

    def _check_requirements(self) -> None:
        if self._requirements_checked:
            return
        facts = {Requirement.OPTIMIZER: self.loop.optimizer, Requirement.TOTAL_STEPS: self.loop.total_steps,
                 Requirement.STEPS_PER_EPOCH: self.loop.steps_per_epoch}
        hints = {
            Requirement.OPTIMIZER: "handle.bind_optimizer(optimizer) (GenLoRACallback binds the Trainer's)",
            Requirement.TOTAL_STEPS: "genlora.attach(..., total_steps=N) or handle.configure(total_steps=N) "
                                     "(GenLoRACallback sets it from the Trainer's max_steps)",
            Requirement.STEPS_PER_EPOCH: "genlora.attach(..., steps_per_epoch=N) or handle.configure("
                                         "steps_per_epoch=N) (GenLoRACallback sets it from the train dataloader)",
        }
        for m in self.methods:
            for req in sorted(m.requirements(), key=lambda r: r.value):
                if facts[req] is None:
                    raise RuntimeError(f"{m!r} needs the {req.value} of the training loop: {hints[req]}")
        self._requirements_checked = True

    def _check_active_adapter(self) -> None:
        active = self.slots[0].layer.active_adapters
        if self.adapter_name not in active:
            raise RuntimeError(
                f"genlora is attached to adapter {self.adapter_name!r}, but the active adapter is now {active}: "
                "switching adapters in the middle of a run would put its methods on another adapter's training; "
                "set_adapter back, or detach this handle and attach to the other adapter"
            )

    # --- seeds -------------------------------------------------------------------------------------------------
    def _resolve_seeds(self) -> None:
        """Every method's seed: its config's, else one derived from the global torch seed (so a new
        `torch.manual_seed` gives new noise, masks and re-inits)."""
        base = torch.initial_seed()
        for m in self.methods:
            m.seed = m.config.seed if m.config.seed is not None else derive_seed(base, f"genlora.{m.name}")

    def _sync_seeds(self) -> None:
        """Under torch.distributed, derived seeds come from rank 0: the methods' draws must agree on every rank
        (RM-LoRA's masks after the gradient all-reduce, LoRASC's re-inits, shared Flat-LoRA noise)."""
        if self._seeds_synced:
            return
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            self._seeds_synced = True
            return
        derived = [m for m in self.methods if m.config.seed is None]
        if derived:
            backend = dist.get_backend()
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            seeds = torch.tensor([m.seed for m in derived], dtype=torch.int64, device=device)
            dist.broadcast(seeds, src=0)
            for m, s in zip(derived, seeds.tolist()):
                m.seed = int(s)
        self._seeds_synced = True

    # --- hooks -------------------------------------------------------------------------------------------------
    def _require_step(self) -> None:
        if self._phase is not _Phase.FORWARD:
            raise RuntimeError(
                f"training-mode forward while the genlora handle is {self._phase.value}: call handle.begin_step() "
                "before the step's first forward (or model.eval() for evaluation)"
            )

    def _has_regularizer(self) -> bool:
        return self.objective.active

    def _pre_forward_hook(self, module, args):
        if module.training and not self.objective.probing:
            self._require_step()
            self.forward_index += 1

    def _forward_hook(self, module, args, kwargs, output):
        objective = self.objective
        if not module.training or objective.probing or not torch.is_grad_enabled() or not objective.active:
            return output  # (no_grad: a reference forward, nothing to backpropagate)
        loss = loss_of(output)
        if loss is not None:
            share = objective.share_in_model_loss(module, args, kwargs, self.loop.grad_accum_steps)
            output["loss"] = objective.add(loss, share, "outputs")
        return output

    # --- detach, state, files --------------------------------------------------------------------------------
    def _check_attached(self) -> None:
        if not self._attached:
            raise RuntimeError("this genlora handle was detached")

    def detach(self) -> None:
        """Remove every method, hook and patch; the model is left exactly as it was before `attach`."""
        if not self._attached:
            return
        for h in self._hooks:
            h.remove()
        for m in reversed(self.methods):
            m.on_detach()
        self.perturber.unpatch()
        self.deployment.remove()
        for s in self.slots:
            _ATTACHED_LAYERS.discard(s.layer)
        self._phase = _Phase.IDLE
        self._attached = False

    def config_dict(self) -> dict[str, Any]:
        return {
            "genlora_format": _STATE_FORMAT,
            "adapter_name": self.adapter_name,
            "total_steps": self.loop.total_steps,
            "methods": [{"method": m.name, **m.resolved_config()} for m in self.methods],
        }

    def _adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        if hasattr(self.model, "peft_config"):
            state = get_peft_model_state_dict(self.model, adapter_name=self.adapter_name)
        else:
            state = {}
            for s in self.slots:
                state[f"{s.name}.A"], state[f"{s.name}.B"] = s.a_weight, s.b_weight
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def _load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        expected = set(self._adapter_state())
        if set(state) != expected:
            raise ValueError("the saved training state holds an adapter with other layers than this model's")
        if hasattr(self.model, "peft_config"):
            set_peft_model_state_dict(self.model, state, adapter_name=self.adapter_name)
        else:
            with torch.no_grad():
                for s in self.slots:
                    s.a_weight.copy_(state[f"{s.name}.A"])
                    s.b_weight.copy_(state[f"{s.name}.B"])

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly: step counter, the trained adapter, each method's state."""
        return {
            **self.config_dict(),
            "global_step": self.global_step,
            "adapter": self._adapter_state(),
            "method_states": {m.name: m.state_dict() for m in self.methods},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()`; the attached methods and their configs must match the saved ones (a method
        whose seed was derived takes the run's recorded seed). On any error nothing is changed."""
        if self.in_step:
            raise RuntimeError("load_state_dict() between steps only")
        if not isinstance(state, dict) or state.get("genlora_format") != _STATE_FORMAT:
            raise ValueError(f"unsupported genlora state format {state.get('genlora_format')!r}")
        saved = state.get("methods")
        mine = self.config_dict()["methods"]
        if not isinstance(saved, list) or len(saved) != len(mine):
            raise ValueError(f"saved state is for methods {saved}, but the handle has {mine}")
        for m, s_cfg, m_cfg in zip(self.methods, saved, mine):
            free_seed = m.config.seed is None  # derived: the saved run's seed is the one to continue with
            if {k: v for k, v in s_cfg.items() if not (free_seed and k == "seed")} != {
                    k: v for k, v in m_cfg.items() if not (free_seed and k == "seed")}:
                raise ValueError(f"saved state is for methods {saved}, but the handle has {mine}")
        step = state.get("global_step")
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"global_step must be a non-negative integer, got {step!r}")
        if not isinstance(state.get("adapter"), dict) or not isinstance(state.get("method_states"), dict):
            raise ValueError("saved state holds no adapter weights or method states")
        backup = self.state_dict()
        try:
            self._apply_state(state)
        except BaseException:
            self._apply_state(backup)
            raise

    def _apply_state(self, state: dict[str, Any]) -> None:
        self._load_adapter_state(state["adapter"])
        for m, cfg in zip(self.methods, state["methods"]):
            m.seed = cfg.get("seed")
            m.load_state_dict(state["method_states"][m.name])
        self._seeds_synced = True
        self.global_step = state["global_step"]
        self.loop.total_steps = state.get("total_steps", self.loop.total_steps)

    def verify_base(self) -> None:
        """Raise if any frozen weight differs from its checksum taken at attach (needs `guard_base=True`)."""
        if self.base_checksums is None:
            raise RuntimeError("verify_base() needs genlora.attach(..., guard_base=True)")
        now = base_checksums(self.model)
        changed = sorted(k for k in self.base_checksums if now.get(k) != self.base_checksums[k])
        if changed:
            raise RuntimeError(f"frozen base weights changed during training: {changed[:5]} ({len(changed)} in all)")

    def save_state(self, path: str | os.PathLike) -> None:
        """Write `state_dict()` to `path` atomically (temporary file, then rename)."""
        if self.in_step:
            raise RuntimeError("save_state() between steps only")
        write_atomic(path, lambda f: torch.save(self.state_dict(), f))

    def load_state(self, path: str | os.PathLike) -> None:
        """Read a `save_state()` file and restore it; a corrupt or foreign file raises and changes nothing."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:  # truncated, not a torch file, unpickling refused
            raise ValueError(f"{path} is not a readable genlora state file ({type(e).__name__}: {e})") from e
        if not isinstance(state, dict):
            raise ValueError(f"{path} is not a genlora state file")
        self.load_state_dict(state)

    # --- files: the deployed model (core/deployment.py) ------------------------------------------------------
    def save_config(self, directory: str | os.PathLike) -> str:
        """Write `genlora_config.json` (the attached methods and their options, seeds as run) into `directory`."""
        return self.deployment.save_config(directory)

    def save_pretrained(self, directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write the deployed model as a standard PEFT adapter (`PeftModel.from_pretrained` loads it without genlora)
        plus `genlora_config.json` beside it. `model.save_pretrained`, `Trainer.save_model()` and every Trainer
        checkpoint call this while the handle is attached. Keyword arguments go to PEFT's `save_pretrained`."""
        self.deployment.save_pretrained(directory, **kwargs)

    def merged_model(self) -> nn.Module:
        """A deep copy of the base model with the deployed model merged densely and no LoRA layers (LoRASC's
        persistent noise included in that mode; quantized bases dequantized). The live model is not touched.
        Costs one model copy of memory."""
        return self.deployment.merged_model()

    def save_merged(self, directory: str | os.PathLike, **kwargs: Any) -> None:
        """`merged_model().save_pretrained(directory, **kwargs)`: an ordinary transformers model, no PEFT needed."""
        model = self.model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not hasattr(base, "save_pretrained"):  # checked before paying for the copy
            raise TypeError(
                f"{type(base).__name__} has no save_pretrained; torch.save handle.merged_model().state_dict() instead"
            )
        self.merged_model().save_pretrained(directory, **kwargs)
