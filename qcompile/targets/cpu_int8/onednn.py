"""oneDNN int8 kernels as qcompile ops: what ``lower-cpu-int8`` rewrites Q/DQ groups into.

``torch.ops.qc.linear_int8`` and ``torch.ops.qc.conv2d_int8`` keep the contract, checked in
tests against the reference ops:

    op(x_q, ...) == quantize_out(unary(dequantize(x_q) ⊛ dequantize(w_q) + b [+ other]))

with activations as uint8 plus a scale and zero point (one-element tensors, so the same op
serves static scales and scales computed at run time), weights as plain int8 tensors,
symmetric per output channel, bias in float, an optional ``other`` added before the
unary post-op (a residual add fused into the kernel epilogue: float for linear; for conv2d
float, or uint8 read with ``other_scale`` / ``other_zero_point``), and the output float
(``float32``/``bfloat16``, for float consumers) or uint8 requantized with ``out_scale`` /
``out_zero_point`` (for the next int8 op).

The graph holds plain int8 weights, so a lowered graph prints, verifies and serializes like
any other; oneDNN's blocked layout is made on first use and cached per weight tensor, which
keeps packing out of the steady state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx
from torch.nn import functional as F
from torch.utils.weak import WeakIdKeyDictionary

from qcompile import native
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
OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.uint8)
_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()


# The capability table's post-op lists, read once: _check runs on every kernel call.
_ACCEPTED_POST_OPS = {(kernel, with_add): anchor.post_ops(with_add)
                      for kernel, anchor in BY_KERNEL.items() for with_add in (False, True)}


def _check(x: Tensor, post_op: str, out_dtype: torch.dtype, kernel: str, with_add: bool) -> None:
    if x.dtype != torch.uint8:
        raise ValueError(f"{kernel} activations must be uint8, got {x.dtype}")
    accepted = _ACCEPTED_POST_OPS[kernel, with_add]
    if post_op not in accepted:
        after = " after a residual add" if with_add else ""
        raise ValueError(f"{kernel}: post-op '{post_op}'{after} is not one it fuses (it fuses: {', '.join(accepted)})")
    if out_dtype not in OUTPUT_DTYPES:
        raise ValueError(f"{kernel} output must be float32, bfloat16, float16 or uint8, got {out_dtype}")


def _kernel_dtype(out_dtype: torch.dtype) -> torch.dtype:
    """What oneDNN writes for ``out_dtype``: it has no float16 epilogue here, so a float16
    model's kernels write float32, cast once after the kernel."""
    return torch.float32 if out_dtype == torch.float16 else out_dtype


def packed_linear_weight(weight: Tensor) -> Tensor:
    """oneDNN's packed form of an int8 [out, in] weight, made once per weight tensor."""
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"linear_int8 weights must be 2-D int8, got {weight.dtype} {list(weight.shape)}")
    packed = _PACKED.get(weight)
    if packed is None:
        packed = _PACKED[weight] = torch.ops.onednn.qlinear_prepack(weight, None)
    return packed


