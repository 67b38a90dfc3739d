"""annotate: decide, node by node, what is quantized and how (the ``qc.qspec`` plan).

For every op the target has an int8 kernel for (``Target.op_rules``), the QConfig picks a spec
for its activation inputs, its weight and its bias:

    linear(x, W, b)  ->  qc.qspec = [0=activation:uint8/affine@x', 1=weight:int8/sym/per-channel(0),
                                     2=bias:int32 (scale S_x · S_W, derived at convert)]

``x'`` is where the activation is observed: the edge's producer, or further up through
single-user ops that keep qparams (view, transpose, max-pool...; those get ``shares(x')``), so
the integers can flow through them. Everything else stays float, and the annotation says why:
the QConfig kept it float, the target has no kernel for the op, the kernel does not take the
spec, or the weight is not a constant.

An op a target runs only as another kernel's epilogue (cpu-int8's residual add, the sum
post-op of the convolution before it) keeps that convolution's output float, since the kernel
adds it before rounding, and quantizes its other input:

    add(conv2d(...), identity)  ->  qc.qspec = [1=activation:uint8/affine@identity]

A weight op the target has no kernel for (``conv1d``, ``lstm``, a ``bmm`` with a constant) is
planned as float with that reason, so the report accounts for every op with weights.

Ops a QConfig rule asked for but the target cannot run are ``unsupported`` diagnostics, which
``compile`` turns into warnings. A weight wider than the kernel multiplies exactly on this CPU
(``OpRule.weight_bits``: int8 into a u8s8 GEMM without VNNI) is planned narrowed, a ``narrowed``
diagnostic the report notes. Inside a compile the pass plans for the compile's target and
QConfig (:meth:`Annotate.run`); on its own, for the target it names (cpu-int8 by default) and
that target's preset.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import fx

from qcompile.errors import NodeError
from qcompile.ir.graph import constant_expression, constant_value
from qcompile.ir.meta import EdgeQuant, QuantAnnotation, get_provenance, get_qspec, set_qspec
from qcompile.pipeline import Diagnostic, Pass, PassResult
from qcompile.qconfig import OpQuantConfig, QConfig, op_kind
from qcompile.qdq import observation_root
from qcompile.spec import PerGroup, QuantSpec, group_mismatch
from qcompile.targets import OpRule, Target, get_target, targets

if TYPE_CHECKING:
    from qcompile.context import CompileContext


# Ops that carry learned weights: every one is in the report, int8 or float with a reason.
WEIGHT_OP_KINDS = frozenset({
    "linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "convolution", "embedding", "embedding_bag", "lstm", "gru", "rnn_tanh", "rnn_relu", "matmul", "mm", "bmm",
    "addmm", "baddbmm", "_weight_norm_interface", "gru_recurrence", "lstm_recurrence",
})

# Weight ops a pass made float on purpose, and why: the report's reason for them.
FLOAT_BY_DESIGN = {
    "smooth-outliers": "the outlier channels smooth-outliers split off: their product stays float by design",
    "split-recurrent": ("the recurrent product (a few rows a step) runs in the fused fp32 recurrence, faster than "
                        "a per-step int8 GEMM; its input product is an int8 linear"),
}


def is_weight_op(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` is a weight op reading a constant floating-point matrix (or larger): a
    ``conv1d`` with its kernel, an ``lstm`` with its parameter list, a ``matmul`` with a constant."""
    if node.op != "call_function" or op_kind(node) not in WEIGHT_OP_KINDS:
        return False
    for arg in torch.utils._pytree.tree_leaves((node.args, node.kwargs)):
        value = constant_value(gm, arg) if isinstance(arg, fx.Node) else None
        if value is not None and value.is_floating_point() and value.dim() >= 2:
            return True
    return False


