"""oneDNN int8 kernels as qcompile ops: what ``lower-cpu-int8`` rewrites Q/DQ groups into.

``torch.ops.qc.linear_int8`` and ``torch.ops.qc.conv2d_int8`` are native operators
(``qcompile/csrc/int8_kernels.cpp``: a call is checked, finds its packed weight and reaches oneDNN
in C++, with no Python frame). They keep the contract, checked against the reference ops below:

    op(x_q, ...) == quantize_out(unary(dequantize(x_q) ⊛ dequantize(w_q) + b [+ other]))

with activations as uint8 plus a scale and zero point (one-element tensors, so the same op
serves static scales and scales computed at run time; for ``linear_int8`` also one per row,
activations quantized per token at run time), weights as plain int8 tensors,
symmetric per output channel, bias in float, an optional ``other`` added before the
unary post-op (a residual add fused into the kernel epilogue: float for linear; for conv2d
float, or uint8 read with ``other_scale`` / ``other_zero_point``), and the output float
(``float32``/``bfloat16``/``float16``, for float consumers) or uint8 requantized with
``out_scale`` / ``out_zero_point`` (for the next int8 op).

The graph holds plain int8 weights, so a lowered graph prints, verifies and serializes like
any other; the packed layouts (oneDNN's blocked one; VNNI blocks for linears of up to
``native.FEW_ROWS`` rows, where oneDNN's fixed cost per call dominates) are made on first use and
cached per weight tensor, made again if the weight is written in place. On a CPU with AMX-INT8
the VNNI blocks are also the tiles' weight layout, and linears of up to ``native.TILED_ROWS`` rows
run on tiles instead of oneDNN.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx
from torch.nn import functional as F

from qcompile import native  # noqa: F401  (loads the extension, which defines the two kernels)
from qcompile.ir.graph import op_arguments
from qcompile.kernel_check import register_kernel
from qcompile.targets.cpu_int8.capabilities import BY_KERNEL, POST_OPS

# oneDNN keeps one JIT-compiled primitive per (op, shape) in a process-wide LRU cache of 1024 by
# default; an int8 GEMM primitive takes ~0.4 MB, so a model called at many batch sizes grew by
# ~400 MB before that bound bit (a 2-layer MLP over 1000 batch sizes: +414 MB; with 256: +93 MB,
# flat from the 500th shape on). 256 still holds every kernel of a model with up to 256 int8
# layers at one shape. oneDNN reads the capacity when it creates its first primitive, so it is
# set on import, before any model runs; a value the user set wins.
PRIMITIVE_CACHE_CAPACITY = 256
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(PRIMITIVE_CACHE_CAPACITY))

linear_int8 = torch.ops.qc.linear_int8.default
conv2d_int8 = torch.ops.qc.conv2d_int8.default


@torch.library.register_fake("qc::linear_int8")
def _(x, x_scale, x_zero_point, weight, weight_scale, bias, other, out_scale, out_zero_point, out_dtype, post_op):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=out_dtype)


@torch.library.register_fake("qc::conv2d_int8")
def _(x, x_scale, x_zero_point, weight, weight_scale, bias, other, other_scale, other_zero_point, stride, padding,
      dilation, groups, out_scale, out_zero_point, out_dtype, post_op):
    n, _, h, w = x.shape
    out_hw = [
        (size + 2 * pad - dil * (k - 1) - 1) // st + 1
        for size, pad, dil, k, st in zip((h, w), padding, dilation, weight.shape[2:], stride)
    ]
    return x.new_empty((n, weight.shape[0], *out_hw), dtype=out_dtype)


def _reference_output(y: Tensor, out_scale: float, out_zero_point: int, out_dtype: torch.dtype) -> Tensor:
    if out_dtype == torch.uint8:
        return torch.ops.qc.quantize(y, torch.tensor(out_scale), torch.tensor(out_zero_point), None, 0, 255, torch.uint8)
    return y.to(out_dtype)


def _dequantized(q: Tensor, scale: Tensor | float, zero_point: Tensor | int, axis: int | None = None) -> Tensor:
    return torch.ops.qc.dequantize(q, torch.as_tensor(scale).float(), torch.as_tensor(zero_point), axis, torch.float32)


def reference_linear_int8(x, x_scale, x_zero_point, weight, weight_scale, bias, other, out_scale, out_zero_point,
                          out_dtype, post_op) -> Tensor:
    """``linear_int8``'s contract in reference ops: quantize(unary(DQ(x)·DQ(W)ᵀ + b + other)), the
    activations' scale and zero point one pair, or one per row (per token) shaped [..., 1]."""
    rows = () if x_scale.numel() == 1 else (*x.shape[:-1], 1)
    y = F.linear(_dequantized(x, x_scale.reshape(rows), x_zero_point.reshape(rows)),
                 _dequantized(weight, weight_scale, torch.zeros_like(weight_scale, dtype=torch.int32), 0),
                 None if bias is None else bias.float())
    if other is not None:
        y = y + other.float()
    return _reference_output(POST_OPS[post_op](y), out_scale, out_zero_point, out_dtype)


