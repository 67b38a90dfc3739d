"""lower-cpu-int8: Q/DQ groups to oneDNN int8 kernels.

    dequantize(x_q, S_x, Z_x) -> linear(·, dequantize(W_q, S_W, 0), dequantize(b_q, ...))
        [-> add(·, other)] [-> gelu | relu]  [-> quantize(·, S_y, Z_y)]
    ->  qc.linear_int8(x_q, S_x, Z_x, W_q, S_W, b, other, S_y, Z_y, out_dtype, post_op)

and the same for ``conv2d`` (relu only) into ``qc.conv2d_int8``, whose residual ``other``
may also be a uint8 tensor read through its dequantize (the sum post-op then adds integers
and the block's output stays uint8). The group is the one ``fuse-patterns`` marked. The
output dtype is the one the consumers want: when every user of the group's last value
quantizes it with the same uint8 per-tensor qparams, the kernel requantizes in its epilogue
and those quantize nodes disappear (uint8 flows straight into the next int8 op); otherwise the
kernel writes float for the float ops that read it.

A max-pool left reading uint8 (the stem of a ResNet, once its convolution writes uint8)
becomes ``qc.max_pool2d_uint8``: ATen pools uint8 on a slow generic path.

An anchor that does not fit a kernel stays in the reference Q/DQ form (numerically the same
model, just not fast) and the pass's stats say why, node by node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from qcompile.ir.graph import add_constant, constant_value, insert_call, op_arguments
from qcompile.ir.meta import Fusion, Provenance, get_fusion
from qcompile.pipeline import Diagnostic, Pass, PassResult
from qcompile.qdq import DequantizeCall, QParams, QuantizeCall, is_dequantize, qparams_of
from qcompile.targets.cpu_int8.capabilities import ANCHORS
from qcompile.targets.cpu_int8.onednn import conv2d_int8, linear_int8
from qcompile.targets.cpu_int8.uint8_kernels import max_pool2d_uint8

aten = torch.ops.aten


@dataclass
class _Operands:
    x_q: fx.Node
    x_scale: fx.Node
    x_zero_point: fx.Node
    weight_q: fx.Node  # the int8 constant convert made; the kernel reads it as it is
    weight_scale: torch.Tensor
    bias: torch.Tensor | None


def _operands(gm: fx.GraphModule, anchor: fx.Node) -> _Operands | str:
    """The kernel's inputs read off the Q/DQ form, or why the anchor does not fit the kernel."""
    op = op_arguments(anchor)  # linear(input, weight, bias) and conv2d(input, weight, bias, ...)
    x_dq = DequantizeCall.of(op["input"])
    if x_dq is None:
        return "input is not dequantized from integers (not quantized by the plan)"
    if x_dq.integer_dtype != torch.uint8 or x_dq.axis is not None:
        return "input is not uint8 per-tensor"
    w_dq = DequantizeCall.of(op["weight"])
    weight_q = constant_value(gm, w_dq.q) if w_dq is not None else None
    if weight_q is None:
        return "weight is not a dequantized int8 constant"
    w = qparams_of(gm, w_dq.node)
    if not w.static or weight_q.dtype != torch.int8 or w.axis not in (None, 0) or bool(w.zero_point.any()):
        return "weight is not int8 symmetric per output channel"
    channels = weight_q.shape[0]
    bias_dq = DequantizeCall.of(op["bias"])
    if bias_dq is not None:
        bias = _dequantized_constant(gm, bias_dq)
    else:
        bias = constant_value(gm, op["bias"])
        if op["bias"] is not None and bias is None:
            return "bias is computed in the graph"
    if anchor.target == aten.conv2d.default and not isinstance(constant_value(gm, x_dq.scale), torch.Tensor):
        return "conv2d kernel packs with a static input scale (dynamic quantization is linear-only)"
    return _Operands(x_dq.q, x_dq.scale, x_dq.zero_point, w_dq.q,
                     w.scale.reshape(-1).expand(channels).contiguous().float(), bias)


def _dequantized_constant(gm: fx.GraphModule, dq: DequantizeCall) -> torch.Tensor:
    params = qparams_of(gm, dq.node)
    return torch.ops.qc.dequantize(constant_value(gm, dq.q), params.scale, params.zero_point, params.axis,
                                   torch.float32)


def _uint8_static_source(gm: fx.GraphModule, value: fx.Node) -> tuple[fx.Node, float, int] | None:
    """``(q, S, Z)`` when ``value`` is ``dequantize(q, S, Z)`` of a uint8 tensor with constant
    per-tensor qparams: what a convolution's sum post-op can read instead of the float."""
    dq = DequantizeCall.of(value)
    if dq is None or dq.integer_dtype != torch.uint8:
        return None
    params = qparams_of(gm, value)
    if not params.static or params.axis is not None:
        return None
    return dq.q, float(params.scale.reshape(())), int(params.zero_point.reshape(()))


def _pair(values: list[int]) -> list[int]:
    """ATen's ``int[2]`` arguments, which a single value fills."""
    values = list(values)
    return values * 2 if len(values) == 1 else values


def _requantize_target(gm: fx.GraphModule, last: fx.Node) -> tuple[list[fx.Node], QParams] | None:
    """The quantize users of ``last`` when all of them agree on one static uint8 per-tensor format."""
    users = list(last.users)
    calls = [QuantizeCall.of(u) for u in users]
    if not users or None in calls:
        return None
    params = [qparams_of(gm, u) for u in users]
    first = params[0]
    if not first.static or first.axis is not None or calls[0].dtype != torch.uint8:
        return None
    if any(not p.same_as(first) or c.integer_format != calls[0].integer_format for p, c in zip(params, calls)):
        return None
    return users, first


