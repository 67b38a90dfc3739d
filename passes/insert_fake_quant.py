"""insert-fake-quant: the calibrated plan as trainable fake quantization (QAT's graph).

Every activation observer becomes a :class:`~qcompile.fake_quant.FakeQuantize` whose scale and
zero point start at the observer's calibrated values, and every planned weight is read through
one whose scale starts at the weight's own range (``weight_qparams``):

    o = observer_0(y)          ->   o = fq_act_0(y)                 S, Z from observer_0
    linear(o, W, b)            ->   linear(o, fq_weight_1(W), b)    S_W from W

so QAT quantizes exactly the values the PTQ plan quantizes (both come from ``annotate``). A
per-token (dynamic) activation has no observer: its edge is read through a
:class:`~qcompile.fake_quant.DynamicFakeQuantize` put where ``convert`` puts the dynamic Q/DQ
(after the edge's observation root, one per root and spec), which computes the same per-row
parameters from the row's range at every call. A
weight the plan has already rounded (``gptq``, ``correct-bias``: its Q/DQ form
dequantize(W_q, S, Z)) trains from its rounded values W = (W_q − Z)·S, a new float constant,
with its fake-quant started at that grid (S, Z), so that fq(W) = W and QAT starts at the PTQ
model; a convolution trained in folded form takes the rounded values with its folded grid. The
constant bias of such an op is rounded to the int32 steps S_x · S_W it will be stored in
(``FakeQuantizeBias``, straight-through), so the lowered biases are the trained ones.

A convolution whose only user is a training BatchNorm (a ``ModeSwitchedOp`` of
``training-ops``) is rewritten so that its weight is fake-quantized as it will be folded
(Krishnamoorthi 2018; Jacob et al. 2018), with s = γ / √(σ²_running + ε) per output channel:

    bn(conv(x, W, b))   ->   bn(conv(x, fq(W · s), None) / s + b)

In training, bn normalizes with batch statistics, so the forward is the float model's up to the
weight's rounding, and γ, β, W and the scale all train. In eval mode (or with the BatchNorm
frozen) bn uses σ²_running and μ, and the expression equals conv(x, fq(W · s)) + (b − μ) · s + β:
the folded convolution ``lower-qat`` emits, fake-quantized the same way.

Fake-quant modules are new submodules of this pass's copy; the observers it replaces and the
graph it was given are left as they were.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from qcompile.errors import NodeError
from qcompile.fake_quant import DynamicFakeQuantize, FakeQuantize, FakeQuantizeBias, weight_qparams
from qcompile.ir.graph import (
    add_constant,
    add_submodule,
    called_module,
    constant_expression,
    constant_value,
    infer_fake_value,
    op_arguments,
    remove_dead_nodes,
    set_argument,
)
from qcompile.ir.meta import Provenance, get_qspec, set_provenance, source_module
from qcompile.observers import Observer
from qcompile.passes.training_ops import is_batch_norm_switch
from qcompile.pipeline import Pass, PassResult
from qcompile.qconfig import op_kind
from qcompile.qdq import observation_root, quantized_weight
from qcompile.spec import PerGroup, QuantSpec

aten = torch.ops.aten
CONVOLUTIONS = ("conv1d", "conv2d", "conv3d")


def _where(node: fx.Node) -> str:
    module = source_module(node)
    return f"{node.name} in module '{module[0]}'" if module and module[0] else node.name


@dataclass(frozen=True)
class InsertFakeQuant(Pass):
    name: ClassVar[str] = "insert-fake-quant"
    requires: ClassVar[frozenset[str]] = frozenset({"calibrated"})
    establishes: ClassVar[frozenset[str]] = frozenset({"fake-quantized"})
    invalidates: ClassVar[frozenset[str]] = frozenset({"observed", "calibrated"})

    def call(self, gm: fx.GraphModule) -> PassResult:
        activations = weights = folded = 0
        dynamic: dict[tuple[str, QuantSpec], fx.Node] = {}  # (observation root, spec) -> its fake-quant
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and isinstance(observer := gm.get_submodule(node.target), Observer):
                if observer.batches == 0:
                    raise NodeError(node, f"observer '{node.target}' saw no data: calibrate before insert-fake-quant")
                scale, zero_point = observer.qparams()
                node.target = add_submodule(gm, stem="fq_act", module=FakeQuantize(observer.spec, scale, zero_point,
                                                                        observer.name))
                set_provenance(node, Provenance(self.name, sources=(node.args[0].name,)))
                activations += 1
                continue
            plan = get_qspec(node)
            if plan is None or not plan.quantized:
                continue
            for index, edge in plan.inputs:
                if edge.role == "activation" and edge.spec.dynamic and isinstance(node.args[index], fx.Node):
                    self._fake_quantize_dynamic(gm, node, index, edge.spec, dynamic)
                if edge.role != "weight":
                    continue
                weight = node.args[index]
                value = constant_expression(gm, weight)
                if value is None:
                    continue  # already fake-quantized: running the pass twice changes nothing
                found = quantized_weight(gm, weight)
                rounded = found[0] if found is not None else None  # its dequantize, when the plan rounded it
                if rounded is not None:  # rounded by the plan (gptq, correct-bias): train from its values
                    stem = rounded.q.target if rounded.q.op == "get_attr" else f"{node.name}_weight"
                    weight = add_constant(gm, value, f"{str(stem).removesuffix('_q')}_rounded", before=node)
                    set_provenance(weight, Provenance(self.name, sources=(rounded.node.name,)))
                    node.update_arg(index, weight)
                batch_norm = next(iter(node.users)) if len(node.users) == 1 else None
                if op_kind(node) in CONVOLUTIONS and index == 1 and is_batch_norm_switch(gm, batch_norm):
                    self._fold_ready(gm, node, batch_norm, edge.spec)
                    folded += 1
                else:
                    grid = None if rounded is None else (constant_value(gm, rounded.scale),
                                                         constant_value(gm, rounded.zero_point))
                    node.update_arg(index, self._fake_quantize(gm, weight, value, edge.spec, before=node,
                                                               where=_where(node), grid=grid))
                weights += 1
        biases = sum(self._fake_quantize_bias(gm, node) for node in list(gm.graph.nodes))
        remove_dead_nodes(gm)  # the Q/DQ forms of rounded weights, now read as float values
        stats = {"activations": activations, "weights": weights, "biases": biases}
        if dynamic:
            stats["dynamic"] = len(dynamic)
        if folded:
            stats["batchnorm"] = folded
        return PassResult(gm, bool(activations or weights or dynamic), stats)

    def _fake_quantize_dynamic(self, gm: fx.GraphModule, node: fx.Node, index: int, spec: QuantSpec,
                               made: dict[tuple[str, QuantSpec], fx.Node]) -> None:
        """``node``'s input ``index`` read through the per-token fake-quant of its observation
        root: ``convert``'s dynamic Q/DQ, at the same place, in training form."""
        root, chain = observation_root(node.args[index], per_token=True)
        reader = chain[0] if chain else node
        if called_module(gm, root, DynamicFakeQuantize) is not None:
            return  # already fake-quantized: running the pass twice changes nothing
        key = (root.name, spec)
        if key not in made:
            module = DynamicFakeQuantize(spec, f"input {index} of {_where(node)}")
            name = add_submodule(gm, stem="fq_token", module=module)
            with gm.graph.inserting_after(root):
                made[key] = gm.graph.call_module(name, (root,))
            made[key].meta["val"] = root.meta.get("val")
            set_provenance(made[key], Provenance(self.name, sources=(root.name,)))
        reader.replace_input_with(root, made[key])

    def _fake_quantize_bias(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        """A planned op's constant bias rounded to int32 steps of S_x · S_W of its input's and
        weight's fake-quants (``fake_quantize_bias``), as ``lower-qat`` will store it."""
        plan = get_qspec(node)
        if plan is None or not plan.quantized or node.op != "call_function":
            return False
        arguments = op_arguments(node)
        bias, weight = arguments.get("bias"), arguments.get("weight")
        activation = observation_root(arguments["input"])[0] if isinstance(arguments.get("input"), fx.Node) else None
        if constant_value(gm, bias) is None or not all(
                called_module(gm, n, FakeQuantize) is not None for n in (weight, activation)):
            return False
        spec = gm.get_submodule(weight.target).spec
        if isinstance(spec.granularity, PerGroup) or spec.is_float8:
            return False  # no integer kernel takes it (a float8 one adds a float bias): no int32 steps
        name = add_submodule(gm, stem="fq_bias", module=FakeQuantizeBias())
        with gm.graph.inserting_before(node):
            scales = [gm.graph.get_attr(f"{n.target}.log_scale") for n in (activation, weight)]
            rounded = gm.graph.call_module(name, (bias, *scales))
        for scale, n in zip(scales, (activation, weight), strict=True):
            scale.meta["val"] = gm.get_submodule(n.target).log_scale.detach()
        rounded.meta["val"] = bias.meta.get("val")
        set_provenance(rounded, Provenance(self.name, sources=(bias.name,)))
        set_argument(node, "bias", rounded)
        return True

    def _fake_quantize(self, gm: fx.GraphModule, value: fx.Node, initial: torch.Tensor, spec: QuantSpec, *,
                       before: fx.Node, where: str, grid: tuple[torch.Tensor, torch.Tensor] | None = None) -> fx.Node:
        """``value`` read through a new weight fake-quant whose scale and zero point start at
        ``grid`` (a rounding pass's) or at ``initial``'s own range."""
        scale, zero_point = grid if grid is not None else weight_qparams(initial, spec)
        name = add_submodule(gm, stem="fq_weight", module=FakeQuantize(spec, scale, zero_point, f"weight of {where}"))
        with gm.graph.inserting_before(before):
            node = gm.graph.call_module(name, (value,))
        node.meta["val"] = value.meta.get("val")
        set_provenance(node, Provenance(self.name, sources=(value.name,)))
        return node

    def _call(self, gm: fx.GraphModule, op: object, args: tuple, before: fx.Node, source: fx.Node) -> fx.Node:
        with gm.graph.inserting_before(before):
            node = gm.graph.call_function(op, args)
        infer_fake_value(node)
        set_provenance(node, Provenance(self.name, "conv-batchnorm-qat", (source.name,)))
        return node

    def _fold_ready(self, gm: fx.GraphModule, conv: fx.Node, batch_norm: fx.Node, spec: QuantSpec) -> None:
        """bn(conv(x, W, b)) -> bn(conv(x, fq(W · s), None) / s + b), s = γ / √(σ² + ε)."""
        bn = batch_norm.kwargs
        weight, bias = op_arguments(conv)["weight"], op_arguments(conv)["bias"]
        gamma, variance = bn["weight"], bn["running_var"]
        if constant_value(gm, variance) is None:
            raise NodeError(batch_norm, "BatchNorm without running statistics cannot be folded for QAT "
                                        "(track_running_stats=False)")
        w = constant_expression(gm, weight)
        channel = [-1] + [1] * (w.dim() - 1)           # s along the weight's output channels
        feature = [1, -1] + [1] * (w.dim() - 2)         # s along the conv output's channel dim
        std = self._call(gm, aten.sqrt.default,
                         (self._call(gm, aten.add.Tensor, (variance, float(bn["eps"])), conv, batch_norm),),
                         conv, batch_norm)
        s = (self._call(gm, aten.reciprocal.default, (std,), conv, batch_norm) if gamma is None
             else self._call(gm, aten.div.Tensor, (gamma, std), conv, batch_norm))
        scaled = self._call(gm, aten.mul.Tensor, (weight, self._call(gm, aten.view.default, (s, channel), conv,
                                                                     batch_norm)), conv, batch_norm)
        with torch.no_grad():
            gamma_value = constant_value(gm, gamma) if gamma is not None else torch.ones(w.shape[0])
            initial = w * (gamma_value / torch.sqrt(constant_value(gm, variance) + float(bn["eps"]))).reshape(channel)
        conv.update_arg(1, self._fake_quantize(gm, scaled, initial, spec, before=conv, where=_where(conv)))
        if len(conv.args) > 2:
            conv.update_arg(2, None)
        else:
            conv.update_kwarg("bias", None)
        infer_fake_value(conv)
        after = batch_norm
        y = self._call(gm, aten.div.Tensor, (conv, self._call(gm, aten.view.default, (s, feature), after, conv)),
                       after, conv)
        if bias is not None:
            y = self._call(gm, aten.add.Tensor, (y, self._call(gm, aten.view.default, (bias, feature), after, conv)),
                           after, conv)
        batch_norm.update_kwarg("input", y)
