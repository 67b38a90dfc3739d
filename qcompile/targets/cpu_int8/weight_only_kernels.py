"""Weight-only linears: ``torch.ops.qc.linear_weight_only``, int8 or int4 weights, bf16 activations.

    linear_weight_only(x, W_q, S, Z, group_size, b, kernel)
        == linear(x, S · (W_q − Z) per output channel or per group of group_size inputs, b)

Z is None (symmetric weights) or, per group only, each group's zero point: int4pack stores a
group as (q + 8 − 8)·S + zero with zero = −Z·S, so an affine group costs nothing more.

Two kernels, both from ATen, chosen by :data:`WEIGHT_ONLY_KERNELS` (the weight's values and
grouping) where the CPU has native bf16 GEMMs:

    kernel     weights                         ATen op                                   packed
    int8pack   int8 (int5..int8), per channel  aten._weight_int8pack_mm                  no
    int4pack   [-8, 7] (int2..int4), groups    aten._weight_int4pack_mm_for_cpu          once per weight

Both read bf16 activations: fed fp32 they fall to paths measured 20x slower (29 ms against
1.4 ms for a 4096² int8 weight at batch 1), so the kernel casts ``x`` to bf16 itself and no
caller can reach those paths. Both are matrix-vector kernels: from :data:`GEMV_ROWS` rows on
(a prefill, a batch), dequantizing the weight to bf16 on the fly (S·W_q, one pass) and running
oneDNN's bf16 GEMM is faster. Measured on a 1536 x 512 weight, 2 threads (µs):

    rows    bf16 GEMM    int8pack    int4pack g128    dequantize + bf16 GEMM
    8          76          125          136                198
    32        159          392          357                280
    64        270          748          658                394 ``W_q`` is the integer constant of the Q/DQ graph: [out, in]
per channel, or [out, in / group_size, group_size] per group with scales [out, in / group_size,
1]; the int4 packing (two values a byte, the layout the kernel tiles) is made on first use
and cached per weight tensor. The result is in ``x``'s dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, fx
from torch.nn import functional as F
from torch.utils.weak import WeakIdKeyDictionary

from qcompile.ir.graph import op_arguments
from qcompile.kernel_check import BF16_UNIT_ROUNDOFF, bf16_linear_bound, register_kernel

_INT4_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()
INT4_INNER_K_TILES = 2  # the packing's k-tiling; in must be a multiple of 16 · this
GEMV_ROWS = 32  # from this many rows on, dequantize and run a bf16 GEMM (module doc)


@dataclass(frozen=True)
class WeightOnlyKernel:
    """What a weight-only kernel takes: the integer range of its weights, grouped or per channel."""

    name: str
    qmin: int
    qmax: int
    grouped: bool
    group_sizes: tuple[int, ...] = ()
    out_multiple: int = 1  # the packing tiles output channels in blocks of this many

    def unsupported(self, weight_q: Tensor, group_size: int, in_features: int) -> str | None:
        """Why this kernel cannot run the weight, or None."""
        if int(weight_q.min()) < self.qmin or int(weight_q.max()) > self.qmax:
            return f"{self.name} takes weights in [{self.qmin}, {self.qmax}]"
        if self.grouped and group_size not in self.group_sizes:
            return f"{self.name} takes groups of {', '.join(map(str, self.group_sizes))}, not {group_size}"
        if self.grouped and in_features % (16 * INT4_INNER_K_TILES):
            return f"{self.name} needs in_features a multiple of {16 * INT4_INNER_K_TILES}, not {in_features}"
        if weight_q.shape[0] % self.out_multiple:
            return f"{self.name} needs out_features a multiple of {self.out_multiple}, not {weight_q.shape[0]}"
        return None


WEIGHT_ONLY_KERNELS = {
    "int8pack": WeightOnlyKernel("int8pack", -128, 127, grouped=False),
    "int4pack": WeightOnlyKernel("int4pack", -8, 7, grouped=True, group_sizes=(32, 64, 128, 256), out_multiple=16),
}


def _int4_packed(weight_q: Tensor) -> Tensor:
    """The int4pack layout of a grouped int4 weight [out, groups, size], made once per tensor."""
    packed = _INT4_PACKED.get(weight_q)
    if packed is None:
        unsigned = (weight_q.reshape(weight_q.shape[0], -1).to(torch.int32) + 8).contiguous()
        packed = _INT4_PACKED[weight_q] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, INT4_INNER_K_TILES)
    return packed


def _scales_and_zeros(scale: Tensor, zero_point: Tensor | None) -> Tensor:
    """int4pack's [groups, out, 2] bf16 table: each group's scale S, and its offset −Z·S (0
    for symmetric weights), so that (q_unsigned − 8)·S − Z·S = (q − Z)·S."""
    scales = scale.reshape(scale.shape[0], -1).float()
    zeros = torch.zeros_like(scales) if zero_point is None else -zero_point.reshape(scales.shape).float() * scales
    return torch.stack([scales.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()


@torch.library.custom_op("qc::linear_weight_only", mutates_args=())
def linear_weight_only(x: Tensor, weight_q: Tensor, scale: Tensor, zero_point: Tensor | None, group_size: int,
                       bias: Tensor | None, kernel: str) -> Tensor:
    if kernel not in WEIGHT_ONLY_KERNELS:
        raise ValueError(f"linear_weight_only kernel '{kernel}' is not one of: {', '.join(WEIGHT_ONLY_KERNELS)}")
    if weight_q.dtype != torch.int8:
        raise ValueError(f"linear_weight_only weights are int8 storage, got {weight_q.dtype}")
    if zero_point is not None and not WEIGHT_ONLY_KERNELS[kernel].grouped:
        raise ValueError(f"linear_weight_only: {kernel} takes symmetric weights (no zero point)")
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # never fp32 into these kernels (see the module doc)
    if rows.shape[0] >= GEMV_ROWS:
        y = F.linear(rows, dequantized_weight(weight_q, scale, zero_point, torch.bfloat16))
    elif kernel == "int8pack":
        y = torch.ops.aten._weight_int8pack_mm(rows, weight_q, scale.reshape(-1).to(torch.bfloat16))
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, _int4_packed(weight_q), group_size,
                                                        _scales_and_zeros(scale, zero_point))
    if bias is not None:
        y = y.add_(bias.to(torch.bfloat16))
    return y.view(*x.shape[:-1], y.shape[-1]).to(x.dtype)


@linear_weight_only.register_fake
def _(x, weight_q, scale, zero_point, group_size, bias, kernel):
    return x.new_empty((*x.shape[:-1], weight_q.shape[0]))


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


WEIGHT_ONLY = linear_weight_only._opoverload


def describe_weight_only_kernel(node: fx.Node) -> str | None:
    """The report's name for a weight-only linear: its kernel and grouping."""
    if node.op != "call_function" or node.target != WEIGHT_ONLY:
        return None
    arguments = op_arguments(node)
    grouping = f"groups of {arguments['group_size']}" if arguments["group_size"] else "per channel"
    grouping += ", affine" if arguments["zero_point"] is not None else ""
    return f"qc.linear_weight_only via {arguments['kernel']} ({grouping}), bf16 activations"
