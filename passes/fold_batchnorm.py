"""fold-batchnorm: fold inference BatchNorm into the conv or linear before it.

    BatchNorm(Conv(x, W, b)) -> Conv(x, W', b')      (conv1d, conv2d, conv3d)
    BatchNorm(Linear(x, W, b)) -> Linear(x, W', b')  (2-D linear output: features on dim 1)

with, per output channel c, std_c = sqrt(var_c + eps) and s_c = gamma_c / std_c:

    W'[c] = W[c] * s_c
    b'_c  = (b_c - mean_c) * s_c + beta_c            (b = 0 when the layer has no bias)

because BN(y)_c = (y_c - mean_c) * s_c + beta_c is affine in y_c = W[c]·x + b_c. The folded
tensors are computed in float64 and stored in the weight's dtype, so the result moves by a few
ulps only; they are registered as new constants, and the model's own tensors stay untouched.
Only eval-mode BatchNorm folds: training-mode BN uses batch statistics, not running ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx

from qcompile.ir.graph import add_constant, constant_value, op_arguments
from qcompile.ir.meta import Provenance, set_provenance
from qcompile.pipeline import Pass, PassResult
from qcompile.rewrite import Match, Rule, RuleSet, apply_rule_set, register_rule_set

aten = torch.ops.aten


class FoldIntoPreceding(Rule):
    """BatchNorm(op(x, W, b)) -> op(x, W', b') for an op whose weight has output channels on dim 0."""

    def __init__(self, op: Any, name: str):
        self.op = op
        self.name = name
        self.pattern = lambda x, weight, bias, gamma, beta, mean, var: aten.batch_norm.default(
            op(x, weight, bias), gamma, beta, mean, var
        )

    def check(self, match: Match) -> str | None:
        gm, bn = match.graph_module, match.anchor
        if op_arguments(bn)["training"] is not False:
            return "BatchNorm runs in training mode (batch statistics); call model.eval() before capture"
        if constant_value(gm, match["weight"]) is None:
            return f"the {self.op} weight is computed in the graph, not a constant"
        for name in ("mean", "var"):
            if constant_value(gm, match[name]) is None:
                return f"BatchNorm running {name} is not a constant tensor"
        for name in ("bias", "gamma", "beta"):
            if match[name] is not None and constant_value(gm, match[name]) is None:
                return f"'{name}' is computed in the graph, not a constant"
        if not constant_value(gm, match["weight"]).is_floating_point():
            return "the weight is not floating point"
        return None

    def rewrite(self, match: Match) -> None:
        gm, bn, layer = match.graph_module, match.anchor, match.op(self.op)
        weight = constant_value(gm, match["weight"])
        channels = weight.shape[0]

        def per_channel(name: str, default: float) -> torch.Tensor:
            value = constant_value(gm, match[name]) if match[name] is not None else None
            return value.double() if value is not None else torch.full((channels,), default, dtype=torch.float64)

        eps = float(op_arguments(bn)["eps"])
        scale = per_channel("gamma", 1.0) / torch.sqrt(per_channel("var", 0.0) + eps)
        folded_weight = (weight.double() * scale.reshape(-1, *[1] * (weight.dim() - 1))).to(weight.dtype)
        folded_bias = ((per_channel("bias", 0.0) - per_channel("mean", 0.0)) * scale + per_channel("beta", 0.0)).to(
            weight.dtype
        )
        weight_node = add_constant(gm, folded_weight, f"{layer.name}_folded_weight", before=layer)
        bias_node = add_constant(gm, folded_bias, f"{layer.name}_folded_bias", before=layer)
        provenance = Provenance(match.pass_name, self.name, (layer.name, bn.name))
        set_provenance(weight_node, provenance)
        set_provenance(bias_node, provenance)

        args = list(layer.args) + [None] * (3 - len(layer.args))
        args[1], args[2] = weight_node, bias_node
        layer.args = tuple(args)
        layer.kwargs = {k: v for k, v in layer.kwargs.items() if k != "bias"}
        bn.replace_all_uses_with(layer)
        old_inputs = [match[n] for n in ("weight", "bias", "gamma", "beta", "mean", "var")]
        gm.graph.erase_node(bn)
        for node in old_inputs:
            if isinstance(node, fx.Node) and not node.users:
                gm.graph.erase_node(node)


class FoldLinearBatchNorm(FoldIntoPreceding):
    def check(self, match: Match) -> str | None:
        out = match.op(self.op).meta.get("val")
        if isinstance(out, torch.Tensor) and out.dim() != 2:
            return (
                f"linear output is {out.dim()}-D: BatchNorm normalizes dim 1, which is not the "
                "linear's output features"
            )
        return super().check(match)


FOLD_BATCHNORM_RULES = register_rule_set(
    RuleSet(
        "fold-batchnorm",
        [
            FoldIntoPreceding(aten.conv1d.default, "conv1d-batchnorm"),
            FoldIntoPreceding(aten.conv2d.default, "conv2d-batchnorm"),
            FoldIntoPreceding(aten.conv3d.default, "conv3d-batchnorm"),
            FoldLinearBatchNorm(aten.linear.default, "linear-batchnorm"),
        ],
    )
)


@dataclass(frozen=True)
class FoldBatchNorm(Pass):
    name: ClassVar[str] = "fold-batchnorm"
    establishes: ClassVar[frozenset[str]] = frozenset({"bn-folded"})
    preserves_semantics: ClassVar[bool] = True

    def call(self, gm: fx.GraphModule) -> PassResult:
        counts = apply_rule_set(gm, FOLD_BATCHNORM_RULES, self.name)
        return PassResult(gm, bool(counts), dict(counts))
