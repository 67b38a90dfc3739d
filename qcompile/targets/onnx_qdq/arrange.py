"""Passes that arrange a Q/DQ graph for ONNX Runtime's CPU graph optimizer, values unchanged.

    linear(x, W, dequantize(b_q, S_b, 0)) -> linear(x, W, b)           rank(x) > 2, b = S_b·b_q
    layer_norm(add(linear(x, W, b), r))   -> layer_norm(unfused_sum([linear(x, W), r, b]))
    quantize(relu(x), S, 0, float8)       -> quantize(maximum(x, 0), S, 0, float8)
    linear(x, view(dequantize(W_q, S, Z), [out, in]), b)   (groups)
                                          -> matmul(x, dequantize_blocked(W_qᵀ, Sᵀ, Zᵀ, size)) + b

They run on the export's own copy of the graph (``export_onnx``), never on the model that
runs in torch, as the pipeline :data:`ARRANGE_FOR_ONNX_RUNTIME`, after the target-independent
``quantize-before-pad`` (a one-sided pad moved onto the integers, so DQ→Conv→Q fuses), so dumps, verification and
``QCOMPILE_SKIP_PASSES`` see them like any other pass. ``qc.unfused_sum`` is written to ONNX
as one ``Sum`` and ``qc.dequantize_blocked`` as one blocked ``DequantizeLinear`` (their
translations live with the exporter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from qcompile.ir.graph import add_constant, constant_value, insert_call, op_arguments, set_argument
from qcompile.ir.meta import Provenance
from qcompile.pipeline import Pass, PassResult
from qcompile.qdq import DequantizeCall, QuantizeCall, quantized_weight

aten = torch.ops.aten


@torch.library.custom_op("qc::unfused_sum", mutates_args=())
def unfused_sum(values: list[torch.Tensor]) -> torch.Tensor:
    """The broadcast sum of ``values``, written to ONNX as one ``Sum`` (see :class:`ResidualAddsAsSums`)."""
    total = values[0] + values[1]
    for value in values[2:]:
        total = total + value
    return total


@unfused_sum.register_fake
def _(values):
    return torch.empty_like(values[0])


UNFUSED_SUM = unfused_sum._opoverload


@torch.library.custom_op("qc::dequantize_blocked", mutates_args=())
def dequantize_blocked(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, block_size: int,
                       bits: int) -> torch.Tensor:
    """ONNX's blocked DequantizeLinear along axis 0, in float32:

        y[k, n] = (q[k, n] − Z[k // block_size, n]) · S[k // block_size, n]

    the same products ``qc.dequantize`` forms for a group, so the values are bit for bit the
    grouped weight's. ``bits`` is the integer width the file stores ``q`` in (4 or 8)."""
    s = scale.repeat_interleave(block_size, 0).to(torch.float32)
    z = zero_point.repeat_interleave(block_size, 0).to(torch.float32)
    return (q.to(torch.float32) - z) * s


@dequantize_blocked.register_fake
def _(q, scale, zero_point, block_size, bits):
    return torch.empty_like(q, dtype=torch.float32)


DEQUANTIZE_BLOCKED = dequantize_blocked._opoverload


@dataclass(frozen=True)
class FloatMatmulBiases(Pass):
    """Linears with batched (rank > 2) inputs take their bias as a float constant, the
    dequantized int32 values, exactly what the Q/DQ graph adds.

    The exporter writes those linears as MatMul + Add; ONNX Runtime folds a *constant* bias Add
    into BiasGelu, but not one computed by DequantizeLinear, which would leave a separate Add
    per linear. Gemm and Conv keep the int32 bias: their QDQ fusions (QGemm, QLinearConv) take it.
    """

    name: ClassVar[str] = "onnx-float-matmul-biases"
    requires: ClassVar[frozenset[str]] = frozenset({"qdq"})
    preserves_semantics: ClassVar[bool] = True

    def call(self, gm: fx.GraphModule) -> PassResult:
        changed = 0
        for node in list(gm.graph.nodes):
            linear = op_arguments(node) if node.target == aten.linear.default else None
            bias = DequantizeCall.of(linear["bias"]) if linear is not None else None
            if bias is None:
                continue
            stored = [constant_value(gm, a) for a in (bias.q, bias.scale, bias.zero_point)]
            if any(t is None for t in stored) or linear["input"].meta["val"].dim() <= 2:
                continue
            value = torch.ops.qc.dequantize(*stored, bias.axis, bias.out_dtype)
            set_argument(node, "bias", add_constant(gm, value, f"{bias.q.target}_float", before=node))
            changed += 1
        return PassResult(gm, bool(changed), {"float-biases": changed} if changed else {})


@dataclass(frozen=True)
class ResidualAddsAsSums(Pass):
    """A float add whose only reader is a LayerNorm (a transformer's residual) is written as Sum,
    with the constant bias of a linear operand moved into it.

    ONNX Runtime fuses Add -> LayerNormalization into SkipLayerNormalization, whose CPU kernel
    is a scalar loop with a division per element: measured 3.4x slower than the Add and the
    LayerNormalization it replaces (all-MiniLM: 44 of 214 ms per batch). Sum computes the same
    values and is left alone by that fusion; taking the linear's bias as a third input keeps the
    bias from costing an Add of its own.
    """

    name: ClassVar[str] = "onnx-residual-sums"
    preserves_semantics: ClassVar[bool] = True

    def call(self, gm: fx.GraphModule) -> PassResult:
        changed = 0
        for node in list(gm.graph.nodes):
            operands = self._residual_operands(node)
            if operands is None:
                continue
            for operand in operands:
                linear = op_arguments(operand) if operand.target == aten.linear.default else None
                if linear is not None and len(operand.users) == 1 and constant_value(gm, linear["bias"]) is not None:
                    operands.append(linear["bias"])
                    set_argument(operand, "bias", None)
                    break
            summed = insert_call(gm, UNFUSED_SUM, (operands,), before=node,
                                 provenance=Provenance(self.name, "residual-sum", (node.name,)), meta_from=node)
            node.replace_all_uses_with(summed)
            gm.graph.erase_node(node)
            changed += 1
        return PassResult(gm, bool(changed), {"sums": changed} if changed else {})

    @staticmethod
    def _residual_operands(node: fx.Node) -> list[fx.Node] | None:
        """The two same-shape operands of an add that only a LayerNorm reads (as its input)."""
        users = list(node.users)
        if node.target != aten.add.Tensor or len(users) != 1 or users[0].target != aten.layer_norm.default:
            return None
        add = op_arguments(node)
        if add["alpha"] != 1 or op_arguments(users[0])["input"] is not node:
            return None
        operands = [add["self"], add["other"]]
        if not all(isinstance(x, fx.Node) and x.meta["val"].shape == node.meta["val"].shape for x in operands):
            return None
        return operands


@dataclass(frozen=True)
class Float8ReluAsMax(Pass):
    """A relu read by a float8 quantize is written as ``maximum(x, 0)`` (ONNX ``Max``).

    ONNX Runtime 1.32's optimizer removes a ``Relu`` followed by a ``QuantizeLinear`` whose zero
    point is 0, as if the quantize's saturation clipped negative values, which is true of uint8
    and false of float8 (a signed format): the optimized file then lets negatives through,
    measured on a conv -> relu -> FP8 quantize as 45 % of the values wrong (the cross-check
    caught it: 121 codes apart). ``Max`` computes the same values and is not fused away.
    """

    name: ClassVar[str] = "onnx-float8-relu-as-max"
    requires: ClassVar[frozenset[str]] = frozenset({"qdq"})
    preserves_semantics: ClassVar[bool] = True

    def call(self, gm: fx.GraphModule) -> PassResult:
        changed = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in (aten.relu.default, aten.relu_.default):
                continue
            readers = [QuantizeCall.of(user) for user in node.users]
            if not any(q is not None and q.dtype.is_floating_point for q in readers):
                continue
            x = op_arguments(node)["self"]
            zero = add_constant(gm, torch.zeros((), dtype=x.meta["val"].dtype), f"{node.name}_zero", before=node)
            maximum = insert_call(gm, aten.maximum.default, (x, zero), before=node,
                                  provenance=Provenance(self.name, "relu-as-max", (node.name,)), meta_from=node)
            node.replace_all_uses_with(maximum)
            gm.graph.erase_node(node)
            changed += 1
        return PassResult(gm, bool(changed), {"relus": changed} if changed else {})


@dataclass(frozen=True)
class BlockedWeights(Pass):
    """A linear with per-group weights becomes a MatMul on a blocked DequantizeLinear.

        linear(x, view(dequantize(W_q, S, Z), [out, in]), b)  ->  matmul(x, dequantize_blocked(W_qᵀ, Sᵀ, Zᵀ, size)) + b

    with W_q [out, in / size, size] stored transposed as [in, out] and S, Z as [in / size, out]:
    ONNX blocks run along an axis of the tensor itself, and x·Wᵀ is x times that [in, out]
    matrix. Values in [-8, 7] are written as INT4 (two a byte), wider ones as INT8. ONNX
    Runtime fuses a constant INT4 blocked DequantizeLinear along axis 0 into its MatMul as
    ``MatMulNBits`` (and the bias Add into it), its 4-bit weight-only kernel.
    """

    name: ClassVar[str] = "onnx-blocked-weights"
    requires: ClassVar[frozenset[str]] = frozenset({"qdq"})
    preserves_semantics: ClassVar[bool] = True

    def call(self, gm: fx.GraphModule) -> PassResult:
        changed = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target != aten.linear.default:
                continue
            linear = op_arguments(node)
            found = quantized_weight(gm, linear["weight"])
            if found is None or not found[1]:
                continue
            dq, size = found
            stored = [constant_value(gm, a) for a in (dq.q, dq.scale, dq.zero_point)]
            if any(t is None for t in stored):
                continue
            q, scale, zero_point = (t.reshape(t.shape[0], -1).t().contiguous() for t in stored)
            bits = 4 if int(q.min()) >= -8 and int(q.max()) <= 7 else 8
            provenance = Provenance(self.name, "blocked", (node.name,))
            constants = [add_constant(gm, t, f"{node.name}_blocked_{suffix}", before=node)
                         for t, suffix in ((q, "q"), (scale, "scale"), (zero_point.to(torch.int32), "zero_point"))]
            weight = insert_call(gm, DEQUANTIZE_BLOCKED, (*constants, size, bits), before=node, provenance=provenance)
            result = insert_call(gm, aten.matmul.default, (linear["input"], weight), before=node, provenance=provenance,
                                 meta_from=node)
            if linear["bias"] is not None:
                result = insert_call(gm, aten.add.Tensor, (result, linear["bias"]), before=node,
                                     provenance=provenance, meta_from=node)
            node.replace_all_uses_with(result)
            gm.graph.erase_node(node)
            changed += 1
        return PassResult(gm, bool(changed), {"blocked": changed} if changed else {})


ARRANGE_FOR_ONNX_RUNTIME = "quantize-before-pad,onnx-blocked-weights,onnx-float-matmul-biases,onnx-residual-sums,onnx-float8-relu-as-max,eliminate-dead-code"
