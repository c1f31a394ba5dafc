"""Fused weight noise on CUDA (Flat-LoRA's Gaussian row noise, and NoisyTune-style uniform noise such as LoRASC's
stage noise): counter-based generation, scaling and the add to W in one pass over the weight.

    out[i, j] = round_to_out_dtype( t1[i, j] (+ t2[i, j]) (+ base[i, j]) ),   t[i, j] = scale[i] * z[i, j]

with one or two noise terms, each `z` either standard normal or a centred uniform u - 1/2, u ~ U[0, 1), and
`scale` per row (Flat-LoRA: std_i = sigma_t ||W'_i|| / sqrt(n_in)) or a scalar (uniform: lambda * std(W)).
`z[i, j]` is a pure function of (seed, i, j): Philox4x32-10 keyed by the 64-bit `seed` (itself derived from
(method seed, draw, layer) by `genlora.core.seeding.derive_seed`), counter (row, column block), turned into four
draws per call (two Box-Muller transforms for normals: `tl.randint4x` + `pair_uniform_to_normal`, Triton's own
`tl.randn4x` recipe). So a backward regenerates the forward's noise bit for bit without storing it, and nothing but
the scales and the seeds persist. The fp32 sum is formed in the order of the unfused path (term 1, + term 2, + W)
and rounded once, without FMA contraction (`enable_fp_fusion=False`), so fused and unfused Triton paths give
identical bits.

The numbers differ from `torch.randn`/`torch.rand` with a CUDA generator (a different counter layout), but follow
the same laws. The pure-PyTorch paths of the methods are used wherever this kernel is not.

Counter layout (fixed: changing BLOCK changes the noise, so it is a module constant and never autotuned): element
(i, j) with j = b * BLOCK + q * Q + t (Q = BLOCK / 4, 0 <= t < Q) takes draw number q of the Philox call with the
64-bit counter i * ceil(n_in / BLOCK) * Q + b * Q + t.

Opt in with the environment variable GENLORA_TRITON=auto (default off until it has been verified on a GPU; the
PyTorch paths run on CUDA otherwise). Tests run this
kernel on CPU tensors under TRITON_INTERPRET=1 (and GENLORA_TRITON=interpret to route Flat-LoRA's CPU draws to it).
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import torch

try:  # triton is optional: CUDA builds of torch ship it, CPU installs usually do not
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - ImportError, or a triton that does not match this torch/driver
    triton = None
    tl = None

BLOCK = 1024  # columns per program; part of the noise definition (see the module docstring)
NUM_WARPS = 4

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _mode() -> str:
    """GENLORA_TRITON: "0"/"off" (default) never use the kernel; "auto" on CUDA tensors; "interpret" also on CPU
    tensors when TRITON_INTERPRET=1 (Triton's CPU interpreter: slow, for tests only)."""
    # Off unless asked for: the kernel has not yet run on a GPU (this project's sessions so far had none), and an
    # untested kernel must not sit on every CUDA user's default path. Opt in with GENLORA_TRITON=auto.
    return os.environ.get("GENLORA_TRITON", "off").lower()


def available() -> bool:
    """Whether the Triton path can run at all (triton imported and not disabled by GENLORA_TRITON=0)."""
    return triton is not None and _mode() not in ("0", "off", "false", "no")


def supports(t: torch.Tensor) -> bool:
    """Whether Flat-LoRA should generate the noise of tensor `t` with this kernel: a row-major 2-D float tensor on
    CUDA (or on CPU under TRITON_INTERPRET=1 with GENLORA_TRITON=interpret)."""
    if not available():
        return False
    if not (t.is_cuda or (_INTERPRET and _mode() == "interpret")):
        return False
    return (
        t.dim() == 2
        and t.stride(1) == 1
        and t.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and t.shape[0] > 0
        and t.shape[1] > 0
    )


_FAILED: str | None = None  # set when a launch failed: the PyTorch paths are used for the rest of the process


def usable(t: torch.Tensor) -> bool:
    """`supports(t)` and no earlier launch failed in this process."""
    return _FAILED is None and supports(t)


def disable(err: Exception) -> None:
    """Turn the kernel off for the rest of the process after a failed launch (e.g. a GPU Triton cannot compile
    for), with one warning; callers then use their PyTorch path."""
    global _FAILED
    if _FAILED is None:
        _FAILED = f"{type(err).__name__}: {err}"
        warnings.warn(
            f"genlora: the Triton noise kernel failed ({_FAILED}); using the PyTorch noise path for the rest of this "
            "process (set GENLORA_TRITON=0 to silence this)",
            RuntimeWarning,
            stacklevel=3,
        )


KINDS = {"normal": 1, "uniform": 2}  # normal: z ~ N(0, 1); uniform: u - 1/2 with u ~ U[0, 1)


class NoiseTerm(NamedTuple):
    """One noise term of a fused perturbation: `scale * z` with z from `kind` and `seed`; `scale` is a per-row
    (n_rows,) tensor or a float."""

    kind: str
    seed: int
    scale: torch.Tensor | float


if triton is not None:

    @triton.jit
    def _term(seed, counter, KIND: tl.constexpr):
        """Four blocks of standard draws of kind KIND (1 normal, 2 centred uniform) from one Philox call each."""
        r0, r1, r2, r3 = tl.randint4x(seed, counter)
        u0 = tl.random.uint_to_uniform_float(r0)
        u1 = tl.random.uint_to_uniform_float(r1)
        u2 = tl.random.uint_to_uniform_float(r2)
        u3 = tl.random.uint_to_uniform_float(r3)
        if KIND == 1:
            z0, z1 = tl.random.pair_uniform_to_normal(u0, u1)
            z2, z3 = tl.random.pair_uniform_to_normal(u2, u3)
        else:
            z0 = u0 - 0.5
            z1 = u1 - 0.5
            z2 = u2 - 0.5
            z3 = u3 - 0.5
        return z0, z1, z2, z3

    @triton.jit
    def _scale(scale_ptr, scale, row, ROWSCALE: tl.constexpr):
        if ROWSCALE:
            return tl.load(scale_ptr + row).to(tl.float32)
        else:
            return tl.cast(scale, tl.float32)

    @triton.jit
    def _store_quarter(out_row, base_row, cols, n_cols, a, s1, b, s2,
                       HAS_BASE: tl.constexpr, KIND2: tl.constexpr):
        # The sum is formed in the order of the unfused path: term 1, + term 2, + W; then rounded once.
        mask = cols < n_cols
        val = a * s1
        if KIND2 != 0:
            val = val + b * s2
        if HAS_BASE:
            val = val + tl.load(base_row + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_row + cols, val.to(out_row.dtype.element_ty), mask=mask)

    @triton.jit
    def _perturb_kernel(
        out_ptr,
        base_ptr,
        seed1,
        scale1_ptr,
        scale1,
        seed2,
        scale2_ptr,
        scale2,
        n_cols,
        stride_out,
        stride_base,
        ctr_per_row,
        HAS_BASE: tl.constexpr,
        KIND1: tl.constexpr,
        ROWSCALE1: tl.constexpr,
        KIND2: tl.constexpr,
        ROWSCALE2: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        Q: tl.constexpr = BLOCK // 4
        row = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1).to(tl.int64)
        t = tl.arange(0, Q)
        counter = row * ctr_per_row + blk * Q + t  # int64: its lo/hi words are the Philox counters c0/c1
        a0, a1, a2, a3 = _term(seed1, counter, KIND1)
        s1 = _scale(scale1_ptr, scale1, row, ROWSCALE1)
        if KIND2 != 0:
            b0, b1, b2, b3 = _term(seed2, counter, KIND2)
            s2 = _scale(scale2_ptr, scale2, row, ROWSCALE2)
        else:
            b0, b1, b2, b3 = a0, a1, a2, a3
            s2 = s1
        col0 = blk * BLOCK + t
        out_row = out_ptr + row * stride_out
        base_row = base_ptr + row * stride_base
        _store_quarter(out_row, base_row, col0, n_cols, a0, s1, b0, s2, HAS_BASE, KIND2)
        _store_quarter(out_row, base_row, col0 + Q, n_cols, a1, s1, b1, s2, HAS_BASE, KIND2)
        _store_quarter(out_row, base_row, col0 + 2 * Q, n_cols, a2, s1, b2, s2, HAS_BASE, KIND2)
        _store_quarter(out_row, base_row, col0 + 3 * Q, n_cols, a3, s1, b3, s2, HAS_BASE, KIND2)


def _term_args(term: NoiseTerm | None, n_rows: int, device: torch.device, dummy: torch.Tensor):
    """(kind id, seed, scale pointer, scale float, per-row?) for one term (zeros for an absent one)."""
    if term is None:
        return 0, 0, dummy, 0.0, False
    kind, seed, scale = term
    if kind not in KINDS:
        raise ValueError(f"noise kind must be one of {sorted(KINDS)}, got {kind!r}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    if isinstance(scale, torch.Tensor):
        if scale.shape != (n_rows,):
            raise ValueError(f"a per-row scale must have shape ({n_rows},), got {tuple(scale.shape)}")
        return KINDS[kind], seed, scale.to(device=device, dtype=torch.float32).contiguous(), 0.0, True
    return KINDS[kind], seed, dummy, float(scale), False


def perturb(out: torch.Tensor, terms, base: torch.Tensor | None = None) -> torch.Tensor:
    """out = round_to_out_dtype( term_1 + term_2 + base ), each term `scale * z(kind, seed)`, all in fp32 and in that
    order (the order in which the unfused path accumulates draws); base = 0 when None, and `out` may be `base`
    (in-place accumulate). One or two terms; out, base: (n_rows, n_cols), row-major. Returns `out`."""
    if triton is None:
        raise RuntimeError("genlora's Triton noise kernel needs the `triton` package")
    terms = [NoiseTerm(*t) for t in terms]
    if not 1 <= len(terms) <= 2:
        raise ValueError(f"the fused kernel takes one or two noise terms, got {len(terms)}")
    if out.dim() != 2 or out.stride(1) != 1:
        raise ValueError("out must be a row-major 2-D tensor (stride 1 along columns)")
    if base is not None and (base.shape != out.shape or base.stride(1) != 1 or base.device != out.device):
        raise ValueError("base must be a row-major tensor of out's shape and device")
    n_rows, n_cols = out.shape
    k1, seed1, ptr1, sc1, row1 = _term_args(terms[0], n_rows, out.device, out)
    k2, seed2, ptr2, sc2, row2 = _term_args(terms[1] if len(terms) > 1 else None, n_rows, out.device, out)
    n_blocks = triton.cdiv(n_cols, BLOCK)
    _perturb_kernel[(n_rows, n_blocks)](
        out,
        out if base is None else base,
        seed1,
        ptr1,
        sc1,
        seed2,
        ptr2,
        sc2,
        n_cols,
        out.stride(0),
        out.stride(0) if base is None else base.stride(0),
        n_blocks * (BLOCK // 4),
        HAS_BASE=base is not None,
        KIND1=k1,
        ROWSCALE1=row1,
        KIND2=k2,
        ROWSCALE2=row2,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )
    return out


def row_noise(out: torch.Tensor, std: torch.Tensor, seed: int, base: torch.Tensor | None = None) -> torch.Tensor:
    """out = base + std[:, None] * z(seed), z ~ N(0, 1) (base = 0 when None), rounded once to out's dtype; `out`
    may be `base` (in-place accumulate). out, base: (n_out, n_in), row-major; std: (n_out,). Returns `out`."""
    if std.shape != (out.shape[0],):
        raise ValueError(f"std must have shape ({out.shape[0]},), got {tuple(std.shape)}")
    return perturb(out, [NoiseTerm("normal", seed, std)], base)


def uniform_noise(out: torch.Tensor, scale, seed: int, base: torch.Tensor | None = None) -> torch.Tensor:
    """out = base + (u(seed) - 1/2) * scale, u ~ U[0, 1) (NoisyTune / LoRASC stage noise); `scale` a float or a
    per-row (n_out,) tensor. Same conventions as `row_noise`."""
    return perturb(out, [NoiseTerm("uniform", seed, scale)], base)
