"""LoRA Dropout's test-time ensemble (Lin et al., arXiv 2404.09610, Sec. 4.3): average the predicted probabilities of
`n_test` forwards, each with its own dropout masks on A's input and B's output features,

    p(y | x) = (1/N) Σ_k softmax(z_k(x)),   z_k = logits of the model with masks m_k.

Probabilities, not logits, are averaged: Theorem 4.5 (Jensen's inequality for a loss convex in the post-softmax
output) is about the mean of the probabilities, and averaging logits would be a different, geometric-mean ensemble.
The result is returned as `logits = log(mean probs)` (fp32), so code that takes argmax, softmax or a cross-entropy
of `logits` keeps working: softmax(log p) = p, and the cross-entropy is the ensemble's NLL. For causal LMs this is
the averaged next-token distribution at every position.

Two ways to use it, both with masks fixed per member (member k uses the same masks for every batch)::

    with genlora.test_time_ensemble(model, handle, n_test=4):   # around an existing model's forward
        out = model(**batch)                                    # one call, n_test masked forwards
    ensemble = genlora.test_time_ensemble(model, handle)        # or as a wrapper
    out = ensemble(**batch)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from .config import check_choice, check_int
from .core.handle import GenLoRAHandle
from .core.method import Method
from .methods.lora_dropout import LoRADropout

TASKS = ("auto", "classification", "causal_lm")
IGNORE_INDEX = -100  # transformers' label value for positions without a target


def test_time_ensemble(
    model: nn.Module, handle: GenLoRAHandle | Method, n_test: int | None = None, *, task: str = "auto"
) -> TestTimeEnsemble:
    """The test-time ensemble of the LoRA Dropout attached through `handle` (or the `LoRADropout` itself).

    Args:
        model: the model to call (the PEFT model the handle is attached to, or a module containing its LoRA layers).
        n_test: masked forwards per call; default: the method's `n_test`.
        task: how a `labels` argument becomes the ensemble's loss (NLL of the mean probabilities):
            'classification' (labels aligned with logits[..., :-1 dims], e.g. (B,) for (B, C)), 'causal_lm' (labels
            shifted by one, as transformers' causal LMs do), or 'auto' (causal_lm for *ForCausalLM models / PEFT task
            CAUSAL_LM, else classification).

    Returns a `TestTimeEnsemble`: call it like the model, or use it as a context manager around `model(...)`.
    Needs `model.eval()`; runs under the caller's grad mode (wrap it in `torch.no_grad()` for inference).
    """
    return TestTimeEnsemble(model, handle, n_test, task=task)


test_time_ensemble.__test__ = False  # a `test_*` name: keep pytest from collecting it where it is imported


class TestTimeEnsemble:
    """See `test_time_ensemble`. Output: a tensor if the model returns a tensor of logits, else the model's output
    class (or a dict) holding `logits` = log(mean probs) and `loss` (ensemble NLL, when `labels` were passed).
    Other fields (hidden states, caches) of the members are dropped: they describe single members, not the ensemble.
    A KV cache is not supported (each member would need its own), so generate with `use_cache=False`."""

    __test__ = False

    def __init__(self, model: nn.Module, handle: GenLoRAHandle | Method, n_test: int | None = None, *, task="auto"):
        self.method = _lora_dropout_of(handle)
        self.n_test = self.method.config.n_test if n_test is None else n_test
        check_int("n_test", self.n_test, low=1)
        check_choice("task", task, TASKS)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        layers = {id(m) for m in model.modules()}
        if not all(id(s.layer) in layers for s in self.method.ctx.slots):
            raise ValueError("model does not contain the LoRA layers the handle is attached to")
        config = getattr(model, "config", None)
        if getattr(config, "problem_type", None) in ("multi_label_classification", "regression"):
            raise ValueError(f"the ensemble averages softmax probabilities; problem_type={config.problem_type!r} "
                             "has no softmax output")
        self.model = model
        self.task = _resolve_task(model, self.method, task)
        self._restore = None

    # --- wrapper -----------------------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any):
        return self._run(self.model, args, kwargs)

    # --- context manager ---------------------------------------------------------------------------------------
    def __enter__(self) -> TestTimeEnsemble:
        if self._restore is not None:
            raise RuntimeError("this test-time ensemble is already active")
        # Patch the innermost model: a PeftModel's forward and its `generate` (which PEFT hands to the transformers
        # model, bypassing PeftModel.forward) both end in that model's forward.
        model = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        had_own = "forward" in model.__dict__
        previous = model.__dict__.get("forward")
        original = model.forward  # bound method, or an instance-level patch (accelerate hooks) that we wrap

        @functools.wraps(original)
        def forward(*args, **kwargs):
            return self._run(original, args, kwargs)

        # An instance attribute, removed on exit: parameters, hooks and state dict keys stay untouched.
        model.forward = forward

        def restore():
            if had_own:
                model.forward = previous
            else:
                del model.forward

        self._restore = restore
        return self

    def __exit__(self, *exc) -> None:
        restore, self._restore = self._restore, None
        if restore is not None:
            restore()

    # --- the ensemble ------------------------------------------------------------------------------------------
    def _run(self, forward, args, kwargs):
        method = self.method
        if method.ctx is None:
            raise RuntimeError("the LoRA Dropout of this ensemble was detached")
        if any(s.lora_A.training for s in method.ctx.slots):
            raise RuntimeError("the test-time ensemble needs model.eval() (training-mode forwards belong to a step)")
        if kwargs.get("past_key_values") is not None:
            raise ValueError("the test-time ensemble does not support a KV cache; pass use_cache=False")
        log_mean = None  # running log(sum_k p_k), fp32, shape of the logits
        out_type = None
        for k in range(self.n_test):
            with method.ensemble_member(k):
                out = forward(*args, **kwargs)
            if out_type is None:
                out_type = type(out)
            logits = _logits_of(out)
            del out  # do not keep a member's caches and hidden states alive during the next forward
            if logits.shape[-1] < 2:
                raise ValueError(f"the ensemble averages class probabilities; logits of shape {tuple(logits.shape)} "
                                 "have fewer than two classes")
            # dtype= computes in fp32 without first materialising an fp32 copy of bf16/fp16 logits (T x V x 4 bytes)
            logp = torch.log_softmax(logits, -1, dtype=torch.float32)
            if log_mean is None:
                log_mean = logp
            elif torch.is_grad_enabled() and (log_mean.requires_grad or logp.requires_grad):
                log_mean = torch.logaddexp(log_mean, logp)
            else:
                torch.logaddexp(log_mean, logp, out=log_mean)  # in place: one extra logits-sized buffer in all
        # log-sum-exp of log-probabilities, not a sum of probabilities: tiny probabilities do not underflow to 0.
        log_mean = log_mean - math.log(self.n_test)
        loss = self._nll(log_mean, kwargs)
        if issubclass(out_type, torch.Tensor):
            return log_mean
        fields = {"logits": log_mean}
        if loss is not None:
            fields["loss"] = loss
        try:
            return out_type(**fields)
        except TypeError:
            return fields

    def _nll(self, log_mean: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
        """NLL of the ensemble distribution with transformers' conventions: mean over positions with a label
        (-100 = none), or the sum over `num_items_in_batch` when the Trainer passes it."""
        labels = kwargs.get("labels")
        if labels is None:
            return None
        if self.task == "causal_lm":
            shift_labels = kwargs.get("shift_labels")
            if shift_labels is None:  # position t predicts token t+1; the last position has no target
                shift_labels = F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
            labels = shift_labels
        if labels.dtype.is_floating_point or labels.shape != log_mean.shape[:-1]:
            raise ValueError(
                f"labels of shape {tuple(labels.shape)} ({labels.dtype}) do not index classes of logits "
                f"{tuple(log_mean.shape)}; pass task='classification' or 'causal_lm' to test_time_ensemble"
            )
        flat = log_mean.reshape(-1, log_mean.shape[-1]), labels.reshape(-1).to(log_mean.device)
        num_items = kwargs.get("num_items_in_batch")
        if num_items is None:
            return F.nll_loss(*flat, ignore_index=IGNORE_INDEX)
        # The Trainer's token count over all micro-batches: the same normalization the model's own loss uses.
        if torch.is_tensor(num_items):
            num_items = num_items.to(log_mean.device)
        return F.nll_loss(*flat, ignore_index=IGNORE_INDEX, reduction="sum") / num_items


def _lora_dropout_of(handle) -> Method:
    if isinstance(handle, LoRADropout):
        method = handle
    elif isinstance(handle, GenLoRAHandle):
        try:
            method = handle.method(LoRADropout.config_class.method_name)
        except KeyError:
            raise ValueError("the test-time ensemble needs a LoRADropout attached to the handle") from None
    else:
        raise TypeError(f"handle must be a GenLoRAHandle or a LoRADropout, got {type(handle).__name__}")
    if method.ctx is None:
        raise RuntimeError("the LoRADropout is not attached: genlora.attach(model, LoRADropout(...)) first")
    if method.config.deploy != "ensemble":
        raise ValueError(
            f"this LoRADropout deploys as {method.config.deploy!r} (the expectation over masks, merged into the "
            "adapter): its model is the plain eval-mode forward; the test-time ensemble needs deploy='ensemble'"
        )
    return method


def _resolve_task(model: nn.Module, method: Method, task: str) -> str:
    if task != "auto":
        return task
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, Mapping) and method.ctx.handle.adapter_name in peft_config:
        task_type = getattr(peft_config[method.ctx.handle.adapter_name], "task_type", None)
        if getattr(task_type, "value", task_type) == "CAUSAL_LM":
            return "causal_lm"
    get_base = getattr(model, "get_base_model", None)
    for m in (model, get_base() if callable(get_base) else None):
        if m is not None and type(m).__name__.endswith("ForCausalLM"):
            return "causal_lm"
    return "classification"


def _logits_of(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and out.get("logits") is not None:
        return out["logits"]
    raise TypeError(
        f"the test-time ensemble needs a model returning logits (a tensor, or an output with `logits`), got "
        f"{type(out).__name__}; with transformers pass return_dict=True"
    )
