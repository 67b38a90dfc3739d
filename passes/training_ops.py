"""training-ops: ops that behave differently in training read the graph module's own mode.

A graph captured in training mode holds the mode as a literal:

    batch_norm(x, γ, β, μ, σ², training=True, ...)     dropout(x, p, train=True)
    scaled_dot_product_attention(q, k, v, mask, dropout_p=0.1)

so ``.eval()`` on the graph module would change nothing. Each such op becomes a call of a
:class:`ModeSwitchedOp` submodule, which runs the same op with that argument chosen at call
time from its own ``training``: the captured value in training, the eval value otherwise:

    batch_norm(...)  ->  call_module bn_mode_0(x, γ, β, μ, σ², momentum=…, eps=…, cudnn_enabled=…)

so ``gm.train()`` / ``gm.eval()`` switch batch statistics and dropout as they do on the model
they came from; each switch starts in the graph module's mode. An op captured with its eval
value already (a submodule the user left in eval mode) is left as it is. A switch can be
frozen (``freeze()``): it then runs as in eval mode while the rest of the graph trains
(BatchNorm on its running statistics for QAT's last steps, dropout off for distillation). In
eval mode the graph computes exactly what it computed before the pass with the eval values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx, nn

from qcompile.ir.graph import add_submodule, op_arguments
from qcompile.ir.meta import Provenance, set_provenance
from qcompile.pipeline import Pass, PassResult

aten = torch.ops.aten

# Each op whose result depends on training mode: its mode argument and that argument's value in
# eval mode.
MODE_ARGUMENTS: dict[Any, tuple[str, Any]] = {
    aten.batch_norm.default: ("training", False),
    aten.dropout.default: ("train", False),
    aten.feature_dropout.default: ("train", False),
    aten.alpha_dropout.default: ("train", False),
    aten.feature_alpha_dropout.default: ("train", False),
    aten.scaled_dot_product_attention.default: ("dropout_p", 0.0),
}
# Ops that are the identity in eval mode.
DROPOUTS = frozenset({aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
                      aten.feature_alpha_dropout.default})


class ModeSwitchedOp(nn.Module):
    """``op(**arguments, <mode argument>=<captured value> if training and not frozen else <eval value>)``."""

    def __init__(self, op: Any, mode_argument: str, training_value: Any, eval_value: Any):
        super().__init__()
        self.op = op
        self.mode_argument = mode_argument
        self.training_value = training_value
        self.eval_value = eval_value
        self.frozen = False

    def freeze(self, frozen: bool = True) -> None:
        """Run as in eval mode even while training."""
        self.frozen = frozen

    def forward(self, **arguments: Any) -> Any:
        value = self.training_value if self.training and not self.frozen else self.eval_value
        return self.op(**arguments, **{self.mode_argument: value})

    def extra_repr(self) -> str:
        return f"{self.op}, {self.mode_argument}={self.training_value} in training, frozen={self.frozen}"


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
            mode = MODE_ARGUMENTS.get(node.target) if node.op == "call_function" else None
            if mode is None:
                continue
            mode_argument, eval_value = mode
            arguments = op_arguments(node)
            training_value = arguments.pop(mode_argument)
            if training_value == eval_value:
                continue
            stem = {aten.batch_norm.default: "bn_mode", aten.scaled_dot_product_attention.default: "attention_mode"
                    }.get(node.target, "dropout_mode")
            switch_module = ModeSwitchedOp(node.target, mode_argument, training_value, eval_value).train(gm.training)
            name = add_submodule(gm, switch_module, stem)
            with gm.graph.inserting_before(node):
                switch = gm.graph.call_module(name, (), arguments)
            switch.meta = dict(node.meta)
            set_provenance(switch, Provenance(self.name, sources=(node.name,)))
            node.replace_all_uses_with(switch)
            gm.graph.erase_node(node)
            switched += 1
        return PassResult(gm, bool(switched), {"switched": switched} if switched else {})
