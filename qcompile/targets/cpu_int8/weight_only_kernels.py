"""Weight-only linears: ``torch.ops.qc.linear_weight_only``, int8 or int4 weights, bf16 activations;
and ``torch.ops.qc.linear_w4a8``, int4 weights on uint8 activations.

    linear_weight_only(x, W_q, S, Z, group_size, b, kernel)
        == linear(x, S · (W_q − Z) per output channel or per group of group_size inputs, b)
    linear_w4a8(x_q, S_x, Z_x, W_q, S, Z, group_size, b, out_dtype)
        == linear_weight_only(S_x · (x_q − Z_x), W_q, S, Z, group_size, b, "int4pack")  in out_dtype

``linear_w4a8`` is what a W4A8 plan's linear becomes when its activations are uint8 (per tensor
or per token): the kernel reads the integers (``qcompile/csrc/linear_w4a8.cpp``: byte dot products
summed exactly in integers, the dequantization folded into fp32 scales afterwards). Without AVX2,
and with AVX512-BF16, it runs ``linear_weight_only`` on the dequantized activations instead: on
an AMD Zen 4 the two tie at one row (both bound by reading the nibbles) and the bf16 int4 kernel
is faster from 4 rows on (``linear_w4a8.cpp`` has the figures).

Z is None (symmetric weights) or, per group only, each group's zero points. The operator is
native (``qcompile/csrc/weight_only.cpp``, which gives the kernels' algebra); this module holds
its fake kernel, its fp32 reference and error bound for the compile-time check, and the table the
lowering reads to choose a kernel by the weight's values and grouping, where the CPU has native
bf16 GEMMs:

    kernel     weights                         few rows (a decode step)
    int8pack   int8 (int5..int8), per channel  aten._weight_int8pack_mm
    int4pack   [-8, 7] (int2..int4), groups    qcompile's int4 kernel (AVX512-BF16 dot products on
                                               nibbles, weights packed once per tensor)

Both read bf16 activations: ATen's int8pack fed fp32 falls to a path measured 20x slower (29 ms
against 1.4 ms for a 4096² int8 weight at batch 1), so the operator casts ``x`` to bf16 itself and
no caller can reach it. Both are matrix-vector kernels: from ``GEMV_ROWS`` rows on (a prefill, a
batch), dequantizing the weight to bf16 on the fly (S·W_q, one pass) and running oneDNN's bf16
GEMM is faster. Measured on a 1536 x 512 weight, 2 threads (µs):

    rows    bf16 GEMM    int8pack    int4pack g128    dequantize + bf16 GEMM
    8          76          125          136                198
    32        159          392          357                280
    64        270          748          658                394

Without AVX512-BF16 (bf16 emulated: 4-5x slower than fp32 at 64 rows) the operator runs ATen's
``_weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu`` under ``GEMV_ROWS`` rows (2-3x faster
than an fp32 GEMM at one row on an AVX2 CPU) and from there on an fp32 GEMM, the weight dequantized
to fp32 a few MB of outputs at a time while they are in cache; ``weight_only.cpp`` has the
measurements.

``W_q`` is the integer constant of the Q/DQ graph: [out, in] per channel, or [out, in /
group_size, group_size] per group with scales [out, in / group_size, 1]; the result is in ``x``'s
dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, fx
from torch.nn import functional as F

from qcompile import native  # loads the extension, which defines the operators
from qcompile.ir.graph import op_arguments
from qcompile.kernel_check import BF16_UNIT_ROUNDOFF, bf16_linear_bound, register_kernel
from qcompile.qdq import DequantizeCall, one_scale

INT4_IN_MULTIPLE = 32  # the int4 kernel reads a row's weights 32 at a time (one bf16 dot product)


@dataclass(frozen=True)
class WeightOnlyKernel:
    """What a weight-only kernel takes: the integer range of its weights, grouped or per channel."""

    name: str
    qmin: int
    qmax: int
    grouped: bool
    group_sizes: tuple[int, ...] = ()

    def unsupported(self, weight_q: Tensor, group_size: int, in_features: int) -> str | None:
        """Why this kernel cannot run the weight, or None."""
        if int(weight_q.min()) < self.qmin or int(weight_q.max()) > self.qmax:
            return f"{self.name} takes weights in [{self.qmin}, {self.qmax}]"
        if self.grouped and group_size not in self.group_sizes:
            return f"{self.name} takes groups of {', '.join(map(str, self.group_sizes))}, not {group_size}"
        if self.grouped and in_features % INT4_IN_MULTIPLE:
            return f"{self.name} needs in_features a multiple of {INT4_IN_MULTIPLE}, not {in_features}"
        return None


WEIGHT_ONLY_KERNELS = {
    "int8pack": WeightOnlyKernel("int8pack", -128, 127, grouped=False),
    "int4pack": WeightOnlyKernel("int4pack", -8, 7, grouped=True, group_sizes=(32, 64, 128, 256)),
}


linear_weight_only = torch.ops.qc.linear_weight_only.default
WEIGHT_ONLY = linear_weight_only
linear_w4a8 = torch.ops.qc.linear_w4a8.default


@torch.library.register_fake("qc::linear_weight_only")
def _(x, weight_q, scale, zero_point, group_size, bias, kernel):
    return x.new_empty((*x.shape[:-1], weight_q.shape[0]))


@torch.library.register_fake("qc::linear_w4a8")
def _(x_q, x_scale, x_zero_point, weight_q, scale, zero_point, group_size, bias, out_dtype):
    return x_q.new_empty((*x_q.shape[:-1], weight_q.shape[0]), dtype=out_dtype)


def dequantized_weight(weight_q: Tensor, scale: Tensor, zero_point: Tensor | None = None,
                       dtype: torch.dtype = torch.float32) -> Tensor:
    """S · (W_q − Z) as [out, in] in ``dtype``: per channel ([out] scales) or per group
    ([out, groups, 1] scales and zero points)."""
    scales = scale.reshape(-1, 1) if weight_q.dim() == 2 else scale
    values = weight_q if zero_point is None else weight_q.to(torch.int16) - zero_point.reshape(scales.shape)
    return (values.to(dtype) * scales.to(dtype)).reshape(weight_q.shape[0], -1)


def reference_linear_weight_only(x: Tensor, weight_q: Tensor, scale: Tensor, zero_point: Tensor | None,
                                 group_size: int, bias: Tensor | None, kernel: str) -> Tensor:
    """The contract in fp32: x · (S·(W_q − Z))ᵀ + b."""
    return F.linear(x.float(), dequantized_weight(weight_q, scale, zero_point),
                    None if bias is None else bias.float()).to(x.dtype)


def linear_weight_only_bound(x: Tensor, weight_q: Tensor, scale: Tensor, zero_point: Tensor | None,
                             group_size: int, bias: Tensor | None, kernel: str) -> float:
    """bf16 activations and scales, fp32 accumulation (:func:`~qcompile.kernel_check.bf16_linear_bound`).
    An affine group's offset −Z·S is rounded to bf16 apart from S·q, so each weight may be off
    by u·S·(|q| + |Z|): the product terms are bounded for weights of that magnitude."""
    weight = dequantized_weight(weight_q, scale, zero_point)
    if zero_point is None:
        return bf16_linear_bound(x, weight)
    magnitude = dequantized_weight(weight_q.to(torch.int16).abs() + zero_point.reshape(scale.shape).abs(), scale)
    rows = x.reshape(-1, x.shape[-1]).float()
    return float(2 * BF16_UNIT_ROUNDOFF * (rows.abs() @ magnitude.t()).max()
                 + BF16_UNIT_ROUNDOFF * (rows @ weight.t()).abs().max())


register_kernel(linear_weight_only, reference_linear_weight_only, precision=torch.bfloat16,
                bound=linear_weight_only_bound)


def _dequantized_activations(x_q: Tensor, x_scale: Tensor, x_zero_point: Tensor) -> Tensor:
    """S_x · (x_q − Z_x) in fp32, one scale per row or one for all: the dequantize the kernel replaced."""
    return torch.ops.qc.dequantize(x_q, x_scale, x_zero_point, None, torch.float32)


def reference_linear_w4a8(x_q: Tensor, x_scale: Tensor, x_zero_point: Tensor, weight_q: Tensor, scale: Tensor,
                          zero_point: Tensor | None, group_size: int, bias: Tensor | None,
                          out_dtype: torch.dtype) -> Tensor:
    """The contract in fp32: the dequantized activations through the weight-only reference."""
    x = _dequantized_activations(x_q, x_scale, x_zero_point)
    return reference_linear_weight_only(x, weight_q, scale, zero_point, group_size, bias, "int4pack").to(out_dtype)


def linear_w4a8_bound(x_q: Tensor, x_scale: Tensor, x_zero_point: Tensor, weight_q: Tensor, scale: Tensor,
                      zero_point: Tensor | None, group_size: int, bias: Tensor | None, out_dtype: torch.dtype) -> float:
    """The weight-only operator's bound on the dequantized activations: where the CPU has
    AVX512-BF16 that is what runs. The integer kernel is far inside it (its products are exact;
    its fp32 sums of scaled integers are off by a few 2^-24 of S_x·S·8·Σx_q per group)."""
    x = _dequantized_activations(x_q, x_scale, x_zero_point)
    return linear_weight_only_bound(x, weight_q, scale, zero_point, group_size, bias, "int4pack")


register_kernel(linear_w4a8, reference_linear_w4a8, precision=torch.bfloat16, bound=linear_w4a8_bound)


def _grouping(arguments: dict) -> str:
    """How a weight-only kernel's weight is scaled, as the report says it."""
    grouping = f"groups of {arguments['group_size']}" if arguments["group_size"] else "per channel"
    return grouping + (", affine" if arguments["zero_point"] is not None else "")


def describe_weight_only_kernel(node: fx.Node) -> str | None:
    """The report's name for a weight-only linear: its kernel, grouping and what it reads."""
    if node.op != "call_function" or node.target not in (WEIGHT_ONLY, linear_w4a8):
        return None
    arguments = op_arguments(node)
    if node.target == linear_w4a8:
        granularity = "" if one_scale(None, arguments["x_scale"]) else " per-token"
        how = "summed in integers" if native.w4a8_in_integers() else "dequantized for qc.linear_weight_only"
        return f"qc.linear_w4a8 ({_grouping(arguments)}), uint8{granularity} activations {how}"
    grouping = _grouping(arguments)
    dequantized = DequantizeCall.of(arguments["x"])
    if dequantized is None:
        activations = "bf16 activations"
    else:
        per_token = "" if dequantized.per_tensor else " per-token"
        activations = f"{str(dequantized.integer_dtype).removeprefix('torch.')}{per_token} activations dequantized to bf16"
    return f"qc.linear_weight_only via {arguments['kernel']} ({grouping}), {activations}"
