"""cpu-fp8's kernel: ``torch.ops.qc.linear_fp8``, what ``lower-cpu-fp8`` rewrites an FP8 linear into.

    linear_fp8(x, S_x, fmt, W_q, S_W, b, path)
        == linear(dequantize(quantize(x, S_x, fmt)), dequantize(W_q, S_W, axis=0), b)

``x`` arrives in float and is cast to ``fmt`` (E4M3 or E5M2) with ``S_x`` inside the kernel:
one scale, or one per row ([..., 1], per-token scales computed in the graph). Without ``fmt``
the linear is weight-only and ``x`` is read as it is. ``W_q`` is the FP8 constant the Q/DQ
graph holds, symmetric per output channel. ``path`` is the one the lowering chose
(:mod:`.capabilities`): ``scaled-mm`` (``torch._scaled_mm``, the native FP8 GEMM on CPUs with
AMX) or ``bf16`` (the weight decoded once per tensor into ``S_W·W_q`` in bf16 and cached, the
activation decoded through a 256-entry table of ``S_x·v``). The result is in ``x``'s dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, fx
from torch.nn import functional as F
from torch.utils.weak import WeakIdKeyDictionary

from qcompile.ir.graph import op_arguments
from qcompile.kernel_check import register_kernel
from qcompile.ops import FLOAT8_VALUES, float8_to_float32
from qcompile.targets.cpu_fp8.capabilities import PATHS

_DECODED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def decoded_weight(weight: Tensor, weight_scale: Tensor) -> Tensor:
    """``S_W · W_q`` in bf16 for an FP8 [out, in] weight, made once per weight tensor."""
    decoded = _DECODED.get(weight)
    if decoded is None:
        values = float8_to_float32(weight) * weight_scale.float().reshape(-1, 1)
        decoded = _DECODED[weight] = values.to(torch.bfloat16)
    return decoded


def _cast(x: Tensor, scale: Tensor, fmt: torch.dtype) -> Tensor:
    """fp8(clamp(x / S, −max, max)): ``qc.quantize`` to ``fmt`` with zero point 0."""
    finite_max = int(torch.finfo(fmt).max)
    return torch.ops.qc.quantize(x, scale, torch.zeros_like(scale, dtype=torch.int32), None,
                                 -finite_max, finite_max, fmt)


def _decoded_activation(x: Tensor, scale: Tensor, fmt: torch.dtype) -> Tensor:
    """``S_x · fp8(x / S_x)`` in bf16: the cast, then one table lookup per element (the table
    holds S_x·v for each of the 256 codes when S_x is one number; per-row scales multiply after)."""
    codes = _cast(x, scale, fmt).view(torch.uint8).reshape(-1).to(torch.int32)
    if scale.numel() == 1:
        table = (FLOAT8_VALUES[fmt] * scale.float().reshape(())).to(torch.bfloat16)
        return table.index_select(0, codes).view(x.shape)
    values = FLOAT8_VALUES[fmt].to(torch.bfloat16).index_select(0, codes).view(x.shape)
    return values.mul_(scale.to(torch.bfloat16))


@torch.library.custom_op("qc::linear_fp8", mutates_args=())
def linear_fp8(x: Tensor, x_scale: Tensor | None, x_format: torch.dtype | None, weight: Tensor,
               weight_scale: Tensor, bias: Tensor | None, path: str) -> Tensor:
    if path not in PATHS:
        raise ValueError(f"linear_fp8 path '{path}' is not one of: {', '.join(PATHS)}")
    if weight.dtype not in FLOAT8_VALUES or weight.dim() != 2:
        raise ValueError(f"linear_fp8 weights must be 2-D float8, got {weight.dtype} {list(weight.shape)}")
    if (x_scale is None) != (x_format is None):
        raise ValueError("linear_fp8 takes an activation scale and format together (or neither: weight-only)")
    if path == "scaled-mm":
        if x_format is None:
            raise ValueError("linear_fp8's scaled-mm path needs FP8 activations")
        rows = x.reshape(-1, x.shape[-1])
        per_row = x_scale.float().reshape(-1, 1) if x_scale.numel() > 1 else None
        # _scaled_mm pairs a row-wise weight scale (one per output channel) with row-wise activation scales.
        scale_a = per_row if per_row is not None else x_scale.float().reshape(1, 1).expand(rows.shape[0], 1)
        y = torch._scaled_mm(_cast(rows, per_row if per_row is not None else x_scale, x_format), weight.t(),
                             scale_a=scale_a.contiguous(), scale_b=weight_scale.float().reshape(1, -1),
                             bias=None if bias is None else bias.to(torch.bfloat16), out_dtype=torch.bfloat16)
        return y.view(*x.shape[:-1], weight.shape[0]).to(x.dtype)
    operand = x.to(torch.bfloat16) if x_format is None else _decoded_activation(x, x_scale, x_format)
    bias = None if bias is None else bias.to(torch.bfloat16)
    return F.linear(operand, decoded_weight(weight, weight_scale), bias).to(x.dtype)


@linear_fp8.register_fake
def _(x, x_scale, x_format, weight, weight_scale, bias, path):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def reference_linear_fp8(x: Tensor, x_scale: Tensor | None, x_format: torch.dtype | None, weight: Tensor,
                         weight_scale: Tensor, bias: Tensor | None, path: str) -> Tensor:
    """The contract in fp32 with the reference ops the kernel replaced."""
    operand = x.float()
    if x_format is not None:
        zero = torch.zeros_like(x_scale, dtype=torch.int32)
        operand = torch.ops.qc.dequantize(_cast(x, x_scale, x_format), x_scale, zero, None, torch.float32)
    w = torch.ops.qc.dequantize(weight, weight_scale, torch.zeros_like(weight_scale, dtype=torch.int32), 0,
                                torch.float32)
    return F.linear(operand, w, None if bias is None else bias.float()).to(x.dtype)


# Both paths compute in bf16 (operands rounded to bf16's 8-bit mantissa, fp32 accumulation).
register_kernel(linear_fp8, reference_linear_fp8, precision=torch.bfloat16)


LINEAR_FP8 = linear_fp8._opoverload


def describe_fp8_kernel(node: fx.Node) -> str | None:
    """The report's name for a ``qc.linear_fp8`` node: its path and activation format."""
    if node.op != "call_function" or node.target != LINEAR_FP8:
        return None
    arguments = op_arguments(node)
    fmt = arguments["x_format"]
    activations = "bf16 activations (weight-only)" if fmt is None else str(fmt).removeprefix("torch.")
    return f"qc.linear_fp8 via {arguments['path']}, {activations}"
