"""fuse-token-quantize: a dynamic per-token quantize, its parameters and its integers, in one native call.

    S, Z = qc.choose_qparams_per_token(x, qmin, qmax, symmetric)
    q = qc.quantize(x, S, Z, None, qmin, qmax, dtype)
        ->  q, S, Z = qc.quantize_per_token(x, qmin, qmax, symmetric, dtype)

A linear whose activations are quantized per token at run time (W4A8, dynamic int8) reads the
integers q and each row's S and Z. Two calls and two reads of x become one: each row's range,
its parameters and its quantized values while the row is in cache
(``qcompile/csrc/choose_qparams.cpp``), the same fp32 operations, so the same bits. A decoder
layer quantizes four activations per token this way. The pass matches when the quantize reads
the same x as the parameters it is given, per row (axis None, S and Z the [..., 1] pair), into
uint8 or int8 over the range they were chosen for; S and Z keep their other readers (the kernel).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from qcompile import native  # noqa: F401  (loads the extension, which defines the op)
from qcompile.ir.graph import insert_call, is_call, op_arguments
from qcompile.ir.meta import Provenance
from qcompile.kernel_check import register_kernel
from qcompile.pipeline import Pass, PassResult
from qcompile.rewrite import fuse_matches
from qcompile.qdq import CHOOSE_QPARAMS_PER_TOKEN, QuantizeCall

quantize_per_token = torch.ops.qc.quantize_per_token.default


@torch.library.register_fake("qc::quantize_per_token")
def _(x, qmin, qmax, symmetric, dtype):
    shape = (*x.shape[:-1], 1)
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.int32)


def reference_quantize_per_token(x: torch.Tensor, qmin: int, qmax: int, symmetric: bool,
                                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two calls it replaces."""
    scale, zero_point = torch.ops.qc.choose_qparams_per_token(x, qmin, qmax, symmetric)
    return torch.ops.qc.quantize(x, scale, zero_point, None, qmin, qmax, dtype), scale, zero_point


register_kernel(quantize_per_token, reference_quantize_per_token)


@dataclass(frozen=True)
class _Match:
    choose: fx.Node
    quantize: QuantizeCall
    scale: fx.Node  # getitem(choose, 0)
    zero_point: fx.Node  # getitem(choose, 1)


def _output(choose: fx.Node, index: int) -> fx.Node | None:
    """The one ``getitem(choose, index)``, or None."""
    found = [u for u in choose.users if u.target is operator.getitem and u.args[1] == index]
    return found[0] if len(found) == 1 else None


def _match(node: fx.Node) -> _Match | None:
    """The per-token parameters and the quantize that reads them, from the quantize ``node``."""
    quantize = QuantizeCall.of(node)
    if quantize is None or quantize.axis is not None or quantize.dtype not in (torch.uint8, torch.int8):
        return None
    scale = quantize.scale
    if not (isinstance(scale, fx.Node) and scale.target is operator.getitem
            and is_call(scale.args[0], CHOOSE_QPARAMS_PER_TOKEN)):
        return None
    choose = scale.args[0]
    chosen = op_arguments(choose)
    if chosen["x"] is not quantize.x or (chosen["qmin"], chosen["qmax"]) != (quantize.qmin, quantize.qmax):
        return None
    if not all(u.target is operator.getitem for u in choose.users):
        return None
    found = _Match(choose, quantize, scale, _output(choose, 1))
    if found.zero_point is not quantize.zero_point or _output(choose, 0) is not scale:
        return None
    return found


@dataclass(frozen=True)
class FuseTokenQuantize(Pass):
    name: ClassVar[str] = "fuse-token-quantize"
    preserves_semantics: ClassVar[bool] = True

    def call(self, gm: fx.GraphModule) -> PassResult:
        return fuse_matches(gm, _match, lambda match: self._fuse(gm, match))

    def _fuse(self, gm: fx.GraphModule, match: _Match) -> None:
        node = match.quantize.node
        chosen = op_arguments(match.choose)
        provenance = Provenance(self.name, "token-quantize", (match.choose.name, node.name))
        call = insert_call(gm, quantize_per_token, (chosen["x"], chosen["qmin"], chosen["qmax"],
                                                    chosen["symmetric"], match.quantize.dtype),
                           before=match.choose, provenance=provenance, meta_from=node)
        outputs = [insert_call(gm, operator.getitem, (call, index), before=match.choose, provenance=provenance,
                               meta_from=source)
                   for index, source in enumerate((node, match.scale, match.zero_point))]
        for source, output in zip((node, match.scale, match.zero_point), outputs, strict=True):
            source.replace_all_uses_with(output)
        for source in (node, match.scale, match.zero_point, match.choose):
            gm.graph.erase_node(source)