def reference_conv2d_int8(x, x_scale, x_zero_point, weight, weight_scale, bias, other, other_scale,
                          other_zero_point, stride, padding, dilation, groups, out_scale, out_zero_point,
                          out_dtype, post_op) -> Tensor:
    """``conv2d_int8``'s contract in reference ops, a uint8 ``other`` read through its qparams;
    float activations are first quantized with their scale and zero point."""
    if x.is_floating_point():
        x = torch.ops.qc.quantize(x, x_scale.reshape(()), x_zero_point.reshape(()), None, 0, 255, torch.uint8)
    y = F.conv2d(_dequantized(x, x_scale.reshape(()), x_zero_point.reshape(())),
                 _dequantized(weight, weight_scale, torch.zeros_like(weight_scale, dtype=torch.int32), 0),
                 None if bias is None else bias.float(), stride, padding, dilation, groups)
    if other is not None:
        y = y + (_dequantized(other, other_scale, other_zero_point) if other.dtype == torch.uint8 else other.float())
    return _reference_output(POST_OPS[post_op](y), out_scale, out_zero_point, out_dtype)


register_kernel(linear_int8, reference_linear_int8)
register_kernel(conv2d_int8, reference_conv2d_int8)


@dataclass(frozen=True)
class Int8KernelCall:
    """A ``qc.linear_int8`` / ``qc.conv2d_int8`` node read by argument name: what the report
    and later passes need of a kernel (its input, output format, fused epilogue)."""

    node: fx.Node
    kernel: str  # "linear_int8" or "conv2d_int8"
    x: fx.Node
    other: Any
    out_dtype: torch.dtype
    post_op: str

    @classmethod
    def of(cls, node: object) -> Int8KernelCall | None:
        if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in INT8_KERNELS:
            return None
        arguments = op_arguments(node)
        return cls(node, INT8_KERNELS[node.target], arguments["x"], arguments["other"], arguments["out_dtype"],
                   arguments["post_op"])

    def describe(self) -> str:
        """How the report names it: ``qc.linear_int8+add+gelu -> uint8``."""
        fused = ("+add" if self.other is not None and self.kernel == "linear_int8" else "") + (
            f"+{self.post_op}" if self.post_op != "none" else "")
        return f"qc.{self.kernel}{fused} -> {str(self.out_dtype).removeprefix('torch.')}"


INT8_KERNELS = {getattr(torch.ops.qc, kernel).default: kernel for kernel in BY_KERNEL}


def describe_int8_kernel(node: fx.Node) -> str | None:
    """The report's name for a oneDNN int8 kernel node (cpu-int8's ``describe_kernel``)."""
    call = Int8KernelCall.of(node)
    return call.describe() if call is not None else None
