"""A user-written pass, inserted into a pipeline with ``insert_after``.

    mul(x, 1) -> x      add(x, 0) -> x      sub(x, 0) -> x      div(x, 1) -> x

Models grow these through generic code (a ``scale`` that defaults to 1.0, a bias of 0 added by a
wrapper). The pass is three rules on the public API, and a pipeline entry like any built-in.

Run: ``python -m examples.custom_pass``
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx, nn

import qcompile
from qcompile import Match, Pass, PassResult, Rule, RuleSet, apply_rule_set

aten = torch.ops.aten


class DropNeutralScalar(Rule):
    """op(x, neutral) -> x, for a scalar operand equal to the op's neutral element."""

    def __init__(self, op: Any, neutral: float):
        self.op, self.neutral = op, neutral
        self.name = f"drop-{str(op).removeprefix('aten.').split('.')[0]}-{neutral:g}"
        self.pattern = lambda x, other: op(x, other)

    def check(self, match: Match) -> str | None:
        other = match["other"]
        if isinstance(other, fx.Node):
            return "the other operand is a tensor, not a scalar"
        if other != self.neutral:
            return f"the scalar is {other}, not {self.neutral:g}"
        if qcompile.op_arguments(match.anchor).get("alpha", 1) != 1:
            return "alpha is not 1"
        return None

    def rewrite(self, match: Match) -> None:
        match.anchor.replace_all_uses_with(match["x"])
        match.graph.erase_node(match.anchor)


SIMPLIFY_RULES = RuleSet(
    "simplify-arithmetic",
    [
        DropNeutralScalar(aten.mul.Tensor, 1.0),
        DropNeutralScalar(aten.div.Tensor, 1.0),
        DropNeutralScalar(aten.add.Tensor, 0.0),
        DropNeutralScalar(aten.sub.Tensor, 0.0),
    ],
)


@dataclass(frozen=True)
class SimplifyArithmetic(Pass):
    name: ClassVar[str] = "simplify-arithmetic"
    preserves_semantics: ClassVar[bool] = True

    def call(self, gm: fx.GraphModule) -> PassResult:
        counts = apply_rule_set(gm, SIMPLIFY_RULES, self.name)
        return PassResult(gm, bool(counts), dict(counts))


class ScaledBlock(nn.Module):
    def __init__(self, scale: float = 1.0, shift: float = 0.0):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.scale, self.shift = scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x))) * self.scale + self.shift


def main() -> None:
    model = ScaledBlock().eval()
    x = torch.randn(2, 3, 16, 16)
    gm = qcompile.capture(model, (x,))
    pipeline = qcompile.Pipeline.parse("canonicalize,fold-batchnorm")
    pipeline.insert_after("fold-batchnorm", SimplifyArithmetic())
    print(f"pipeline: {pipeline}")
    result = qcompile.PassManager(pipeline, [qcompile.NumericCheck((x,))], verify=True)(gm)
    print(result.report())
    print(qcompile.diff_graphs(gm, result.graph_module))


if __name__ == "__main__":
    main()
