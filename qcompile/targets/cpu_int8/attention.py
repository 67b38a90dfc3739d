"""``qc.attention``: scaled dot-product attention as one native fp32 kernel per (batch, head).

    qc.attention(Q, K, V, mask, scale, is_causal, out_dtype)
        = softmax(Q·Kᵀ·scale + mask) · V        (is_causal: row i keeps positions j <= i;
                                                  scale None: 1/√depth)

Query head h reads key/value head h / (heads / kv_heads) (grouped-query attention), a fully
masked row is zeros, and Q, K, V may be strided views (the transposed projections they arrive
as are read in place). The kernel (``qcompile/csrc/attention.cpp``) never writes the score
matrix: each head's scores are masked, exponentiated and multiplied into V while they are in
cache, and key positions a mask removes from every row (a padded batch's tail) are skipped.
Fewer than four query rows (a decode step) are read straight from K's and V's rows instead.
It computes in fp32, so its contract is the fp32 reference to fp32 tolerance.
``python -m benchmarks.native_kernels`` (2 threads, AMD Zen 4): all-MiniLM's layer (32 x 12
heads x 128 x 32) 8.5 ms against 16.9 for ATen's fp32 SDPA and 17.8 for the bf16 batched
matmul + softmax form it replaced (which also rounded scores and probabilities to bf16); 4.5 ms
with 40 of 128 positions kept; a 512-token GQA decode step 0.05 ms (ATen 0.07); a 128-token
causal prefill 0.38 ms (ATen 0.73). A variant with AVX512-BF16 dot products measured slower on
this CPU (9.8 ms against 8.1 with fp32 FMAs, at 1e4 times the error) and was not kept.

The output is laid out [batch, length, heads, depth] and returned as the [batch, heads, length,
depth] view, so the transpose and reshape back to [batch, length, width] that follow cost nothing.

``qc.attention_quantize(Q, K, V, mask, scale, is_causal, m, S, Z, qmin, qmax, dtype)`` is the same
attention with its output quantized per tensor as each row is finished: ``clamp(round(y · m / S)
+ Z, qmin, qmax)``, m an optional multiplier per output channel (heads · depth, outlier
smoothing's), as uint8 or int8, in the same layout. ``fuse-attention-quantize`` makes it
(:mod:`.fuse_attention_quantize`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from qcompile import native  # noqa: F401  (loads the extension, which defines torch.ops.qc.attention)
from qcompile.kernel_check import register_kernel

attention = torch.ops.qc.attention.default


@torch.library.register_fake("qc::attention")
def _(query, key, value, mask, scale, is_causal, out_dtype):
    batch, heads, length, _ = query.shape
    return query.new_empty((batch, length, heads, value.shape[-1]), dtype=out_dtype).permute(0, 2, 1, 3)


def reference_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float | None,
                        is_causal: bool, out_dtype: torch.dtype) -> Tensor:
    """The contract: ATen's scaled dot-product attention in fp32."""
    out = F.scaled_dot_product_attention(
        query.float(), key.float(), value.float(),
        None if mask is None else (mask if mask.dtype == torch.bool else mask.float()),
        is_causal=is_causal, scale=scale, enable_gqa=query.shape[1] != key.shape[1])
    return out.to(out_dtype)


register_kernel(attention, reference_attention, precision=torch.float32)

attention_quantize = torch.ops.qc.attention_quantize.default


@torch.library.register_fake("qc::attention_quantize")
def _(query, key, value, mask, scale, is_causal, multiplier, out_scale, zero_point, qmin, qmax, dtype):
    batch, heads, length, _ = query.shape
    return query.new_empty((batch, length, heads, value.shape[-1]), dtype=dtype).permute(0, 2, 1, 3)


def reference_attention_quantize(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float | None,
                                 is_causal: bool, multiplier: Tensor | None, out_scale: float, zero_point: int,
                                 qmin: int, qmax: int, dtype: torch.dtype) -> Tensor:
    """The ops it replaces: the attention, its output's channels (heads x depth, as the
    transpose and reshape after it lay them out) times the multiplier, ``qc.quantize``."""
    y = reference_attention(query, key, value, mask, scale, is_causal, torch.float32)
    if multiplier is not None:
        y = y * multiplier.reshape(y.shape[1], 1, y.shape[3])
    return torch.ops.qc.quantize(y, torch.tensor([out_scale]), torch.tensor([zero_point], dtype=torch.int32), None,
                                 qmin, qmax, dtype)


register_kernel(attention_quantize, reference_attention_quantize)
