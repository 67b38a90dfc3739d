"""smooth-outliers: keep a few wide channels from setting an int8 linear's input scale.

Transformer activations concentrate their extremes in a handful of fixed channels, and a
per-tensor scale that must cover them quantizes every other channel several times more
coarsely than it needs. For a value ``x`` read by linears, with channels ``c`` and factors
``f_c`` measured on calibration data (``qcompile.outliers``), the pass rewrites the graph into
the same function in one of two forms.

**Split**, when ``x = act(linear(h, W1, b1))`` with ``act(0) = 0`` (a transformer FFN's GELU
or ReLU) and nothing else reads it; the channels ``I`` are its few outliers. Rows ``I`` of
``W1`` and ``b1`` are zeroed, so those channels leave the first linear as zeros and cost
nothing in int8, and a float path computes them from ``h`` and multiplies them in:

    linear(act(linear(h, W1, b1)), W2, b2)
        ->  linear(act(linear(h, W1', b1')), W2, b2) + matmul(act(linear(h, W1[I], b1[I])), W2[:, I]ᵀ)

The outlier channels' own linear reads ``h`` like the first linear does, so it is quantized
the same way, from the same integers; only their product with ``W2`` stays float, and it is a
``matmul`` with a constant, not a ``linear``, so quantization rules for linears leave it
alone. A residual add after the second linear takes the float path's result first, so the
int8 kernel still fuses a single add: ``linear(...) + (extra + residual)``.

**Scale** otherwise (a LayerNorm output, which the residual stream also reads). Each listed
channel is divided by ``f_c`` on the way into the linears and its weight columns are
multiplied by it (SmoothQuant's migration):

    linear(x, W, b)  ->  linear(x ⊙ s, W ⊙ s⁻¹, b)      s_c = 1 / f_c for listed channels, 1 elsewhere

One elementwise multiply, and the linear keeps its fused post-op (a split here would put an
add between the linear and its GELU, which oneDNN cannot fuse). Per-channel weight scales
absorb the range far better than one per-tensor activation scale.

Inside a compile, the pass measures its channels itself (:meth:`SmoothOutliers.run`): the
inputs of the linears the QConfig quantizes, over the context's calibration data, with the
compile's ``outlier_smoothing`` as the migration strength (``"auto"``: each value's own,
chosen by the local error of its quantized readers, :mod:`qcompile.outliers`; a
:class:`~qcompile.outliers.MeasuredSmoothing`: another compile's channels, by the weights that
read each value), and leaves what it applied in the context for the next compile of the same
weights; with no data, or smoothing off, it leaves the graph as it is. Given ``outliers``
explicitly, it applies just those.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import fx

from qcompile.ir.graph import add_constant, constant_value, insert_call, op_arguments, remove_dead_nodes
from qcompile.ir.meta import Provenance
from qcompile.pipeline import Pass, PassResult
from qcompile.outliers import (
    LINEAR,
    ZERO_PRESERVING,
    Channels,
    MeasuredSmoothing,
    factor_vector,
    quantized_linear_inputs,
    smoothing_plan,
)
from qcompile.qconfig import op_kind
from qcompile.targets.cpu_int8.fuse_patterns import residual_operand

if TYPE_CHECKING:
    from qcompile.context import CompileContext

aten = torch.ops.aten


def _linear_parts(gm: fx.GraphModule, node: fx.Node) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A linear's constant weight and bias, or None when the weight is computed."""
    if node.op != "call_function" or node.target != LINEAR:
        return None
    linear = op_arguments(node)
    weight, bias_arg = constant_value(gm, linear["weight"]), linear["bias"]
    bias = constant_value(gm, bias_arg)
    if weight is None or (bias_arg is not None and bias is None):
        return None
    return weight, bias


def _foldable_producer(gm: fx.GraphModule, value: fx.Node, readers: list[fx.Node]) -> fx.Node | None:
    """The linear inside ``value = act(linear(...))`` when its outlier rows can simply be zeroed."""
    if value.target not in ZERO_PRESERVING or set(value.users) != set(readers):
        return None
    producer = op_arguments(value)["self"]  # relu(self) / gelu(self)
    if not isinstance(producer, fx.Node) or len(producer.users) != 1 or _linear_parts(gm, producer) is None:
        return None
    return producer


