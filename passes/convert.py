"""convert: from the observed plan to the explicit Q/DQ form, the common ground of every target.

    o = observer_0(y)          ->   q = qc.quantize(y, S, Z) ; o' = qc.dequantize(q, S, Z)
    linear(x, W, b)            ->   linear(x, qc.dequantize(W_q, S_W, 0, axis=0),
                                           qc.dequantize(b_q, S_x·S_W, 0, axis=0))

S and Z come from each observer's statistics; W_q from the weight's own range (per output
channel by default, or per group of inputs: ``view(dequantize(W_q, S, Z), [out, in])`` with
W_q viewed [out, in / size, size] and one S per group; with ``observer="mse"`` each channel's
or group's clipping ratio that minimizes the rounding error, :func:`~qcompile.fake_quant.weight_qparams`),
computed once here. A weight a pass before convert already rounded (``gptq``, ``correct-bias``)
arrives in that Q/DQ form and is kept as it is. The bias is stored as int32 with the derived scale
S_x · S_W, so that an integer kernel can add it to the int32 accumulator exactly (its rounding
error is at most half of one accumulator step).

With ``dynamic=true`` there are no observers: each quantized activation gets
``S, Z = qc.choose_qparams(y)`` at run time, and biases stay float (their scale would only be
known at run time). A per-token spec is dynamic whatever the calibration: its scales come
from ``qc.choose_qparams_per_token(y)``, one per row. An observer that saw no data, or a
planned activation that is neither observed nor dynamic, is an error naming the node: the
graph was not calibrated.

``convert`` takes the integer formats; float8 edges are the ``cast-fp8`` pass's, the same
conversion for scaled casts (:mod:`qcompile.passes.cast_fp8`), which runs first: a float8
observer left for ``convert`` is an error naming it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from qcompile.errors import NodeError, QCompileError
from qcompile.fake_quant import weight_qparams
from qcompile.ir.graph import add_constant, constant_expression, constant_value, insert_call
from qcompile.ir.meta import Provenance, get_qspec
from qcompile.observers import Observer
from qcompile.pipeline import Pass, PassResult
from qcompile.qdq import (
    CHOOSE_QPARAMS,
    CHOOSE_QPARAMS_PER_TOKEN,
    DEQUANTIZE,
    QUANTIZE,
    DequantizeCall,
    observation_root,
    quantized_weight,
)
from qcompile.spec import PerChannel, PerGroup, QuantSpec, grouped


def _call(gm: fx.GraphModule, target: object, args: tuple, *, before: fx.Node, pass_name: str,
          source: fx.Node) -> fx.Node:
    return insert_call(gm, target, args, before=before, provenance=Provenance(pass_name, sources=(source.name,)))


def quantize_dequantize(gm: fx.GraphModule, root: fx.Node, spec: QuantSpec, scale: fx.Node, zero_point: fx.Node,
                        *, before: fx.Node, pass_name: str) -> fx.Node:
    """``dequantize(quantize(root, S, Z), S, Z)`` inserted before ``before``: a quantized edge."""
    q = _call(gm, QUANTIZE, (root, scale, zero_point, spec.axis, spec.qmin, spec.qmax, spec.storage_dtype),
              before=before, pass_name=pass_name, source=root)
    return _call(gm, DEQUANTIZE, (q, scale, zero_point, spec.axis, root.meta["val"].dtype),
                 before=before, pass_name=pass_name, source=root)


def dynamic_quantize_dequantize(gm: fx.GraphModule, root: fx.Node, spec: QuantSpec, *, pass_name: str) -> fx.Node:
    """``dequantize(quantize(root, S, Z), S, Z)`` right after ``root``, with ``S, Z`` chosen from
    ``root``'s own range at run time: ``qc.choose_qparams`` per tensor, ``qc.choose_qparams_per_token``
    per row for a per-token spec. A float8 scale is computed for the range the margin leaves
    (its zero point is 0)."""
    after_root = root.next
    qmin, qmax = spec.scale_range if spec.is_float8 else (spec.qmin, spec.qmax)
    choose = CHOOSE_QPARAMS_PER_TOKEN if spec.dynamic else CHOOSE_QPARAMS
    params = _call(gm, choose, (root, qmin, qmax, spec.symmetric), before=after_root, pass_name=pass_name, source=root)
    scale, zero_point = (_call(gm, operator.getitem, (params, i), before=after_root, pass_name=pass_name, source=root)
                         for i in (0, 1))
    return quantize_dequantize(gm, root, spec, scale, zero_point, before=after_root, pass_name=pass_name)


def quantized_constant(gm: fx.GraphModule, value: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                       spec: QuantSpec, *, before: fx.Node, pass_name: str, source: fx.Node,
                       name: str | None = None) -> fx.Node:
    """``dequantize(W_q, S, Z)`` with ``W_q = quantize(value, S, Z)`` computed once and stored:
    a quantized weight, its constants named ``name`` (default: after the constant ``source``)."""
    value_q = torch.ops.qc.quantize(value, scale, zero_point, spec.axis, spec.qmin, spec.qmax, spec.storage_dtype)
    base = name or (str(source.target) if source.op == "get_attr" else source.name)
    args = [add_constant(gm, t, f"{base}_{suffix}", before=before)
            for t, suffix in ((value_q, "q"), (scale, "scale"), (zero_point, "zero_point"))]
    return _call(gm, DEQUANTIZE, (*args, spec.axis, value.dtype), before=before, pass_name=pass_name, source=source)


def quantized_group_constant(gm: fx.GraphModule, value: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                             spec: QuantSpec, *, before: fx.Node, pass_name: str, source: fx.Node,
                             name: str | None = None) -> fx.Node:
    """A weight quantized per group: ``view(dequantize(W_q, S, Z), [out, in])`` where ``W_q`` is
    the weight viewed [out, in / size, size] (:func:`~qcompile.spec.grouped`) and ``S``, ``Z``
    are [out, in / size, 1], one per group, broadcast over its elements."""
    values = grouped(value, spec)
    shape = (*values.shape[:2], 1)
    dequantized = quantized_constant(gm, values, scale.reshape(shape), zero_point.reshape(shape), spec, before=before,
                                     pass_name=pass_name, source=source, name=name)
    return _call(gm, torch.ops.aten.view.default, (dequantized, list(value.shape)), before=before, pass_name=pass_name,
                 source=source)


def quantized_weight_constant(gm: fx.GraphModule, value: torch.Tensor, scale: torch.Tensor,
                              zero_point: torch.Tensor, spec: QuantSpec, *, before: fx.Node, pass_name: str,
                              source: fx.Node, name: str | None = None) -> fx.Node:
    """A weight's Q/DQ form for its spec: :func:`quantized_group_constant` per group, else
    :func:`quantized_constant`."""
    quantized = quantized_group_constant if isinstance(spec.granularity, PerGroup) else quantized_constant
    return quantized(gm, value, scale, zero_point, spec, before=before, pass_name=pass_name, source=source, name=name)


def planned_weights(gm: fx.GraphModule, wanted: Callable[[QuantSpec], bool]) -> list[tuple[fx.Node, int, QuantSpec]]:
    """``(node, argument index, spec)`` of each weight the plan quantizes with a ``wanted`` spec
    that is still float: the weights a pass rounding before ``convert`` (gptq, correct-bias) has left."""
    found = []
    for node in gm.graph.nodes:
        plan = get_qspec(node)
        if plan is None or not plan.quantized:
            continue
        found.extend((node, index, edge.spec) for index, edge in plan.inputs
                     if edge.role == "weight" and wanted(edge.spec) and quantized_weight(gm, node.args[index]) is None)
    return found


def quantize_bias(gm: fx.GraphModule, node: fx.Node, index: int, scale: torch.Tensor, *, pass_name: str) -> None:
    """Argument ``index`` of ``node``, a constant bias, as int32 with scale ``scale`` (S_x · S_W)."""
    bias_node = node.args[index]
    bias = constant_value(gm, bias_node)
    scale = scale.reshape(-1).expand(bias.shape[0]).contiguous() if scale.numel() == 1 else scale.reshape(-1)
    zero_point = torch.zeros_like(scale, dtype=torch.int32)
    bias_spec = QuantSpec("int32", symmetric=True, granularity=PerChannel(0))
    node.update_arg(index, quantized_constant(gm, bias, scale, zero_point, bias_spec, before=node,
                                              pass_name=pass_name, source=bias_node))


@dataclass(frozen=True)
class Convert(Pass):
    name: ClassVar[str] = "convert"
    requires: ClassVar[frozenset[str]] = frozenset({"annotated"})
    establishes: ClassVar[frozenset[str]] = frozenset({"qdq"})
    invalidates: ClassVar[frozenset[str]] = frozenset({"observed"})

    dynamic: bool = False

    def takes(self, spec: QuantSpec) -> bool:
        """Whether this pass converts edges of ``spec``: the integer formats."""
        return not spec.is_float8

    def call(self, gm: fx.GraphModule) -> PassResult:
        activation_qparams: dict[tuple[str, QuantSpec], tuple[fx.Node, ...]] = {}
        observed = self._replace_observers(gm, activation_qparams)
        converted = 0
        for node in list(gm.graph.nodes):
            plan = get_qspec(node)
            if plan is None or not plan.quantized:
                continue
            edges = [(index, edge) for index, edge in plan.inputs if self.takes(edge.spec)]
            x_scale, w_scale, weights = None, None, 0
            for index, edge in edges:
                if edge.role == "activation":
                    x_scale = self._activation(gm, node, index, edge.spec, activation_qparams)
            for index, edge in edges:
                if edge.role != "weight":
                    continue
                rounded = quantized_weight(gm, node.args[index])
                if rounded is None:
                    w_scale = self._weight(gm, node, index, edge.spec)
                    converted += 1
                else:  # rounded before convert (gptq, correct-bias): its scale is the bias's
                    w_scale = constant_value(gm, rounded[0].scale)
                weights += 1
            for index, edge in edges:
                if (edge.role == "bias" and weights and x_scale is not None and w_scale is not None
                        and not self.dynamic and DequantizeCall.of(node.args[index]) is None):
                    self._bias(gm, node, index, edge.spec, constant_value(gm, x_scale) * w_scale)
        stats = {"observers": observed, "weights": converted}
        dynamic_edges = sum(1 for _, spec in activation_qparams if self.dynamic or spec.dynamic)
        if dynamic_edges:
            stats["dynamic"] = dynamic_edges
        return PassResult(gm, bool(observed or converted or dynamic_edges), stats)

    def _replace_observers(self, gm: fx.GraphModule, qparams: dict) -> int:
        count = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            observer = gm.get_submodule(node.target)
            if not isinstance(observer, Observer):
                continue
            if not self.takes(observer.spec):
                if observer.spec.is_float8:
                    raise NodeError(node, f"observer '{node.target}' is planned as {observer.spec.dtype}: float8 "
                                          "edges are converted by cast-fp8, which runs before convert")
                continue
            if observer.batches == 0:
                raise NodeError(node, f"observer '{node.target}' saw no data: the graph was never calibrated "
                                      "(run calibration after insert-observers, or convert{dynamic=true})")
            root, spec = node.args[0], observer.spec
            scale, zero_point = observer.qparams()
            scale_node = add_constant(gm, scale, f"{root.name}_scale", before=node)
            zp_node = add_constant(gm, zero_point, f"{root.name}_zero_point", before=node)
            dq = self._quantize_dequantize(gm, root, spec, scale_node, zp_node, before=node)
            node.replace_all_uses_with(dq)
            gm.graph.erase_node(node)
            qparams[(root.name, spec)] = (scale_node, zp_node)
            count += 1
        return count

    def _quantize_dequantize(self, gm, root, spec, scale, zero_point, *, before) -> fx.Node:
        return quantize_dequantize(gm, root, spec, scale, zero_point, before=before, pass_name=self.name)

    def _activation(self, gm, node, index, spec, qparams) -> fx.Node | None:
        """The scale node of ``node``'s quantized input ``index`` (adding the dynamic Q/DQ if needed)."""
        root, chain = observation_root(node.args[index], per_token=spec.dynamic)
        dequantize = DequantizeCall.of(root)
        if dequantize is not None:
            return dequantize.scale
        if not (self.dynamic or spec.dynamic):
            raise NodeError(node, f"input {index} is planned as quantized but was never observed; run "
                                  f"insert-observers and calibrate, or use {self.name}{{dynamic=true}}")
        key = (root.name, spec)
        if key not in qparams:
            qparams[key] = (dynamic_quantize_dequantize(gm, root, spec, pass_name=self.name),)
        dq = qparams[key][-1]
        (chain[0] if chain else node).replace_input_with(root, dq)
        return None

    def _weight(self, gm: fx.GraphModule, node: fx.Node, index: int, spec: QuantSpec) -> torch.Tensor:
        weight_node = node.args[index]
        if spec.rounding != "nearest" or spec.bias_correction:
            asked = spec.rounding if spec.rounding != "nearest" else "bias correction"
            raise NodeError(node, f"its weight is planned with {asked}, which the {asked.replace(' ', '-')} pass "
                                  "does before convert from calibration data; this pipeline had none (or no data)")
        weight = constant_expression(gm, weight_node)
        name = None if weight_node.op == "get_attr" else f"{node.name}_weight"  # a pruned weight: mul(W, mask)
        try:
            scale, zero_point = weight_qparams(weight, spec)
        except QCompileError as exc:
            raise NodeError(node, str(exc)) from None
        node.update_arg(index, quantized_weight_constant(gm, weight, scale, zero_point, spec, before=node,
                                                         pass_name=self.name, source=weight_node, name=name))
        return scale

    def _bias(self, gm, node, index, spec, scale: torch.Tensor) -> None:
        quantize_bias(gm, node, index, scale, pass_name=self.name)
