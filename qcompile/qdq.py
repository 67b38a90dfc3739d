"""Reading and building the Q/DQ form: the vocabulary the convert, eliminate and lowering passes share.

A quantized edge is ``dequantize(quantize(x, S, Z), S, Z)``; a quantized weight is
``dequantize(W_q, S, Z)`` with ``W_q`` a constant. ``QParams`` is what a Q or DQ node says
about its integer format when its scale and zero point are constants (static quantization);
with dynamic quantization they are values computed in the graph and ``QParams`` holds nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from qcompile.ir.graph import constant_value, describe_node, op_arguments
from qcompile.ir.verify import register_invariant
from qcompile.observers import Observer
from qcompile.spec import FLOAT8_STORAGE as _FLOAT8

QUANTIZE = torch.ops.qc.quantize.default
DEQUANTIZE = torch.ops.qc.dequantize.default
CHOOSE_QPARAMS = torch.ops.qc.choose_qparams.default
CHOOSE_QPARAMS_PER_TOKEN = torch.ops.qc.choose_qparams_per_token.default

aten = torch.ops.aten

# Ops whose output keeps its input's quantization parameters: they move or select values
# without changing them, so quantizing before or after them gives the same integers. The data
# is argument 0 of each.
SHARES_QPARAMS = frozenset({
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.permute.default,
    aten.transpose.int,
    aten.t.default,
    aten.flatten.using_ints,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.contiguous.default,
    aten.max_pool2d.default,
})


def is_quantize(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target == QUANTIZE


def is_dequantize(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target == DEQUANTIZE


@dataclass(frozen=True)
class QParams:
    """Scale and zero point of a Q or DQ node: tensors when constant, else the nodes computing them."""

    scale: torch.Tensor | fx.Node
    zero_point: torch.Tensor | fx.Node
    axis: int | None

    @property
    def static(self) -> bool:
        return isinstance(self.scale, torch.Tensor) and isinstance(self.zero_point, torch.Tensor)

    def same_as(self, other: QParams) -> bool:
        if self.axis != other.axis:
            return False
        if self.static and other.static:
            return torch.equal(self.scale, other.scale) and torch.equal(self.zero_point, other.zero_point)
        return self.scale is other.scale and self.zero_point is other.zero_point


def one_scale(axis: int | None, scale: object) -> bool:
    """One scale for the whole tensor: no axis, and not per-token scales shaped [..., 1] (a
    scale computed in the graph is one when its fake value has at most one dimension)."""
    if axis is not None:
        return False
    val = scale.meta.get("val") if isinstance(scale, fx.Node) else scale
    return not isinstance(val, torch.Tensor) or val.dim() <= 1


@dataclass(frozen=True)
class QuantizeCall:
    """``qc.quantize(x, scale, zero_point, axis, qmin, qmax, dtype)``, read by argument name."""

    node: fx.Node
    x: fx.Node
    scale: fx.Node
    zero_point: fx.Node
    axis: int | None
    qmin: int
    qmax: int
    dtype: torch.dtype

    @classmethod
    def of(cls, node: object) -> QuantizeCall | None:
        """The view of ``node`` when it is a quantize, else None."""
        return cls(node, **op_arguments(node)) if is_quantize(node) else None

    @property
    def per_tensor(self) -> bool:
        return one_scale(self.axis, self.scale)

    @property
    def integer_format(self) -> tuple[int, int, torch.dtype]:
        """(qmin, qmax, dtype): two quantizes with equal qparams and format give equal integers."""
        return self.qmin, self.qmax, self.dtype

    def constant_qparams(self, gm: fx.GraphModule) -> tuple[float, int] | None:
        """(S, Z) when the quantize is per tensor with constant parameters, which a fused kernel
        can take as numbers; None otherwise."""
        scale, zero_point = constant_value(gm, self.scale), constant_value(gm, self.zero_point)
        if not self.per_tensor or scale is None or zero_point is None:
            return None
        return float(scale.reshape(())), int(zero_point.reshape(()))


@dataclass(frozen=True)
class DequantizeCall:
    """``qc.dequantize(q, scale, zero_point, axis, out_dtype)``, read by argument name."""

    node: fx.Node
    q: fx.Node
    scale: fx.Node
    zero_point: fx.Node
    axis: int | None
    out_dtype: torch.dtype

    @classmethod
    def of(cls, node: object) -> DequantizeCall | None:
        """The view of ``node`` when it is a dequantize, else None."""
        return cls(node, **op_arguments(node)) if is_dequantize(node) else None

    @property
    def per_tensor(self) -> bool:
        return one_scale(self.axis, self.scale)

    @property
    def integer_dtype(self) -> torch.dtype | None:
        """The dtype of the integers it reads (from the fake value export recorded)."""
        val = self.q.meta.get("val") if isinstance(self.q, fx.Node) else None
        return val.dtype if isinstance(val, torch.Tensor) else None


def quantized_weight(gm: fx.GraphModule, weight: object) -> tuple[DequantizeCall, int] | None:
    """A weight already in its Q/DQ form: its dequantize and group size (0: one scale per tensor
    or per channel), or None. Per group the form is ``view(dequantize(W_q, S, Z), [out, in])``
    with ``W_q`` a constant [out, in / size, size]."""
    dq = DequantizeCall.of(weight)
    if dq is not None:
        return dq, 0
    if isinstance(weight, fx.Node) and weight.op == "call_function" and weight.target == aten.view.default:
        dq = DequantizeCall.of(weight.args[0])
        q = constant_value(gm, dq.q) if dq is not None else None
        if q is not None and q.dim() == 3:
            return dq, q.shape[-1]
    return None


def qparams_of(gm: fx.GraphModule, node: fx.Node) -> QParams:
    """The qparams a quantize or dequantize node applies."""
    call = QuantizeCall.of(node) or DequantizeCall.of(node)
    if call is None:
        raise TypeError(f"{describe_node(node)} is neither a quantize nor a dequantize")
    scale = constant_value(gm, call.scale)
    zero_point = constant_value(gm, call.zero_point)
    return QParams(
        scale if scale is not None else call.scale,
        zero_point if zero_point is not None else call.zero_point,
        call.axis,
    )


_LAST_DIM_STAYS = frozenset({aten.transpose.int, aten.permute.default})
_RESHAPES = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
                       aten.unsqueeze.default, aten.squeeze.dim, aten.contiguous.default})


def keeps_rows(node: fx.Node) -> bool:
    """Whether shape op ``node`` maps its input's rows (all dimensions but the last) one to one
    onto its output's: a transpose or permute that leaves the last dimension last, or a row-major
    reshape whose last dimension keeps its size (each output row is then one input row). A
    per-token scale computed before such an op is the one computed after it."""
    source = node.args[0]
    before, after = source.meta.get("val"), node.meta.get("val")
    if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor) or not before.dim() or not after.dim():
        return False
    if node.target in _LAST_DIM_STAYS:
        arguments, last = op_arguments(node), before.dim() - 1
        if node.target == aten.permute.default:
            return arguments["dims"][-1] % before.dim() == last
        return last not in (arguments["dim0"] % before.dim(), arguments["dim1"] % before.dim())
    width, kept = before.shape[-1], after.shape[-1]
    return node.target in _RESHAPES and isinstance(width, int) and isinstance(kept, int) and width == kept


def observation_root(node: fx.Node, per_token: bool = False) -> tuple[fx.Node, list[fx.Node]]:
    """Where the value feeding an op should be observed: up through single-user ops that share
    qparams (with ``per_token``, only through those that keep its rows: :func:`keeps_rows`).
    Returns the root and the shape ops from the root down to the edge's producer."""
    chain: list[fx.Node] = []
    while (
        node.op == "call_function"
        and node.target in SHARES_QPARAMS
        and len(node.users) == 1
        and isinstance(node.args[0], fx.Node)
        and isinstance(node.args[0].meta.get("val"), torch.Tensor)
        and (not per_token or keeps_rows(node))
    ):
        chain.append(node)
        node = node.args[0]
    return node, chain[::-1]


