"""lower-cpu-fp8: FP8 linears of the Q/DQ graph to ``qc.linear_fp8`` on the path this CPU runs best.

    dequantize(quantize(x, S_x, fp8), S_x) -> linear(·, dequantize(W_q, S_W, axis=0), b)
        ->  qc.linear_fp8(x, S_x, fp8, W_q, S_W, b, path)
    linear(x, dequantize(W_q, S_W, axis=0), b)            (weight-only)
        ->  qc.linear_fp8(x, None, None, W_q, S_W, b, path)

``S_x`` is a constant (static), or the node computing it (per tensor or per token, dynamic).
The path is the best of :func:`~.capabilities.available_paths` (timed at the node's shape where
there is more than one), and the pass's diagnostics say which path each linear took and why,
so the report never hides a slow one. The quantize and dequantize the kernel absorbs are left
to dead-code elimination (another reader of the same quantize keeps it).

A linear that does not fit (a weight that is not an FP8 constant per output channel, an
activation cast the kernel does not make itself) stays in the reference Q/DQ form, and the
pass says why. Embedding tables need no kernel: ``eliminate-dequant`` already gathers their FP8
rows before dequantizing them, and ``qc.dequantize`` decodes FP8 through a table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from qcompile.ir.graph import add_constant, constant_value, insert_call, op_arguments
from qcompile.ir.meta import Provenance
from qcompile.ops import FLOAT8_VALUES
from qcompile.pipeline import Diagnostic, Pass, PassResult
from qcompile.qdq import DequantizeCall, QuantizeCall, qparams_of
from qcompile.targets.cpu_fp8.capabilities import available_paths, fastest_path, why_path
from qcompile.targets.cpu_fp8.kernels import linear_fp8

LINEAR = torch.ops.aten.linear.default


@dataclass
class _Operands:
    x: fx.Node
    x_scale: fx.Node | None
    x_format: torch.dtype | None
    weight_q: fx.Node
    weight_scale: torch.Tensor
    bias: torch.Tensor | None


def _operands(gm: fx.GraphModule, linear: fx.Node) -> _Operands | str:
    """The kernel's inputs read off the Q/DQ form, or why the linear does not fit the kernel."""
    op = op_arguments(linear)
    w_dq = DequantizeCall.of(op["weight"])
    weight_q = constant_value(gm, w_dq.q) if w_dq is not None else None
    if weight_q is None or weight_q.dtype not in FLOAT8_VALUES:
        return "weight is not a dequantized FP8 constant"
    w = qparams_of(gm, w_dq.node)
    if not w.static or w.axis not in (None, 0) or weight_q.dim() != 2:
        return "weight is not a 2-D FP8 constant scaled per tensor or per output channel"
    bias = constant_value(gm, op["bias"])
    if op["bias"] is not None and bias is None:
        return "bias is computed in the graph"
    x, x_scale, x_format = op["input"], None, None
    x_dq = DequantizeCall.of(x)
    if x_dq is not None:
        quantize = QuantizeCall.of(x_dq.q)
        if quantize is None or quantize.dtype not in FLOAT8_VALUES or quantize.axis is not None:
            return "input is not cast to FP8 right before the linear (per tensor or per token)"
        x, x_scale, x_format = quantize.x, quantize.scale, quantize.dtype
    channels = weight_q.shape[0]
    return _Operands(x, x_scale, x_format, w_dq.q, w.scale.reshape(-1).expand(channels).contiguous().float(), bias)


def _timing_inputs(linear: fx.Node, ops: _Operands, weight_q: torch.Tensor) -> tuple:
    """Random inputs of the node's shape (symbolic sizes at their hint) for timing its paths."""
    shape = [int(size) if isinstance(size, int) else size.node.hint for size in linear.args[0].meta["val"].shape]
    x = torch.randn(shape)
    scale = None if ops.x_format is None else torch.full((1,), 0.01)
    return x, scale, ops.x_format, weight_q, ops.weight_scale, ops.bias


@dataclass(frozen=True)
class LowerCpuFp8(Pass):
    name: ClassVar[str] = "lower-cpu-fp8"
    requires: ClassVar[frozenset[str]] = frozenset({"qdq"})
    establishes: ClassVar[frozenset[str]] = frozenset({"lowered"})

    # The paths to choose from (default: what this CPU runs, :func:`available_paths`).
    paths: tuple[str, ...] | None = None

    def call(self, gm: fx.GraphModule) -> PassResult:
        candidates = self.paths or available_paths()
        taken: dict[str, int] = {}
        diagnostics = []
        for linear in list(gm.graph.nodes):
            if linear.op != "call_function" or linear.target != LINEAR:
                continue
            ops = _operands(gm, linear)
            if isinstance(ops, str):
                if DequantizeCall.of(op_arguments(linear)["weight"]) is not None:
                    diagnostics.append(Diagnostic(linear.name, "kept", ops))
                continue
            usable = candidates if ops.x_format is not None else tuple(p for p in candidates if p != "scaled-mm")
            weight_q = constant_value(gm, ops.weight_q)
            path = fastest_path(usable, lambda p: linear_fp8(*_timing_inputs(linear, ops, weight_q), p))
            self._lower(gm, linear, ops, path)
            taken[path] = taken.get(path, 0) + 1
            activations = "weight-only, bf16 activations" if ops.x_format is None else f"{ops.x_format} activations"
            diagnostics.append(Diagnostic(linear.name, "path", f"{path} ({activations}): {why_path(path, usable)}"))
        return PassResult(gm, bool(taken), {"lowered": taken} if taken else {}, tuple(diagnostics))

    def _lower(self, gm: fx.GraphModule, linear: fx.Node, ops: _Operands, path: str) -> None:
        name = linear.name
        weight_scale = add_constant(gm, ops.weight_scale, f"{name}_weight_scale", before=linear)
        bias = add_constant(gm, ops.bias, f"{name}_bias", before=linear) if ops.bias is not None else None
        args = (ops.x, ops.x_scale, ops.x_format, ops.weight_q, weight_scale, bias, path)
        kernel = insert_call(gm, linear_fp8._opoverload, args, before=linear,
                             provenance=Provenance(self.name, "linear", (name,)), meta_from=linear)
        linear.replace_all_uses_with(kernel)
        gm.graph.erase_node(linear)
