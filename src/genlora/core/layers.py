"""The PEFT LoRA layer types genlora acts on, each mapped onto the one view every method is defined on.

Every method (docs/methods.md) is written for a linear map with a frozen weight W (n_out, n_in), a LoRA update
s*B*A with B (n_out, r) and A (r, n_in), and "rows = output features, fan-in = n_in". Each PEFT layer type stores
these differently; a `LayerKind` translates (docs/methods.md, "Layer types"):

| kind      | PEFT layer (base)                     | W storage            | W as (n_out, n_in)         | B, A as (n_out, r), (r, n_in)          |
|-----------|---------------------------------------|----------------------|----------------------------|----------------------------------------|
| linear    | lora.Linear (nn.Linear)               | (n_out, n_in)        | W                          | lora_B.weight, lora_A.weight           |
| conv1d_t  | lora.Linear (transformers Conv1D)     | (n_in, n_out)        | W^T (fan_in_fan_out)       | lora_B.weight, lora_A.weight           |
| conv      | lora.Conv1d/2d/3d (nn.ConvNd)         | (out, in, *k)        | W.reshape(out, in*prod(k)) | B.reshape(out, r), A.reshape(r, -1)    |
| embedding | lora.Embedding (nn.Embedding)         | (vocab, dim)         | W^T: one-hot(vocab) -> dim | lora_embedding_B, lora_embedding_A     |
| bnb_4bit  | lora.bnb.Linear4bit (bnb Linear4bit)  | packed 4-bit         | dequantized W              | lora_B.weight, lora_A.weight           |
| bnb_8bit  | lora.bnb.Linear8bitLt                 | int8 + row scales    | dequantized W              | lora_B.weight, lora_A.weight           |

An embedding is the linear map from a one-hot token (fan-in = vocabulary size) to its vector: output features are the
embedding coordinates, as for a linear layer whatever the storage layout. Noise is always drawn in W's storage
layout (elementwise i.i.d., so the layout does not change its law) and scaled along the output axis.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


class LayerKind:
    """One PEFT LoRA layer type. Stateless: every method takes the `LoraSlot` (or its layers) it acts on."""

    name: ClassVar[str]
    quantized: ClassVar[bool] = False
    # Storage axis of W (and of a storage-layout noise buffer) that holds the output features.
    out_axis: ClassVar[int] = 0
    # Axis of lora_A's input and lora_B's output that holds the features (LoRA Dropout's masks): last for linear
    # maps (..., n), 1 for convolutions (batch, channels, *spatial).
    feature_axis: ClassVar[int] = -1

    @staticmethod
    def matches(layer: nn.Module, base: nn.Module) -> bool:
        raise NotImplementedError

    # --- the trainable factors, as (n_out, r) and (r, n_in) -----------------------------------------------------------
    def factor_views(self, slot) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) as (n_out, r), (r, n_in) views of the adapter's parameters (differentiable; no scaling)."""
        return slot.b_weight, slot.a_weight

    # --- the frozen weight ---------------------------------------------------------------------------------------------
    def dense_weight(self, base: nn.Module) -> torch.Tensor:
        """W in storage layout as a float tensor: the parameter itself, or its dequantized copy."""
        return base.weight

    def as_linear(self, weight: torch.Tensor) -> torch.Tensor:
        """A storage-layout tensor (W or noise) viewed as (n_out, n_in); a view, never a copy."""
        return weight

    def from_linear(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """An (n_out, n_in) tensor in the storage layout of `like` (W): the inverse of `as_linear`."""
        return t.reshape(like.shape)

    def peft_state(self, slot, b: torch.Tensor, a: torch.Tensor) -> dict[str, torch.Tensor]:
        """State-dict entries (key suffixes after the layer's name) of a PEFT adapter whose LoRA of this layer is
        B (n_out, R), A (R, n_in): what PEFT's `save_pretrained` would write for a rank-R adapter."""
        ad = slot.adapter
        return {f"lora_A.{ad}.weight": a, f"lora_B.{ad}.weight": b}

    def fan_in(self, base: nn.Module) -> int:
        return self.as_linear(self.dense_weight(base)).shape[1]

    def row_shape(self, weight: torch.Tensor) -> list[int]:
        """Shape that broadcasts a per-output-feature vector (n_out,) against W's storage layout."""
        shape = [1] * weight.dim()
        shape[self.out_axis] = -1
        return shape

    # --- forwards with a perturbed weight (core/perturbed_linear.py) ----------------------------------------------------
    # Whether `weight_op_grad` needs the layer's input (convolutions recompute their input gradient by autograd).
    grad_needs_input: ClassVar[bool] = False

    def weight_op(self, base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's output without its bias, with `weight` (storage layout, float) in place of its own."""
        raise NotImplementedError

    def weight_op_grad(self, base: nn.Module, x: torch.Tensor | None, weight: torch.Tensor, grad_out: torch.Tensor,
                       x_meta: tuple) -> torch.Tensor | None:
        """d(weight_op)/dx applied to grad_out; `x_meta` = (dtype, shape) of x. None where x has no gradient."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            out = self.weight_op(base, xg, weight.detach())
            (grad_x,) = torch.autograd.grad(out, xg, grad_out)
        return grad_x

    def add_bias(self, base: nn.Module, out: torch.Tensor) -> torch.Tensor:
        """out + the base layer's bias (trainable or not: autograd sees this add), broadcast over the output axis."""
        bias = getattr(base, "bias", None)
        return out if bias is None else out + bias.to(out.dtype)

    def apply_lowrank(self, slot, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The output of the low-rank map U V (U (n_out, K), V (K, n_in)) on the layer's input x, computed the way
        PEFT computes this layer's LoRA term (so a PEFT adapter holding U, V as B, A reproduces it exactly)."""
        return F.linear(F.linear(x, v), u)

    # --- a fresh adapter --------------------------------------------------------------------------------------------------
    def reinit(self, slot, generator: torch.Generator) -> None:
        """A fresh LoRA as PEFT creates one (init_lora_weights=True): A Kaiming-uniform, B = 0."""
        nn.init.kaiming_uniform_(slot.a_weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(slot.b_weight)


class LinearKind(LayerKind):
    name = "linear"

    @staticmethod
    def matches(layer, base):
        return type(base) is nn.Linear or (isinstance(base, nn.Linear) and not _is_bnb(base))

    def weight_op(self, base, x, weight):
        return F.linear(x, weight.to(x.dtype))

    def weight_op_grad(self, base, x, weight, grad_out, x_meta):
        return grad_out.matmul(weight.to(grad_out.dtype)).to(x_meta[0])  # (..., n_in)


class Conv1DKind(LayerKind):
    """transformers' `Conv1D` (GPT-2 family): y = x W + b with W stored (n_in, n_out); PEFT sets fan_in_fan_out."""

    name = "conv1d_t"
    out_axis = 1

    @staticmethod
    def matches(layer, base):
        return type(base).__name__ == "Conv1D" and hasattr(base, "nf")

    def as_linear(self, weight):
        return weight.T

    def from_linear(self, t, like):
        return t.T

    def weight_op(self, base, x, weight):
        return x.matmul(weight.to(x.dtype))  # (..., n_in) @ (n_in, n_out)

    def weight_op_grad(self, base, x, weight, grad_out, x_meta):
        return grad_out.matmul(weight.T.to(grad_out.dtype)).to(x_meta[0])


class ConvKind(LayerKind):
    """nn.Conv1d/2d/3d: a filter is an output channel, fan-in = in_channels x prod(kernel)."""

    name = "conv"
    feature_axis = 1

    @staticmethod
    def matches(layer, base):
        # groups > 1: PEFT's lora_A then sees all input channels while each filter sees in/groups of them, so
        # s*B*A is not a (out, in/groups * k) update of W (and LoRA's B is grouped): not mapped, refused.
        return isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and base.groups == 1

    def factor_views(self, slot):
        r = slot.r
        return slot.b_weight.reshape(slot.b_weight.shape[0], r), slot.a_weight.reshape(r, -1)

    def as_linear(self, weight):
        return weight.reshape(weight.shape[0], -1)

    def peft_state(self, slot, b, a):
        ad, a_shape, b_shape = slot.adapter, slot.a_weight.shape, slot.b_weight.shape
        return {f"lora_A.{ad}.weight": a.reshape(a.shape[0], *a_shape[1:]),
                f"lora_B.{ad}.weight": b.reshape(b.shape[0], b.shape[1], *b_shape[2:])}

    grad_needs_input = True

    def weight_op(self, base, x, weight):
        return base._conv_forward(x, weight.to(x.dtype), None)  # the module's own padding mode, stride, groups

    def add_bias(self, base, out):
        bias = base.bias
        return out if bias is None else out + bias.to(out.dtype).reshape(1, -1, *([1] * (out.dim() - 2)))

    def apply_lowrank(self, slot, x, u, v):
        # As PEFT's conv LoRA: lora_A is a conv with the base's kernel, stride and padding (r output channels),
        # lora_B a 1x1 conv; here with K channels in between.
        lora_a = slot.lora_A
        kernel = lora_a.weight.shape[2:]
        v_conv = v.reshape(v.shape[0], lora_a.weight.shape[1], *kernel)
        mid = lora_a._conv_forward(x, v_conv, None)
        u_conv = u.reshape(u.shape[0], u.shape[1], *([1] * len(kernel)))
        return slot.lora_B._conv_forward(mid, u_conv, None)


class EmbeddingKind(LayerKind):
    """nn.Embedding as the linear map one-hot(vocab) -> dim: output features are the embedding coordinates, fan-in is
    the vocabulary size; PEFT keeps A (r, vocab) and B (dim, r) in lora_embedding_A / lora_embedding_B."""

    name = "embedding"
    out_axis = 1

    @staticmethod
    def matches(layer, base):
        return isinstance(base, nn.Embedding)

    def as_linear(self, weight):
        return weight.T

    def from_linear(self, t, like):
        return t.T

    def peft_state(self, slot, b, a):
        return {f"lora_embedding_A.{slot.adapter}": a, f"lora_embedding_B.{slot.adapter}": b}

    def weight_op(self, base, x, weight):
        out = F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                          base.sparse)
        scale = getattr(base, "embed_scale", None)  # scaled word embeddings (Gemma & co.) scale in their forward
        return out if scale is None else out * scale.to(out.dtype)

    def weight_op_grad(self, base, x, weight, grad_out, x_meta):
        return None  # token ids carry no gradient

    def apply_lowrank(self, slot, x, u, v):
        # As PEFT's embedding LoRA: F.embedding(x, A^T) @ B^T, times the layer's embed_scale where it has one.
        out = slot.layer._embed(x, v.T) @ u.T
        scale = slot.layer._get_embed_scale() if hasattr(slot.layer, "_get_embed_scale") else None
        return out if scale is None else out * scale.to(out.dtype)

    def reinit(self, slot, generator):
        # PEFT's embedding LoRA starts with A = 0 and B ~ N(0, 1) (loralib's convention)
        nn.init.zeros_(slot.a_weight)
        nn.init.normal_(slot.b_weight, generator=generator)


def _is_bnb(base: nn.Module) -> bool:
    return type(base).__module__.startswith("bitsandbytes")


class _BnbKind(LayerKind):
    """bitsandbytes-quantized nn.Linear bases (QLoRA): W is read by dequantizing (fp32/fp16/bf16, (n_out, n_in)); the
    quantized parameter is never written."""

    quantized = True
    class_name: ClassVar[str]

    @classmethod
    def matches(cls, layer, base):
        return _is_bnb(base) and type(base).__name__ == cls.class_name

    def dense_weight(self, base):
        from peft.utils.integrations import dequantize_bnb_weight

        weight = base.weight
        return dequantize_bnb_weight(weight, state=getattr(weight, "quant_state", None) or getattr(base, "state", None))

    def weight_op(self, base, x, weight):
        # in the layer's compute dtype, as bitsandbytes computes (the result cast back to the input's dtype)
        dtype = getattr(base, "compute_dtype", None) or weight.dtype
        return F.linear(x.to(dtype), weight.to(dtype)).to(x.dtype)

    def weight_op_grad(self, base, x, weight, grad_out, x_meta):
        return grad_out.matmul(weight.to(grad_out.dtype)).to(x_meta[0])


class Bnb4bitKind(_BnbKind):
    name = "bnb_4bit"
    class_name = "Linear4bit"


class Bnb8bitKind(_BnbKind):
    name = "bnb_8bit"
    class_name = "Linear8bitLt"


# Most specific first: bitsandbytes layers subclass nn.Linear.
KINDS: tuple[LayerKind, ...] = (Bnb4bitKind(), Bnb8bitKind(), Conv1DKind(), ConvKind(), EmbeddingKind(), LinearKind())


def kind_of(layer: nn.Module) -> LayerKind | None:
    """The kind of a PEFT LoRA layer, or None for a type genlora does not map (MultiheadAttention, ParamWrapper...)."""
    from peft.tuners.lora import Embedding as LoraEmbedding
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora.layer import _ConvNd as LoraConv

    base = layer.get_base_layer()
    for kind in KINDS:
        if not kind.matches(layer, base):
            continue
        if isinstance(kind, EmbeddingKind) and not isinstance(layer, LoraEmbedding):
            continue
        if isinstance(kind, ConvKind) and not isinstance(layer, LoraConv):
            continue
        if isinstance(kind, (LinearKind, Conv1DKind)) and not isinstance(layer, LoraLinear):
            continue
        if isinstance(kind, _BnbKind) and not hasattr(layer, "lora_A"):
            continue
        return kind
    return None


def kind_of_base(module: nn.Module) -> LayerKind | None:
    """The kind of a plain (not LoRA-wrapped) layer, for noise on frozen layers without an adapter (LoRASC's
    noise_scope="all"): bitsandbytes, Conv1D, Conv, Embedding and Linear layers."""
    for kind in KINDS:
        if kind.matches(None, module):
            return kind
    return None
