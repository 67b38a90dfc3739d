"""fuse-patterns: mark the groups that lower to one int8 kernel (cpu-int8's group marking;
which epilogues each kernel fuses is :mod:`qcompile.targets.cpu_int8.capabilities`).

    linear(x, W, b) -> gelu | relu | relu6              one kernel, unary post-op
    linear(x, W, b) -> add(·, other) [-> relu]          one kernel, binary post-op (residual add)
    conv2d(x, W, b, ...) -> relu | relu6                 one kernel, unary post-op
    conv2d(x, W, b, ...) -> add(·, other) [-> relu]      one kernel, sum post-op (ResNet's block end)

Marking, not rewriting: the anchor gets a ``qc.fusion`` record naming the group's nodes, and
the graph is otherwise unchanged (so the pass preserves semantics trivially). Lowering reads
the record: a group becomes one kernel whose output is the group's last value, so the values
inside it never need quantizing. A node joins a group only when it is the sole user of the
value before it, since a second user would need that intermediate value to exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from qcompile.ir.graph import op_arguments
from qcompile.ir.meta import Fusion, get_fusion, set_fusion
from qcompile.pipeline import Pass, PassResult
from qcompile.targets.cpu_int8.capabilities import ANCHORS

aten = torch.ops.aten



def _unary_kind(node: fx.Node) -> str | None:
    if node.target == aten.relu.default:
        return "relu"
    if node.target == aten.relu6.default:
        return "relu6"
    if node.target in (aten.hardtanh.default, aten.clamp.default):  # nn.ReLU6 exports as hardtanh(y, 0, 6)
        bounds = op_arguments(node)
        low, high = (bounds["min_val"], bounds["max_val"]) if node.target == aten.hardtanh.default else (
            bounds["min"], bounds["max"])
        return "relu6" if (low, high) == (0, 6) else None
    if node.target == aten.gelu.default:
        return "gelu-tanh" if op_arguments(node)["approximate"] == "tanh" else "gelu"
    return None


def _sole_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 and users[0].op == "call_function" else None


def residual_operand(add: fx.Node, value: fx.Node) -> int | None:
    """Index of the add's other operand when ``add`` is ``value + other`` with matching shapes."""
    if add.target != aten.add.Tensor or add.kwargs.get("alpha", 1) != 1 or len(add.args) != 2:
        return None
    other_index = 1 if add.args[0] is value else 0 if add.args[1] is value else None
    if other_index is None or add.args[other_index] is value:
        return None
    other, out = add.args[other_index], value.meta.get("val")
    if not isinstance(other, fx.Node) or not isinstance(other.meta.get("val"), torch.Tensor):
        return None
    if other_index == 0 and other.target in ANCHORS and _sole_user(other) is add:
        return None  # both operands could take the add (a ResNet shortcut conv): the first does
    other_val = other.meta["val"]
    if other_val.shape != out.shape or other_val.dtype != out.dtype:
        return None
    return other_index


def fusion_group(anchor: fx.Node) -> Fusion:
    capability = ANCHORS[anchor.target]
    last, add_node, add_other, unary, unary_node = anchor, None, None, None, None
    user = _sole_user(anchor)
    if user is not None:
        add_other = residual_operand(user, anchor)
        if add_other is not None:
            add_node, last = user, user
            user = _sole_user(user)
    if user is not None and _unary_kind(user) in capability.post_ops(with_add=add_node is not None)[1:]:
        unary, unary_node, last = _unary_kind(user), user, user
    return Fusion(
        unary=unary,
        unary_node=unary_node.name if unary_node else None,
        add_node=add_node.name if add_node else None,
        add_other=add_other,
        last=last.name,
    )


@dataclass(frozen=True)
class FusePatterns(Pass):
    name: ClassVar[str] = "fuse-patterns"
    establishes: ClassVar[frozenset[str]] = frozenset({"fused"})
    preserves_semantics: ClassVar[bool] = True

    def call(self, gm: fx.GraphModule) -> PassResult:
        groups = {"unary": 0, "add": 0, "alone": 0}
        modified = False
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target not in ANCHORS:
                continue
            fusion = fusion_group(node)
            groups["add" if fusion.add_node else "unary" if fusion.unary else "alone"] += 1
            if get_fusion(node) != fusion:
                set_fusion(node, fusion)
                modified = True
        return PassResult(gm, modified, {k: v for k, v in groups.items() if v})