# Up to this many rows, linear_int8 runs the native VNNI kernel (qcompile/csrc/linear_u8s8.cpp)
# instead of oneDNN, whose fixed cost per call dominates there. Measured (2 threads, Zen 4, kernel
# alone): one row through 384x384 takes 3.8 µs against oneDNN's 36 (fp32 F.linear 14); 896x4864,
# 37 against 108; at 16 rows the two meet on the largest shape (217 / 213 µs) while the native
# kernel still leads on MiniLM's (12.5 / 41); past 32 rows oneDNN's blocked GEMM wins.
FEW_ROWS = 16
FEW_ROW_POST_OPS = ("none", "relu")
_PACKED_FEW_ROWS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def few_row_weight(weight: Tensor, weight_scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The native few-row kernel's packed weight, column sums and float32 scales, made once per weight."""
    entry = _PACKED_FEW_ROWS.get(weight)
    if entry is None:
        entry = _PACKED_FEW_ROWS[weight] = (*native.pack_u8s8_weight(weight), weight_scale.float().contiguous())
    return entry


@torch.library.custom_op("qc::linear_int8", mutates_args=())
def linear_int8(
    x: Tensor,
    x_scale: Tensor,
    x_zero_point: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    other: Tensor | None,
    out_scale: float,
    out_zero_point: int,
    out_dtype: torch.dtype,
    post_op: str,
) -> Tensor:
    _check(x, post_op, out_dtype, "linear_int8", other is not None)
    if other is not None and out_dtype == torch.uint8:
        # oneDNN's binary post-op reads ``other`` in the output's dtype: a float residual would
        # be truncated to bytes. The lowering keeps such a group's output float.
        raise ValueError("linear_int8 adds a float other into a float output only, not a uint8 one")
    if post_op in FEW_ROW_POST_OPS and native.has_vnni() and x.numel() <= FEW_ROWS * x.shape[-1]:
        packed, column_sums, scales = few_row_weight(weight, weight_scale)
        y = native.linear_u8s8(x, float(x_scale), int(x_zero_point), packed, column_sums, scales, bias, other,
                               post_op == "relu", float(out_scale), int(out_zero_point), _kernel_dtype(out_dtype))
        return y.to(out_dtype)
    # oneDNN reads x and other as dense row-major matrices: a strided view is read as if it
    # were one (garbage), or, for some layouts, taken down a reference path thousands of times
    # slower. Both are copied once here when they are not already dense.
    x = x.contiguous()
    result_dtype, out_dtype = out_dtype, _kernel_dtype(out_dtype)
    name, algorithm = POST_OPS[post_op].onednn, POST_OPS[post_op].algorithm
    if out_dtype != torch.uint8:
        out_scale, out_zero_point = 1.0, 0
    packed = packed_linear_weight(weight)
    weight_zero_point = torch.zeros(weight_scale.numel(), dtype=torch.int64)
    x_scale, x_zero_point = x_scale.reshape(()).float(), x_zero_point.reshape(()).to(torch.int64)
    if bias is not None:
        bias = bias.float()
    if other is None:
        y = torch.ops.onednn.qlinear_pointwise.tensor(
            x, x_scale, x_zero_point, packed, weight_scale.float(), weight_zero_point, bias,
            float(out_scale), int(out_zero_point), out_dtype, name, [], algorithm,
        )
    else:
        y = torch.ops.onednn.qlinear_pointwise.binary_tensor(
            x, x_scale, x_zero_point, packed, weight_scale.float(), weight_zero_point, other.to(out_dtype).contiguous(),
            bias, float(out_scale), int(out_zero_point), out_dtype, 1.0, 0, "add", 1.0, name, [], algorithm,
        )
    return y.to(result_dtype)


@linear_int8.register_fake
def _(x, x_scale, x_zero_point, weight, weight_scale, bias, other, out_scale, out_zero_point, out_dtype, post_op):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=out_dtype)


def _packed_conv_weight(
    weight: Tensor, weight_scale: Tensor, x_scale: float, x_zero_point: int,
    stride: list[int], padding: list[int], dilation: list[int], groups: int, input_shape: list[int],
) -> Tensor:
    """Packed for the input shape of the first call: oneDNN's blocked weight layout depends on
    the spatial size, and a layout packed without it is reordered again on every call."""
    packed = _PACKED.get(weight)
    if packed is None:
        packed = _PACKED[weight] = torch.ops.onednn.qconv_prepack(
            weight, weight_scale.float(), x_scale, x_zero_point, stride, padding, dilation, groups, input_shape
        )
    return packed


