"""``qc.layer_norm_quantize`` and the pass that makes it: a LayerNorm and the quantize after it in one pass.

    y = layer_norm(x, [C], γ, β, ε)
    m = y · s                         (outlier smoothing's per-channel multiplier; may be absent)
    q = qc.quantize(m, S, Z, None, qmin, qmax, uint8 | int8)
        ->  (y, q) = qc.layer_norm_quantize(x, γ, β, ε, s, S, Z, qmin, qmax, dtype)
    q, S, Z = qc.quantize_per_token(m, qmin, qmax, symmetric, uint8 | int8)     (activations per token)
        ->  (y, q, S, Z) = qc.layer_norm_quantize_per_token(x, γ, β, ε, s, qmin, qmax, symmetric, dtype)

A transformer block's LayerNorm output feeds the residual add in float and the next int8 linear
quantized (smoothed first). Three passes over the activation and a temporary become one native
pass (``qcompile/csrc/layer_norm_quantize.cpp``) that writes y and q. It matches when γ, β, s, S
and Z are constants, S and Z single (per-tensor) and the multiply's only reader is the quantize;
y keeps its other readers. With activations quantized per token (dynamic int8) each row's S and Z
come from its own y·s, chosen as the row is written (four passes become one). The contract: y is
ATen's LayerNorm to fp32 tolerance, q the quantize of y·s to two steps (y's rounding order differs
from ATen's, which may move a value across a rounding boundary), a per-token S its row's to fp32
rounding.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, fx
from torch.nn import functional as F

from qcompile import native  # noqa: F401  (loads the extension, which defines the op)
from qcompile.ir.graph import constant_value, insert_call, op_arguments, reread_constant
from qcompile.ir.meta import Provenance
from qcompile.kernel_check import register_kernel
from qcompile.pipeline import Pass, PassResult
from qcompile.qdq import QuantizeCall
from qcompile.rewrite import fuse_matches

aten = torch.ops.aten
layer_norm_quantize = torch.ops.qc.layer_norm_quantize.default
layer_norm_quantize_per_token = torch.ops.qc.layer_norm_quantize_per_token.default
quantize_per_token = torch.ops.qc.quantize_per_token.default


@torch.library.register_fake("qc::layer_norm_quantize")
def _(x, weight, bias, eps, multiplier, scale, zero_point, qmin, qmax, dtype):
    return torch.empty_like(x), torch.empty_like(x, dtype=dtype)


def reference_layer_norm_quantize(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                                  multiplier: Tensor | None, scale: float, zero_point: int, qmin: int, qmax: int,
                                  dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The ops it replaces: ATen's LayerNorm, the multiply, ``qc.quantize``."""
    y = F.layer_norm(x, [x.shape[-1]], weight, bias, eps)
    smoothed = y * multiplier if multiplier is not None else y
    q = torch.ops.qc.quantize(smoothed, torch.tensor([scale]), torch.tensor([zero_point], dtype=torch.int32), None,
                              qmin, qmax, dtype)
    return y, q


register_kernel(layer_norm_quantize, reference_layer_norm_quantize)


@torch.library.register_fake("qc::layer_norm_quantize_per_token")
def _(x, weight, bias, eps, multiplier, qmin, qmax, symmetric, dtype):
    rows = (*x.shape[:-1], 1)
    return (torch.empty_like(x), torch.empty_like(x, dtype=dtype), x.new_empty(rows, dtype=torch.float32),
            x.new_empty(rows, dtype=torch.int32))


