"""eliminate-dequant: keep values in integers for as long as their qparams allow.

    shape_op(dequantize(q, S, Z), ...)     -> dequantize(shape_op(q, ...), S, Z)
        (view, reshape, permute, transpose, flatten, squeeze/unsqueeze, max-pool: ops that move
         or select values, so they commute with the per-tensor affine map; per-tensor only: a
         per-token scale belongs to the rows of the value it was computed for; ATen has no
         float8 max-pool, so float8 values are pooled in float)
    quantize(dequantize(q, S, Z), S, Z)    -> q
        (a dequantize straight into a quantize with the same qparams and range is the identity)
    embedding(dequantize(W_q, S, Z, axis=0), ids)
        -> dequantize(W_q[ids], S[ids], Z[ids], axis=0)   (flattened ids, viewed back to ids' shape)
        (a per-row quantized table: looking rows up commutes with dequantizing them, each with
         its own row's scale, so a lookup reads the int8 rows it needs instead of dequantizing
         the whole table on every call)
    quantize(max_pool2d(x, ...), S, Z)     -> max_pool2d(quantize(x, S, Z), ...)
        (per tensor, when the quantize is the pool's only reader: quantizing is monotone, so it
         commutes with max; the pool then reads a quarter of the bytes, and the op before it
         can write uint8 directly)

Sinking the dequantize is what lets a lowered graph run a transpose + reshape on uint8 bytes
instead of float32, and hands the lowering a ``dequantize -> linear`` pair to match. All four
rewrites are exact, so the pass preserves semantics bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from qcompile.ir.graph import insert_call, op_arguments
from qcompile.ir.meta import Provenance, STANDS_FOR
from qcompile.pipeline import Pass, PassResult
from qcompile.qdq import DEQUANTIZE, QUANTIZE, SHARES_QPARAMS, DequantizeCall, QuantizeCall, qparams_of
from qcompile.spec import FLOAT8_STORAGE

aten = torch.ops.aten
MAX_POOL2D = aten.max_pool2d.default
EMBEDDING = aten.embedding.default


def _runs_on(op: fx.Node, dtype: torch.dtype | None) -> bool:
    """Whether ``op`` has an ATen kernel for values of ``dtype``: max-pooling has none for float8
    (views and lookups move any dtype's bytes)."""
    return op.target != MAX_POOL2D or dtype not in FLOAT8_STORAGE


def _sink_through(gm: fx.GraphModule, op: fx.Node, dq: DequantizeCall, pass_name: str) -> fx.Node:
    graph = gm.graph
    provenance = Provenance(pass_name, "sink-dequantize", (op.name, dq.node.name))
    # The data is argument 0 of every op moved here (SHARES_QPARAMS, embedding's weight).
    moved = insert_call(gm, op.target, (dq.q, *op.args[1:]), before=op, provenance=provenance, meta_from=op,
                        kwargs=dict(op.kwargs))
    new_dq = insert_call(gm, DEQUANTIZE, (moved, dq.scale, dq.zero_point, dq.axis, dq.out_dtype), before=op,
                         provenance=provenance)
    op.replace_all_uses_with(new_dq)
    graph.erase_node(op)
    if not dq.node.users:
        graph.erase_node(dq.node)
    return new_dq


def _gather_rows(gm: fx.GraphModule, lookup: fx.Node, dq: DequantizeCall, pass_name: str) -> None:
    provenance = Provenance(pass_name, "gather-rows", (lookup.name, dq.node.name))
    ids = op_arguments(lookup)["indices"]

    def call(target: object, args: tuple) -> fx.Node:
        return insert_call(gm, target, args, before=lookup, provenance=provenance)

    flat = call(aten.reshape.default, (ids, [-1]))
    rows = call(DEQUANTIZE, (*(call(aten.index_select.default, (t, 0, flat)) for t in (dq.q, dq.scale, dq.zero_point)),
                             0, dq.out_dtype))
    shape = [size if isinstance(size, int) else call(aten.sym_size.int, (ids, dim))
             for dim, size in enumerate(ids.meta["val"].shape)]
    values = insert_call(gm, aten.view.default, (rows, [*shape, lookup.meta["val"].shape[-1]]), before=lookup,
                         provenance=Provenance(pass_name, STANDS_FOR, (lookup.name,)), meta_from=lookup)
    lookup.replace_all_uses_with(values)
    gm.graph.erase_node(lookup)
    if not dq.node.users:
        gm.graph.erase_node(dq.node)


def _hoist_above(gm: fx.GraphModule, q: QuantizeCall, pool: fx.Node, pass_name: str) -> None:
    provenance = Provenance(pass_name, "hoist-quantize", (q.node.name, pool.name))
    quantized = insert_call(gm, QUANTIZE, (op_arguments(pool)["self"], q.scale, q.zero_point, q.axis, q.qmin,
                                           q.qmax, q.dtype), before=q.node, provenance=provenance, meta_from=q.node)
    pooled = insert_call(gm, pool.target, (quantized, *pool.args[1:]), before=q.node, provenance=provenance,
                         meta_from=pool, kwargs=dict(pool.kwargs))
    q.node.replace_all_uses_with(pooled)
    gm.graph.erase_node(q.node)
    gm.graph.erase_node(pool)


def _same_format(q: QuantizeCall, dq: DequantizeCall) -> bool:
    """Whether quantize ``q`` produces the integers ``dq`` reads, in the same dtype and range."""
    upstream = QuantizeCall.of(dq.q)
    return dq.integer_dtype == q.dtype and (upstream is None or upstream.integer_format == q.integer_format)


@dataclass(frozen=True)
class EliminateDequant(Pass):
    name: ClassVar[str] = "eliminate-dequant"
    requires: ClassVar[frozenset[str]] = frozenset({"qdq"})
    preserves_semantics: ClassVar[bool] = True

    def call(self, gm: fx.GraphModule) -> PassResult:
        sunk = folded = hoisted = gathered = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            # The data is argument 0 of the ops read here (shape ops, embedding's weight, quantize's x).
            source = node.args[0] if node.args else None
            dq, q = DequantizeCall.of(source), QuantizeCall.of(node)
            if node.target in SHARES_QPARAMS and dq is not None and dq.per_tensor and _runs_on(node, dq.integer_dtype):
                _sink_through(gm, node, dq, self.name)
                sunk += 1
            elif node.target == EMBEDDING and dq is not None and dq.per_tensor:
                _sink_through(gm, node, dq, self.name)  # a per-tensor table: a lookup moves values
                sunk += 1
            elif node.target == EMBEDDING and dq is not None and dq.axis == 0:
                _gather_rows(gm, node, dq, self.name)
                gathered += 1
            elif (q is not None and isinstance(source, fx.Node) and source.target == MAX_POOL2D
                  and len(source.users) == 1 and q.per_tensor and _runs_on(source, q.dtype)):
                _hoist_above(gm, q, source, self.name)
                hoisted += 1
            elif q is not None and dq is not None and _same_format(q, dq):
                if qparams_of(gm, node).same_as(qparams_of(gm, source)):
                    node.replace_all_uses_with(dq.q)
                    gm.graph.erase_node(node)
                    folded += 1
        counts = (("sunk", sunk), ("folded", folded), ("hoisted", hoisted), ("gathered", gathered))
        stats = {k: v for k, v in counts if v}
        return PassResult(gm, bool(stats), stats)
