"""lower-qat: a trained fake-quant graph becomes the Q/DQ graph every target converts and lowers.

Four rewrites, each an identity on the graph's eval-mode outputs:

1. Mode switches take their eval form: ``bn_mode(x, ...)`` -> ``batch_norm(x, ..., training=False)``,
   ``dropout_mode(x)`` -> ``x``, ``attention_mode(q, k, v, ...)`` -> ``sdpa(q, k, v, ..., dropout_p=0)``.
2. A convolution trained for folding (``insert-fake-quant``) is folded for real, with
   s = γ / √(σ² + ε) computed from the same constants in the same float32 ops the graph uses:

       batch_norm(conv(x, fq(W · s), None) / s + b, γ, β, μ, σ²)  ->  conv(x, fq(W · s), b')
       b' = (b − μ) · s + β

   because batch_norm(y) = (y − μ) · s + β and (conv / s + b − μ) · s = conv + (b − μ) · s.
   The running-count increment the BatchNorm left (``num_batches_tracked += 1``), read by
   nothing, goes with it.
3. Each weight fake-quant ``fq(W_expr)``, with ``W_expr`` computed from constants only, becomes
   ``dequantize(W_q, S, Z)`` with ``W_q = quantize(W_expr, S, Z)`` stored once, S and Z the
   learned ones; per group, ``view(dequantize(W_q, S, Z), [out, in])`` with ``W_q`` the weight
   viewed [out, in / size, size] and one S per group (``convert``'s grouped form).
4. Each activation fake-quant becomes ``dequantize(quantize(x, S, Z), S, Z)`` with the learned
   S and Z (rounded and clamped as the fake-quant's forward uses it); a per-token one becomes
   ``convert``'s run-time Q/DQ, ``dequantize(quantize(x, S, Z), S, Z)`` with
   ``S, Z = choose_qparams_per_token(x)``, which computes what it computed.

Since :class:`~qcompile.fake_quant.FakeQuantize` computes exactly what ``qc.quantize`` /
``qc.dequantize`` compute, the Q/DQ graph equals the fake-quant graph in eval mode up to the
float rounding of the fold in (2). Biases of integer ops become int32 with scale S_x · S_W,
as ``convert`` stores them; ``insert-fake-quant`` trained them rounded to those very steps
(``FakeQuantizeBias``, unwrapped here first), except the folded bias b' of (2), which exists
only now (half an accumulator step at most). A float8 op's bias stays float, as ``cast-fp8``
leaves it: its kernel adds it to a float accumulator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx

from qcompile.fake_quant import DynamicFakeQuantize, FakeQuantize, FakeQuantizeBias
from qcompile.ir.graph import (
    add_constant,
    called_module,
    constant_expression,
    constant_value,
    infer_fake_value,
    insert_call,
    is_call,
    op_arguments,
    remove_dead_nodes,
    set_argument,
)
from qcompile.ir.meta import Provenance, get_qspec
from qcompile.passes.convert import (
    dynamic_quantize_dequantize,
    quantize_bias,
    quantize_dequantize,
    quantized_weight_constant,
)
from qcompile.passes.training_ops import DROPOUTS, ModeSwitchedOp
from qcompile.pipeline import Pass, PassResult
from qcompile.qdq import DequantizeCall, observation_root

aten = torch.ops.aten


def _erase_call(gm: fx.GraphModule, node: fx.Node) -> None:
    """Erase a ``call_module`` node, and unregister its module from this copy when nothing else
    calls it (the module itself, shared with the graph the pass was given, is left whole)."""
    gm.graph.erase_node(node)
    if not any(n.op == "call_module" and n.target == node.target for n in gm.graph.nodes):
        delattr(gm, node.target)


def _other(node: fx.Node) -> Any:
    """The second operand (``other``) of an elementwise ``add`` / ``div`` / ``mul``."""
    return op_arguments(node)["other"]


@dataclass(frozen=True)
class LowerQat(Pass):
    name: ClassVar[str] = "lower-qat"
    requires: ClassVar[frozenset[str]] = frozenset({"fake-quantized"})
    establishes: ClassVar[frozenset[str]] = frozenset({"qdq"})
    invalidates: ClassVar[frozenset[str]] = frozenset({"fake-quantized", "mode-switched"})

    def call(self, gm: fx.GraphModule) -> PassResult:
        self._unwrap_biases(gm)
        switched = self._eval_forms(gm)
        folded = sum(self._fold(gm, node) for node in list(gm.graph.nodes) if is_call(node, aten.batch_norm.default))
        weights, activations, dynamic, kept = 0, 0, 0, []
        memo: dict[fx.Node, Any] = {}
        for node in list(gm.graph.nodes):
            if (token := called_module(gm, node, DynamicFakeQuantize)) is not None:
                node.replace_all_uses_with(dynamic_quantize_dequantize(gm, node.args[0], token.spec,
                                                                       pass_name=self.name))
                _erase_call(gm, node)
                dynamic += 1
                continue
            fake_quant = called_module(gm, node, FakeQuantize)
            if fake_quant is None:
                continue
            (source,) = node.args
            constant = constant_expression(gm, source, memo)
            scale, zero_point = fake_quant.qparams()
            if constant is None:
                names = [add_constant(gm, t, f"{source.name}_{suffix}", before=node)
                         for t, suffix in ((scale, "scale"), (zero_point, "zero_point"))]
                replacement = quantize_dequantize(gm, source, fake_quant.spec, *names, before=node,
                                                  pass_name=self.name)
                activations += 1
            else:
                consumer = next(iter(node.users))
                name = None if source.op == "get_attr" else f"{consumer.name}_weight"
                replacement = quantized_weight_constant(gm, constant, scale, zero_point, fake_quant.spec, before=node,
                                                        pass_name=self.name, source=source, name=name)
                weights += 1
            node.replace_all_uses_with(replacement)
            _erase_call(gm, node)
        biases = self._quantize_biases(gm)
        removed = remove_dead_nodes(gm)
        stats = {"weights": weights, "activations": activations, "dynamic": dynamic, "batchnorm-folded": folded,
                 "biases": biases, "mode-switches": switched}
        modified = bool(switched or folded or weights or activations or dynamic or biases or removed)
        return PassResult(gm, modified, {k: v for k, v in stats.items() if v}, tuple(kept))

    def _unwrap_biases(self, gm: fx.GraphModule) -> None:
        """``fq_bias(b, S_x, S_W)`` -> ``b``: the int32 bias at S_x · S_W is made below
        from the same scales, the same values."""
        for node in list(gm.graph.nodes):
            if called_module(gm, node, FakeQuantizeBias) is not None:
                bias, *scales = node.args
                node.replace_all_uses_with(bias)
                _erase_call(gm, node)
                for scale in scales:
                    if not scale.users:
                        gm.graph.erase_node(scale)

    def _eval_forms(self, gm: fx.GraphModule) -> int:
        count = 0
        for node in list(gm.graph.nodes):
            switch = called_module(gm, node, ModeSwitchedOp)
            if switch is None:
                continue
            if switch.op in DROPOUTS:  # the identity in eval mode
                node.replace_all_uses_with(node.kwargs["input"])
            else:
                replacement = insert_call(gm, switch.op, (), before=node, meta_from=node,
                                          provenance=Provenance(self.name, sources=(node.name,)),
                                          kwargs={**node.kwargs, switch.mode_argument: switch.eval_value})
                node.replace_all_uses_with(replacement)
            _erase_call(gm, node)
            count += 1
        return count

    def _fold(self, gm: fx.GraphModule, batch_norm: fx.Node) -> bool:
        """Rewrite (2) of the module docstring, where ``batch_norm`` ends such a chain."""
        bn = op_arguments(batch_norm)
        y, bias = bn["input"], None
        if is_call(y, aten.add.Tensor) and len(y.users) == 1 and is_call(_other(y), aten.view.default):
            y, bias = op_arguments(y)["self"], op_arguments(_other(y))["self"]
        if not (is_call(y, aten.div.Tensor) and len(y.users) == 1 and is_call(_other(y), aten.view.default)):
            return False
        conv, s = op_arguments(y)["self"], op_arguments(_other(y))["self"]
        fake_quant = (op_arguments(conv).get("weight") if isinstance(conv, fx.Node) and conv.op == "call_function"
                      and isinstance(conv.target, torch._ops.OpOverload) else None)
        if called_module(gm, fake_quant, FakeQuantize) is None or len(conv.users) != 1:
            return False
        (scaled,) = fake_quant.args  # the fake-quant's one input
        if not (is_call(scaled, aten.mul.Tensor) and is_call(_other(scaled), aten.view.default)
                and op_arguments(_other(scaled))["self"] is s):
            return False
        memo: dict[fx.Node, Any] = {}
        s = constant_expression(gm, s, memo)
        mean = constant_expression(gm, bn["running_mean"], memo)
        if s is None or mean is None:
            return False
        b = constant_expression(gm, bias, memo) if bias is not None else torch.zeros_like(s)
        beta = constant_expression(gm, bn["bias"], memo) if bn["bias"] is not None else torch.zeros_like(s)
        if b is None or beta is None:
            return False
        with torch.no_grad():
            folded_bias = (b - mean) * s + beta
        set_argument(conv, "bias", add_constant(gm, folded_bias, f"{conv.name}_folded_bias", before=conv))
        infer_fake_value(conv)
        batch_norm.replace_all_uses_with(conv)
        gm.graph.erase_node(batch_norm)
        self._drop_unread_counters(gm)
        return True

    def _drop_unread_counters(self, gm: fx.GraphModule) -> None:
        """``counter.add_(1)`` on a buffer nothing else reads (a folded BatchNorm's batch count)."""
        for node in list(gm.graph.nodes):
            if is_call(node, aten.add_.Tensor) and not node.users:
                counter = op_arguments(node)["self"]
                if counter.op == "get_attr" and len(counter.users) == 1:
                    gm.graph.erase_node(node)
                    gm.graph.erase_node(counter)

    def _quantize_biases(self, gm: fx.GraphModule) -> int:
        """Constant biases of ops whose input and weight are now quantized: int32 at S_x · S_W."""
        count = 0
        for node in gm.graph.nodes:
            plan = get_qspec(node)
            if plan is None or not plan.quantized or node.op != "call_function":
                continue
            arguments = op_arguments(node)
            x = DequantizeCall.of(observation_root(arguments["input"])[0]) if "input" in arguments else None
            weight = DequantizeCall.of(arguments.get("weight"))
            bias = constant_value(gm, arguments.get("bias"))
            x_scale = constant_value(gm, x.scale) if x is not None else None
            w_scale = constant_value(gm, weight.scale) if weight is not None else None
            if bias is None or x_scale is None or w_scale is None or x_scale.numel() != 1:
                continue
            if any(edge.spec.is_float8 for _, edge in plan.inputs if edge.role == "weight"):
                continue  # a float8 kernel adds the float bias to its float accumulator
            bias_index = [a.name for a in node.target._schema.arguments].index("bias")
            if bias_index >= len(node.args):  # quantize_bias replaces a positional argument
                node.args = (*node.args, *[None] * (bias_index - len(node.args)), arguments["bias"])
                node.kwargs = {k: v for k, v in node.kwargs.items() if k != "bias"}
            quantize_bias(gm, node, bias_index, x_scale * w_scale, pass_name=self.name)
            count += 1
        return count
