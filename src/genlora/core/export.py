"""Writing the deployed model when it is more than one rank-r LoRA term per layer (LoRASC's slow experts, LoRA
Dropout's expectation): two forms, both readable without genlora.

* `save_factor_adapter`: a standard PEFT adapter (adapter_config.json + adapter_model.safetensors) whose LoRA layer
  computes sum_j U_j V_j. The terms are concatenated to one LoRA of rank R = sum_j k_j,

      B_cat = [U_1 ... U_J]  (n_out, R),   A_cat = [V_1; ...; V_J]  (R, n_in),   B_cat A_cat = sum_j U_j V_j,

  and the config gets r = lora_alpha = R (scaling 1, since U_j already carries each term's scaling). This is what
  PEFT itself does when it converts PiSSA/OLoRA adapters back to plain LoRA (`[A | A0]`, `[B | -B0]`, rank 2r). The
  layer kind (core/layers.py) turns B_cat, A_cat into the layer's PEFT shapes (conv kernels, embedding factors).
* `merged_dense_copy`: a deep copy of the base model with W + sum_j U_j V_j (+ an optional dense term) merged into
  the weights and the LoRA layers removed, for `save_pretrained` as an ordinary transformers model. A quantized
  (bitsandbytes) base layer is dequantized and replaced by a float nn.Linear holding the merged weight.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections import Counter
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .lora_layers import LoraSlot

Factors = Sequence[tuple[torch.Tensor, torch.Tensor]]  # [(U (n_out, k_j), V (k_j, n_in)), ...]


def _require_peft_model(model: nn.Module, what: str):
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(f"{what} needs a peft.PeftModel (from get_peft_model), got {type(model).__name__}")


def concat_factors(slot: LoraSlot, terms: Factors) -> tuple[torch.Tensor, torch.Tensor]:
    """(B_cat (n_out, R), A_cat (R, n_in)) in fp32 with B_cat A_cat = sum_j U_j V_j; checks every term's shape."""
    b, a = slot.factor_views()
    n_out, n_in = b.shape[0], a.shape[1]
    if not terms:
        raise ValueError(f"no low-rank terms to export for LoRA layer {slot.name!r}")
    for u, v in terms:
        if u.dim() != 2 or v.dim() != 2 or u.shape[0] != n_out or v.shape[1] != n_in or u.shape[1] != v.shape[0]:
            raise ValueError(
                f"factors of {slot.name!r} must be U ({n_out}, k) and V (k, {n_in}), got {tuple(u.shape)} and "
                f"{tuple(v.shape)}"
            )
    b_cat = torch.cat([u.detach().float() for u, _ in terms], dim=1)  # (n_out, R)
    a_cat = torch.cat([v.detach().float() for _, v in terms], dim=0)  # (R, n_in)
    return b_cat, a_cat


def _module_keys(model: nn.Module, slots: Sequence[LoraSlot]) -> dict[str, str]:
    """slot.name -> the module's name inside the wrapped base model, the key PEFT's rank_pattern is matched against."""
    inner = model.base_model.model
    names = {id(m): n for n, m in inner.named_modules()}
    return {s.name: names[id(s.layer)] for s in slots}


def save_factor_adapter(
    model: nn.Module,
    adapter_name: str,
    slots: Sequence[LoraSlot],
    factors_by_slot_name: dict[str, Factors],
    directory: str | os.PathLike,
    save: Callable[..., Any],
    state_dict: dict[str, torch.Tensor] | None = None,
    **kwargs: Any,
) -> None:
    """Write `adapter_name` as a plain PEFT LoRA adapter whose layer `slot` computes sum_j U_j V_j.

    Args:
        model: the `peft.PeftModel` the slots belong to.
        adapter_name: the adapter to write (non-default adapters go into `directory/adapter_name`, as in PEFT).
        slots: every LoRA layer of the adapter.
        factors_by_slot_name: slot.name -> [(U (n_out, k), V (k, n_in)), ...], U including any scaling.
        directory: output folder.
        save: PEFT's own `save_pretrained` of `model` (unpatched).
        state_dict: the model's full state dict to start from (the Trainer passes a gathered one under sharding);
            default `model.state_dict()`.
        kwargs: passed to `save` (e.g. `safe_serialization`, `is_main_process`, `selected_adapters`).

    The file is produced by PEFT's own `save_pretrained`, fed a state dict whose LoRA entries for the slots are
    replaced by the concatenated factors, and a copy of the adapter's config with r = lora_alpha = R (rank_pattern /
    alpha_pattern for layers whose R differs from the most common one), use_rslora = False and
    init_lora_weights = True. So key names, metadata, modules_to_save and other adapters are exactly PEFT's, and
    `PeftModel.from_pretrained` loads it with no genlora import. The live model and its config are unchanged (the
    config is swapped in only for the duration of the call).
    """
    _require_peft_model(model, "save_factor_adapter")
    config = model.peft_config[adapter_name]
    if getattr(config, "use_dora", False):
        raise ValueError("a DoRA adapter cannot be exported as a concatenation of low-rank terms")
    keys = _module_keys(model, slots)
    state = dict(model.state_dict() if state_dict is None else state_dict)  # references; slot entries replaced
    ranks: dict[str, int] = {}
    for slot in slots:
        b_cat, a_cat = concat_factors(slot, factors_by_slot_name[slot.name])
        for suffix, value in slot.kind.peft_state(slot, b_cat, a_cat).items():
            key = f"{slot.name}.{suffix}"
            if key not in state:
                raise RuntimeError(f"state dict of the model has no {key!r}; attach genlora to the PeftModel itself")
            state[key] = value.to(state[key].dtype).contiguous()  # the dtype PEFT would have written
        ranks[keys[slot.name]] = a_cat.shape[0]

    export_config = copy.deepcopy(config)
    default_rank = Counter(ranks.values()).most_common(1)[0][0]
    # Full module names as pattern keys: PEFT matches them with re.match(r"(.*\.)?(key)$", name), i.e. exactly.
    pattern = {name: rank for name, rank in ranks.items() if rank != default_rank}
    export_config.r = default_rank
    export_config.lora_alpha = default_rank  # scaling = lora_alpha / r = 1: U already carries every term's scaling
    export_config.rank_pattern = dict(pattern)
    export_config.alpha_pattern = dict(pattern)
    export_config.use_rslora = False  # rsLoRA's scaling alpha / sqrt(r) would not be 1
    export_config.init_lora_weights = True  # the weights are loaded; never re-run PiSSA/OLoRA-style inits on load

    configs = model.peft_config
    configs[adapter_name] = export_config
    try:
        save(directory, state_dict=state, **kwargs)
    finally:
        configs[adapter_name] = config


