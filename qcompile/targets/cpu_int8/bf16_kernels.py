"""bfloat16 kernels for the float part of an int8 model: ``qc.linear_bf16``.

    x · Wᵀ + b     with bf16 operands (W stored in bf16) and fp32 accumulation, in x's dtype

A linear the QConfig kept float still costs a full fp32 GEMM; on CPUs with AVX512-BF16 this
costs about a quarter, with an error well below the int8 linears around it.

The weight is handed to oneDNN prepacked: ``F.linear`` on a plain bf16 weight reorders it into
oneDNN's blocked layout on every call, which at 4096 x 384 -> 1536 was half the call (AMX Xeon,
2 threads, alternated: 16.0 ms plain against 8.0 packed; 0.21 against 0.16 at 128 rows). The
packed copy is made on the first call, once per weight tensor (the graph keeps the plain one:
it is what is saved and what the reference reads), and gives the plain call's result bit for
bit at every row count (tested).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.weak import WeakIdKeyDictionary

from qcompile.kernel_check import register_kernel
from qcompile.targets.cpu_features import has_bf16_gemm

_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def packed_weight(weight: Tensor, rows: int) -> Tensor | None:
    """``weight`` in oneDNN's blocked layout for this CPU (laid out for ``rows``-row inputs on
    its first use), or None where oneDNN has no native bf16 GEMM: torch's packed bf16 linear
    refuses CPUs without AVX-512 (its own check, which decides even where the flags we read are
    overridden), and ``F.linear`` converts instead."""
    packed = _PACKED.get(weight)  # the checks below run only until the weight is packed
    if packed is None:
        if not (has_bf16_gemm() and torch.backends.mkldnn.is_available()
                and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return None
        packed = _PACKED[weight] = torch.ops.mkldnn._reorder_linear_weight(weight, max(rows, 1))
    return packed


@torch.library.custom_op("qc::linear_bf16", mutates_args=())
def linear_bf16(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x · Wᵀ + b with bf16 operands and the result in x's dtype (W stored in bf16)."""
    bias = None if bias is None else bias.to(torch.bfloat16)
    operand = x.to(torch.bfloat16)
    packed = packed_weight(weight, operand.numel() // max(operand.shape[-1], 1))
    if packed is None:
        return F.linear(operand, weight, bias).to(x.dtype)
    return torch.ops.mkldnn._linear_pointwise(operand, packed, bias, "none", [], "").to(x.dtype)


@linear_bf16.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def reference_linear_bf16(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The contract in fp32, on the bf16-stored weight: x·Wᵀ + b."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


register_kernel(linear_bf16, reference_linear_bf16, precision=torch.bfloat16, tolerance_scale=4.0)