def _group_nodes(anchor: fx.Node, fusion: Fusion) -> dict[str, fx.Node] | None:
    """The marked group's nodes by name, or None when the chain of sole users no longer holds."""
    nodes, current = {anchor.name: anchor}, anchor
    for name in (fusion.add_node, fusion.unary_node):
        if name is None:
            continue
        users = list(current.users)
        if len(users) != 1 or users[0].name != name:
            return None
        current = nodes[name] = users[0]
    return nodes if current.name == fusion.last else None


@dataclass(frozen=True)
class LowerCpuInt8(Pass):
    name: ClassVar[str] = "lower-cpu-int8"
    requires: ClassVar[frozenset[str]] = frozenset({"qdq", "fused"})
    establishes: ClassVar[frozenset[str]] = frozenset({"lowered"})

    def call(self, gm: fx.GraphModule) -> PassResult:
        lowered, kept = 0, {}
        for anchor in list(gm.graph.nodes):
            if anchor.op != "call_function" or anchor.target not in ANCHORS:
                continue
            operands = _operands(gm, anchor)
            if isinstance(operands, str):
                if is_dequantize(op_arguments(anchor)["weight"]):
                    kept[anchor.name] = operands
                continue
            self._lower(gm, anchor, operands)
            lowered += 1
        pooled = sum(self._lower_uint8_pool(gm, node) for node in list(gm.graph.nodes))
        stats: dict[str, object] = {"lowered": lowered}
        if pooled:
            stats["uint8-pools"] = pooled
        diagnostics = tuple(Diagnostic(node, "kept", reason) for node, reason in kept.items())
        return PassResult(gm, bool(lowered or pooled), stats, diagnostics)

    def _lower_uint8_pool(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        if node.op != "call_function" or node.target != aten.max_pool2d.default:
            return False
        pool = op_arguments(node)
        if pool["self"].meta["val"].dtype != torch.uint8 or pool["ceil_mode"] or list(pool["dilation"]) != [1, 1]:
            return False
        kernel, padding = _pair(pool["kernel_size"]), _pair(pool["padding"])
        if any(2 * p >= k for p, k in zip(padding, kernel)):
            return False  # the kernel starts from the tap at the padding offset, which must lie inside
        args = (pool["self"], kernel, _pair(pool["stride"] or kernel), padding)
        pooled = insert_call(gm, max_pool2d_uint8, args, before=node,
                             provenance=Provenance(self.name, "max_pool2d", (node.name,)), meta_from=node)
        node.replace_all_uses_with(pooled)
        gm.graph.erase_node(node)
        return True

    def _lower(self, gm: fx.GraphModule, anchor: fx.Node, ops: _Operands) -> None:
        fusion = get_fusion(anchor)
        nodes = _group_nodes(anchor, fusion) if fusion else None
        if nodes is None:  # unmarked, or the graph changed since fuse-patterns: the anchor alone
            fusion, nodes = None, {anchor.name: anchor}
        last = nodes[fusion.last] if fusion else anchor
        other = nodes[fusion.add_node].args[fusion.add_other] if fusion and fusion.add_node else None
        post_op = (fusion.unary if fusion else None) or "none"
        requantize = _requantize_target(gm, last)
        other_scale, other_zero_point = 1.0, 0
        if other is not None:
            # A sum post-op reads a uint8 other through its qparams; a binary one reads it as float.
            integer_other = _uint8_static_source(gm, other) if ANCHORS[anchor.target].residual == "sum" else None
            if integer_other is not None:
                other, other_scale, other_zero_point = integer_other
            elif requantize is not None:
                requantize = None  # oneDNN adds a float other into a float output only
        if requantize is not None:
            out_scale = float(requantize[1].scale.reshape(()))
            out_zero_point, out_dtype = int(requantize[1].zero_point.reshape(())), torch.uint8
        else:
            out_scale, out_zero_point, out_dtype = 1.0, 0, last.meta["val"].dtype
        name = anchor.name
        weight_scale = add_constant(gm, ops.weight_scale, f"{name}_weight_scale", before=anchor)
        bias = add_constant(gm, ops.bias, f"{name}_bias", before=anchor) if ops.bias is not None else None
        x = (ops.x_q, ops.x_scale, ops.x_zero_point, ops.weight_q, weight_scale, bias)
        if anchor.target == aten.linear.default:
            target, args = linear_int8, (*x, other, out_scale, out_zero_point, out_dtype, post_op)
        else:
            conv = op_arguments(anchor)
            target = conv2d_int8
            args = (*x, other, other_scale, other_zero_point, list(conv["stride"]), list(conv["padding"]),
                    list(conv["dilation"]), conv["groups"], out_scale, out_zero_point, out_dtype, post_op)
        provenance = Provenance(self.name, ANCHORS[anchor.target].kind, tuple(nodes))
        kernel = insert_call(gm, target, args, before=last.next, provenance=provenance, meta_from=anchor)
        for replaced in requantize[0] if requantize else [last]:
            replaced.replace_all_uses_with(kernel)
        for replaced in [*(requantize[0] if requantize else []), *reversed(list(nodes.values()))]:
            gm.graph.erase_node(replaced)  # the group is the kernel now; its inputs are left to DCE
