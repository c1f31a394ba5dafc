"""`attach(model, *methods)`: the one call that puts genlora methods on a PEFT LoRA model, and the handle that
drives them step by step (from a plain loop or from the Trainer callback) and takes them off again."""

from __future__ import annotations

import json
import os
import tempfile
import weakref
from enum import Enum
import warnings
from typing import Any, Callable

import torch
from torch import nn

from ..config import check_choice, check_int
from .lora_layers import LoraSlot, find_lora_slots, resolve_adapter
from .method import AttachContext, Method
from .perturbed_linear import BaseWeightPerturber

GENLORA_CONFIG_NAME = "genlora_config.json"
GENLORA_STATE_NAME = "genlora_state.pt"
NONFINITE_POLICIES = ("skip", "raise", "off")
_STATE_FORMAT = 1

# LoRA layers that carry attached methods; a layer can belong to one handle at a time.
_ATTACHED_LAYERS: weakref.WeakSet = weakref.WeakSet()


class _Phase(Enum):
    IDLE = "between steps"
    FORWARD = "inside a step (after begin_step)"
    OPTIMIZER = "between pre_optimizer_step and post_optimizer_step"


def attach(
    model: nn.Module,
    *methods: Method,
    adapter_name: str | None = None,
    total_steps: int | None = None,
    on_nonfinite: str = "skip",
    guard_base: bool = False,
) -> GenLoRAHandle:
    """Attach one or several genlora methods to a PEFT LoRA model and return the handle that drives them.

    Args:
        model: a `peft.PeftModel`, or any module containing PEFT `LoraLayer`s.
        methods: method objects, e.g. `FlatLoRA(sigma=0.05)`, `RMLoRA(k=4, reg_lambda=0.1)`.
        adapter_name: the LoRA adapter to act on; default: the model's single active adapter.
        total_steps: number of optimizer steps of the run (needed by ramped schedules); the Trainer callback sets
            it from `TrainingArguments` when left out.
        on_nonfinite: what `pre_optimizer_step` does when a trainable gradient holds NaN/inf: "skip" the update
            (gradients are set to None, so the optimizer leaves those parameters alone; compatible with fp16 loss
            scaling, whose overflow steps look the same), "raise" a `FloatingPointError`, or "off" (no check).
        guard_base: take an exact checksum of every frozen weight now; `verify_base()` (also run by the Trainer
            callback at the end of training) raises if any of them changed.

    Everything is validated before anything is changed: on error the model is untouched.
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
    if total_steps is not None:
        check_int("total_steps", total_steps, low=1)
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
        m.validate(model, slots)
    handle = GenLoRAHandle(model, sorted(methods, key=lambda m: m.order), slots, adapter, total_steps)
    handle.on_nonfinite = on_nonfinite
    if guard_base:
        handle.base_checksums = base_checksums(model)
    return handle


class GenLoRAHandle:
    """Drives attached methods through the optimizer steps of a run.

    Plain loop (one optimizer step; gradient accumulation = several forward/backward between the two calls)::

        handle.begin_step()
        loss = model(**batch).loss          # the RM-LoRA regularizer is already in a model-returned loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        handle.optimizer_step(optimizer)    # masks (RM-LoRA), optimizer.step(), bookkeeping
        optimizer.zero_grad()

    A missed call raises instead of silently skipping a method: a training-mode forward outside a step, a second
    `begin_step` without an optimizer step, or a step in which a regularizer never reached the loss.
    """

    def __init__(self, model, methods, slots, adapter_name, total_steps):
        self.model = model
        self.methods: list[Method] = list(methods)
        self.slots: list[LoraSlot] = slots
        self.adapter_name: str = adapter_name
        self.total_steps: int | None = total_steps
        self.global_step = 0  # completed optimizer steps
        # Set by the Trainer callback: when the model normalizes its loss by `num_items_in_batch` (transformers'
        # gradient-accumulation fix), each micro-step's loss is a share of the step's loss, so a per-forward
        # regularizer is weighted 1/grad_accum_steps to add up to one regularizer per step.
        self.grad_accum_steps = 1
        self.on_nonfinite = "skip"
        self.skipped_steps: list[int] = []  # steps whose update was skipped for non-finite gradients
        self.base_checksums: dict[str, tuple[int, int]] | None = None
        self.optimizer: torch.optim.Optimizer | None = None  # needed by methods that reset optimizer state (LoRASC)
        # Optimizer steps per epoch: LoRASC's default stage length. Set it by hand in a plain loop (or pass it to the
        # method); GenLoRACallback sets it from the Trainer's train dataloader.
        self.steps_per_epoch: int | None = None
        # Training-mode forwards of the whole model since begin_step: keys per-forward random draws (dropout
        # masks), so gradient checkpointing, which re-runs layers but not the model, sees the same draws.
        self.forward_index = -1
        self._phase = _Phase.IDLE
        self._reg_in_outputs = 0
        self._reg_by_hand = 0
        self.perturber = BaseWeightPerturber(slots, guard=self._require_step)
        ctx = AttachContext(model=model, slots=slots, perturber=self.perturber, handle=self)
        for m in self.methods:
            m.on_attach(ctx)
        self._hooks = [
            model.register_forward_pre_hook(self._pre_forward_hook),
            model.register_forward_hook(self._forward_hook, with_kwargs=True),
        ]
        for s in slots:
            _ATTACHED_LAYERS.add(s.layer)
        self._attached = True

    # --- queries -----------------------------------------------------------------------------------------------
    def method(self, name: str) -> Method:
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(f"no attached method {name!r}; attached: {[m.name for m in self.methods]}")

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Tell the handle which optimizer trains the adapter (LoRASC resets its state at stage boundaries)."""
        self.optimizer = optimizer

    @property
    def in_step(self) -> bool:
        return self._phase is not _Phase.IDLE

    def delta_factors(self, slot: LoraSlot) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Low-rank terms (U (n_out, k), V (k, n_in)) whose products the layer adds to its base weight now:
        the trained adapter's (s*B, A), plus any frozen factors a method keeps (LoRASC's slow experts)."""
        terms = [(slot.scaling * slot.lora_B.weight, slot.lora_A.weight)]
        for m in self.methods:
            extra = getattr(m, "extra_delta_factors", None)
            if extra is not None:
                terms.extend(extra(slot))
        return terms

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
        self._phase = _Phase.FORWARD
        self._reg_in_outputs = self._reg_by_hand = 0
        self.forward_index = -1
        try:
            for m in self.methods:
                m.begin_step(self.global_step)
        except BaseException:
            self._phase = _Phase.IDLE  # the step never started: a corrected retry must not see "called twice"
            raise

    def regularizer(self) -> torch.Tensor | None:
        """Sum of the attached methods' loss terms (e.g. RM-LoRA's lambda * R(A, B)); None if there are none."""
        terms = [t for t in (m.regularizer() for m in self.methods) if t is not None]
        if not terms:
            return None
        return terms[0] if len(terms) == 1 else torch.stack([t.float() for t in terms]).sum()

    def loss(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss` plus the regularizers: use this when you compute the loss yourself instead of the model."""
        self._require_step()
        reg = self.regularizer()
        if reg is None:
            return loss
        self._reg_by_hand += 1
        return loss + reg.to(loss.dtype)

    def pre_optimizer_step(self) -> None:
        """After backward and gradient clipping, right before `optimizer.step()`."""
        self._check_attached()
        if self._phase is not _Phase.FORWARD:
            raise RuntimeError(f"pre_optimizer_step() needs begin_step() first (the handle is {self._phase.value})")
        if self._has_regularizer():
            if self._reg_in_outputs == 0 and self._reg_by_hand == 0:
                raise RuntimeError(
                    "an attached method adds a loss term, but it reached no loss in this step: the model returned "
                    "no `loss`, so compute `loss = handle.loss(your_loss)` before backward"
                )
            if self._reg_in_outputs and self._reg_by_hand:
                raise RuntimeError(
                    "the regularizer was added twice: the model's returned loss already contains it, so do not "
                    "also pass that loss through handle.loss()"
                )
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

    def _gradients_finite(self) -> bool:
        grads = [p.grad for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        if not grads:
            return True
        # One fused reduction and a single host sync per step.
        return bool(torch.stack([n.float() for n in torch._foreach_norm(grads)]).isfinite().all())

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """`pre_optimizer_step()`, `optimizer.step()`, `post_optimizer_step()` in one call."""
        self.pre_optimizer_step()
        optimizer.step()
        self.post_optimizer_step()

    # --- hooks -------------------------------------------------------------------------------------------------
    def _require_step(self) -> None:
        if self._phase is not _Phase.FORWARD:
            raise RuntimeError(
                f"training-mode forward while the genlora handle is {self._phase.value}: call handle.begin_step() "
                "before the step's first forward (or model.eval() for evaluation)"
            )

    def _has_regularizer(self) -> bool:
        return any(getattr(m, "has_regularizer", False) for m in self.methods)

    def _pre_forward_hook(self, module, args):
        if module.training:
            self._require_step()
            self.forward_index += 1

    def _forward_hook(self, module, args, kwargs, output):
        if not module.training or not self._has_regularizer():
            return output
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if loss is None:
            return output
        reg = self.regularizer()
        if "num_items_in_batch" in kwargs and self.grad_accum_steps > 1:
            reg = reg / self.grad_accum_steps
        output["loss"] = loss + reg.to(loss.dtype)
        self._reg_in_outputs += 1
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
        for s in self.slots:
            _ATTACHED_LAYERS.discard(s.layer)
        self._phase = _Phase.IDLE
        self._attached = False

    def config_dict(self) -> dict[str, Any]:
        return {
            "genlora_format": _STATE_FORMAT,
            "adapter_name": self.adapter_name,
            "total_steps": self.total_steps,
            "methods": [{"method": m.name, **m.config.to_dict()} for m in self.methods],
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly: step counter and each method's own state."""
        return {
            **self.config_dict(),
            "global_step": self.global_step,
            "method_states": {m.name: m.state_dict() for m in self.methods},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()`; the attached methods and their configs must match the saved ones."""
        if self.in_step:
            raise RuntimeError("load_state_dict() between steps only")
        if state.get("genlora_format") != _STATE_FORMAT:
            raise ValueError(f"unsupported genlora state format {state.get('genlora_format')!r}")
        mine = self.config_dict()["methods"]
        if state.get("methods") != mine:
            raise ValueError(f"saved state is for methods {state.get('methods')}, but the handle has {mine}")
        step = state.get("global_step")
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"global_step must be a non-negative integer, got {step!r}")
        for m in self.methods:
            m.load_state_dict(state["method_states"][m.name])
        self.global_step = step
        self.total_steps = state.get("total_steps", self.total_steps)

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

    def save_config(self, directory: str | os.PathLike) -> str:
        """Write `genlora_config.json` (the attached methods and their options) into `directory`, atomically."""
        path = os.path.join(directory, GENLORA_CONFIG_NAME)
        write_json_atomic(path, self.config_dict())
        return path

    def save_pretrained(self, directory: str | os.PathLike, **kwargs: Any) -> None:
        """`model.save_pretrained(directory)` (a standard PEFT adapter) plus `genlora_config.json` beside it."""
        if not hasattr(self.model, "save_pretrained"):
            raise TypeError("save_pretrained needs a peft.PeftModel; save the adapter with PEFT's helpers instead")
        if self.in_step:
            raise RuntimeError("save between steps, not in the middle of one")
        bad = [s.name for s in self.slots if not all(bool(p.isfinite().all()) for p in (s.a_weight, s.b_weight))]
        if bad:
            raise ValueError(f"refusing to save: the adapter holds NaN/inf in {bad[:3]} ({len(bad)} layers)")
        factors = {}
        changed = False
        for slot in self.slots:
            plain = [(slot.scaling * slot.lora_B.weight.detach(), slot.lora_A.weight.detach())]
            terms = plain
            for m in self.methods:
                terms = m.export_factors(slot, terms)
            changed = changed or terms is not plain
            factors[slot.name] = terms
        os.makedirs(directory, exist_ok=True)
        if changed:
            from .export import save_factor_adapter

            save_factor_adapter(self.model, self.adapter_name, self.slots, factors, directory, **kwargs)
        else:
            self.model.save_pretrained(directory, **kwargs)
        self.save_config(directory)


def write_atomic(path: str | os.PathLike, write: Callable[[Any], None], binary: bool = True) -> None:
    """Call `write(file)` on a temporary file in the same folder, then rename it to `path`: readers (and a crash)
    see either the old file or the whole new one, never half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_atomic(path, lambda f: json.dump(data, f, indent=2, sort_keys=True), binary=False)


def base_checksums(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Exact checksums of every frozen floating-point tensor: the bit patterns summed plainly and with position
    weights (int64, wrapping), so any changed bit changes them. One pass over the weights, no copy kept."""
    sums = {}
    int_views = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}
    for name, p in model.named_parameters():
        if p.requires_grad or not p.is_floating_point():
            continue
        bits = p.detach().reshape(-1).view(int_views[p.element_size()]).to(torch.int64)
        weights = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) % 65521 + 1
        sums[name] = (int(bits.sum()), int((bits * weights).sum()))
    return sums
