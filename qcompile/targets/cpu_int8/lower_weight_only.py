"""lower-weight-only: linears with integer weights and float activations to ``qc.linear_weight_only``,
and int4 groups on uint8 activations (W4A8) to ``qc.linear_w4a8``.

    linear(x, dequantize(W_q, S, 0, axis=0), b)                    ->  linear_weight_only(x, W_q, S, None, 0, b, int8pack)
    linear(x, view(dequantize(W_q, S, Z), [out, in]), b)   (groups)   ->  linear_weight_only(x, W_q, S, Z, size, b, int4pack)
    linear(dequantize(x_q, S_x, Z_x), view(dequantize(W_q, S, Z), [out, in]), b)
                                         (x_q uint8)   ->  linear_w4a8(x_q, S_x, Z_x, W_q, S, Z, size, b, dtype)

``x`` is float (the plan quantizes no activation; or, for groups, ``x = dequantize(x_q)`` of
activations the plan quantizes, W4A8: uint8, per tensor or per token, which the kernel reads as
integers, ``dtype`` being the dequantize's). ``W_q`` is an integer
constant per output channel or per group of ``size`` inputs ([out, in / size, size], scales [out, in / size, 1]);
groups may be affine (Z their zero points, None when all are 0), channels are symmetric.
The kernel is the one :data:`~.weight_only_kernels.WEIGHT_ONLY_KERNELS` gives for the weight's
values and grouping; where there is none, the linear stays in the reference Q/DQ form and the
pass says why. Every CPU runs the operator at least as fast as that form, with or without
native bf16 GEMMs (:mod:`~.weight_only_kernels` says what runs where).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from qcompile.ir.graph import add_constant, constant_value, insert_call, op_arguments
from qcompile.ir.meta import Provenance
from qcompile.pipeline import Diagnostic, Pass, PassResult
from qcompile.qdq import DequantizeCall, qparams_of, quantized_weight
from qcompile.targets.cpu_int8.weight_only_kernels import WEIGHT_ONLY_KERNELS, linear_w4a8, linear_weight_only

aten = torch.ops.aten
LINEAR = aten.linear.default


@dataclass
class _Operands:
    weight_q: fx.Node
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    group_size: int
    bias: torch.Tensor | None
    kernel: str


def _operands(gm: fx.GraphModule, linear: fx.Node) -> _Operands | str | None:
    """The kernel's inputs, why the linear cannot run on one, or None when it is not weight-only."""
    op = op_arguments(linear)
    found = quantized_weight(gm, op["weight"])
    if found is None or (DequantizeCall.of(op["input"]) is not None and not found[1]):
        return None  # float weights, or quantized activations with an int8 kernel's weight: another lowering's
    dq, group_size = found
    weight_q = constant_value(gm, dq.q)
    params = qparams_of(gm, dq.node)
    if weight_q is None or weight_q.dtype != torch.int8 or not params.static:
        return "weight is not an integer constant"
    affine = bool(params.zero_point.any())
    if affine and not group_size:
        return "weight is affine per channel (int8pack takes symmetric weights)"
    if group_size == 0 and params.axis not in (None, 0):
        return "weight is not scaled per output channel"
    in_features = int(op["input"].meta["val"].shape[-1])
    kernel = "int4pack" if group_size else "int8pack"
    reason = WEIGHT_ONLY_KERNELS[kernel].unsupported(weight_q, group_size, in_features)
    if reason is not None:
        return reason
    bias = constant_value(gm, op["bias"])
    if op["bias"] is not None and bias is None:
        return "bias is computed in the graph"
    scale = params.scale.float()
    if group_size == 0:
        scale = scale.reshape(-1).expand(weight_q.shape[0]).contiguous()
    zero_point = params.zero_point.to(torch.int8) if affine else None
    return _Operands(dq.q, scale, zero_point, group_size, bias, kernel)


@dataclass(frozen=True)
class LowerWeightOnly(Pass):
    name: ClassVar[str] = "lower-weight-only"
    requires: ClassVar[frozenset[str]] = frozenset({"qdq"})
    establishes: ClassVar[frozenset[str]] = frozenset({"lowered"})

    def call(self, gm: fx.GraphModule) -> PassResult:
        lowered: dict[str, int] = {}
        kept = []
        for linear in list(gm.graph.nodes):
            if linear.op != "call_function" or linear.target != LINEAR:
                continue
            ops = _operands(gm, linear)
            if isinstance(ops, str):
                kept.append(Diagnostic(linear.name, "kept", ops))
            elif ops is not None:
                kernel = self._lower(gm, linear, ops)
                lowered[kernel] = lowered.get(kernel, 0) + 1
        return PassResult(gm, bool(lowered), {"lowered": lowered} if lowered else {}, tuple(kept))

    def _lower(self, gm: fx.GraphModule, linear: fx.Node, ops: _Operands) -> str:
        """Replace ``linear`` by its kernel's call; the kernel's name."""
        name = linear.name
        scale = add_constant(gm, ops.scale, f"{name}_weight_scale", before=linear)
        zero_point = (add_constant(gm, ops.zero_point, f"{name}_weight_zero_point", before=linear)
                      if ops.zero_point is not None else None)
        bias = add_constant(gm, ops.bias, f"{name}_bias", before=linear) if ops.bias is not None else None
        x = op_arguments(linear)["input"]
        activations = DequantizeCall.of(x)
        if ops.group_size and activations is not None and activations.axis is None \
                and activations.integer_dtype == torch.uint8:
            target, label = linear_w4a8, "w4a8"
            args = (activations.q, activations.scale, activations.zero_point, ops.weight_q, scale, zero_point,
                    ops.group_size, bias, activations.out_dtype)
        else:
            target, label = linear_weight_only, ops.kernel
            args = (x, ops.weight_q, scale, zero_point, ops.group_size, bias, ops.kernel)
        kernel = insert_call(gm, target, args, before=linear,
                             provenance=Provenance(self.name, "linear", (name,)), meta_from=linear)
        linear.replace_all_uses_with(kernel)
        gm.graph.erase_node(linear)
        if target == linear_w4a8 and not activations.node.users:
            gm.graph.erase_node(activations.node)  # the kernel reads the integers
        return label
