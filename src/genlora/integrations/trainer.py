"""A thin transformers `TrainerCallback` that drives a genlora handle from `Trainer.train()`.

All logic lives in the handle (usable from any loop); this file only maps Trainer events onto it:
`on_step_begin` = start of an accumulation cycle, `on_pre_optimizer_step` = after clipping, before
`optimizer.step()`, `on_optimizer_step` = right after it.
"""

from __future__ import annotations

import os

from transformers import TrainerCallback

from ..core.handle import GenLoRAHandle


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
        # When resuming from a checkpoint the Trainer restores its step counter; follow it.
        self.handle.global_step = state.global_step

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

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
            self.handle.save_config(args.output_dir)
