"""The deployed model: one model, whatever the path (docs/methods.md, "The deployed model").

Methods define the model a run ends with (`Method.deploy_factors`: LoRASC's `W + S + alpha s*B*A`, LoRA Dropout's
expectation) and terms the live model adds in training (`Method.frozen_delta_factors`: LoRASC's slow experts).
`Deployment` makes every way a user reaches the model agree with that definition:

* forwards: a hook on each LoRA layer adds, in training, the frozen terms and, in eval mode, the deployed model minus
  PEFT's own `s*B*A x` (nothing when the deployed model is the trained adapter);
* saving: the PEFT model's `save_pretrained` (called by `Trainer.save_model` and every checkpoint) writes the deployed
  model as a plain PEFT adapter plus `genlora_config.json`;
* loading: its `load_adapter` (called when the Trainer resumes or loads the best checkpoint) restores the exact
  training state from a checkpoint's `genlora_state.pt`, and refuses a deployed adapter that would be transformed
  twice;
* merging: PEFT's `merge_and_unload` / `merge_adapter` are refused where they would give another model;
  `merged_model()` gives the deployed one, dense.

The PEFT methods are replaced by instance attributes (marked `__genlora_patch__`), removed again on detach.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .files import write_json_atomic
from .lora_layers import LoraSlot
from .method import Factors

if TYPE_CHECKING:
    from .handle import GenLoRAHandle

GENLORA_CONFIG_NAME = "genlora_config.json"
GENLORA_STATE_NAME = "genlora_state.pt"
_PATCHED = ("save_pretrained", "load_adapter", "merge_and_unload", "merge_adapter")


class Deployment:
    """The deployed model of a handle's methods: its terms, forwards, save, load and merge paths."""

    def __init__(self, handle: GenLoRAHandle):
        self.handle = handle
        self._hooks: list = []
        self._patched: dict[str, object] = {}
        self._originals: dict[str, object] = {}
        if any(m.adds_delta_terms() for m in handle.methods):
            for s in handle.slots:
                self._hooks.append(s.layer.register_forward_hook(self._make_hook(s), with_kwargs=True))
        self._patch_peft_methods()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for name, previous in self._patched.items():
            if previous is None:
                self.handle.model.__dict__.pop(name, None)
            else:
                object.__setattr__(self.handle.model, name, previous)
        self._patched = {}

    # --- the terms -----------------------------------------------------------------------------------------------
    def factors(self, slot: LoraSlot) -> tuple[Factors, bool, tuple[torch.Tensor, torch.Tensor]]:
        """(deployed terms of `slot`, whether they differ from the trained adapter's one term, that term)."""
        raw = slot.trained_factors()
        plain: Factors = [raw]
        terms = plain
        for m in self.handle.methods:
            terms = m.deploy_factors(slot, terms)
        return terms, terms is not plain, raw

    def extra_terms(self, slot: LoraSlot, training: bool) -> Factors:
        """Terms a forward adds to PEFT's own W x + s*B*A x: in training the frozen terms (the live model); in eval
        the deployed model minus PEFT's term (an empty list when the deployed model is the trained adapter)."""
        if training:
            terms: Factors = []
            for m in self.handle.methods:
                terms.extend(m.frozen_delta_factors(slot))
            return terms
        deployed, changed, (raw_u, raw_v) = self.factors(slot)
        if not changed:
            return []
        *rest, (last_u, last_v) = deployed
        if last_v is raw_v:  # methods keep the trained term last and rescale only its U: one correction term
            return [*rest, (last_u - raw_u, raw_v)]
        return [*deployed, (-raw_u, raw_v)]

    def differs_from_peft(self) -> bool:
        """Whether the model differs from PEFT's view of the live adapter (LoRASC's slow experts, LoRA Dropout's
        expectation export): then PEFT's own merge, or loading a deployed adapter into the live one, would give
        another model."""
        return any(self.extra_terms(s, False) or self.extra_terms(s, True) for s in self.handle.slots)

    def _make_hook(self, slot: LoraSlot):
        layer = slot.layer

        def add_terms(module, args, kwargs, output):
            if layer.merged or not slot.active:
                return output
            terms = self.extra_terms(slot, module.training)
            if not terms:
                return output
            if kwargs.get("adapter_names") is not None:
                raise NotImplementedError("mixed-adapter batches (adapter_names=...) are not supported by genlora's "
                                          "LoRASC / expectation-deployed adapters")
            x = args[0] if args else kwargs["x"]
            if len(terms) == 1:  # LoRASC in training: the slow factors, already one concatenation (no copy)
                (u, v), = terms
            else:
                u = torch.cat([t[0] for t in terms], dim=1)  # (n_out, K)
                v = torch.cat([t[1] for t in terms], dim=0)  # (K, n_in)
            dtype = slot.a_weight.dtype  # compute like PEFT's own LoRA term: in the adapter's dtype
            x = x.to(dtype) if x.is_floating_point() else x  # (embedding ids stay integers)
            delta = slot.kind.apply_lowrank(slot, x, u.to(dtype), v.to(dtype))
            return (output + delta).to(output.dtype)  # added in the wider dtype, rounded once, as PEFT does

        return add_terms

    # --- PEFT's save / load / merge paths --------------------------------------------------------------------
    def _patch_peft_methods(self) -> None:
        from peft import PeftModel

        model = self.handle.model
        if not isinstance(model, PeftModel):
            return
        originals = self._originals = {name: getattr(model, name) for name in _PATCHED}

        def save_pretrained(save_directory, *args, **kwargs):
            if args:  # name PEFT's positional options, so the deployed export can pass them on as keywords
                bound = inspect.signature(originals["save_pretrained"]).bind(save_directory, *args, **kwargs)
                kwargs = {k: v for k, v in bound.arguments.items() if k not in ("save_directory", "kwargs")}
                kwargs.update(bound.arguments.get("kwargs", {}))
            return self.save_pretrained(save_directory, **kwargs)

        def load_adapter(model_id, adapter_name, *args, **kwargs):
            return self._load_adapter(model_id, adapter_name, *args, **kwargs)

        def refuse_merge(name):
            def merge(*args, **kwargs):
                if self.differs_from_peft():
                    raise RuntimeError(
                        f"{name}() would merge only the trained adapter, not the model genlora's methods define "
                        f"({[m.name for m in self.handle.methods]}): use handle.merged_model() for a dense copy of "
                        "the deployed model (handle.save_merged(dir) to write it), or handle.save_pretrained(dir)"
                    )
                return originals[name](*args, **kwargs)

            return merge

        patches = {"save_pretrained": save_pretrained, "load_adapter": load_adapter,
                   "merge_and_unload": refuse_merge("merge_and_unload"), "merge_adapter": refuse_merge("merge_adapter")}
        for name, fn in patches.items():
            fn.__genlora_patch__ = True
            self._patched[name] = model.__dict__.get(name)
            object.__setattr__(model, name, fn)

    def _load_adapter(self, model_id, adapter_name, *args, **kwargs):
        handle = self.handle
        folder = os.fspath(model_id)
        if adapter_name == handle.adapter_name and os.path.isdir(folder):
            state = os.path.join(folder, GENLORA_STATE_NAME)
            if os.path.isfile(state):
                # A checkpoint of this run (Trainer resume, load_best_model_at_end): the adapter file there is the
                # deployed model, the training state beside it is what continues the run exactly.
                handle.load_state(state)
                return None
            config = os.path.join(folder, GENLORA_CONFIG_NAME)
            if os.path.isfile(config):
                with open(config) as f:
                    if json.load(f).get("deployed_differs_from_trained_adapter"):
                        raise ValueError(
                            f"{folder} has no {GENLORA_STATE_NAME}: it holds the deployed model of a genlora run, not "
                            "a training state, and loading it into the live adapter would apply the methods' "
                            "transform twice. Load it on a fresh base model with PeftModel.from_pretrained, or restore "
                            f"a run from a checkpoint that has {GENLORA_STATE_NAME} (handle.load_state(path))"
                        )
        return self._originals["load_adapter"](model_id, adapter_name, *args, **kwargs)

    def save_config(self, directory: str | os.PathLike) -> str:
        """Write `genlora_config.json` (the methods as run, with their seeds) into `directory`, atomically."""
        path = os.path.join(directory, GENLORA_CONFIG_NAME)
        write_json_atomic(path, {**self.handle.config_dict(),
                                 "deployed_differs_from_trained_adapter": self.differs_from_peft()})
        return path

    def _check_exportable(self) -> None:
        handle = self.handle
        if handle.in_step:
            raise RuntimeError("save between steps, not in the middle of one")
        for m in handle.methods:
            reason = m.deployable_as_adapter()
            if reason is not None:
                raise ValueError(reason)
        bad = [s.name for s in handle.slots if not all(bool(p.isfinite().all()) for p in (s.a_weight, s.b_weight))]
        if bad:
            raise ValueError(f"refusing to save: the adapter holds NaN/inf in {bad[:3]} ({len(bad)} layers)")

    def save_pretrained(self, directory: str | os.PathLike, **kwargs: Any) -> None:
        """See `GenLoRAHandle.save_pretrained`."""
        from peft import PeftModel

        handle = self.handle
        if not isinstance(handle.model, PeftModel):
            raise TypeError("save_pretrained needs a peft.PeftModel; save the adapter with PEFT's helpers instead")
        self._check_exportable()
        save = self._originals["save_pretrained"]
        factors, changed = {}, False
        for slot in handle.slots:
            terms, slot_changed, _ = self.factors(slot)
            changed = changed or slot_changed
            factors[slot.name] = terms
        if not kwargs.get("is_main_process", True):
            if not changed:
                save(directory, **kwargs)  # PEFT's own path for non-writer ranks (collectives included)
            return
        os.makedirs(directory, exist_ok=True)
        if changed:
            from .export import save_factor_adapter

            state = kwargs.pop("state_dict", None)
            save_factor_adapter(handle.model, handle.adapter_name, handle.slots, factors, directory, save,
                                state_dict=state, **kwargs)
        else:
            save(directory, **kwargs)
        self.save_config(directory)

    def merged_model(self) -> nn.Module:
        """See `GenLoRAHandle.merged_model`."""
        from .export import merged_dense_copy

        handle = self.handle
        if handle.in_step:
            raise RuntimeError("export between steps, not in the middle of one")
        factors = {s.name: self.factors(s)[0] for s in handle.slots}

        def dense_extra(slot):
            parts = [t for t in (m.dense_extra(slot) for m in handle.methods) if t is not None]
            return sum(parts) if parts else None

        return merged_dense_copy(handle.model, handle.slots, factors, dense_extra=dense_extra,
                                 share=(handle, self, *handle.methods))
