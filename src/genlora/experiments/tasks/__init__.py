"""The tasks of the one experiment runner: `text` (sentence classification), `vision` (few-shot image
classification) and `lm` (causal LM fine-tuning). Each is a `Task` (base.py); everything else is shared."""

from __future__ import annotations

from .base import Encoded, Task, eval_batches, train_batches


def get_task(name: str) -> Task:
    """A fresh task object for `name` (text, vision, lm)."""
    if name == "text":
        from .text import TextClassification

        return TextClassification()
    if name == "vision":
        from .vision import ImageClassification

        return ImageClassification()
    if name == "lm":
        from .lm import CausalLM

        return CausalLM()
    raise ValueError(f"task must be one of ['text', 'vision', 'lm'], got {name!r}")


__all__ = ["Encoded", "Task", "eval_batches", "get_task", "train_batches"]
