"""fuse-matmul-add: a float product with a constant matrix, added to a tensor of its shape, as one GEMM.

    add(matmul(a, W), c)  ->  view_as(addmm(reshape(c, [-1, N]), reshape(a, [-1, K]), W), c)
                              a [..., K], W [K, N] constant, c [..., N] of the product's shape

smooth-outliers' float path for a GELU's outlier channels is such a product: those few channels
times their columns of the second FFN weight, added to the residual before the int8 kernel's
epilogue adds the sum. As two ops that is a GEMM writing a [tokens, width] fp32 temporary and an
add reading it and c to write a third tensor; ``addmm`` accumulates the product into c's values
in the GEMM itself (BLAS's β = 1), one pass over the output (all-MiniLM at 32 x 128: 0.35 ms
against 0.23 per layer). The products are the same fp32 products; c joins the sum at another
point of its order, so the result is the same to fp32 rounding and the pass does not claim
bit-for-bit semantics. It matches when the product has no other reader, W is an fp32 constant
matrix, a and c are fp32 and the add does not broadcast (alpha 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from qcompile.ir.graph import constant_value, insert_call, op_arguments
from qcompile.ir.meta import Provenance
from qcompile.pipeline import Pass, PassResult
from qcompile.rewrite import fuse_matches

aten = torch.ops.aten


@dataclass(frozen=True)
class _Match:
    add: fx.Node
    product: fx.Node  # matmul(a, W)
    a: fx.Node
    weight: fx.Node
    c: fx.Node


def _fp32(node: object) -> bool:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(value, torch.Tensor) and value.dtype == torch.float32


def _match(gm: fx.GraphModule, add: fx.Node) -> _Match | None:
    if add.op != "call_function" or add.target != aten.add.Tensor:
        return None
    operands = op_arguments(add)
    if operands.get("alpha", 1) != 1:
        return None
    for product, c in ((operands["self"], operands["other"]), (operands["other"], operands["self"])):
        if not (isinstance(product, fx.Node) and product.target == aten.matmul.default and len(product.users) == 1):
            continue
        factors = op_arguments(product)
        a, weight = factors["self"], factors["other"]
        matrix = constant_value(gm, weight)
        if (matrix is None or matrix.dim() != 2 or matrix.dtype != torch.float32 or not _fp32(a) or not _fp32(c)
                or a.meta["val"].dim() < 2 or c.meta["val"].shape != add.meta["val"].shape
                or product.meta["val"].shape != add.meta["val"].shape):
            continue
        return _Match(add, product, a, weight, c)
    return None


@dataclass(frozen=True)
class FuseMatmulAdd(Pass):
    name: ClassVar[str] = "fuse-matmul-add"

    def call(self, gm: fx.GraphModule) -> PassResult:
        return fuse_matches(gm, lambda node: _match(gm, node), lambda match: self._fuse(gm, match))

    def _fuse(self, gm: fx.GraphModule, match: _Match) -> None:
        add = match.add
        inner, width = constant_value(gm, match.weight).shape
        provenance = Provenance(self.name, sources=(add.name,))

        def call(target: object, args: tuple) -> fx.Node:
            return insert_call(gm, target, args, before=add, provenance=provenance, meta_from=add)

        rows = call(aten.reshape.default, (match.a, [-1, int(inner)]))
        accumulated = call(aten.reshape.default, (match.c, [-1, int(width)]))
        product = call(aten.addmm.default, (accumulated, rows, match.weight))
        result = call(aten.view_as.default, (product, match.c))
        add.replace_all_uses_with(result)
        gm.graph.erase_node(add)
        gm.graph.erase_node(match.product)
