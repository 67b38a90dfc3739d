"""quantize-before-pad: pad the integers, not the floats.

    quantize(pad(y, p, "constant", v), S, Z)  ->  constant_pad_nd(quantize(y, S, Z), p, q(v))
                                                  q(v) = clamp(round(v / S) + Z, qmin, qmax)

Exact: a quantize is elementwise, so quantizing the padded tensor and padding the quantized one
with the quantized value give the same integers (q(0) = Z: a zero pad becomes a pad with the zero
point). TF-style "same" padding before a strided convolution (HF MobileNet, EfficientNet) pads one
side only, which no convolution's padding can state (a symmetric pad is folded into the
convolution by ``canonicalize``). Left float, it sits between two int8 convolutions: the first
writes float, the pad copies float, the quantize reads it again. Moved, the first convolution's
group ends at the quantize, so it writes uint8 in its epilogue, and the pad copies bytes
(MobileNet-v2 at batch 8: 20 ms of copies and fills gone, with the folded pads). In an ONNX
file the float Pad also sat between a DequantizeLinear and its Conv, so ONNX Runtime ran those
convolutions in float on dequantized weights; moved, the pad runs on uint8 and each DQ→Conv→Q
fuses into a QLinearConv. cpu-int8's lowering and the ONNX export's arrangement both run it.

The pad must be the quantize's only input path (its sole user), the quantize per tensor into
integers with constant parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from qcompile.ir.graph import constant_value, insert_call, op_arguments
from qcompile.ir.meta import Provenance
from qcompile.pipeline import Pass, PassResult
from qcompile.qdq import QUANTIZE, QuantizeCall

aten = torch.ops.aten
PADS = (aten.pad.default, aten.constant_pad_nd.default)


def _padded_quantize(gm: fx.GraphModule, node: fx.Node) -> tuple[QuantizeCall, fx.Node, int] | None:
    """(the quantize, its pad, the quantized pad value) when ``node`` is a quantize this pass moves."""
    quantize = QuantizeCall.of(node)
    if quantize is None or quantize.x.target not in PADS or list(quantize.x.users) != [node]:
        return None
    if not quantize.per_tensor or quantize.dtype not in (torch.uint8, torch.int8):
        return None
    pad = op_arguments(quantize.x)
    if pad.get("mode", "constant") != "constant":
        return None
    scale, zero_point = constant_value(gm, quantize.scale), constant_value(gm, quantize.zero_point)
    if scale is None or zero_point is None:
        return None
    value = torch.tensor([float(pad.get("value") or 0.0)])
    padded = torch.ops.qc.quantize(value, scale, zero_point, None, quantize.qmin, quantize.qmax, quantize.dtype)
    return quantize, quantize.x, int(padded.item())


@dataclass(frozen=True)
class QuantizeBeforePad(Pass):
    name: ClassVar[str] = "quantize-before-pad"
    preserves_semantics: ClassVar[bool] = True

    def call(self, gm: fx.GraphModule) -> PassResult:
        moved = 0
        for node in list(gm.graph.nodes):
            found = _padded_quantize(gm, node)
            if found is None:
                continue
            quantize, pad, value = found
            provenance = Provenance(self.name, sources=(pad.name, node.name))
            args = (op_arguments(pad)["self"], quantize.scale, quantize.zero_point, quantize.axis, quantize.qmin,
                    quantize.qmax, quantize.dtype)
            integers = insert_call(gm, QUANTIZE, args, before=node, provenance=provenance, meta_from=node)
            padded = insert_call(gm, aten.constant_pad_nd.default, (integers, list(op_arguments(pad)["pad"]), value),
                                 before=node, provenance=provenance, meta_from=pad)
            node.replace_all_uses_with(padded)
            gm.graph.erase_node(node)
            gm.graph.erase_node(pad)
            moved += 1
        return PassResult(gm, bool(moved), {"moved": moved} if moved else {})
