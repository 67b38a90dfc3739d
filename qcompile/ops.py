"""qcompile's quantization ops: ``torch.ops.qc.quantize`` and ``torch.ops.qc.dequantize``.

They work on plain tensors: int8 / uint8 / int4-in-int8 storage plus float32 scale and int32
zero-point tensors, never on torch's quantized tensor types. ``axis`` is ``None`` for
per-tensor parameters (one-element tensors), per-token ones (shaped [..., 1], one per row) and
per-group ones (a weight viewed [out, groups, size] with parameters [out, groups, 1]), the last
two broadcast as they are; or the channel axis for per-channel ones.

    quantize:    q = clamp(round(r / S) + Z, qmin, qmax)   (round half to even, as oneDNN and ONNX do)
                 q = fp8(clamp(r / S, -max, max))         (float8 storage: the cast rounds to nearest)
    dequantize:  r = S · (q − Z)                          (float8: decoded through a 256-entry table)

Both are native operators (``qcompile/csrc/qdq.cpp``): every int8 kernel's input passes
through a quantize, and a Python op's call cost (about 15 µs) exceeded a decode step's kernel.
A per-tensor quantize to uint8 / int8 runs as one native pass; the other forms are ATen ops
called from C++. This module gives them fake kernels, so graphs that contain them can be
exported and shape-propagated, and holds the dynamic-quantization ops that choose parameters
(per tensor in Python, per token native).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from qcompile import native  # noqa: F401  (loads the extension, which defines qc.quantize and qc.dequantize)
from qcompile.spec import FLOAT8_STORAGE, integer_qparams

if TYPE_CHECKING:
    from qcompile.spec import QuantSpec

@torch.library.register_fake("qc::quantize")
def _(x, scale, zero_point, axis, qmin, qmax, dtype):
    return torch.empty_like(x, dtype=dtype)


@torch.library.register_fake("qc::dequantize")
def _(q, scale, zero_point, axis, out_dtype):
    return torch.empty_like(q, dtype=out_dtype)


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


@torch.library.custom_op("qc::choose_qparams", mutates_args=())
def choose_qparams(x: Tensor, qmin: int, qmax: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Per-tensor scale and zero point from ``x``'s own range: dynamic quantization's step."""
    lo = torch.clamp(x.min().float(), max=0.0).reshape(1)
    hi = torch.clamp(x.max().float(), min=0.0).reshape(1)
    return integer_qparams(lo, hi, qmin, qmax, symmetric)


@choose_qparams.register_fake
def _(x, qmin, qmax, symmetric):
    return x.new_empty((1,), dtype=torch.float32), x.new_empty((1,), dtype=torch.int32)


def choose_qparams_per_token(x: Tensor, qmin: int, qmax: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """A scale and zero point per row of ``x`` (over its last dimension), shaped [..., 1]: dynamic
    per-token quantization's step, :func:`~qcompile.spec.integer_qparams` of each row's range
    widened to contain 0. A float8 spec passes its range narrowed by the margin. The operator
    ``qc.choose_qparams_per_token`` is native (``qcompile/csrc/choose_qparams.cpp``, the same fp32
    operations): a dynamic linear calls it on every forward."""
    return torch.ops.qc.choose_qparams_per_token(x, qmin, qmax, symmetric)


@torch.library.register_fake("qc::choose_qparams_per_token")
def _(x, qmin, qmax, symmetric):
    shape = (*x.shape[:-1], 1)
    return x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.int32)


def quantize_with(x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """``qc.quantize`` with the range and storage dtype a :class:`QuantSpec` gives."""
    return torch.ops.qc.quantize(x, scale, zero_point, spec.axis, spec.qmin, spec.qmax, spec.storage_dtype)
