"""lower-cpu-fp8: FP8 linears of the Q/DQ graph to ``qc.linear_fp8`` on the path this CPU runs best.

    dequantize(x_q, S_x) -> linear(·, dequantize(W_q, S_W, axis=0), b)
        ->  qc.linear_fp8(x_q, S_x, W_q, S_W, b, out_dtype, path)
    linear(x, dequantize(W_q, S_W, axis=0), b)            (weight-only)
        ->  qc.linear_fp8(x, None, W_q, S_W, b, out_dtype, path)

``x_q`` is FP8 (a quantize's output, or views of it that ``eliminate-dequant`` moved the
dequantize past), ``S_x`` a constant (static) or the node computing it (per tensor or per
token, dynamic).
The path is the best of :func:`~.capabilities.available_paths` (timed at the node's shape where
there is more than one, once per machine: a saved model lowered again here takes the same), and
the pass's diagnostics say which path each linear took and why, so the report never hides a
slow one. The dequantize the kernel absorbs is left to dead-code elimination.

A linear's output is written in bf16 when every reader takes it in bf16 anyway (a weight-only
linear, an FP8 cast), possibly through views and GELU/ReLU, which
then run in bf16 too: converting to fp32 and back was a third of a MiniLM call's copies.

A linear that does not fit (a weight that is not an FP8 constant per output channel, an
activation cast the kernel does not make itself) stays in the reference Q/DQ form, and the
pass says why. Embedding tables need no kernel: ``eliminate-dequant`` already gathers their FP8
rows before dequantizing them, and ``qc.dequantize`` decodes FP8 through a table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from qcompile.ir.graph import add_constant, constant_value, infer_fake_value, insert_call, op_arguments, set_argument
from qcompile.ir.meta import Provenance
from qcompile.latency import LatencyTable
from qcompile.ops import FLOAT8_VALUES
from qcompile.pipeline import Diagnostic, Pass, PassResult
from qcompile.qdq import DequantizeCall, QuantizeCall, qparams_of
from qcompile.targets.cpu_fp8.capabilities import available_paths, fastest_path, why_path
from qcompile.targets.cpu_fp8.kernels import linear_fp8

aten = torch.ops.aten
LINEAR = aten.linear.default
LINEAR_FP8 = linear_fp8._opoverload

# Ops that only select or relayout values on the way from a linear to its readers: views,
# transposes, and the slices that cut merged query/key/value projections apart.
LAYOUT_OPS = frozenset({torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten.transpose.int,
                        torch.ops.aten.permute.default, torch.ops.aten.unsqueeze.default,
                        torch.ops.aten.slice.Tensor})


def bf16_paths(node: fx.Node, reads_bf16: Callable[[fx.Node, fx.Node], bool],
               through: frozenset = LAYOUT_OPS) -> list[fx.Node] | None:
    """The ops between ``node`` and the ops that read it in bf16, when every use of ``node``
    ends in one (``reads_bf16(user, value)``) through ``through`` ops only; None otherwise.
    Such a value may be written in bf16 by its producer: its readers round it to bf16 anyway."""
    layout = []
    for user in node.users:
        if reads_bf16(user, node):
            continue
        if user.op != "call_function" or user.target not in through:
            return None
        below = bf16_paths(user, reads_bf16, through)
        if below is None:
            return None
        layout += [user, *below]
    return layout


def write_bf16(node: fx.Node, paths: list[fx.Node]) -> None:
    """Switch kernel ``node`` to bf16 output; the ops on ``paths`` below it, now computing in
    bf16, are replaced by new nodes (a value keeps its dtype for as long as its node lives)."""
    graph = node.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    set_argument(node, "out_dtype", torch.bfloat16)
    infer_fake_value(node)
    for old in sorted(set(paths), key=order.__getitem__):
        with graph.inserting_before(old):
            new = graph.node_copy(old, lambda n: n)
        old.replace_all_uses_with(new)
        graph.erase_node(old)
        infer_fake_value(new)

# Ops a bf16 value passes through on its way to a bf16 reader, computing in bf16.
BF16_THROUGH = LAYOUT_OPS | {aten.gelu.default, aten.relu.default}


def _reads_bf16(user: fx.Node, value: fx.Node) -> bool:
    """``user`` rounds ``value`` to bf16 (or casts it to FP8) whatever its dtype."""
    if user.target == LINEAR_FP8:
        arguments = op_arguments(user)
        return arguments["x"] is value and arguments["x_scale"] is None
    quantize = QuantizeCall.of(user)
    return quantize is not None and quantize.x is value and quantize.dtype in FLOAT8_VALUES


@dataclass
class _Operands:
    x: fx.Node
    x_scale: fx.Node | None
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
    x, x_scale = op["input"], None
    x_dq = DequantizeCall.of(x)
    if x_dq is not None:
        if x_dq.integer_dtype not in FLOAT8_VALUES or x_dq.axis is not None:
            return "input is not FP8 scaled per tensor or per token"
        zero_point = constant_value(gm, x_dq.zero_point)
        if zero_point is not None and bool(zero_point.any()):
            return "input has a float8 zero point other than 0"
        x, x_scale = x_dq.q, x_dq.scale
    channels = weight_q.shape[0]
    return _Operands(x, x_scale, w_dq.q, w.scale.reshape(-1).expand(channels).contiguous().float(), bias)


def _timing_inputs(linear: fx.Node, ops: _Operands, weight_q: torch.Tensor) -> tuple:
    """Random inputs of the node's shape (symbolic sizes at their hint) for timing its paths."""
    value = ops.x.meta["val"]
    x = torch.randn([int(size) if isinstance(size, int) else size.node.hint for size in value.shape]).to(value.dtype)
    scale = None if ops.x_scale is None else torch.full((1,), 0.01)
    return x, scale, weight_q, ops.weight_scale, ops.bias, linear.meta["val"].dtype