@register_invariant
def dequantize_reads_integers(gm: fx.GraphModule) -> list[str]:
    """Every dequantize reads integers, and one fed by a quantize uses that quantize's qparams."""
    problems = []
    for node in gm.graph.nodes:
        if not is_dequantize(node):
            continue
        source = DequantizeCall.of(node).q
        val = source.meta.get("val") if isinstance(source, fx.Node) else None
        if isinstance(val, torch.Tensor) and val.is_floating_point() and val.dtype not in _FLOAT8:
            problems.append(f"{describe_node(node)} dequantizes {val.dtype}, not integers")
        if is_quantize(source) and not qparams_of(gm, source).same_as(qparams_of(gm, node)):
            problems.append(f"{describe_node(node)} reads {source.name} with other qparams than it was quantized with")
    return problems


@register_invariant
def no_observer_beside_quantize(gm: fx.GraphModule) -> list[str]:
    """Observers belong to the calibration stage: once a format family (integer, float8) has a
    quantize, it was converted (``convert``, ``cast-fp8``) and none of its observers are left."""
    converted = {QuantizeCall.of(n).dtype in _FLOAT8 for n in gm.graph.nodes if is_quantize(n)}
    return [
        f"{describe_node(n)} is an observer left in a converted graph"
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(observer := gm.get_submodule(n.target), Observer)
        and observer.spec.is_float8 in converted
    ]
