"""oneDNN int8 kernels on plain tensors: the targets ``lower-cpu-int8`` rewrites Q/DQ into.

The contract each wrapper keeps, checked in tests against the reference ops:

    qlinear(x_q, ...) == quantize_out(post_op(linear(dequantize(x_q), dequantize(w_q), b)))

with activations as uint8 plus one scale and zero point, weights as int8 symmetric per output
channel (zero point 0), bias in float, and the output either float (``out_dtype=float32`` or
``bfloat16``, for float consumers) or uint8 requantized with ``out_scale`` / ``out_zero_point``
(for the next int8 op). ``post_op`` fuses an activation into the kernel epilogue.

Weights are packed once (``prepack_linear_weight``) into oneDNN's blocked layout; the packed
tensor is what a lowered graph keeps as its constant.
"""

from __future__ import annotations

import torch
from torch import Tensor

# post_op name -> (oneDNN post-op name, algorithm): oneDNN's GELU takes its approximation as
# the algorithm argument.
POST_OPS: dict[str, tuple[str, str]] = {
    "none": ("none", ""),
    "relu": ("relu", ""),
    "gelu": ("gelu", "none"),
    "gelu-tanh": ("gelu", "tanh"),
}


def prepack_linear_weight(weight_q: Tensor, x_shape: list[int] | None = None) -> Tensor:
    """Pack an int8 [out, in] weight for ``qlinear``; ``x_shape`` is a hint, not a constraint."""
    if weight_q.dtype != torch.int8 or weight_q.dim() != 2:
        raise ValueError(f"qlinear weights must be 2-D int8, got {weight_q.dtype} {list(weight_q.shape)}")
    return torch.ops.onednn.qlinear_prepack(weight_q, x_shape)


def qlinear(
    x_q: Tensor,
    x_scale: float,
    x_zero_point: int,
    packed_weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    *,
    out_scale: float = 1.0,
    out_zero_point: int = 0,
    out_dtype: torch.dtype = torch.float32,
    post_op: str = "none",
) -> Tensor:
    """int8 linear with a fused post-op; float output ignores ``out_scale`` and ``out_zero_point``."""
    if x_q.dtype != torch.uint8:
        raise ValueError(f"qlinear activations must be uint8, got {x_q.dtype}")
    if post_op not in POST_OPS:
        raise ValueError(f"unknown post-op '{post_op}' (known: {', '.join(POST_OPS)})")
    if out_dtype not in (torch.float32, torch.bfloat16, torch.uint8):
        raise ValueError(f"qlinear output must be float32, bfloat16 or uint8, got {out_dtype}")
    name, algorithm = POST_OPS[post_op]
    if out_dtype != torch.uint8:
        out_scale, out_zero_point = 1.0, 0
    zero_points = torch.zeros(weight_scale.numel(), dtype=torch.int64)
    return torch.ops.onednn.qlinear_pointwise(
        x_q, float(x_scale), int(x_zero_point), packed_weight, weight_scale.float(), zero_points,
        bias, float(out_scale), int(out_zero_point), out_dtype, name, [], algorithm,
    )
