"""bfloat16 kernels for the float part of an int8 model: ``qc.attention_bf16``, ``qc.linear_bf16``.

    softmax(Q·Kᵀ · scale + mask) · V     computed with bf16 batched matmuls, returned in ``out_dtype``

On CPUs with AVX512-BF16 this explicit form runs several times faster than the fp32 fused
scaled-dot-product kernel at BERT shapes (sequence 128, head 32), because the two batched
matmuls dominate and bf16 halves their cost and memory traffic. The mask is clamped to bf16's
finite range first: fp32's lowest value (what Hugging Face uses for padding) rounds to -inf in
bf16, which would turn a fully masked row into NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from qcompile.kernel_check import register_kernel

_BF16_LOWEST = torch.finfo(torch.bfloat16).min


def _contiguous_bf16(like: Tensor) -> Tensor:
    return torch.empty(like.shape, dtype=torch.bfloat16, device=like.device)


@torch.library.custom_op("qc::attention_bf16", mutates_args=())
def attention_bf16(
    query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float, out_dtype: torch.dtype
) -> Tensor:
    *batch, length, depth = query.shape
    # One pass each into a new contiguous bf16 buffer (q, k, v usually arrive as transposed
    # views): writing through ``out=``/``copy_`` is about 3x faster than ``.to(bfloat16,
    # memory_format=...)`` on a transposed fp32 view, which converts and relayouts separately.
    q = torch.mul(query, scale, out=_contiguous_bf16(query)).view(-1, length, depth)
    k = _contiguous_bf16(key).copy_(key).view(-1, key.shape[-2], depth)
    v = _contiguous_bf16(value).copy_(value).view(-1, *value.shape[-2:])
    scores = torch.bmm(q, k.transpose(1, 2)).view(*batch, length, k.shape[1])
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill_(~mask, float("-inf"))
        else:
            scores = scores.add_(mask.clamp(min=_BF16_LOWEST).to(torch.bfloat16))
    probabilities = torch.softmax(scores, dim=-1).reshape(-1, length, k.shape[1])
    out = torch.bmm(probabilities, v)
    return out.reshape(*batch, length, value.shape[-1]).to(out_dtype)


@attention_bf16.register_fake
def _(query, key, value, mask, scale, out_dtype):
    return query.new_empty((*query.shape[:-1], value.shape[-1]), dtype=out_dtype)


@torch.library.custom_op("qc::linear_bf16", mutates_args=())
def linear_bf16(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x · Wᵀ + b with bf16 operands and the result in x's dtype (W stored in bf16)."""
    bias = None if bias is None else bias.to(torch.bfloat16)
    return torch.nn.functional.linear(x.to(torch.bfloat16), weight, bias).to(x.dtype)


@linear_bf16.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def reference_attention_bf16(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float,
                             out_dtype: torch.dtype) -> Tensor:
    """The contract in fp32: softmax(Q·Kᵀ·scale + mask)·V."""
    out = F.scaled_dot_product_attention(query.float(), key.float(), value.float(),
                                         None if mask is None else (mask if mask.dtype == torch.bool else mask.float()),
                                         scale=scale)
    return out.to(out_dtype)


def reference_linear_bf16(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The contract in fp32, on the bf16-stored weight: x·Wᵀ + b."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


# Below this an additive mask removes a position: its weight is under e^-1000 of the row's.
_MASKED = -1e3


def attention_bf16_bound(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float,
                         out_dtype: torch.dtype) -> float:
    """The error bf16 attention may make on these inputs, absolute: 2·u·(L + 1)·max|v|.

    With u = 2⁻⁹ (bf16's unit roundoff) and L the largest |logit| s = scale·q·k over the positions
    the mask keeps: q·scale, k and the score are rounded, so a logit is off by about u·|s| ≤ u·L;
    the softmax turns that into a relative change of about u·L in the probabilities, and rounding
    p and v adds about u. So the output moves by about u·(L + 1)·max|v|; measured on random
    heads, 0.26 to 0.36 of u·L·max|v| for L from 4 to 37. Twice the estimate is allowed: it follows
    the logits, which a fixed tolerance cannot (all-MiniLM with int4 weights reaches L ≈ 30), and
    stays far below garbage (at L = 30, 0.12 of max|v|)."""
    scores = torch.matmul(query.float() * scale, key.float().transpose(-1, -2))
    if mask is not None:
        keep = mask if mask.dtype == torch.bool else mask > _MASKED
        scores = scores.masked_fill(~keep, 0.0)
    u = 2.0**-9
    return 2 * u * (float(scores.abs().max()) + 1) * float(value.float().abs().max())


# bf16 operands (8-bit mantissas) into dot products and a softmax: all-MiniLM's attention measured
# up to 0.008 of the largest output (about 2^-7); allowed 4x that, 2^-5, or the rounding bound of
# attention_bf16_bound where the logits are large.
register_kernel(attention_bf16, reference_attention_bf16, precision=torch.bfloat16, tolerance_scale=4.0,
                bound=attention_bf16_bound)
register_kernel(linear_bf16, reference_linear_bf16, precision=torch.bfloat16, tolerance_scale=4.0)
