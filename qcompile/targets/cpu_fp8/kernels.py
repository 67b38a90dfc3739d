"""cpu-fp8's kernel: ``torch.ops.qc.linear_fp8``, what ``lower-cpu-fp8`` rewrites an FP8 linear into.

    linear_fp8(x_q, S_x, W_q, S_W, b, out_dtype, path)
        == linear(dequantize(x_q, S_x), dequantize(W_q, S_W, axis=0), b)

``x_q`` is the FP8 activation the graph's ``qc.quantize`` cast (possibly through views: the
bytes move, not floats), with one scale or one per row ([..., 1], per-token scales computed in
the graph); or, for a weight-only linear, the float activation itself with no scale. ``W_q``
is the FP8 constant the Q/DQ graph holds, symmetric per output channel. ``path`` is the one the
lowering chose (:mod:`.capabilities`): ``scaled-mm`` (``torch._scaled_mm``, the native FP8
GEMM on CPUs with AMX) or ``bf16`` (the weight decoded once per tensor into ``S_W·W_q`` in
bf16 and cached; the activation decoded through a 256-entry table of ``S_x·v``).
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


def _decoded_activation(x_q: Tensor, scale: Tensor) -> Tensor:
    """``S_x · x_q`` in bf16 by one table lookup per element (the table holds S_x·v for each of
    the 256 codes when S_x is one number; per-row scales multiply after)."""
    codes = x_q.reshape(-1).view(torch.uint8).to(torch.int32)
    if scale.numel() == 1:
        table = (FLOAT8_VALUES[x_q.dtype] * scale.float().reshape(())).to(torch.bfloat16)
        return table.index_select(0, codes).view(x_q.shape)
    values = FLOAT8_VALUES[x_q.dtype].to(torch.bfloat16).index_select(0, codes).view(x_q.shape)
    return values.mul_(scale.to(torch.bfloat16))


def _check(x: Tensor, x_scale: Tensor | None, weight: Tensor, path: str) -> None:
    if path not in PATHS:
        raise ValueError(f"linear_fp8 path '{path}' is not one of: {', '.join(PATHS)}")
    if weight.dtype not in FLOAT8_VALUES or weight.dim() != 2:
        raise ValueError(f"linear_fp8 weights must be 2-D float8, got {weight.dtype} {list(weight.shape)}")
    if (x_scale is None) == (x.dtype in FLOAT8_VALUES):
        raise ValueError(f"linear_fp8 takes a float8 activation with its scale, or a float one without (weight-only); "
                         f"got {x.dtype} {'without' if x_scale is None else 'with'} a scale")
    if path == "scaled-mm" and x_scale is None:
        raise ValueError("linear_fp8's scaled-mm path needs FP8 activations")


@torch.library.custom_op("qc::linear_fp8", mutates_args=())
def linear_fp8(x: Tensor, x_scale: Tensor | None, weight: Tensor, weight_scale: Tensor, bias: Tensor | None,
               out_dtype: torch.dtype, path: str) -> Tensor:
    _check(x, x_scale, weight, path)
    if path == "scaled-mm":
        rows = x.reshape(-1, x.shape[-1])
        # _scaled_mm pairs a row-wise weight scale (one per output channel) with row-wise activation scales.
        scale_a = x_scale.float().reshape(-1, 1)
        if scale_a.shape[0] == 1:
            scale_a = scale_a.expand(rows.shape[0], 1)
        y = torch._scaled_mm(rows.contiguous(), weight.t(), scale_a=scale_a.contiguous(),
                             scale_b=weight_scale.float().reshape(1, -1),
                             bias=None if bias is None else bias.to(torch.bfloat16), out_dtype=torch.bfloat16)
        return y.view(*x.shape[:-1], weight.shape[0]).to(out_dtype)
    operand = x.to(torch.bfloat16) if x_scale is None else _decoded_activation(x, x_scale)
    bias = None if bias is None else bias.to(torch.bfloat16)
    return F.linear(operand, decoded_weight(weight, weight_scale), bias).to(out_dtype)


@linear_fp8.register_fake
def _(x, x_scale, weight, weight_scale, bias, out_dtype, path):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=out_dtype)


def _dequantized(q: Tensor, scale: Tensor, axis: int | None) -> Tensor:
    """``qc.dequantize`` of float8 values (zero point 0) to float32."""
    return torch.ops.qc.dequantize(q, scale, torch.zeros_like(scale, dtype=torch.int32), axis, torch.float32)


def reference_linear_fp8(x: Tensor, x_scale: Tensor | None, weight: Tensor, weight_scale: Tensor,
                         bias: Tensor | None, out_dtype: torch.dtype, path: str) -> Tensor:
    """The contract in fp32 with the reference ops the kernel replaced."""
    operand = x.float() if x_scale is None else _dequantized(x, x_scale, None)
    y = F.linear(operand, _dequantized(weight, weight_scale, 0), None if bias is None else bias.float())
    return y.to(out_dtype)


register_kernel(linear_fp8, reference_linear_fp8, precision=torch.bfloat16)


LINEAR_FP8 = linear_fp8._opoverload


def describe_fp8_kernel(node: fx.Node) -> str | None:
    """The report's name for a ``qc.linear_fp8`` node: its path and activation format."""
    if node.op != "call_function" or node.target != LINEAR_FP8:
        return None
    arguments = op_arguments(node)
    x = arguments["x"].meta["val"]
    activations = "bf16 activations (weight-only)" if arguments["x_scale"] is None else str(x.dtype).removeprefix("torch.")
    return f"qc.linear_fp8 via {arguments['path']}, {activations}"
