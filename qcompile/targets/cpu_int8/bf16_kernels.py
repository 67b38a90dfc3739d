"""bfloat16 kernels for the float part of an int8 model: ``qc.linear_bf16``.

    x · Wᵀ + b     with bf16 operands (W stored in bf16) and fp32 accumulation, in x's dtype

A linear the QConfig kept float still costs a full fp32 GEMM; on CPUs with AVX512-BF16 this
costs about a quarter, with an error well below the int8 linears around it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from qcompile.kernel_check import register_kernel


@torch.library.custom_op("qc::linear_bf16", mutates_args=())
def linear_bf16(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x · Wᵀ + b with bf16 operands and the result in x's dtype (W stored in bf16)."""
    bias = None if bias is None else bias.to(torch.bfloat16)
    return torch.nn.functional.linear(x.to(torch.bfloat16), weight, bias).to(x.dtype)


@linear_bf16.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def reference_linear_bf16(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The contract in fp32, on the bf16-stored weight: x·Wᵀ + b."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


register_kernel(linear_bf16, reference_linear_bf16, precision=torch.bfloat16, tolerance_scale=4.0)
