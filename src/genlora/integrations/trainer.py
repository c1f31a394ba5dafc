"""A thin transformers `TrainerCallback` that drives a genlora handle from `Trainer.train()`.

All logic lives in the handle (usable from any loop); this file only maps Trainer events onto it:
`on_step_begin` = start of an accumulation cycle, `on_pre_optimizer_step` = after clipping, before
`optimizer.step()`, `on_optimizer_step` = right after it.
"""

from __future__ import annotations

import os

from transformers import TrainerCallback
from transformers import Trainer

from ..core.handle import GENLORA_STATE_NAME, GenLoRAHandle


class GenLoRACallback(TrainerCallback):
    """Usage: `Trainer(model=peft_model, args=args, ..., callbacks=[GenLoRACallback(handle)])`.

    The regularizers (RM-LoRA) are added to the loss the model returns; with `compute_loss_func` or label
    smoothing the model returns no loss and the step stops with an error telling you so.
    """

    def __init__(self, handle: GenLoRAHandle):
        if not isinstance(handle, GenLoRAHandle):
            raise TypeError(f"GenLoRACallback needs the handle returned by genlora.attach, got {type(handle).__name__}")
        self.handle = handle

    def on_train_begin(self, args, state, control, **kwargs):
        if self.handle.total_steps is None and state.max_steps > 0:
            self.handle.total_steps = state.max_steps
        self.handle.grad_accum_steps = args.gradient_accumulation_steps
        if kwargs.get("optimizer") is not None:
            self.handle.bind_optimizer(kwargs["optimizer"])
        if self.handle.steps_per_epoch is None:  # LoRASC's default stage length: one epoch of optimizer steps
            self.handle.steps_per_epoch = update_steps_per_epoch(kwargs.get("train_dataloader"), args)
        if state.global_step > 0 and self.handle.global_step != state.global_step:
            # Resuming: the Trainer restored its step counter from checkpoint-N; restore genlora's state saved
            # beside it (to resume from a checkpoint outside output_dir, call handle.load_state(path) before
            # train()). A checkpoint without one cannot be continued exactly, so it is an error, not a guess.
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            path = os.path.join(folder, GENLORA_STATE_NAME)
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"resuming at step {state.global_step}, but {path} is missing: genlora's state (step counter, "
                    "LoRASC stages, ...) was not saved with that checkpoint"
                )
            self.handle.load_state(path)
            if self.handle.global_step != state.global_step:
                raise ValueError(f"{path} is for step {self.handle.global_step}, the Trainer is at {state.global_step}")

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


# --- LoRA Dropout's n_train instances and test-time ensemble inside the Trainer -----------------------------------
class GenLoRATrainerMixin:
    """Trainer mixin for what a callback cannot do: LoRA Dropout's n_train forward/backward passes per batch and its
    test-time ensemble in evaluation. Usage: `genlora.GenLoRATrainer(model=..., args=..., genlora_handle=handle)`, or
    `class MyTrainer(GenLoRATrainerMixin, SFTTrainer)`. It adds `GenLoRACallback(handle)` itself when missing.

    - `training_step`: with n_train > 1, runs the batch n_train times, each with its own masks and loss / n_train
      (the scaling happens in `compute_loss`, so custom losses, label smoothing and accumulation are covered).
    - `prediction_step`: inside `genlora.test_time_ensemble` when `genlora_eval_ensemble` is True, or when it is
      None (default) and the LoRA Dropout deploys as an ensemble (`deploy="ensemble"`); eval_loss is then the
      ensemble's NLL and the predictions are log(mean probs).
    Without an attached LoRA Dropout it behaves like the Trainer plus the callback.
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
        dropout = self._genlora_dropout()
        if dropout is None or dropout.config.n_train == 1:
            return super().training_step(model, inputs, *args, **kwargs)
        total = None
        for inst in dropout.train_instances():
            self._genlora_instance = inst
            try:  # each call prepares its own copy of `inputs`, so the batch can be run again
                loss = super().training_step(model, inputs, *args, **kwargs)
            finally:
                self._genlora_instance = None
            total = loss if total is None else total + loss  # the sum of loss / n_train: the mean, for logging
        return total

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        inst = self._genlora_instance
        if inst is None:
            return result
        if return_outputs:
            return inst.scale(result[0]), result[1]
        return inst.scale(result)

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
