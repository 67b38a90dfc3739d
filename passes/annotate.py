"""annotate: decide, node by node, what is quantized and how (the ``qc.qspec`` plan).

For every op the target has an int8 kernel for (``Target.op_rules``), the QConfig picks a spec
for its activation inputs, its weight and its bias:

    linear(x, W, b)  ->  qc.qspec = [0=activation:uint8/affine@x', 1=weight:int8/sym/per-channel(0),
                                     2=bias:int32 (scale S_x · S_W, derived at convert)]

``x'`` is where the activation is observed: the edge's producer, or further up through
single-user ops that keep qparams (view, transpose, max-pool...; those get ``shares(x')``), so
the integers can flow through them. Everything else stays float, and the annotation says why:
the QConfig kept it float, the target has no kernel for the op, the kernel does not take the
spec, or the weight is not a constant. Ops a QConfig rule asked for but the target cannot run
are counted in the stats, which ``compile`` turns into a warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from qcompile import (
    EdgeQuant,
    Pass,
    PassResult,
    QConfig,
    QuantAnnotation,
    QuantSpec,
    constant_value,
    get_qspec,
    get_target,
    observation_root,
    set_qspec,
)
from qcompile.qconfig import OpQuantConfig, op_kind
from qcompile.targets import OpRule, Target


def _float_input_reason(node: fx.Node, index: int) -> str | None:
    arg = node.args[index] if index < len(node.args) else None
    val = arg.meta.get("val") if isinstance(arg, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return f"input {index} is not a tensor"
    if val.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"input {index} is {val.dtype}, not floating point"
    return None


def _float_path_reason(node: fx.Node, rule: OpRule) -> str | None:
    """Why ``node`` is on a float path the rule leaves alone (not a limitation, so no warning)."""
    if rule.producers is None:
        return None
    for index in rule.activations:
        arg = node.args[index] if index < len(node.args) else None
        if not isinstance(arg, fx.Node):
            return f"input {index} is not a tensor"
        root, _ = observation_root(arg)
        kind = op_kind(root) if root.op == "call_function" else root.op
        if kind not in rule.producers:
            return f"input {index} comes from '{kind}', not from {', '.join(rule.producers)}: a float path"
    return None


def plan_node(gm: fx.GraphModule, node: fx.Node, config: OpQuantConfig, rule: OpRule, why: str) -> QuantAnnotation:
    reason = rule.unsupported(config)
    if reason is None:
        reason = next(filter(None, (_float_input_reason(node, i) for i in rule.activations)), None)
    weight = node.args[rule.weight] if rule.weight is not None and rule.weight < len(node.args) else None
    if reason is None and rule.weight is not None and constant_value(gm, weight) is None:
        reason = "the weight is computed in the graph, not a constant"
    if reason is not None:
        return QuantAnnotation(rule=why, float_reason=reason)
    assert config.activation is not None
    edges: list[tuple[int, EdgeQuant]] = []
    for index in rule.activations:
        arg = node.args[index] if index < len(node.args) else None
        if not isinstance(arg, fx.Node):
            return f"input {index} is not a tensor"
        root, _ = observation_root(arg)
        edges.append((index, EdgeQuant("activation", config.activation, observe_at=root.name)))
    if rule.weight is not None and config.weight is not None:
        edges.append((rule.weight, EdgeQuant("weight", config.weight)))
        bias = node.args[rule.bias] if rule.bias is not None and rule.bias < len(node.args) else None
        if constant_value(gm, bias) is not None:
            bias_spec = QuantSpec("int32", symmetric=True, granularity=config.weight.granularity)
            edges.append((rule.bias, EdgeQuant("bias", bias_spec)))
    return QuantAnnotation(inputs=tuple(edges), rule=why)


@dataclass(frozen=True)
class Annotate(Pass):
    name: ClassVar[str] = "annotate"
    establishes: ClassVar[frozenset[str]] = frozenset({"annotated"})
    preserves_semantics: ClassVar[bool] = True

    target: str = "cpu-int8"
    qconfig: QConfig | None = None

    def call(self, gm: fx.GraphModule) -> PassResult:
        target: Target = get_target(self.target)
        qconfig = self.qconfig if self.qconfig is not None else target.preset()
        plans: dict[fx.Node, QuantAnnotation] = {}
        unsupported: dict[str, str] = {}
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            config, why = qconfig.resolve(node)
            kind = op_kind(node)
            rule = target.op_rules.get(kind)
            if rule is None:
                if config is not None and why != "default":
                    reason = f"{target.name} has no int8 kernel for '{kind}'"
                    plans[node] = QuantAnnotation(rule=why, float_reason=reason)
                    unsupported[node.name] = reason
                continue
            if config is None:
                plans[node] = QuantAnnotation(rule=why, float_reason=f"the QConfig keeps it float ({why})")
                continue
            float_path = _float_path_reason(node, rule)
            if float_path is not None:
                plans[node] = QuantAnnotation(rule=why, float_reason=float_path)
                continue
            plans[node] = plan = plan_node(gm, node, config, rule, why)
            if plan.float_reason:
                unsupported[node.name] = plan.float_reason
            for index, edge in plan.inputs:
                if edge.role == "activation":
                    for shape_op in observation_root(node.args[index])[1]:
                        plans[shape_op] = QuantAnnotation(rule=why, shares_qparams_of=edge.observe_at)
        modified = False
        for node, plan in plans.items():
            if get_qspec(node) != plan:
                set_qspec(node, plan)
                modified = True
        quantized = sum(plan.quantized for plan in plans.values())
        stats: dict[str, object] = {"quantized": quantized}
        if unsupported:
            stats["unsupported"] = unsupported
        return PassResult(gm, modified, stats)
