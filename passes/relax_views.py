"""relax-views: views recorded on the float graph's layouts become reshapes after lowering.

    aten.view(x, shape) -> aten.reshape(x, shape)        where x descends from a kernel

``torch.export`` records ``view`` where the float model's tensors were dense; a lowered kernel
may return another layout (oneDNN's convolutions and the uint8 pool write channels-last, the
native attention returns a [batch, length, heads, depth] layout where SDPA returned a dense one), and a ``view``
across it fails on every call. ``reshape`` is the same value: a view where the strides allow
one, a copy only where they do not. Only views that can see a kernel's layout (downstream of a
kernel node) change; the graph is functional after export, so no write goes through a view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from qcompile.ir.graph import op_arguments
from qcompile.pipeline import Pass, PassResult
from qcompile.kernel_check import kernel_contracts

aten = torch.ops.aten


def _downstream_of_kernels(gm: fx.GraphModule) -> set[fx.Node]:
    kernels = kernel_contracts()
    reached: set[fx.Node] = set()
    for node in gm.graph.nodes:  # topological order: every input is visited before its users
        if (node.op == "call_function" and node.target in kernels) or any(a in reached for a in node.all_input_nodes):
            reached.add(node)
    return reached


@dataclass(frozen=True)
class RelaxViews(Pass):
    name: ClassVar[str] = "relax-views"
    requires: ClassVar[frozenset[str]] = frozenset({"lowered"})
    preserves_semantics: ClassVar[bool] = True

    def call(self, gm: fx.GraphModule) -> PassResult:
        reached = _downstream_of_kernels(gm)
        relaxed = 0
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target == aten.view.default and op_arguments(node)["self"] in reached:
                node.target = aten.reshape.default
                relaxed += 1
        return PassResult(gm, relaxed > 0, {"relaxed": relaxed} if relaxed else {})
