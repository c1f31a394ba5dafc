"""A thin transformers `TrainerCallback` that drives a genlora handle from `Trainer.train()`, and a Trainer mixin for
what a callback cannot do.

All logic lives in the handle (usable from any loop); the callback only maps Trainer events onto it:
`on_step_begin` = start of an accumulation cycle, `on_pre_optimizer_step` = after clipping, before
`optimizer.step()`, `on_optimizer_step` = right after it. Saving needs nothing here: while the handle is attached,
the model's own `save_pretrained` (which `Trainer.save_model` and every checkpoint call) writes the deployed model,
and its `load_adapter` (which resuming and `load_best_model_at_end` call) restores the run from the checkpoint's
`genlora_state.pt`.
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer, TrainerCallback

from ..core.handle import GENLORA_STATE_NAME, GenLoRAHandle


class GenLoRACallback(TrainerCallback):
    """Usage: `Trainer(model=peft_model, args=args, ..., callbacks=[GenLoRACallback(handle)])`.

    The regularizers (RM-LoRA) are added to the loss the model returns; with `compute_loss_func`, label smoothing or
    a trainer that computes its own loss (TRL's DPO), use `GenLoRATrainerMixin`, which adds them there.
    """

    def __init__(self, handle: GenLoRAHandle):
        if not isinstance(handle, GenLoRAHandle):
            raise TypeError(f"GenLoRACallback needs the handle returned by genlora.attach, got {type(handle).__name__}")
        self.handle = handle

    def on_train_begin(self, args, state, control, **kwargs):
        handle = self.handle
        if handle.total_steps is None and state.max_steps > 0:
            handle.configure(total_steps=state.max_steps)
        handle.configure(grad_accum_steps=args.gradient_accumulation_steps)
        if kwargs.get("optimizer") is not None:
            handle.bind_optimizer(kwargs["optimizer"])
        if handle.steps_per_epoch is None:  # LoRASC's stage_per_epoch: one epoch of optimizer steps
            steps = update_steps_per_epoch(kwargs.get("train_dataloader"), args)
            if steps is not None:
                handle.configure(steps_per_epoch=steps)
        if args.save_strategy != "no":
            for m in handle.methods:  # checkpoints would fail mid-run: refuse before the first step
                reason = m.deployable_as_adapter()
                if reason is not None:
                    raise ValueError(f"the Trainer saves checkpoints (save_strategy={args.save_strategy!r}), but {reason}"
                                     "; set save_strategy='no' and save with handle.save_merged at the end")
        if state.global_step > 0 and handle.global_step != state.global_step:
            # Resuming from a checkpoint whose adapter the Trainer did not load through the model (e.g. a checkpoint
            # outside output_dir needs handle.load_state(path) before train()): restore genlora's state saved
            # beside it. A checkpoint without one cannot be continued exactly, so it is an error, not a guess.
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            path = os.path.join(folder, GENLORA_STATE_NAME)
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"resuming at step {state.global_step}, but {path} is missing: genlora's state (step counter, "
                    "LoRASC stages, ...) was not saved with that checkpoint"
                )
            handle.load_state(path)
            if handle.global_step != state.global_step:
                raise ValueError(f"{path} is for step {handle.global_step}, the Trainer is at {state.global_step}")

    def on_step_begin(self, args, state, control, **kwargs):
        if kwargs.get("optimizer") is not None and self.handle.optimizer is None:
            self.handle.bind_optimizer(kwargs["optimizer"])
        self.handle.begin_step()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.handle.pre_optimizer_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.handle.post_optimizer_step()

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                self.handle.save_config(folder)
                self.handle.save_state(os.path.join(folder, GENLORA_STATE_NAME))

    def on_train_end(self, args, state, control, **kwargs):
        if self.handle.base_checksums is not None:
            self.handle.verify_base()
        if state.is_world_process_zero and args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
            self.handle.save_config(args.output_dir)


class GenLoRATrainerMixin:
    """Trainer mixin for what a callback cannot do. Usage: `genlora.GenLoRATrainer(model=..., args=...,
    genlora_handle=handle)`, or `class MyTrainer(GenLoRATrainerMixin, SFTTrainer)` (any Trainer subclass, TRL's
    included). It adds `GenLoRACallback(handle)` itself when missing.

    - `training_step`: with several passes per batch (LoRA Dropout's n_train > 1), runs the batch that many times,
      each with its own masks and loss / n (the scaling happens in `compute_loss`, so custom losses, label smoothing
      and accumulation are covered).
    - `compute_loss`: when the loss did not come from the model's own forward (`compute_loss_func`, label smoothing,
      TRL's DPO loss), adds the attached methods' regularizers to it, exactly once per micro-step, weighted so that
      each optimizer step's gradient gets lambda * grad R once, as the Trainer then scales the loss.
    - `prediction_step`: inside `genlora.test_time_ensemble` when `genlora_eval_ensemble` is True, or when it is
      None (default) and a LoRA Dropout deploys as an ensemble; eval_loss is then the ensemble's NLL and the
      predictions are log(mean probs).
    """

    def __init__(self, *args, genlora_handle: GenLoRAHandle | None = None, genlora_eval_ensemble: bool | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        callbacks = [cb for cb in self.callback_handler.callbacks if isinstance(cb, GenLoRACallback)]
        if genlora_handle is None:
            if len(callbacks) != 1:
                raise TypeError(f"{type(self).__name__} needs genlora_handle=<the handle returned by genlora.attach>")
            genlora_handle = callbacks[0].handle
        if not isinstance(genlora_handle, GenLoRAHandle):
            raise TypeError(f"genlora_handle must be the handle returned by genlora.attach, got "
                            f"{type(genlora_handle).__name__}")
        if any(cb.handle is not genlora_handle for cb in callbacks):
            raise ValueError("a GenLoRACallback for another handle is registered; pass one handle")
        if not callbacks:
            self.add_callback(GenLoRACallback(genlora_handle))
        if genlora_eval_ensemble not in (None, True, False):
            raise TypeError(f"genlora_eval_ensemble must be None (auto), True or False, got {genlora_eval_ensemble!r}")
        self.genlora_handle = genlora_handle
        self.genlora_eval_ensemble = genlora_eval_ensemble
        self._genlora_instance = None

    def _genlora_dropout(self):
        try:
            return self.genlora_handle.method("lora_dropout")
        except KeyError:
            return None

    def training_step(self, model, inputs, *args, **kwargs):
        handle = self.genlora_handle
        if handle.passes_per_batch() == 1:
            return super().training_step(model, inputs, *args, **kwargs)
        total = None
        for inst in handle.train_instances():
            self._genlora_instance = inst
            try:  # each call prepares its own copy of `inputs`, so the batch can be run again
                loss = super().training_step(model, inputs, *args, **kwargs)
            finally:
                self._genlora_instance = None
            total = loss if total is None else total + loss  # the sum of loss / n: the mean, for logging
        return total

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        handle = self.genlora_handle
        since = handle.regularizer_terms if handle.in_step else None
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        loss, outputs = result if return_outputs else (result, None)
        if (since is not None and model.training and torch.is_grad_enabled() and handle.objective.active
                and not handle.regularizer_in(loss, since)):
            # the loss was not built on the model's returned loss (a custom loss, label smoothing, TRL's DPO)
            loss = handle.loss(loss, share=self._genlora_regularizer_share(kwargs.get("num_items_in_batch")))
        inst = self._genlora_instance
        if inst is not None:
            loss = inst.scale(loss)
        return (loss, outputs) if return_outputs else loss

    def _genlora_regularizer_share(self, num_items_in_batch) -> float:
        """The regularizer's weight in this micro-step's loss: the Trainer divides the loss by the accumulation
        steps unless it believes the loss is already normalized over the whole step (its `loss_is_scaled_for_ga`
        rule); in that case the share is 1/accumulation steps, so every optimizer step sums to lambda * R."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) or (
                getattr(self, "compute_loss_func", None) is not None)
        accum = self.genlora_handle.grad_accum_steps
        return 1.0 / accum if scaled else 1.0

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        dropout = self._genlora_dropout()
        use = self.genlora_eval_ensemble
        if use is None:
            use = dropout is not None and dropout.config.deploy == "ensemble"
        if not use:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        if dropout is None:
            raise ValueError("genlora_eval_ensemble=True needs a LoRADropout attached to the handle")
        from ..ensemble import test_time_ensemble

        # Patch the attached model's forward: `model` here may be a DDP/accelerate wrapper that calls into it.
        with test_time_ensemble(self.genlora_handle.model, self.genlora_handle):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)


class GenLoRATrainer(GenLoRATrainerMixin, Trainer):
    """`transformers.Trainer` plus `GenLoRATrainerMixin`: `GenLoRATrainer(model=..., args=..., genlora_handle=h)`."""


def update_steps_per_epoch(train_dataloader, args) -> int | None:
    """Optimizer steps per epoch as `Trainer.set_initial_training_values` counts them (the last, shorter
    accumulation cycle of an epoch is a step of its own); None for a dataloader without a length."""
    try:
        batches = len(train_dataloader)
    except TypeError:  # None, or an iterable dataset
        return None
    accum = args.gradient_accumulation_steps
    return max(batches // accum + int(batches % accum > 0), 1)
