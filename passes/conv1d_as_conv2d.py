"""conv1d-as-conv2d: a 1-D convolution becomes a 2-D one over a height of 1.

    conv1d(x, W, b, s, p, d, g)  ->  squeeze(conv2d(unsqueeze(x, -2), W₂, b, [1, s], [0, p], [1, d], g), -2)

with ``x`` [N, C, L] (or unbatched [C, L]) viewed as [N, C, 1, L] and ``W₂`` a new constant
``W`` [O, C/g, K] viewed as [O, C/g, 1, K]. Over a height of 1 the 2-D kernel has one row, so
each output is the same sum of the same products, y[n, o, l] = b[o] + Σ_c Σ_k W[o, c, k] ·
x[n, c, s·l + d·k − p], and ATen itself runs a 1-D convolution as this 2-D one. Everything that
knows ``conv2d`` then takes audio front ends, Whisper's stem and temporal CNNs too: the op rules
and the precision search, the int8 convolution kernels with their fused ReLU and residual sum,
and the ONNX exporter (ONNX Runtime's QLinearConv).

So that a stack of 1-D convolutions stays one 4-D chain (a fused ReLU, uint8 between the
kernels), the squeeze moves past the ops that follow it and commute with it, and a squeeze met by
the next convolution's unsqueeze cancels:

    f(squeeze(y, -2))               ->  squeeze(f(y), -2)      (f pointwise: relu, gelu, clamp, ...;
                                                                or BatchNorm, per channel)
    unsqueeze(squeeze(y, -2), -2)   ->  y                      (y of height 1)

Runs after ``fold-batchnorm``, which folds BatchNorm1d into the 1-D form (QAT, which trains
BatchNorm, runs it before: the BatchNorm then follows the 2-D convolution); the model's own weight
is never changed (the 4-D copy is the graph's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from qcompile.ir.graph import add_constant, constant_value, infer_fake_value, insert_call, op_arguments, set_argument
from qcompile.ir.meta import Provenance
from qcompile.pipeline import Pass, PassResult

aten = torch.ops.aten

# Ops that commute with squeezing a height of 1 out of [N, C, 1, L], by the argument they read it
# through: elementwise functions (their other arguments are scalars), and BatchNorm, whose
# statistics per channel C run over every other position, the same positions in either shape
# (a training BatchNorm in QAT, which keeps it unfolded).
COMMUTING = {
    **dict.fromkeys((aten.relu.default, aten.relu6.default, aten.hardtanh.default, aten.clamp.default,
                     aten.gelu.default, aten.silu.default, aten.sigmoid.default, aten.tanh.default,
                     aten.hardswish.default, aten.leaky_relu.default, aten.elu.default), "self"),
    aten.batch_norm.default: "input",
}


def _height_squeeze(node: object) -> fx.Node | None:
    """The 4-D value ``node`` squeezes its height of 1 out of, when it is such a squeeze."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target == aten.squeeze.dim):
        return None
    arguments = op_arguments(node)
    source, dim = arguments["self"], arguments["dim"]
    value = source.meta.get("val") if isinstance(source, fx.Node) else None
    if dim != -2 or not isinstance(value, torch.Tensor) or value.dim() < 3 or value.shape[-2] != 1:
        return None
    return source


def _sink_squeeze(gm: fx.GraphModule, squeeze: fx.Node, provenance: Provenance) -> None:
    """Move ``squeeze`` past each single commuting reader in turn: the reader is made again on the
    4-D value, and its readers read that through a new squeeze."""
    while len(squeeze.users) == 1:
        (reader,) = squeeze.users
        argument = COMMUTING.get(reader.target) if reader.op == "call_function" else None
        if argument is None or op_arguments(reader)[argument] is not squeeze:
            return
        commuted = insert_call(gm, reader.target, reader.args, kwargs=dict(reader.kwargs), before=reader,
                               provenance=provenance, meta_from=reader)
        set_argument(commuted, argument, op_arguments(squeeze)["self"])
        infer_fake_value(commuted)
        moved = insert_call(gm, aten.squeeze.dim, (commuted, -2), before=reader, provenance=provenance,
                            meta_from=reader)
        reader.replace_all_uses_with(moved)
        gm.graph.erase_node(reader)
        gm.graph.erase_node(squeeze)
        squeeze = moved


@dataclass(frozen=True)
class Conv1dAsConv2d(Pass):
    name: ClassVar[str] = "conv1d-as-conv2d"
    preserves_semantics: ClassVar[bool] = True

    def call(self, gm: fx.GraphModule) -> PassResult:
        rewritten = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target != aten.conv1d.default:
                continue
            conv = op_arguments(node)
            weight = constant_value(gm, conv["weight"])
            if weight is None or not weight.is_floating_point() or not isinstance(conv["padding"], (list, tuple)):
                continue  # a computed weight is not a weight op; string padding is canonicalize's to spell out
            provenance = Provenance(self.name, "conv1d", (node.name,))
            weight_2d = add_constant(gm, weight.unsqueeze(2).contiguous(), f"{node.name}_weight", before=node)
            x = _height_squeeze(conv["input"]) or insert_call(
                gm, aten.unsqueeze.default, (conv["input"], -2), before=node, provenance=provenance)
            conv2d = insert_call(
                gm, aten.conv2d.default,
                (x, weight_2d, conv["bias"], [1, conv["stride"][0]], [0, conv["padding"][0]],
                 [1, conv["dilation"][0]], conv["groups"]),
                before=node, provenance=provenance, meta_from=node)
            y = insert_call(gm, aten.squeeze.dim, (conv2d, -2), before=node, provenance=provenance, meta_from=node)
            node.replace_all_uses_with(y)
            gm.graph.erase_node(node)
            _sink_squeeze(gm, y, provenance)
            rewritten += 1
        for node in list(gm.graph.nodes):  # squeezes nothing reads any more (the next conv took the 4-D value)
            if node.target == aten.squeeze.dim and not node.users and _height_squeeze(node) is not None:
                gm.graph.erase_node(node)
        return PassResult(gm, bool(rewritten), {"conv1d": rewritten} if rewritten else {})
