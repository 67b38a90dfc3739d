"""fuse-conv-input-quantize: a convolution quantizes the float activations it alone reads.

    q = qc.quantize(x, S, Z, None, 0, 255, uint8)
    y = qc.conv2d_int8(q, S, Z, W, ...)          ->  y = qc.conv2d_int8(x, S, Z, W, ...)

A network's first convolution reads the float image: quantized by one pass into uint8 laid out as
the image was (N, C, H, W), then copied by the kernel into the channels-last order oneDNN reads.
``conv2d_int8`` given float activations does both in one pass (``quantize_channels_last`` in
``qcompile/csrc/channels_last.cpp``), with qc.quantize's arithmetic, so the integers and the
output are the same bits. ResNet-18's image batch (8 x 3 x 224 x 224, 2 threads, AMX Xeon): the
quantize took 0.25-0.30 ms and the kernel's copy about 0.4 (its share of the profile), the one
pass 0.26-0.32. The pass matches a per-tensor uint8 quantize over the
full range whose only reader is a convolution reading it as its activations, with the scale and
zero point the convolution is given (the same nodes, or constants of equal value).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from qcompile.ir.graph import constant_value, op_arguments, set_argument
from qcompile.pipeline import Pass, PassResult
from qcompile.qdq import QuantizeCall
from qcompile.rewrite import fuse_matches
from qcompile.targets.cpu_int8.onednn import Int8KernelCall


@dataclass(frozen=True)
class _Match:
    conv: fx.Node
    quantize: QuantizeCall


def _same_value(gm: fx.GraphModule, a: object, b: object) -> bool:
    """Whether two arguments are one value: the same node, or constants of equal value."""
    if a is b:
        return True
    left, right = constant_value(gm, a), constant_value(gm, b)
    return left is not None and right is not None and left.dtype == right.dtype and torch.equal(left, right)


def _match(gm: fx.GraphModule, node: fx.Node) -> _Match | None:
    call = Int8KernelCall.of(node)
    if call is None or call.kernel != "conv2d_int8":
        return None
    quantize = QuantizeCall.of(call.x)
    if quantize is None or len(quantize.node.users) != 1 or call.other is quantize.node:
        return None
    value = quantize.x.meta.get("val")
    if not (quantize.per_tensor and quantize.integer_format == (0, 255, torch.uint8)
            and isinstance(value, torch.Tensor) and value.is_floating_point()):
        return None
    conv = op_arguments(node)
    if not (_same_value(gm, conv["x_scale"], quantize.scale)
            and _same_value(gm, conv["x_zero_point"], quantize.zero_point)):
        return None
    return _Match(node, quantize)


@dataclass(frozen=True)
class FuseConvInputQuantize(Pass):
    name: ClassVar[str] = "fuse-conv-input-quantize"
    preserves_semantics: ClassVar[bool] = True

    def call(self, gm: fx.GraphModule) -> PassResult:
        return fuse_matches(gm, lambda node: _match(gm, node), lambda match: self._fuse(gm, match))

    def _fuse(self, gm: fx.GraphModule, match: _Match) -> None:
        set_argument(match.conv, "x", match.quantize.x)
        gm.graph.erase_node(match.quantize.node)
