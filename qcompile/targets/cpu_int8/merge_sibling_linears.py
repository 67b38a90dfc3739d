"""merge-sibling-linears: linears that read the same value run as one GEMM.

    linear(x, W1, b1), linear(x, W2, b2), linear(x, W3, b3)
        ->  y = linear(x, [W1; W2; W3], [b1; b2; b3]);   y[..., :n1], y[..., n1:n1+n2], y[..., n1+n2:]

Attention's query, key and value projections are the common case: one GEMM with three times
the output channels instead of three GEMMs, so the input is read once and the int8 kernel is
called once per layer instead of three times. cpu-int8 runs it in its lowering only: in an ONNX
file ONNX Runtime copies each slice, which measured slower than three MatMulIntegerToFloat.
The pass runs on the Q/DQ form, where a quantized weight is
``dequantize(W_q, S, Z)`` with one scale per output channel (a per-tensor scale is repeated
per channel), or ``view(dequantize(W_q, S, Z), [out, in])`` per group (``W_q`` [out, in / size,
size], ``S`` and ``Z`` [out, in / size, 1]; siblings merge when their groups have one size):
stacking integers, scales, zero points and biases row-wise leaves every output channel with
exactly its own numbers, so the pieces are the values the siblings computed. A decoder's query,
key and value projections in int4 groups (W4, W4A8) so become one weight-only kernel call, as
its MLP's gate and up projections do.

A sibling joins only when its output is used as plain float. A requantized output, or one that
starts a group fuse-patterns would fuse (relu/gelu, a residual add), keeps its own linear: the
slice would separate the GEMM from the epilogue its kernel runs.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from qcompile.ir.graph import add_constant, constant_value, insert_call, op_arguments, remove_dead_nodes
from qcompile.ir.meta import Provenance, STANDS_FOR
from qcompile.pipeline import Pass, PassResult
from qcompile.targets.cpu_int8.fuse_patterns import fusion_group
from qcompile.qdq import DEQUANTIZE, is_quantize, quantized_weight

aten = torch.ops.aten
LINEAR = aten.linear.default


@dataclass(frozen=True)
class _Operand:
    """A linear's weight or bias as constants: float, or integers dequantized per output row or
    per group of a row's inputs."""

    values: torch.Tensor
    scale: torch.Tensor | None = None  # one per row ([rows]) or per group ([rows, groups, 1]) when quantized
    zero_point: torch.Tensor | None = None
    out_dtype: torch.dtype | None = None
    axis: int | None = 0  # the dequantize's
    group_size: int = 0

    @property
    def key(self) -> tuple:
        """Operands with equal keys stack into one."""
        quantized = self.scale is not None
        return (quantized, self.values.dtype, tuple(self.values.shape[1:]), self.out_dtype, self.group_size,
                self.axis if self.group_size else 0,
                self.scale.dtype if quantized else None, self.zero_point.dtype if quantized else None)


def _operand(gm: fx.GraphModule, node: object) -> _Operand | None:
    """A constant, or a per-row (or per-tensor) or per-group dequantize of constants; None for anything else."""
    value = constant_value(gm, node)
    if value is not None:
        return _Operand(value)
    found = quantized_weight(gm, node)
    if found is None:
        return None
    dq, group_size = found
    values, scale, zero_point = (constant_value(gm, a) for a in (dq.q, dq.scale, dq.zero_point))
    if values is None or scale is None or zero_point is None:
        return None
    rows = values.shape[0]
    if group_size:
        per_group = (rows, values.shape[1], 1)
        if tuple(scale.shape) != per_group or zero_point.numel() not in (1, scale.numel()):
            return None
        return _Operand(values, scale, zero_point.reshape(-1).expand(scale.numel()).reshape(per_group),
                        dq.out_dtype, dq.axis, group_size)
    if dq.axis not in (0, None):
        return None
    if scale.numel() == 1 and zero_point.numel() == 1:
        scale, zero_point = scale.reshape(1).expand(rows), zero_point.reshape(1).expand(rows)
    elif dq.axis != 0 or scale.numel() != rows or zero_point.numel() != rows:
        return None
    return _Operand(values, scale.reshape(rows), zero_point.reshape(rows), dq.out_dtype)


