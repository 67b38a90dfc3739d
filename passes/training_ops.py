"""training-ops: ops that behave differently in training read the graph module's own mode.

A graph captured in training mode holds the mode as a literal:

    batch_norm(x, γ, β, μ, σ², training=True, momentum, eps, cudnn)     dropout(x, p, train=True)

so ``.eval()`` on the graph module would change nothing. Each such op becomes a call of a
:class:`ModeSwitchedOp` submodule, which runs the same op with the flag read from its own
``training`` at call time:

    batch_norm(...)  ->  call_module bn_mode_0(x, γ, β, μ, σ², momentum=…, eps=…, cudnn_enabled=…)

so ``gm.train()`` / ``gm.eval()`` switch batch statistics and dropout as they do on the model
they came from; each switch starts in the graph module's mode. A BatchNorm switch can also be frozen (``freeze()``): it then uses and keeps
its running statistics while the rest of the graph trains, as QAT does for its last steps.
In eval mode the graph computes exactly what it computed before the pass with the flag False.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx, nn

from qcompile.ir.graph import op_arguments
from qcompile.ir.meta import Provenance, set_provenance
from qcompile.pipeline import Pass, PassResult

aten = torch.ops.aten

# Each op whose result depends on training mode, and the name of its mode argument.
MODE_ARGUMENTS: dict[Any, str] = {
    aten.batch_norm.default: "training",
    aten.dropout.default: "train",
    aten.feature_dropout.default: "train",
    aten.alpha_dropout.default: "train",
    aten.feature_alpha_dropout.default: "train",
}


class ModeSwitchedOp(nn.Module):
    """``op(**arguments, <mode>=self.training and not self.frozen)``."""

    def __init__(self, op: Any, mode_argument: str):
        super().__init__()
        self.op = op
        self.mode_argument = mode_argument
        self.frozen = False

    def freeze(self, frozen: bool = True) -> None:
        """Run as in eval mode even while training (BatchNorm: running statistics, not updated)."""
        self.frozen = frozen

    def forward(self, **arguments: Any) -> Any:
        return self.op(**arguments, **{self.mode_argument: self.training and not self.frozen})

    def extra_repr(self) -> str:
        return f"{self.op}, frozen={self.frozen}"


def is_batch_norm_switch(gm: fx.GraphModule, node: object) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_module"
            and isinstance(module := gm.get_submodule(node.target), ModeSwitchedOp)
            and module.op == aten.batch_norm.default)


@dataclass(frozen=True)
class TrainingOps(Pass):
    name: ClassVar[str] = "training-ops"
    establishes: ClassVar[frozenset[str]] = frozenset({"mode-switched"})

    def call(self, gm: fx.GraphModule) -> PassResult:
        switched = 0
        for node in list(gm.graph.nodes):
            mode_argument = MODE_ARGUMENTS.get(node.target) if node.op == "call_function" else None
            if mode_argument is None:
                continue
            arguments = {k: v for k, v in op_arguments(node).items() if k != mode_argument}
            stem = "bn_mode" if node.target == aten.batch_norm.default else "dropout_mode"
            name, number = f"{stem}_{switched}", switched
            while hasattr(gm, name):
                number += 1
                name = f"{stem}_{number}"
            gm.add_submodule(name, ModeSwitchedOp(node.target, mode_argument).train(gm.training))
            with gm.graph.inserting_before(node):
                switch = gm.graph.call_module(name, (), arguments)
            switch.meta = dict(node.meta)
            set_provenance(switch, Provenance(self.name, sources=(node.name,)))
            node.replace_all_uses_with(switch)
            gm.graph.erase_node(node)
            switched += 1
        return PassResult(gm, bool(switched), {"switched": switched} if switched else {})