def _residual_add(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(add, other)`` when ``node``'s only user is the residual add ``node + other``."""
    users = list(node.users)
    index = residual_operand(users[0], node) if len(users) == 1 else None
    return None if index is None else (users[0], users[0].args[index])


def _already_zero(gm: fx.GraphModule, producer: fx.Node, channels: Channels) -> bool:
    weight, bias = _linear_parts(gm, producer)
    index = torch.tensor([c for c, _ in channels])
    return bool((weight[index] == 0).all()) and (bias is None or bool((bias[index] == 0).all()))


@dataclass(frozen=True)
class SmoothOutliers(Pass):
    name: ClassVar[str] = "smooth-outliers"
    preserves_semantics: ClassVar[bool] = True

    # (value name, ((channel, factor), ...)) pairs: what qcompile.outliers found on calibration data.
    outliers: tuple[tuple[str, Channels], ...] = ()
    # (value name, strength) chosen per scaled value by outlier_smoothing="auto", for the report.
    alphas: tuple[tuple[str, float], ...] = ()

    def run(self, gm: fx.GraphModule, context: CompileContext | None = None) -> PassResult:
        """Measure the channels on the compile's calibration data, then smooth them."""
        if self.outliers or context is None or context.dynamic or context.outlier_smoothing is None:
            return self(gm)
        qconfig, rules = context.resolved_qconfig(), context.target.op_rules
        # Smoothing moves activation outliers into the weights: it is for quantized activations
        # only, and for the linears whose config does not opt out.
        specs = {n.name: (config.activation, config.weight) for n in gm.graph.nodes
                 if n.op == "call_function" and op_kind(n) in rules
                 and (config := qconfig.resolve(n)[0]) is not None and config.activation is not None and config.smooth}
        values = quantized_linear_inputs(gm, set(specs))
        if isinstance(context.outlier_smoothing, MeasuredSmoothing):
            outliers, alphas = context.outlier_smoothing.plan(gm, values), {}
        else:
            outliers, alphas = smoothing_plan(gm, values, context.calibration_data, context.example,
                                              context.outlier_smoothing, specs)
        context.smoothing = MeasuredSmoothing.of(gm, outliers)
        return replace(self, outliers=outliers, alphas=tuple(alphas.items()))(gm)

    def call(self, gm: fx.GraphModule) -> PassResult:
        nodes = {n.name: n for n in gm.graph.nodes}
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        done: dict[str, dict[str, int]] = {"split": {}, "scaled": {}}
        for name, channels in self.outliers:
            value = nodes.get(name)
            if value is None or not channels:
                continue
            readers = [u for u in value.users if _linear_parts(gm, u) is not None and op_arguments(u)["input"] is value]
            if not readers:
                continue
            readers.sort(key=order.__getitem__)
            producer = _foldable_producer(gm, value, readers)
            if producer is not None and _already_zero(gm, producer, channels):
                continue  # split before: the int8 path carries zeros there
            if producer is not None:
                self._split(gm, value, producer, readers, [c for c, _ in channels])
                done["split"][name] = len(channels)
            else:
                self._scale(gm, value, readers, channels)
                done["scaled"][name] = len(channels)
        stats = {form: values for form, values in done.items() if values}
        if self.alphas:
            stats["alpha"] = dict(self.alphas)
        if stats:
            remove_dead_nodes(gm)  # the weights the rewritten linears no longer read
        return PassResult(gm, bool(stats), stats)

    def _split(self, gm: fx.GraphModule, value: fx.Node, producer: fx.Node, readers: list[fx.Node],
               channels: list[int]) -> None:
        provenance = Provenance(self.name, "split", (value.name,))
        index = torch.tensor(channels)
        weight, bias = _linear_parts(gm, producer)
        inlier_weight = weight.clone()
        inlier_weight[index] = 0
        producer.update_arg(1, add_constant(gm, inlier_weight, f"{producer.name}_inlier_weight", before=producer))
        if bias is not None:
            inlier_bias = bias.clone()
            inlier_bias[index] = 0
            producer.update_arg(2, add_constant(gm, inlier_bias, f"{producer.name}_inlier_bias", before=producer))
        first = readers[0]
        rows = add_constant(gm, weight[index].contiguous(), f"{producer.name}_outlier_weight", before=first)
        outlier_bias = None if bias is None else add_constant(gm, bias[index].contiguous(),
                                                              f"{producer.name}_outlier_bias", before=first)
        outlier = insert_call(gm, LINEAR, (op_arguments(producer)["input"], rows, outlier_bias), before=first,
                              provenance=provenance, meta_from=producer)
        outlier = insert_call(gm, value.target, (outlier, *value.args[1:]), kwargs=dict(value.kwargs),
                              before=first, provenance=provenance, meta_from=value)
        for reader in readers:
            reader_weight, _ = _linear_parts(gm, reader)
            after = reader.next
            columns = add_constant(gm, reader_weight[:, index].t().contiguous(), f"{reader.name}_outlier_weight",
                                   before=after)
            extra = insert_call(gm, aten.matmul.default, (outlier, columns), before=after,
                                provenance=provenance, meta_from=reader)
            residual = _residual_add(reader)
            if residual is not None:
                # linear + (extra + residual): the int8 kernel's epilogue still adds one tensor
                add, other = residual
                summed = insert_call(gm, aten.add.Tensor, (extra, other), before=add, provenance=provenance,
                                     meta_from=reader)
                add.args = (reader, summed)
                continue
            total = insert_call(gm, aten.add.Tensor, (reader, extra), before=after, provenance=provenance,
                                meta_from=reader)
            reader.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)

    def _scale(self, gm: fx.GraphModule, value: fx.Node, readers: list[fx.Node],
               channels: Channels) -> None:
        provenance = Provenance(self.name, "scale", (value.name,))
        val = value.meta["val"]
        factors = factor_vector(int(val.shape[-1]), channels)  # channels: static, even if export kept a symbol
        first = readers[0]
        inverse = add_constant(gm, (1.0 / factors).to(val.dtype), f"{value.name}_smoothing", before=first)
        smoothed = insert_call(gm, aten.mul.Tensor, (value, inverse), before=first, provenance=provenance,
                               meta_from=value)
        for reader in readers:
            weight, _ = _linear_parts(gm, reader)
            scaled = add_constant(gm, (weight * factors.to(weight.dtype)).contiguous(),
                                  f"{reader.name}_smoothed_weight", before=reader)
            reader.update_arg(0, smoothed)
            reader.update_arg(1, scaled)
