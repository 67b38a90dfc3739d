"""lower-float-bf16: run the heavy ops the plan left in float on faster kernels than ATen's fp32 ones.

    aten.scaled_dot_product_attention(q, k, v, mask, is_causal)
                                    ->  qc.attention(q, k, v, mask, scale, is_causal, dtype)
                                        (scale None: 1/√depth, as for SDPA)
    key / value  reshape(expand(unsqueeze(kv, 2), [b, g, n, L, d]), [b, g·n, L, d])  ->  kv
                                        (repeat_kv: query head h reads kv head h // n, which is
                                        the kernel's own grouped-query mapping, so the n copies of
                                        the cache a decode step made per layer are not made)
    aten.linear(x, W, b)   (W constant, not quantized) ->  qc.linear_bf16(x, W_bf16, b)

Attention has no weights, so int8 kernels do not apply to it; it runs as the native fused fp32
kernel (:mod:`.attention`), which qualifies without dropout, with or without causal masking,
and with grouped-query heads. A linear the QConfig kept float (for fidelity) still costs a full
fp32 GEMM; in bf16 it costs about a quarter, and its error stays well below the int8 linears'
around it. That holds only where the CPU multiplies bf16 natively (AVX512-BF16 or AMX): elsewhere
oneDNN converts to fp32 first, and a MiniLM FFN linear measured 5-7x slower in bf16 than in fp32
(Zen 1, AVX2), so by default (``linears=None``) the linears are rewritten only on such a CPU.
Inputs and outputs stay in the graph's dtype. The pass changes numerics (bf16
rounding, and the attention's summation order), so it does not claim to preserve semantics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from qcompile.ir.graph import add_constant, constant_value, insert_call, is_call, op_arguments, remove_dead_nodes
from qcompile.ir.meta import Provenance
from qcompile.pipeline import Diagnostic, Pass, PassResult
from qcompile.targets.cpu_int8.attention import attention
from qcompile.targets.cpu_features import has_bf16_gemm
from qcompile.targets.cpu_int8.bf16_kernels import linear_bf16

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
LINEAR = aten.linear.default


def _attention_unsupported(node: fx.Node) -> str | None:
    arguments = op_arguments(node)
    if arguments["dropout_p"] != 0.0:
        return "dropout"
    q, k = arguments["query"].meta["val"], arguments["key"].meta["val"]
    if q.dim() != 4 or k.dim() != 4:
        return "not [batch, heads, length, depth]"
    # Known without a guard: asking a symbolic size would specialize the caller's graph.
    if not statically_known_true(q.shape[0] == k.shape[0]):
        return "query and key batch sizes may differ (broadcast)"
    return None


def _through_whole_slices(node: fx.Node) -> fx.Node:
    """What ``node`` reads past slices that keep everything (``x[:, :]`` captures as
    slice(x, d, 0, 2**63 − 1))."""
    while is_call(node, aten.slice.Tensor):
        piece = op_arguments(node)
        end = piece["end"]
        if piece["start"] not in (None, 0) or piece["step"] != 1 or not (end is None or (isinstance(end, int) and end >= 2**62)):
            break
        node = piece["self"]
    return node


def _shared_heads(node: fx.Node) -> fx.Node | None:
    """``kv`` when ``node`` repeats its heads as transformers' repeat_kv does (module doc), else None."""
    if not (is_call(node, aten.reshape.default) or is_call(node, aten.view.default)):
        return None
    expanded = op_arguments(node)["self"]
    if not is_call(expanded, aten.expand.default):
        return None
    inner = _through_whole_slices(op_arguments(expanded)["self"])
    if not is_call(inner, aten.unsqueeze.default) or op_arguments(inner)["dim"] != 2:
        return None
    kv = _through_whole_slices(op_arguments(inner)["self"])
    source, repeated, result = (n.meta.get("val") for n in (kv, expanded, node))
    if not all(isinstance(v, torch.Tensor) for v in (source, repeated, result)) or source.dim() != 4:
        return None
    b, g, n, length, d = repeated.shape
    same = [(b, source.shape[0]), (g, source.shape[1]), (length, source.shape[2]), (d, source.shape[3]),
            (result.shape[0], b), (result.shape[1], g * n), (result.shape[2], length), (result.shape[3], d)]
    return kv if all(statically_known_true(x == y) for x, y in same) else None


def _replace(gm: fx.GraphModule, node: fx.Node, target: object, args: tuple, pass_name: str) -> None:
    provenance = Provenance(pass_name, sources=(node.name,))
    new = insert_call(gm, target, args, before=node, provenance=provenance, meta_from=node)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


@dataclass(frozen=True)
class LowerFloatBf16(Pass):
    name: ClassVar[str] = "lower-float-bf16"

    # Float linears to bf16: True, False, or None for "where this CPU has a native bf16 GEMM".
    linears: bool | None = None

    def call(self, gm: fx.GraphModule) -> PassResult:
        bf16_linears = has_bf16_gemm() if self.linears is None else self.linears
        attentions = linears = shared = 0
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
                key, value = (_shared_heads(arguments[name]) for name in ("key", "value"))
                if key is None or value is None or key.meta["val"].shape[1] != value.meta["val"].shape[1]:
                    key, value = arguments["key"], arguments["value"]
                else:
                    shared += 1
                operands = (arguments["query"], key, value)
                args = (*operands, arguments["attn_mask"], arguments["scale"], bool(arguments["is_causal"]),
                        node.meta["val"].dtype)
                _replace(gm, node, attention, args, self.name)
                attentions += 1
            elif node.target == LINEAR and bf16_linears and self._float_linear(gm, node):
                linear = op_arguments(node)
                weight = constant_value(gm, linear["weight"])
                weight_bf16 = add_constant(gm, weight.to(torch.bfloat16), f"{linear['weight'].target}_bf16",
                                           before=node)
                _replace(gm, node, linear_bf16._opoverload, (linear["input"], weight_bf16, linear["bias"]), self.name)
                linears += 1
        if shared:
            remove_dead_nodes(gm)  # the repeated heads no attention reads any more
        stats: dict[str, object] = {k: v for k, v in (("attention", attentions), ("linear", linears),
                                                      ("grouped-query heads read shared", shared)) if v}
        diagnostics = tuple(Diagnostic(node, "kept", f"attention stays on ATen's kernel: {reason}") for node, reason in kept.items())
        return PassResult(gm, bool(attentions or linears), stats, diagnostics)

    @staticmethod
    def _float_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
        linear = op_arguments(node)
        weight = constant_value(gm, linear["weight"])
        x = linear["input"].meta.get("val")
        return weight is not None and weight.dtype == torch.float32 and x is not None and x.dtype == torch.float32