def _float_input_reason(node: fx.Node, index: int) -> str | None:
    arg = node.args[index] if index < len(node.args) else None
    val = arg.meta.get("val") if isinstance(arg, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return f"input {index} is not a tensor"
    if val.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"input {index} is {val.dtype}, not float32, bfloat16 or float16"
    return None


def _on_float_path(node: fx.Node, rule: OpRule) -> bool:
    """Whether an input of ``node`` comes from outside the rule's producers: an op on a float
    path (a transformer's residual stream), left unannotated like any op the target has no
    kernel for, since quantizing it is not worth doing rather than not possible."""
    if rule.producers is None:
        return False
    for index in rule.activations:
        arg = node.args[index] if index < len(node.args) else None
        if not isinstance(arg, fx.Node):
            return True
        root, _ = observation_root(arg)
        if (op_kind(root) if root.op == "call_function" else root.op) not in rule.producers:
            return True
    return False


# Ops a convolution kernel runs in its epilogue (QLinearConv clamps to its output range): a
# quantized output belongs after them.
EPILOGUE_KINDS = frozenset({"relu", "relu6", "hardtanh", "clamp"})


def _epilogue_end(node: fx.Node) -> fx.Node:
    """The last of the epilogue ops that follow ``node``, each the only reader of the one before."""
    while len(node.users) == 1:
        (user,) = node.users
        if user.op != "call_function" or op_kind(user) not in EPILOGUE_KINDS:
            break
        node = user
    return node


def _read_float(node: fx.Node, plans: dict[fx.Node, QuantAnnotation]) -> bool:
    """Whether a reader of ``node``'s output takes it as a float: one that is not planned to
    quantize that edge and not a shape op observed above."""
    for user in node.users:
        plan = plans.get(user)
        if plan is not None and plan.shares_qparams_of:
            continue
        if plan is None or not plan.activation_specs_from(user, node):
            return True
    return False


def _computed_from_constants(node: object) -> bool:
    """Whether ``node``'s values depend on no input (shapes of inputs do not count)."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if not isinstance(current, fx.Node) or current in seen:
            continue
        seen.add(current)
        if current.op == "placeholder":
            return False
        if current.op == "call_function" and current.target == torch.ops.aten.sym_size.int:
            continue
        stack.extend(current.all_input_nodes)
    return True


def epilogue_input(node: fx.Node, rule: OpRule, plans: dict[fx.Node, QuantAnnotation]) -> int | None:
    """The input of ``node`` that a quantized producer's kernel computes and adds in its epilogue."""
    for index in rule.activations:
        arg = node.args[index] if index < len(node.args) else None
        if (
            isinstance(arg, fx.Node)
            and arg.op == "call_function"
            and op_kind(arg) in rule.epilogue_of
            and len(arg.users) == 1
            and arg in plans
            and plans[arg].quantized
        ):
            return index
    return None


def plan_node(
    gm: fx.GraphModule,
    node: fx.Node,
    config: OpQuantConfig,
    rule: OpRule,
    why: str,
    activations: tuple[int, ...] | None = None,
) -> QuantAnnotation:
    """The node's plan: ``activations`` are the inputs to quantize (the rule's, unless an
    epilogue keeps one of them float)."""
    activations = rule.activations_of(config) if activations is None else activations
    reason = rule.unsupported(config)
    if reason is None:
        reason = next(filter(None, (_float_input_reason(node, i) for i in activations)), None)
    weight = node.args[rule.weight] if rule.weight is not None and rule.weight < len(node.args) else None
    if reason is None and rule.weight is not None:
        weight_value = constant_expression(gm, weight)
        if weight_value is None:
            reason = "the weight is computed in the graph, not a constant"
        elif config.weight is not None and isinstance(config.weight.granularity, PerGroup):
            reason = group_mismatch(config.weight.granularity, tuple(weight_value.shape))
    if reason is not None:
        return QuantAnnotation(rule=why, float_reason=reason)
    edges: list[tuple[int, EdgeQuant]] = []
    for index in activations:
        assert config.activation is not None  # rule.unsupported() refuses a config without one
        root, _ = observation_root(node.args[index])
        edges.append((index, EdgeQuant("activation", config.activation, observe_at=root.name)))
    if rule.weight is not None and config.weight is not None:
        edges.append((rule.weight, EdgeQuant("weight", config.weight)))
        bias = node.args[rule.bias] if rule.bias is not None and rule.bias < len(node.args) else None
        # An int32 bias is added to the integer accumulator at S_x · S_W: without quantized
        # activations (weight-only), with float8 or with a scale per group there is none to add it to.
        integer_accumulator = activations and not config.weight.is_float8 and not isinstance(
            config.weight.granularity, PerGroup)
        if constant_value(gm, bias) is not None and integer_accumulator:
            bias_spec = QuantSpec("int32", symmetric=True, granularity=config.weight.granularity)
            edges.append((rule.bias, EdgeQuant("bias", bias_spec)))
    return QuantAnnotation(inputs=tuple(edges), rule=why, smooth=config.smooth)


def _float8_without_kernels(target: Target, config: OpQuantConfig, node: fx.Node, why: str) -> None:
    """A float8 format asked of a target that reads none is a mistake, not a float fallback:
    refuse it, listing what the target runs and which targets run float8."""
    asked = sorted({spec.dtype for spec in (config.activation, config.weight) if spec is not None and spec.is_float8})
    formats = {dtype for rule in target.op_rules.values() for dtype in rule.formats}
    if not asked or formats & set(asked):
        return
    with_float8 = sorted(name for name, other in targets().items()
                         if any(dtype.startswith("float8") for rule in other.op_rules.values() for dtype in rule.formats))
    raise NodeError(node, f"the QConfig ({why}) asks for {', '.join(asked)}, which target {target.name} has no "
                          f"kernels for: it runs {', '.join(sorted(formats))}. Targets with float8: "
                          f"{', '.join(with_float8) or 'none'}")


@dataclass(frozen=True)
class Annotate(Pass):
    name: ClassVar[str] = "annotate"
    establishes: ClassVar[frozenset[str]] = frozenset({"annotated"})
    preserves_semantics: ClassVar[bool] = True
    decides_plan: ClassVar[bool] = True

    # None: the compile's target (cpu-int8 outside a compile).
    target: str | None = None
    qconfig: QConfig | None = None

    def run(self, gm: fx.GraphModule, context: CompileContext | None = None) -> PassResult:
        """Plan for the compile's target and QConfig, where this pass names neither."""
        if context is None:
            return self(gm)
        return replace(self, target=self.target or context.target.name,
                       qconfig=self.qconfig if self.qconfig is not None else context.qconfig)(gm)

    def call(self, gm: fx.GraphModule) -> PassResult:
        target: Target = get_target(self.target or "cpu-int8")
        qconfig = self.qconfig if self.qconfig is not None else target.preset()
        plans: dict[fx.Node, QuantAnnotation] = {}
        unsupported: dict[str, str] = {}
        notes: list[Diagnostic] = []
        # How reasons name the target's kernels: by the format family it runs.
        formats = {d for r in target.op_rules.values() for d in r.formats}
        family = " or ".join(name for name, prefixes in (("int8", ("int", "uint")), ("fp8", ("float8",)))
                             if any(d.startswith(prefixes) for d in formats)) or "quantized"
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            config, why = qconfig.resolve(node)
            if config is not None:
                _float8_without_kernels(target, config, node, why)
            kind = op_kind(node)
            rule = target.op_rules.get(kind)
            if rule is None:
                if config is not None and why != "default":
                    reason = f"{target.name} has no {family} kernel for '{kind}'"
                    plans[node] = QuantAnnotation(rule=why, float_reason=reason)
                    unsupported[node.name] = reason
                elif is_weight_op(gm, node):  # reported, so that every weight op is accounted for
                    provenance = get_provenance(node)
                    reason = FLOAT_BY_DESIGN.get(provenance.pass_name if provenance is not None else "",
                                                 f"{target.name} has no {family} kernel for '{kind}': its weights stay float")
                    plans[node] = QuantAnnotation(rule=why, float_reason=reason)
                continue
            if config is None:
                plans[node] = QuantAnnotation(rule=why, float_reason=f"the QConfig keeps it float ({why})")
                continue
            if _on_float_path(node, rule):
                continue
            if rule.lookup_indices is not None and _computed_from_constants(node.args[rule.lookup_indices]):
                plans[node] = QuantAnnotation(rule=why, float_reason=(
                    "looked up at constant indices: every input reads the same rows, so their rounding "
                    "would be a systematic error"))
                continue
            asked, config = config, rule.narrowed(config)
            activations = rule.activations_of(config)
            if rule.epilogue_of:
                fused = epilogue_input(node, rule, plans)
                if fused is None:
                    plans[node] = QuantAnnotation(rule=why, float_reason=(
                        f"no {target.name} kernel runs '{kind}' alone: it is quantized in the epilogue of a "
                        f"quantized {' or '.join(rule.epilogue_of)} whose only user it is, and none feeds it"))
                    continue
                activations = tuple(i for i in rule.activations if i != fused)
            plans[node] = plan = plan_node(gm, node, config, rule, why, activations)
            if plan.float_reason:
                unsupported[node.name] = plan.float_reason
            elif config is not asked:
                notes.append(Diagnostic(node.name, "narrowed", rule.narrowing_reason))
            for index, edge in plan.inputs:
                if edge.role == "activation":
                    for shape_op in observation_root(node.args[index], per_token=edge.spec.dynamic)[1]:
                        plans[shape_op] = QuantAnnotation(rule=why, shares_qparams_of=edge.observe_at)
        for node, plan in list(plans.items()):
            rule = target.op_rules.get(op_kind(node))
            if rule is None or not rule.quantized_output or not plan.quantized:
                continue
            end = _epilogue_end(node)
            if _read_float(end, plans):
                spec = next(edge.spec for _, edge in plan.inputs if edge.role == "activation")
                plans[node] = replace(plan, output=EdgeQuant("activation", spec, observe_at=end.name))
        modified = False
        for node, plan in plans.items():
            if get_qspec(node) != plan:
                set_qspec(node, plan)
                modified = True
        quantized = sum(plan.quantized for plan in plans.values())
        diagnostics = (*(Diagnostic(node, "unsupported", reason) for node, reason in unsupported.items()), *notes)
        return PassResult(gm, modified, {"quantized": quantized}, diagnostics)
