"""Weight-only linears: ``torch.ops.qc.linear_weight_only``, int8 or int4 weights, bf16 activations.

    linear_weight_only(x, W_q, S, group_size, b, kernel)
        == linear(x, dequantize(W_q, S) per output channel or per group of group_size inputs, b)

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
from qcompile.kernel_check import bf16_linear_bound, register_kernel

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

    def unsupported(self, weight_q: Tensor, group_size: int, in_features: int) -> str | None:
        """Why this kernel cannot run the weight, or None."""
        if int(weight_q.min()) < self.qmin or int(weight_q.max()) > self.qmax:
            return f"{self.name} takes weights in [{self.qmin}, {self.qmax}]"
        if self.grouped and group_size not in self.group_sizes:
            return f"{self.name} takes groups of {', '.join(map(str, self.group_sizes))}, not {group_size}"
        if self.grouped and in_features % (16 * INT4_INNER_K_TILES):
            return f"{self.name} needs in_features a multiple of {16 * INT4_INNER_K_TILES}, not {in_features}"
        return None


WEIGHT_ONLY_KERNELS = {
    "int8pack": WeightOnlyKernel("int8pack", -128, 127, grouped=False),
    "int4pack": WeightOnlyKernel("int4pack", -8, 7, grouped=True, group_sizes=(32, 64, 128, 256)),
}


def _int4_packed(weight_q: Tensor) -> Tensor:
    """The int4pack layout of a grouped int4 weight [out, groups, size], made once per tensor."""
    packed = _INT4_PACKED.get(weight_q)
    if packed is None:
        unsigned = (weight_q.reshape(weight_q.shape[0], -1).to(torch.int32) + 8).contiguous()
        packed = _INT4_PACKED[weight_q] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, INT4_INNER_K_TILES)
    return packed


def _scales_and_zeros(scale: Tensor) -> Tensor:
    """int4pack's [groups, out, 2] bf16 table: each group's scale, and 0 (symmetric weights)."""
    scales = scale.reshape(scale.shape[0], -1).t().to(torch.bfloat16)
    return torch.stack([scales, torch.zeros_like(scales)], dim=-1).contiguous()


@torch.library.custom_op("qc::linear_weight_only", mutates_args=())
def linear_weight_only(x: Tensor, weight_q: Tensor, scale: Tensor, group_size: int, bias: Tensor | None,
                       kernel: str) -> Tensor:
    if kernel not in WEIGHT_ONLY_KERNELS:
        raise ValueError(f"linear_weight_only kernel '{kernel}' is not one of: {', '.join(WEIGHT_ONLY_KERNELS)}")
    if weight_q.dtype != torch.int8:
        raise ValueError(f"linear_weight_only weights are int8 storage, got {weight_q.dtype}")
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # never fp32 into these kernels (see the module doc)
    if rows.shape[0] >= GEMV_ROWS:
        scales = scale.reshape(-1, 1) if weight_q.dim() == 2 else scale
        weight = (weight_q.to(torch.bfloat16) * scales.to(torch.bfloat16)).view(weight_q.shape[0], -1)
        y = F.linear(rows, weight)
    elif kernel == "int8pack":
        y = torch.ops.aten._weight_int8pack_mm(rows, weight_q, scale.reshape(-1).to(torch.bfloat16))
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, _int4_packed(weight_q), group_size,
                                                        _scales_and_zeros(scale))
    if bias is not None:
        y = y.add_(bias.to(torch.bfloat16))
    return y.view(*x.shape[:-1], y.shape[-1]).to(x.dtype)


@linear_weight_only.register_fake
def _(x, weight_q, scale, group_size, bias, kernel):
    return x.new_empty((*x.shape[:-1], weight_q.shape[0]))


def dequantized_weight(weight_q: Tensor, scale: Tensor) -> Tensor:
    """S · W_q as [out, in] float32: per channel ([out] scales) or per group ([out, groups, 1])."""
    values = weight_q.float() * (scale.reshape(-1, 1) if weight_q.dim() == 2 else scale.float())
    return values.reshape(weight_q.shape[0], -1)


def reference_linear_weight_only(x: Tensor, weight_q: Tensor, scale: Tensor, group_size: int, bias: Tensor | None,
                                 kernel: str) -> Tensor:
    """The contract in fp32: x · (S·W_q)ᵀ + b."""
    return F.linear(x.float(), dequantized_weight(weight_q, scale), None if bias is None else bias.float()).to(x.dtype)


def linear_weight_only_bound(x: Tensor, weight_q: Tensor, scale: Tensor, group_size: int, bias: Tensor | None,
                             kernel: str) -> float:
    """bf16 activations and scales, fp32 accumulation: :func:`~qcompile.kernel_check.bf16_linear_bound`."""
    return bf16_linear_bound(x, dequantized_weight(weight_q, scale))


register_kernel(linear_weight_only, reference_linear_weight_only, precision=torch.bfloat16,
                bound=linear_weight_only_bound)


WEIGHT_ONLY = linear_weight_only._opoverload


def describe_weight_only_kernel(node: fx.Node) -> str | None:
    """The report's name for a weight-only linear: its kernel and grouping."""
    if node.op != "call_function" or node.target != WEIGHT_ONLY:
        return None
    arguments = op_arguments(node)
    grouping = f"groups of {arguments['group_size']}" if arguments["group_size"] else "per channel"
    return f"qc.linear_weight_only via {arguments['kernel']} ({grouping}), bf16 activations"