def reference_layer_norm_quantize_per_token(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                                            multiplier: Tensor | None, qmin: int, qmax: int, symmetric: bool,
                                            dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ops it replaces: ATen's LayerNorm, the multiply, ``qc.quantize_per_token``."""
    y = F.layer_norm(x, [x.shape[-1]], weight, bias, eps)
    smoothed = y * multiplier if multiplier is not None else y
    return (y, *torch.ops.qc.quantize_per_token(smoothed, qmin, qmax, symmetric, dtype))


register_kernel(layer_norm_quantize_per_token, reference_layer_norm_quantize_per_token)


@dataclass(frozen=True)
class _Match:
    norm: fx.Node
    multiply: fx.Node | None  # y · s, when smoothing scaled the quantize's input
    multiplier: fx.Node | None  # s's get_attr
    quantize: QuantizeCall | None  # per tensor, with constant S and Z
    per_token: fx.Node | None = None  # or qc.quantize_per_token, read only through its getitems


def _per_token_quantize(node: fx.Node) -> bool:
    """``node`` a ``qc.quantize_per_token`` whose outputs are read only by indexing them."""
    return (node.op == "call_function" and node.target == quantize_per_token
            and all(u.target is operator.getitem for u in node.users))


def _vector(gm: fx.GraphModule, node: object, width: int) -> bool:
    value = constant_value(gm, node)
    return value is not None and value.dtype == torch.float32 and value.numel() == width and value.is_contiguous()


def _match(gm: fx.GraphModule, norm: fx.Node) -> _Match | None:
    """``norm`` a last-dimension fp32 LayerNorm with constant (or no) affine parameters whose
    output, directly or through one multiply by a constant vector, is quantized per tensor."""
    if norm.op != "call_function" or norm.target != aten.layer_norm.default:
        return None
    arguments = op_arguments(norm)
    value = norm.meta.get("val")
    if value is None or value.dtype != torch.float32 or len(arguments["normalized_shape"]) != 1:
        return None
    width = int(arguments["normalized_shape"][0])
    if any(arguments[name] is not None and not _vector(gm, arguments[name], width) for name in ("weight", "bias")):
        return None
    for user in norm.users:
        multiply, multiplier, reader = None, None, user
        if user.target == aten.mul.Tensor and len(user.users) == 1:
            operands = op_arguments(user)
            other = operands["other"] if operands["self"] is norm else operands["self"]
            if not _vector(gm, other, width) or constant_value(gm, other).dim() != 1:
                continue
            multiply, multiplier, reader = user, other, next(iter(user.users))
        quantize = QuantizeCall.of(reader)
        if (quantize is not None and quantize.dtype in native.INTEGER_STORAGE
                and quantize.constant_qparams(gm) is not None):
            return _Match(norm, multiply, multiplier, quantize)
        if _per_token_quantize(reader):
            return _Match(norm, multiply, multiplier, None, reader)
    return None


@dataclass(frozen=True)
class FuseLayerNormQuantize(Pass):
    name: ClassVar[str] = "fuse-layer-norm-quantize"

    def call(self, gm: fx.GraphModule) -> PassResult:
        return fuse_matches(gm, lambda node: _match(gm, node), lambda match: self._fuse(gm, match))

    def _fuse(self, gm: fx.GraphModule, match: _Match) -> None:
        if match.per_token is not None:
            self._fuse_per_token(gm, match)
            return
        norm, quantize = match.norm, match.quantize
        arguments = op_arguments(norm)
        multiplier = None if match.multiplier is None else reread_constant(gm, match.multiplier, before=norm)
        scale, zero_point = quantize.constant_qparams(gm)
        args = (arguments["input"], arguments["weight"], arguments["bias"], float(arguments["eps"]), multiplier,
                scale, zero_point, quantize.qmin, quantize.qmax, quantize.dtype)
        provenance = Provenance(self.name, sources=(norm.name, quantize.node.name))
        pair = insert_call(gm, layer_norm_quantize, args, before=norm, provenance=provenance, meta_from=norm)
        y = insert_call(gm, operator.getitem, (pair, 0), before=norm, provenance=provenance, meta_from=norm)
        q = insert_call(gm, operator.getitem, (pair, 1), before=norm, provenance=provenance, meta_from=quantize.node)
        quantize.node.replace_all_uses_with(q)
        gm.graph.erase_node(quantize.node)
        if match.multiply is not None:
            gm.graph.erase_node(match.multiply)
        norm.replace_all_uses_with(y)
        gm.graph.erase_node(norm)

    def _fuse_per_token(self, gm: fx.GraphModule, match: _Match) -> None:
        """(y, q, S, Z) from one call: y replaces the LayerNorm, q, S and Z the per-token
        quantize's outputs 0, 1 and 2."""
        norm, per_token = match.norm, match.per_token
        arguments, quantized = op_arguments(norm), op_arguments(per_token)
        multiplier = None if match.multiplier is None else reread_constant(gm, match.multiplier, before=norm)
        args = (arguments["input"], arguments["weight"], arguments["bias"], float(arguments["eps"]), multiplier,
                quantized["qmin"], quantized["qmax"], quantized["symmetric"], quantized["dtype"])
        provenance = Provenance(self.name, sources=(norm.name, per_token.name))
        call = insert_call(gm, layer_norm_quantize_per_token, args, before=norm, provenance=provenance, meta_from=norm)
        y = insert_call(gm, operator.getitem, (call, 0), before=norm, provenance=provenance, meta_from=norm)
        for read in list(per_token.users):
            output = insert_call(gm, operator.getitem, (call, read.args[1] + 1), before=norm, provenance=provenance,
                                 meta_from=read)
            read.replace_all_uses_with(output)
            gm.graph.erase_node(read)
        gm.graph.erase_node(per_token)
        if match.multiply is not None:
            gm.graph.erase_node(match.multiply)
        norm.replace_all_uses_with(y)
        gm.graph.erase_node(norm)
