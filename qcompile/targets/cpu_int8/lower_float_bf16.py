"""lower-float-bf16: run the heavy ops the plan left in float in bfloat16 instead of fp32.

    aten.scaled_dot_product_attention(q, k, v, mask)  ->  qc.attention_bf16(q, k, v, mask, scale, dtype)
    aten.linear(x, W, b)   (W constant, not quantized) ->  qc.linear_bf16(x, W_bf16, b)

Attention qualifies without dropout, causal masking or grouped-query heads (what encoders like
BERT run at inference); it has no weights, so int8 kernels do not apply to it. A linear the
QConfig kept float (for fidelity) still costs a full fp32 GEMM; in bf16 it costs about a
quarter. bf16 keeps these ops' error well below the int8 linears around them, and inputs and
outputs stay in the graph's dtype, except that an int8 linear whose only uses feed the bf16
attention's q, k or v (through views, transposes and the slices of a merged projection) writes
bf16 itself: the attention would round it to bf16 anyway, and its relayout copies move half the
bytes. The pass changes numerics (bf16 rounding), so it does not claim to preserve semantics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from qcompile.ir.graph import (
    add_constant,
    constant_value,
    infer_fake_value,
    insert_call,
    op_arguments,
    set_argument,
)
from qcompile.ir.meta import Provenance
from qcompile.pipeline import Diagnostic, Pass, PassResult
from qcompile.targets.cpu_int8.bf16_kernels import attention_bf16, linear_bf16
from qcompile.targets.cpu_int8.onednn import Int8KernelCall

SDPA = torch.ops.aten.scaled_dot_product_attention.default
LINEAR = torch.ops.aten.linear.default


def _attention_unsupported(node: fx.Node) -> str | None:
    arguments = op_arguments(node)
    if arguments["dropout_p"] != 0.0:
        return "dropout"
    if arguments["is_causal"]:
        return "causal masking"
    if arguments.get("enable_gqa"):
        return "grouped-query attention"
    q, k = arguments["query"].meta["val"], arguments["key"].meta["val"]
    if q.dim() != 4 or q.shape[1] != k.shape[1]:
        return "not [batch, heads, length, depth] with equal heads"
    return None


# Ops that only select or relayout values on the way from a linear to the attention: views,
# transposes, and the slices that cut merged query/key/value projections apart.
LAYOUT_OPS = frozenset({torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten.transpose.int,
                        torch.ops.aten.permute.default, torch.ops.aten.unsqueeze.default,
                        torch.ops.aten.slice.Tensor})
ATTENTION_BF16 = attention_bf16._opoverload


def bf16_paths(node: fx.Node, reads_bf16: Callable[[fx.Node, fx.Node], bool],
               through: frozenset = LAYOUT_OPS) -> list[fx.Node] | None:
    """The ops between ``node`` and the ops that read it in bf16, when every use of ``node``
    ends in one (``reads_bf16(user, value)``) through ``through`` ops only; None otherwise.
    Such a value may be written in bf16 by its producer: its readers round it to bf16 anyway."""
    layout = []
    for user in node.users:
        if reads_bf16(user, node):
            continue
        if user.op != "call_function" or user.target not in through:
            return None
        below = bf16_paths(user, reads_bf16, through)
        if below is None:
            return None
        layout += [user, *below]
    return layout


def reads_as_attention_operand(user: fx.Node, value: fx.Node) -> bool:
    """``value`` is the bf16 attention's query, key or value (not its mask)."""
    return user.target == ATTENTION_BF16 and op_arguments(user)["mask"] is not value


def write_bf16(node: fx.Node, paths: list[fx.Node]) -> None:
    """Switch kernel ``node`` to bf16 output; the ops on ``paths`` below it, now computing in
    bf16, are replaced by new nodes (a value keeps its dtype for as long as its node lives)."""
    graph = node.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    set_argument(node, "out_dtype", torch.bfloat16)
    infer_fake_value(node)
    for old in sorted(set(paths), key=order.__getitem__):
        with graph.inserting_before(old):
            new = graph.node_copy(old, lambda n: n)
        old.replace_all_uses_with(new)
        graph.erase_node(old)
        infer_fake_value(new)


def _int8_producers_write_bf16(gm: fx.GraphModule) -> None:
    """Switch int8 linears whose output only feeds the bf16 attention to bf16 output."""
    for node in gm.graph.nodes:
        call = Int8KernelCall.of(node)
        if call is None or call.kernel != "linear_int8" or call.out_dtype != torch.float32:
            continue
        layout = bf16_paths(node, reads_as_attention_operand)
        if layout:
            write_bf16(node, layout)


def _replace(gm: fx.GraphModule, node: fx.Node, target: object, args: tuple, pass_name: str) -> None:
    provenance = Provenance(pass_name, sources=(node.name,))
    new = insert_call(gm, target, args, before=node, provenance=provenance, meta_from=node)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


@dataclass(frozen=True)
class LowerFloatBf16(Pass):
    name: ClassVar[str] = "lower-float-bf16"

    def call(self, gm: fx.GraphModule) -> PassResult:
        attention = linears = 0
        kept = {}
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target == SDPA:
                reason = _attention_unsupported(node)
                if reason is not None:
                    kept[node.name] = reason
                    continue
                arguments = op_arguments(node)
                scale = arguments["scale"] or 1.0 / math.sqrt(int(arguments["query"].meta["val"].shape[-1]))
                operands = (arguments["query"], arguments["key"], arguments["value"])
                args = (*operands, arguments["attn_mask"], float(scale), node.meta["val"].dtype)
                _replace(gm, node, ATTENTION_BF16, args, self.name)
                attention += 1
            elif node.target == LINEAR and self._float_linear(gm, node):
                linear = op_arguments(node)
                weight = constant_value(gm, linear["weight"])
                weight_bf16 = add_constant(gm, weight.to(torch.bfloat16), f"{linear['weight'].target}_bf16",
                                           before=node)
                _replace(gm, node, linear_bf16._opoverload, (linear["input"], weight_bf16, linear["bias"]), self.name)
                linears += 1
        if attention:
            _int8_producers_write_bf16(gm)
        stats: dict[str, object] = {k: v for k, v in (("attention", attention), ("linear", linears)) if v}
        diagnostics = tuple(Diagnostic(node, "kept", f"attention stays fp32: {reason}") for node, reason in kept.items())
        return PassResult(gm, bool(attention or linears), stats, diagnostics)

    @staticmethod
    def _float_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
        linear = op_arguments(node)
        weight = constant_value(gm, linear["weight"])
        x = linear["input"].meta.get("val")
        return weight is not None and weight.dtype == torch.float32 and x is not None and x.dtype == torch.float32