def is_genlora_patch(fn: object) -> bool:
    return getattr(fn, "__genlora_patch__", False)


@torch.no_grad()
def merged_dense_copy(
    model: nn.Module,
    slots: Sequence[LoraSlot],
    factors_by_slot_name: dict[str, Factors],
    dense_extra: Callable[[LoraSlot], torch.Tensor | None] | None = None,
    share: Iterable[object] = (),
) -> nn.Module:
    """A deep copy of the base model with W <- W + sum_j U_j V_j (+ dense_extra(slot)) and no LoRA layers.

    Args:
        model: the `peft.PeftModel` the slots belong to; its weights, hooks and patches are not touched.
        slots, factors_by_slot_name: as for `save_factor_adapter`.
        dense_extra: optional full (n_out, n_in) fp32 term per slot (LoRASC's persistent noise), or None.
        share: objects that the copy must reference instead of duplicating: the genlora handle and methods, which
            live hooks point to (they hold the optimizer and other run state). Their hooks sit on the PeftModel
            wrapper and the LoRA layers, which the copy drops when its LoRA layers are unloaded.

    The sum is formed in fp32 and rounded once into W's dtype (as PEFT's merge does, one rounding per merge).
    Costs one copy of the model's memory.
    """
    _require_peft_model(model, "merged_dense_copy")
    memo = {id(obj): obj for obj in share}
    clone = copy.deepcopy(model, memo)
    # deepcopy cannot rebind plain functions: genlora's instance-level patches (forwards, save paths) in the copy
    # would still be closures over the live model. Remove them; the copy is a plain model.
    for copied in clone.modules():
        for attr, value in list(copied.__dict__.items()):
            if is_genlora_patch(value):
                del copied.__dict__[attr]
    quantized = []
    for slot in slots:
        layer = clone.get_submodule(slot.name)
        base = layer.get_base_layer()
        dense = slot.kind.dense_weight(base)  # storage layout; dequantized for bitsandbytes
        b_cat, a_cat = concat_factors(slot, factors_by_slot_name[slot.name])
        delta = (b_cat.to(dense.device) @ a_cat.to(dense.device))  # (n_out, n_in) fp32
        extra = dense_extra(slot) if dense_extra is not None else None
        if extra is not None:
            delta += slot.kind.as_linear(extra.to(device=dense.device, dtype=torch.float32))
        merged = (dense.float() + slot.kind.from_linear(delta, dense)).to(dense.dtype)
        if slot.kind.quantized:
            quantized.append(slot.name)
            layer.base_layer = _float_linear(base, merged)
        else:
            base.weight.copy_(merged)
    if quantized:
        warnings.warn(
            f"merged_model: {len(quantized)} quantized base layers (e.g. {quantized[0]!r}) were dequantized and "
            "hold the merged weights in float (re-quantize the saved model if you need it quantized)",
            stacklevel=3,
        )
    return clone.unload()  # PEFT: LoRA layers -> their base layers, modules_to_save -> the trained copies


def _float_linear(base: nn.Module, weight: torch.Tensor) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=base.bias is not None, device=weight.device,
                    dtype=weight.dtype)
    out.weight.copy_(weight)
    if base.bias is not None:
        out.bias.copy_(base.bias.to(weight.dtype))
    out.requires_grad_(False)
    return out
