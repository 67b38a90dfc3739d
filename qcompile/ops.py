"""qcompile's quantization ops: ``torch.ops.qc.quantize`` and ``torch.ops.qc.dequantize``.

They work on plain tensors: int8 / uint8 / int4-in-int8 storage plus float32 scale and int32
zero-point tensors, never on torch's quantized tensor types. ``axis`` is ``None`` for
per-tensor parameters (one-element tensors), per-token ones (shaped [..., 1], one per row) and
per-group ones (a weight viewed [out, groups, size] with parameters [out, groups, 1]), the last
two broadcast as they are; or the channel axis for per-channel ones.

    quantize:    q = clamp(round(r / S) + Z, qmin, qmax)   (round half to even, as oneDNN and ONNX do)
                 q = fp8(clamp(r / S, -max, max))         (float8 storage: the cast rounds to nearest)
    dequantize:  r = S · (q − Z)                          (float8: decoded through a 256-entry table)

A per-tensor quantize to uint8 / int8 (every activation the int8 kernels read) runs as one native
pass (``qcompile/csrc/quantize.cpp``); the other forms are ATen ops. Both give the same integers.

Each op has a fake kernel so graphs that contain it can be exported and shape-propagated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from qcompile import native
from qcompile.spec import FLOAT8_STORAGE, integer_qparams

if TYPE_CHECKING:
    from qcompile.spec import QuantSpec


def broadcast_param(param: Tensor, x: Tensor, axis: int | None) -> Tensor | float:
    """A per-channel parameter shaped to broadcast along ``axis``; a per-token or per-group one
    ([..., 1]) as it is; a per-tensor one as a Python float, since elementwise kernels take a scalar operand on
    their fast path (dividing by a 0-dim tensor is an order of magnitude slower, with
    bit-identical results)."""
    if axis is None:
        if param.numel() == 1:
            return float(param.reshape(()))
        if param.dim() == x.dim() and param.shape[-1] == 1 and param.shape[:-1] == x.shape[:-1]:
            return param
        raise ValueError(f"per-tensor quantization needs one scale, got {param.numel()} "
                         f"(per-token scales are shaped {[*x.shape[:-1], 1]})")
    axis = axis % x.dim()
    if param.numel() != x.shape[axis]:
        raise ValueError(f"per-channel axis {axis} has {x.shape[axis]} channels but {param.numel()} parameters")
    shape = [1] * x.dim()
    shape[axis] = -1
    return param.reshape(shape)


_ROUNDER = 12582912.0  # 1.5 * 2**23
_ROUNDER_BITS = 0x4B400000  # its float32 bit pattern
_ROUNDING_WINDOW = 1 << 22


def _as_float32(param: Tensor | float) -> Tensor | float:
    return param.to(torch.float32) if isinstance(param, Tensor) else param


@torch.library.custom_op("qc::quantize", mutates_args=())
def quantize(
    x: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None, qmin: int, qmax: int, dtype: torch.dtype
) -> Tensor:
    s = _as_float32(broadcast_param(scale, x, axis))
    z = _as_float32(broadcast_param(zero_point, x, axis))
    if isinstance(s, float) and isinstance(z, float) and dtype in native.INTEGER_STORAGE:
        return native.quantize_per_tensor(x, s, int(z), qmin, qmax, dtype)  # the same integers, one pass
    # Round before adding Z, as ONNX's QuantizeLinear does: in float32, r/S + Z can land on a
    # .5 tie that r/S did not, and the exported model must give the same integers.
    scaled = torch.div(x.to(torch.float32), s)
    if dtype.is_floating_point:  # float8: saturate to the finite range, round to nearest in the cast
        if isinstance(z, Tensor) or z != 0.0:  # the zero point of a float8 format is 0: skip a pass over x
            scaled.add_(z)
        return scaled.clamp_(qmin, qmax).to(dtype)
    if qmax - qmin >= _ROUNDING_WINDOW:  # int32 (bias) ranges: the plain sequence
        return scaled.round_().add_(z).clamp_(qmin, qmax).to(torch.int32).to(dtype)
    # Adding 1.5 * 2**23 rounds r/S half to even (float32 values within 2**22 of it are exactly
    # 1 apart) and leaves the integer in the low mantissa bits; clamping there is exact, and the
    # bits minus the constant's bits, plus Z, are q. Four passes and one narrowing cast instead
    # of round, add, clamp and two casts (float -> uint8 is not vectorized in ATen).
    scaled.add_(_ROUNDER).clamp_(_ROUNDER + qmin - z, _ROUNDER + qmax - z)
    offset = _ROUNDER_BITS - (z.to(torch.int32) if isinstance(z, Tensor) else int(z))
    return scaled.view(torch.int32).sub_(offset).to(dtype)


@quantize.register_fake
def _(x, scale, zero_point, axis, qmin, qmax, dtype):
    return torch.empty_like(x, dtype=dtype)


# Every float8 code's value in float32 (exact): ATen converts float8 to float element by element,
# four times slower than looking the byte up here.
FLOAT8_VALUES = {dtype: torch.arange(256, dtype=torch.uint8).view(dtype).to(torch.float32)
                 for dtype in FLOAT8_STORAGE}


def float8_rounding_limit(dtype: torch.dtype) -> float:
    """The magnitude above which a float8 cast saturates rather than rounds: its largest finite
    value plus half the step below it (448 + 16 for E4M3, 57344 + 4096 for E5M2). Values under
    it round to the largest value anyway; only those above lose more than half a step."""
    finite = FLOAT8_VALUES[dtype][torch.isfinite(FLOAT8_VALUES[dtype])].unique()
    return float(finite[-1] + (finite[-1] - finite[-2]) / 2)


def float8_to_float32(q: Tensor) -> Tensor:
    """The float32 values of float8 ``q``: a table lookup of its bytes (exact, NaN included)."""
    codes = q.reshape(-1).view(torch.uint8).to(torch.int32)
    return FLOAT8_VALUES[q.dtype].index_select(0, codes).view(q.shape)


@torch.library.custom_op("qc::dequantize", mutates_args=())
def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None, out_dtype: torch.dtype) -> Tensor:
    s = _as_float32(broadcast_param(scale, q, axis))
    z = _as_float32(broadcast_param(zero_point, q, axis))
    values = float8_to_float32(q) if q.dtype in FLOAT8_VALUES else q.to(torch.float32)
    return ((values - z) * s).to(out_dtype)


@dequantize.register_fake
def _(q, scale, zero_point, axis, out_dtype):
    return torch.empty_like(q, dtype=out_dtype)


@torch.library.custom_op("qc::choose_qparams", mutates_args=())
def choose_qparams(x: Tensor, qmin: int, qmax: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Per-tensor scale and zero point from ``x``'s own range: dynamic quantization's step."""
    lo = torch.clamp(x.min().float(), max=0.0).reshape(1)
    hi = torch.clamp(x.max().float(), min=0.0).reshape(1)
    return integer_qparams(lo, hi, qmin, qmax, symmetric)


@choose_qparams.register_fake
def _(x, qmin, qmax, symmetric):
    return x.new_empty((1,), dtype=torch.float32), x.new_empty((1,), dtype=torch.int32)


@torch.library.custom_op("qc::choose_qparams_per_token", mutates_args=())
def choose_qparams_per_token(x: Tensor, qmin: int, qmax: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """A scale and zero point per row of ``x`` (over its last dimension), shaped [..., 1]: dynamic
    per-token quantization's step. A float8 spec passes its range narrowed by the margin."""
    lo = torch.clamp(x.amin(dim=-1, keepdim=True).float(), max=0.0)
    hi = torch.clamp(x.amax(dim=-1, keepdim=True).float(), min=0.0)
    return integer_qparams(lo, hi, qmin, qmax, symmetric)


@choose_qparams_per_token.register_fake
def _(x, qmin, qmax, symmetric):
    shape = (*x.shape[:-1], 1)
    return x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.int32)


def quantize_with(x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """``qc.quantize`` with the range and storage dtype a :class:`QuantSpec` gives."""
    return torch.ops.qc.quantize(x, scale, zero_point, spec.axis, spec.qmin, spec.qmax, spec.storage_dtype)