@dataclass(frozen=True)
class LowerCpuFp8(Pass):
    name: ClassVar[str] = "lower-cpu-fp8"
    requires: ClassVar[frozenset[str]] = frozenset({"qdq"})
    establishes: ClassVar[frozenset[str]] = frozenset({"lowered"})

    # The paths to choose from (default: what this CPU runs, :func:`available_paths`).
    paths: tuple[str, ...] | None = None

    def call(self, gm: fx.GraphModule) -> PassResult:
        candidates = self.paths or available_paths()
        table = LatencyTable() if len(candidates) > 1 else None
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
            usable = candidates if ops.x_scale is not None else tuple(p for p in candidates if p != "scaled-mm")
            weight_q = constant_value(gm, ops.weight_q)
            inputs = _timing_inputs(linear, ops, weight_q)
            shape = (f"x{list(inputs[0].shape)} {inputs[0].dtype} w{list(weight_q.shape)} {weight_q.dtype}"
                     f"{' +bias' if ops.bias is not None else ''}")
            path = fastest_path(usable, lambda p: linear_fp8(*inputs, p), shape, table)
            self._lower(gm, linear, ops, path)
            taken[path] = taken.get(path, 0) + 1
            fmt = str(ops.x.meta["val"].dtype).removeprefix("torch.")
            activations = "weight-only, bf16 activations" if ops.x_scale is None else f"{fmt} activations"
            diagnostics.append(Diagnostic(linear.name, "path", f"{path} ({activations}): {why_path(path, usable)}"))
        bf16_outputs = self._write_bf16(gm)
        stats: dict[str, object] = {"lowered": taken} if taken else {}
        if bf16_outputs:
            stats["bf16-outputs"] = bf16_outputs
        return PassResult(gm, bool(taken), stats, tuple(diagnostics))

    @staticmethod
    def _write_bf16(gm: fx.GraphModule) -> int:
        switched = 0
        for node in list(gm.graph.nodes):
            if node.target != LINEAR_FP8 or op_arguments(node)["out_dtype"] != torch.float32 or not node.users:
                continue
            paths = bf16_paths(node, _reads_bf16, BF16_THROUGH)
            if paths is not None:
                write_bf16(node, paths)
                switched += 1
        return switched

    def _lower(self, gm: fx.GraphModule, linear: fx.Node, ops: _Operands, path: str) -> None:
        name = linear.name
        weight_scale = add_constant(gm, ops.weight_scale, f"{name}_weight_scale", before=linear)
        bias = add_constant(gm, ops.bias, f"{name}_bias", before=linear) if ops.bias is not None else None
        args = (ops.x, ops.x_scale, ops.weight_q, weight_scale, bias, linear.meta["val"].dtype, path)
        kernel = insert_call(gm, linear_fp8._opoverload, args, before=linear,
                             provenance=Provenance(self.name, "linear", (name,)), meta_from=linear)
        linear.replace_all_uses_with(kernel)
        gm.graph.erase_node(linear)
