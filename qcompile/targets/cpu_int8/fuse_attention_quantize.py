"""fuse-attention-quantize: an attention whose output only feeds an int8 linear, quantized as it is written.

    y = qc.attention(Q, K, V, mask, scale, is_causal, float32)        [B, H, L, D]
    r = reshape(transpose(y, 1, 2), [B, L, H·D])
    m = r · s                                    (outlier smoothing's per-channel multiplier; may be absent)
    q = qc.quantize(m, S, Z, None, qmin, qmax, uint8 | int8)
        ->  q = reshape(transpose(qc.attention_quantize(Q, K, V, mask, scale, is_causal, s, S, Z, qmin, qmax,
                                                          dtype), 1, 2), [B, L, H·D])

    qc.quantize(y, S, Z, None, qmin, qmax, dtype)          (no multiply: the quantize sits above the layout ops)
        ->  qc.attention_quantize(Q, K, V, mask, scale, is_causal, None, S, Z, qmin, qmax, dtype)

A transformer block's attention output is read by one thing, the output projection, an int8
linear. As separate ops that is the attention writing fp32 rows, a multiply reading and writing
them again and a quantize reading them a third time to write bytes; the fused kernel quantizes
each row while it is in registers. Channel c = h·D + d of r is channel d of head h of y (the
transpose and reshape lay the heads side by side), so s applies to head h's slice
s[h·D : (h+1)·D]. It matches when the chain has no other readers, s is a constant fp32 vector of
H·D and S, Z are single constants (per tensor). The contract: the quantize of the fp32
attention, times s, to two steps (the attention's summation order differs from ATen's, which may
move a value across a rounding boundary), so the pass does not claim bit-for-bit semantics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from qcompile import native
from qcompile.ir.graph import constant_value, infer_fake_value, insert_call, op_arguments, reread_constant
from qcompile.ir.meta import Provenance
from qcompile.pipeline import Pass, PassResult
from qcompile.qdq import QuantizeCall
from qcompile.rewrite import fuse_matches
from qcompile.targets.cpu_int8.attention import attention, attention_quantize

aten = torch.ops.aten
RESHAPES = (aten.reshape.default, aten.view.default)


@dataclass(frozen=True)
class _Match:
    attention: fx.Node
    layout: tuple[fx.Node, ...]  # (transpose, reshape) between the attention and the quantize, or ()
    multiply: fx.Node | None
    multiplier: fx.Node | None  # s's get_attr
    quantize: QuantizeCall


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _heads_side_by_side(y: fx.Node, transpose: fx.Node, reshape: fx.Node) -> bool:
    """transpose(y, 1, 2) then a reshape to [B, L, H·D] (of static H and D)."""
    if transpose.target != aten.transpose.int:
        return False
    arguments = op_arguments(transpose)
    shape, out = y.meta["val"].shape, reshape.meta["val"].shape
    heads, depth = shape[1], shape[3]
    return ({arguments["dim0"], arguments["dim1"]} == {1, 2} and reshape.target in RESHAPES and len(out) == 3
            and isinstance(heads, int) and isinstance(depth, int) and out[2] == heads * depth)


def _per_tensor_quantize(gm: fx.GraphModule, node: fx.Node | None) -> QuantizeCall | None:
    quantize = QuantizeCall.of(node)
    if quantize is None or quantize.dtype not in native.INTEGER_STORAGE or quantize.constant_qparams(gm) is None:
        return None
    return quantize


def _match(gm: fx.GraphModule, node: fx.Node) -> _Match | None:
    """The attention quantized directly (eliminate-dequant hoists a quantize above the layout ops
    when nothing scales the channels), or through the layout ops and smoothing's multiply."""
    if node.op != "call_function" or node.target != attention or op_arguments(node)["out_dtype"] != torch.float32:
        return None
    transpose = _only_user(node)
    direct = _per_tensor_quantize(gm, transpose)
    if direct is not None:
        return _Match(node, (), None, None, direct)
    reshape = transpose and _only_user(transpose)
    reader = reshape and _only_user(reshape)
    if reader is None or not _heads_side_by_side(node, transpose, reshape):
        return None
    width = int(reshape.meta["val"].shape[2])
    multiply, multiplier = None, None
    if reader.target == aten.mul.Tensor:
        operands = op_arguments(reader)
        other = operands["other"] if operands["self"] is reshape else operands["self"]
        value = constant_value(gm, other)
        if value is None or value.dtype != torch.float32 or value.dim() != 1 or value.numel() != width:
            return None
        multiply, multiplier, reader = reader, other, _only_user(reader)
    quantize = _per_tensor_quantize(gm, reader)
    return None if quantize is None else _Match(node, (transpose, reshape), multiply, multiplier, quantize)


@dataclass(frozen=True)
class FuseAttentionQuantize(Pass):
    name: ClassVar[str] = "fuse-attention-quantize"

    def call(self, gm: fx.GraphModule) -> PassResult:
        return fuse_matches(gm, lambda node: _match(gm, node), lambda match: self._fuse(gm, match))

    def _fuse(self, gm: fx.GraphModule, match: _Match) -> None:
        y, quantize = match.attention, match.quantize
        arguments = op_arguments(y)
        multiplier = None if match.multiplier is None else reread_constant(gm, match.multiplier, before=y)
        scale, zero_point = quantize.constant_qparams(gm)
        args = (arguments["query"], arguments["key"], arguments["value"], arguments["mask"], arguments["scale"],
                arguments["is_causal"], multiplier, scale, zero_point, quantize.qmin, quantize.qmax, quantize.dtype)
        provenance = Provenance(self.name, sources=(y.name, quantize.node.name))
        fused = insert_call(gm, attention_quantize, args, before=y, provenance=provenance, meta_from=y)
        result = fused
        if match.layout:  # the transpose and reshape stay where they are and now lay out the integers
            y.replace_all_uses_with(fused)
            for layout in match.layout:
                infer_fake_value(layout)
            result = match.layout[-1]
        quantize.node.replace_all_uses_with(result)
        for dead in (quantize.node, match.multiply, y):
            if dead is not None:
                gm.graph.erase_node(dead)
