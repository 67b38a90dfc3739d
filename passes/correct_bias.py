"""correct-bias: take the mean output error of a rounded weight out of its op's bias.

    op(x, W, b)   ->   op(x, dequantize(W_q, S, Z), b − δ)         δ_c = mean over x, positions of op(x, Ŵ − W, None)_c

for each op whose weight spec says ``bias_correction=True`` (a linear or convolution, or any op
with a ``weight`` and ``bias``). Rounding to nearest makes an error ΔW = Ŵ − W that is unbiased
per element but not per output: with inputs whose mean is far from zero (post-ReLU, post-GELU
activations, image pixels), op(x, ΔW) has a systematic part, the mean δ over the calibration
inputs and over every output position. The op is linear in its weight, so

    op(x, Ŵ, b − δ) = op(x, W, b) + (op(x, ΔW, None) − δ)

keeps only the zero-mean part of the error (Nagel et al.'s empirical bias correction). δ is
measured by running op(x, ΔW, None) itself on the calibration inputs, exact for any stride,
padding or groups. The rounding is round-to-nearest with the scale ``convert`` would take, and
the weight leaves the pass in its Q/DQ form. A weight whose spec also says ``rounding="gptq"``
is left to the ``gptq`` pass, which rounds for the error left once the bias takes its mean and
shifts the bias itself. An op without a bias gets none (its plan has no bias edge for the int32 bias
a kernel adds); it is named in a diagnostic.

Inside a compile, :meth:`CorrectBias.run` measures δ on the context's calibration data and
binds it (``shifts``); without data a plan that asks for bias correction is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, fx, nn

from qcompile.calibration import record
from qcompile.errors import NodeError, QCompileError
from qcompile.fake_quant import weight_qparams
from qcompile.ir.graph import (
    add_constant,
    constant_expression,
    constant_value,
    copy_graph_module,
    op_arguments,
    remove_dead_nodes,
    set_argument,
)
from qcompile.passes.convert import planned_weights, quantized_weight_constant
from qcompile.pipeline import Diagnostic, Pass, PassResult
from qcompile.spec import QuantSpec

if TYPE_CHECKING:
    from qcompile.context import CompileContext

aten = torch.ops.aten


@dataclass(frozen=True, eq=False)
class BiasShifts:
    """What :meth:`CorrectBias.run` bound: δ per node."""

    shifts: tuple[tuple[str, Tensor], ...] = ()

    def __str__(self) -> str:
        return f"<{len(self.shifts)} bias shifts>"


class _MeanOutputError(nn.Module):
    """Mean per output channel of ``op(x, ΔW, None)`` over every input it is called on."""

    def __init__(self, node: fx.Node, delta: Tensor) -> None:
        super().__init__()
        self.arguments = {k: v for k, v in op_arguments(node).items() if k not in ("input", "weight", "bias")}
        self.target, self.delta = node.target, delta
        self.channel_dim = -1 if node.target == aten.linear.default else 1
        self.total: Tensor | None = None
        self.count = 0

    def forward(self, x: Tensor) -> Tensor:
        y = self.target(x.detach(), self.delta, None, **self.arguments).double()
        y = y.movedim(self.channel_dim, -1).reshape(-1, y.shape[self.channel_dim])
        self.total = y.sum(0) if self.total is None else self.total + y.sum(0)
        self.count += y.shape[0]
        return x

    def mean(self) -> Tensor:
        return (self.total / max(self.count, 1)).float()


def _write_weight(gm: fx.GraphModule, node: fx.Node, index: int, spec: QuantSpec, pass_name: str) -> fx.Node:
    """The weight rounded to nearest with the qparams ``convert`` would take, in its Q/DQ form,
    put in place; returns that form's output node."""
    weight = constant_value(gm, node.args[index])
    if weight is None:
        raise NodeError(node, "bias correction reads a constant weight; this one is computed in the graph")
    try:
        scale, zero_point = weight_qparams(weight, spec)
    except QCompileError as exc:
        raise NodeError(node, str(exc)) from None
    replacement = quantized_weight_constant(gm, weight, scale, zero_point, spec, before=node, pass_name=pass_name,
                                            source=node.args[index])
    node.update_arg(index, replacement)
    return replacement


def corrected_to_nearest(spec: QuantSpec) -> bool:
    """Whether this pass corrects a weight of ``spec``: ``gptq`` shifts the biases of the weights it rounds."""
    return spec.bias_correction and spec.rounding == "nearest"


@dataclass(frozen=True)
class CorrectBias(Pass):
    name: ClassVar[str] = "correct-bias"
    requires: ClassVar[frozenset[str]] = frozenset({"annotated"})

    shifts: BiasShifts | None = field(default=None, compare=False)

    def run(self, gm: fx.GraphModule, context: CompileContext | None = None) -> PassResult:
        """Measure δ of every planned op on the compile's calibration data and bind it."""
        found = [(n, i, s) for n, i, s in planned_weights(gm, corrected_to_nearest) if constant_value(gm, op_arguments(n).get("bias")) is not None]
        if self.shifts is not None or context is None or context.dynamic or not found:
            return self(gm)
        work, recorders = copy_graph_module(gm), []
        copies = {n.name: n for n in work.graph.nodes}
        for node, index, spec in found:
            weight = constant_value(gm, node.args[index])
            rounded = constant_expression(work, _write_weight(work, copies[node.name], index, spec, self.name))
            recorders.append((node.name, op_arguments(node)["input"].name, _MeanOutputError(node, rounded - weight)))
        record(gm, [(source, recorder) for _, source, recorder in recorders], context.calibration_data,
               context.example)
        shifts = tuple((name, recorder.mean()) for name, _, recorder in recorders)
        return replace(self, shifts=BiasShifts(shifts))(gm)

    def call(self, gm: fx.GraphModule) -> PassResult:
        found = planned_weights(gm, corrected_to_nearest)
        if not found:
            return PassResult(gm, False)
        shifts = dict(self.shifts.shifts) if self.shifts is not None else None
        diagnostics = []
        for node, index, spec in found:
            bias_node = op_arguments(node).get("bias")
            bias = constant_value(gm, bias_node)
            if bias is not None and shifts is None:
                raise NodeError(node, "its weight is planned with bias_correction, which reads calibration data: "
                                      "compile with calibration_data (or run correct-bias in a CompileContext with it)")
            _write_weight(gm, node, index, spec, self.name)
            if bias is None:
                diagnostics.append(Diagnostic(node.name, "unsupported", "no bias to correct: rounded to nearest"))
                continue
            corrected = add_constant(gm, bias - shifts[node.name].to(bias.dtype), f"{node.name}_corrected_bias",
                                     before=node)
            set_argument(node, "bias", corrected)
        remove_dead_nodes(gm)  # the float weights and biases
        return PassResult(gm, True, {"corrected": len(found) - len(diagnostics)}, tuple(diagnostics))