def _plain_float_output(node: fx.Node) -> bool:
    """Nothing fuses after this linear: no requantize, no post-op or residual add."""
    if any(is_quantize(user) for user in node.users):
        return False
    group = fusion_group(node)
    return group.unary is None and group.add_node is None


def _sibling_key(gm: fx.GraphModule, node: fx.Node) -> tuple | None:
    """What siblings must share to stack, or None when ``node`` cannot join a merge."""
    if node.op != "call_function" or node.target != LINEAR or node.kwargs or not _plain_float_output(node):
        return None
    linear = op_arguments(node)
    weight = _operand(gm, linear["weight"])
    bias_arg = linear["bias"]
    bias = None if bias_arg is None else _operand(gm, bias_arg)
    if weight is None or (bias_arg is not None and bias is None):
        return None
    return weight.key, None if bias is None else bias.key


def _stacked(gm: fx.GraphModule, operands: list[_Operand], name: str, before: fx.Node,
             provenance: Provenance) -> fx.Node:
    values = add_constant(gm, torch.cat([o.values for o in operands]), name, before=before)
    first = operands[0]
    if first.scale is None:
        return values
    scale = add_constant(gm, torch.cat([o.scale for o in operands]), f"{name}_scale", before=before)
    zero_point = add_constant(gm, torch.cat([o.zero_point for o in operands]), f"{name}_zero_point", before=before)
    dequantized = insert_call(gm, DEQUANTIZE, (values, scale, zero_point, first.axis, first.out_dtype), before=before,
                              provenance=provenance)
    if not first.group_size:
        return dequantized
    rows = sum(o.values.shape[0] for o in operands)
    return insert_call(gm, aten.view.default, (dequantized, [rows, first.values.shape[1] * first.group_size]),
                       before=before, provenance=provenance)


@dataclass(frozen=True)
class MergeSiblingLinears(Pass):
    name: ClassVar[str] = "merge-sibling-linears"
    preserves_semantics: ClassVar[bool] = True

    def call(self, gm: fx.GraphModule) -> PassResult:
        groups: dict[tuple[fx.Node, tuple], list[fx.Node]] = defaultdict(list)
        for node in gm.graph.nodes:
            key = _sibling_key(gm, node)
            x = op_arguments(node)["input"] if key is not None else None
            if isinstance(x, fx.Node):
                groups[(x, key)].append(node)
        merged = {}
        for siblings in groups.values():
            if len(siblings) > 1:
                merged[self._merge(gm, siblings).name] = [s.name for s in siblings]
        if merged:
            remove_dead_nodes(gm)  # the siblings' own weights
        return PassResult(gm, bool(merged), {"merged": merged} if merged else {})

    def _merge(self, gm: fx.GraphModule, siblings: list[fx.Node]) -> fx.Node:
        first = siblings[0]
        provenance = Provenance(self.name, "merge", tuple(s.name for s in siblings))
        linears = [op_arguments(s) for s in siblings]
        weights = [_operand(gm, linear["weight"]) for linear in linears]
        weight = _stacked(gm, weights, f"{first.name}_merged_weight", first, provenance)
        has_bias = linears[0]["bias"] is not None
        bias = (_stacked(gm, [_operand(gm, linear["bias"]) for linear in linears], f"{first.name}_merged_bias",
                         first, provenance) if has_bias else None)
        merged = insert_call(gm, LINEAR, (linears[0]["input"], weight, bias), before=first, provenance=provenance,
                             meta_from=first)
        dim = merged.meta["val"].dim() - 1
        bounds = torch.tensor([0, *(w.values.shape[0] for w in weights)]).cumsum(0).tolist()
        pieces = [insert_call(gm, aten.slice.Tensor, (merged, dim, start, end), before=first,
                              provenance=Provenance(self.name, STANDS_FOR, (sibling.name,)), meta_from=sibling)
                  for sibling, start, end in zip(siblings, bounds, bounds[1:])]
        for sibling, piece in zip(siblings, pieces):
            sibling.replace_all_uses_with(piece)
            gm.graph.erase_node(sibling)
        return merged