@torch.library.custom_op("qc::conv2d_int8", mutates_args=())
def conv2d_int8(
    x: Tensor,
    x_scale: Tensor,
    x_zero_point: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    other: Tensor | None,
    other_scale: float,
    other_zero_point: int,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    out_scale: float,
    out_zero_point: int,
    out_dtype: torch.dtype,
    post_op: str,
) -> Tensor:
    _check(x, post_op, out_dtype, "conv2d_int8", other is not None)
    if post_op.startswith("gelu"):
        raise ValueError("conv2d_int8 fuses relu only")
    if weight.dtype != torch.int8 or weight.dim() != 4:
        raise ValueError(f"conv2d_int8 weights must be 4-D int8, got {weight.dtype} {list(weight.shape)}")
    if out_dtype != torch.uint8:
        out_scale, out_zero_point = 1.0, 0
    result_dtype, out_dtype = out_dtype, _kernel_dtype(out_dtype)
    scale, zero_point = float(x_scale), int(x_zero_point)
    packed = _packed_conv_weight(weight, weight_scale, scale, zero_point, stride, padding, dilation, groups,
                                 list(x.shape))
    weight_zero_point = torch.zeros(weight_scale.numel(), dtype=torch.int64)
    bias = None if bias is None else bias.float()
    if other is None:
        y = torch.ops.onednn.qconv2d_pointwise(
            x, scale, zero_point, packed, weight_scale.float(), weight_zero_point, bias, stride, padding, dilation,
            groups, float(out_scale), int(out_zero_point), out_dtype, POST_OPS[post_op].onednn, [], "",
        )
    else:
        accumulator, other_scale, other_zero_point = _accumulator(other, other_scale, other_zero_point, out_dtype)
        y = torch.ops.onednn.qconv2d_pointwise.binary(
            x, scale, zero_point, packed, weight_scale.float(), weight_zero_point, accumulator, bias, stride, padding,
            dilation, groups, float(out_scale), int(out_zero_point), out_dtype, other_scale, other_zero_point, "sum",
            1.0, POST_OPS[post_op].onednn, [], "",
        )
    return y.to(result_dtype)


def _accumulator(other: Tensor, scale: float, zero_point: int, out_dtype: torch.dtype) -> tuple[Tensor, float, int]:
    """oneDNN's sum post-op adds into a buffer of the output's dtype and overwrites it, so the
    kernel gets its own channels-last copy: uint8 (with its qparams) for a uint8 output, else
    float."""
    if out_dtype == torch.uint8:
        if other.dtype != torch.uint8:
            raise ValueError(f"conv2d_int8 with a uint8 output adds a uint8 other, got {other.dtype}")
        return other.clone(memory_format=torch.channels_last), float(scale), int(zero_point)
    if other.dtype == torch.uint8:
        other = torch.ops.qc.dequantize(other, torch.tensor(scale), torch.tensor(zero_point), None, out_dtype)
    return other.to(out_dtype).clone(memory_format=torch.channels_last), 1.0, 0


@conv2d_int8.register_fake
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
    """``linear_int8``'s contract in reference ops: quantize(unary(DQ(x)·DQ(W)ᵀ + b + other))."""
    y = F.linear(_dequantized(x, x_scale.reshape(()), x_zero_point.reshape(())),
                 _dequantized(weight, weight_scale, torch.zeros_like(weight_scale, dtype=torch.int32), 0),
                 None if bias is None else bias.float())
    if other is not None:
        y = y + other.float()
    return _reference_output(POST_OPS[post_op].reference(y), out_scale, out_zero_point, out_dtype)


def reference_conv2d_int8(x, x_scale, x_zero_point, weight, weight_scale, bias, other, other_scale,
                          other_zero_point, stride, padding, dilation, groups, out_scale, out_zero_point,
                          out_dtype, post_op) -> Tensor:
    """``conv2d_int8``'s contract in reference ops, a uint8 ``other`` read through its qparams."""
    y = F.conv2d(_dequantized(x, x_scale.reshape(()), x_zero_point.reshape(())),
                 _dequantized(weight, weight_scale, torch.zeros_like(weight_scale, dtype=torch.int32), 0),
                 None if bias is None else bias.float(), stride, padding, dilation, groups)
    if other is not None:
        y = y + (_dequantized(other, other_scale, other_zero_point) if other.dtype == torch.uint8 else other.float())
    return _reference_output(POST_OPS[post_op].reference(y), out_scale, out_zero_point, out_dtype)


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
