"""``qcompile.sensitivity``: what quantizing each node costs the model, in each candidate format.

    table = qcompile.sensitivity(model, calibration_batches, target="cpu-int8", eval_data=held_out)
    print(table)                        # per node and format: loss, SQNR, latency, bytes
    table.write_svg("sensitivity.svg")

The nodes searched are the ops whose kind the target lists candidate formats for (linear and
conv2d on cpu-int8) with a constant weight. For each candidate ``c`` the capture is prepared
(smoothing, plan, calibration) and converted once with ``c`` on every searched node: ``G_c``.
The graph that quantizes node ``n`` alone is ``G_c`` with every other searched node's inputs
put back to float,

    op(dequantize(quantize(x)), dequantize(W_q), dequantize(b_q))  ->  op(x, W, b)

which is exact: calibration observes the float graph, so ``n``'s scales in ``G_c`` are those it
would get alone, and smoothing is an identity in float for the nodes it no longer quantizes.
Ops the target has no candidates for (an embedding table) keep the preset's plan in every graph,
so their error is the baseline's, not any node's.

Per node and candidate, on the evaluation batches:

* ``loss``: the metric's drop with ``n`` quantized, over the baseline ``G_c`` with no searched
  node quantized. The metric is the user's (a score of the outputs against the float ones,
  higher is better) or the mean per-sample cosine, whose drop is ``1 − cos``. These add up to
  nearly the loss of quantizing several nodes at once (all-MiniLM: within a few percent), which
  the budget search (:mod:`qcompile.mixed_precision`) relies on and then verifies;
* ``sqnr_db``: ``n``'s own output against the same graph with ``n`` float (the local error);
* ``latency_ms``: ``n``'s op in that format, measured (:mod:`qcompile.latency`), plus for
  ``int8-smooth`` the float ops smoothing puts in front of it;
* ``weight_bytes``: its weight stored in that format, scales included.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F
from torch.utils import _pytree as pytree

from qcompile.calibration import as_call
from qcompile.capture import capture, eval_mode
from qcompile.context import CompileContext
from qcompile.errors import QCompileError
from qcompile.ir.graph import add_constant, constant_value, copy_graph_module, op_arguments, remove_dead_nodes, \
    set_argument
from qcompile.ir.meta import get_qspec, source_module
from qcompile.latency import LatencyTable, WeightOpShape
from qcompile.outliers import Smoothing
from qcompile.pipeline import Pipeline
from qcompile.qconfig import Candidate, op_kind
from qcompile.qdq import DequantizeCall, QuantizeCall
from qcompile.report import CompileReport, power_ratio_db, run_recording, sample
from qcompile.spec import PerGroup, QuantSpec
from qcompile.targets import Target, get_target
from qcompile.targets.base import CLEANUP

# (reference outputs, outputs) -> score, higher is better; the loss is its drop from the float score.
Metric = Callable[[Any, Any], float]
Call = tuple[tuple[Any, ...], dict[str, Any]]


def output_cosine(reference: Any, output: Any) -> float:
    """The mean cosine similarity per sample (rows of dimension 0) over every floating-point
    output tensor: the default metric, 1 for the float model itself."""
    scores = []
    for ref, out in zip(pytree.tree_leaves(reference), pytree.tree_leaves(output), strict=True):
        if isinstance(ref, torch.Tensor) and ref.is_floating_point() and ref.dim() >= 1:
            ref, out = ref.reshape(ref.shape[0], -1).double(), out.reshape(out.shape[0], -1).double()
            scores.append(F.cosine_similarity(ref, out, dim=1, eps=1e-12).mean())
    if not scores:
        raise QCompileError("the default metric (output cosine) needs a floating-point output; pass metric=")
    return float(torch.stack(scores).mean())


@dataclass(frozen=True)
class Measurement:
    node: str
    candidate: str
    loss: float
    sqnr_db: float
    latency_ms: float
    weight_bytes: int
    # Set when the target could not run the node in this format (the plan kept it float): the
    # search never offers it.
    float_reason: str | None = None


@dataclass(frozen=True)
class SearchedNode:
    name: str
    kind: str
    module: str
    shape: str


@dataclass
class Sensitivity:
    """Per searched node and candidate format, its measured loss, local SQNR, latency and bytes."""

    target: str
    metric: str
    float_score: float
    baseline_loss: float  # the loss of what is quantized in every graph (the preset's other ops)
    candidates: list[str]
    nodes: list[SearchedNode]
    measurements: list[Measurement] = field(default_factory=list)

    def of(self, node: str) -> dict[str, Measurement]:
        """The node's measurements by candidate name, in the candidates' order."""
        found = {m.candidate: m for m in self.measurements if m.node == node}
        return {name: found[name] for name in self.candidates if name in found}

    def __str__(self) -> str:
        lines = [f"sensitivity on {self.target}: loss = drop of {self.metric} with the node alone quantized "
                 f"(baseline {self.baseline_loss:.2e}), SQNR of its output, latency, weight bytes"]
        lines.append(f"{'node':<22}{'module':<34}" + "".join(f"{name:>24}" for name in self.candidates))
        for node in self.nodes:
            cells = []
            for name in self.candidates:
                m = self.of(node.name).get(name)
                cells.append("" if m is None else "float" if m.float_reason else
                             f"{m.loss:.1e} {_db_text(m.sqnr_db)} {m.latency_ms:.3f}ms")
            lines.append(f"{node.name:<22}{node.module[:33]:<34}" + "".join(f"{c:>24}" for c in cells))
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Sensitivity:
        data = json.loads(text)
        data["nodes"] = [SearchedNode(**n) for n in data["nodes"]]
        data["measurements"] = [Measurement(**m) for m in data["measurements"]]
        return cls(**data)

    def write_svg(self, path: str) -> str:
        """:meth:`svg` as a file."""
        with open(path, "w") as file:
            file.write(self.svg())
        return path

    def svg(self) -> str:
        """A plot of the table: per node (in graph order), each candidate's loss on a log scale."""
        width, height, left, top, bottom = max(480, 16 * len(self.nodes) + 140), 320, 60, 20, 110
        losses = [m.loss for m in self.measurements if m.loss > 0 and not m.float_reason]
        lo = math.floor(math.log10(min(losses, default=1e-6)))
        hi = math.ceil(math.log10(max(losses, default=1e-1)))
        hi = max(hi, lo + 1)
        colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]

        def y(loss: float) -> float:
            exponent = min(max(math.log10(max(loss, 10.0**lo)), lo), hi)
            return top + (hi - exponent) / (hi - lo) * (height - top - bottom)

        parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
                 'font-size="10">', f'<title>{html.escape(f"sensitivity ({self.metric} loss) on {self.target}")}</title>']
        for exponent in range(lo, hi + 1):
            parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{y(10.0**exponent):.1f}" y2="{y(10.0**exponent):.1f}" '
                         'stroke="#ddd"/>')
            parts.append(f'<text x="{left - 6}" y="{y(10.0**exponent) + 3:.1f}" text-anchor="end">1e{exponent}</text>')
        step = (width - left - 10) / max(1, len(self.nodes))
        for i, node in enumerate(self.nodes):
            x = left + step * (i + 0.5)
            parts.append(f'<text transform="translate({x:.1f},{height - bottom + 8}) rotate(60)">'
                         f'{html.escape(node.name)}</text>')
            for j, name in enumerate(self.candidates):
                m = self.of(node.name).get(name)
                if m is not None and not m.float_reason and name != "float":
                    parts.append(f'<circle cx="{x:.1f}" cy="{y(m.loss):.1f}" r="3" fill="{colors[j % len(colors)]}">'
                                 f'<title>{html.escape(f"{node.name} {name}: loss {m.loss:.2e}")}</title></circle>')
        for j, name in enumerate(self.candidates):
            parts.append(f'<text x="{left + 70 * j}" y="{height - 4}" fill="{colors[j % len(colors)]}">'
                         f'{html.escape(name)}</text>')
        parts.append("</svg>")
        return "\n".join(parts) + "\n"


def _db_text(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.0f}dB"


def sensitivity(
    model: nn.Module,
    data: Iterable[Any],
    *,
    target: str | Target = "cpu-int8",
    eval_data: Iterable[Any] | None = None,
    metric: Metric | None = None,
    candidates: dict[str, tuple[Candidate, ...]] | None = None,
    example_inputs: Any = None,
    example_kwargs: dict[str, Any] | None = None,
    outlier_smoothing: Smoothing = 0.75,
    latency: LatencyTable | None = None,
) -> Sensitivity:
    """Measure every searched node of ``model`` in every candidate format (the module
    docstring says how): ``data`` calibrates, ``eval_data`` (default: ``data``) is what the
    metric reads. ``candidates`` (per op kind) replaces the target's list."""
    from qcompile.api import find_example  # api imports the budget search, which imports this

    target = target if isinstance(target, Target) else get_target(target)
    args, kwargs, data = find_example(model, example_inputs, example_kwargs, data)
    if data is None:
        raise QCompileError("sensitivity needs calibration data (data=...)")
    batches = list(data)
    with eval_mode(model):
        graph = capture(model, args, kwargs)
    evaluation = [as_call(b) for b in (eval_data if eval_data is not None else batches)]
    return measure(graph, target, (args, kwargs), batches, evaluation, metric, candidates, outlier_smoothing,
                   latency or LatencyTable())


def measure(graph: fx.GraphModule, target: Target, example: Call, batches: list[Any], evaluation: list[Call],
            metric: Metric | None, candidates: dict[str, tuple[Candidate, ...]] | None,
            outlier_smoothing: Smoothing, latency: LatencyTable) -> Sensitivity:
    """:func:`sensitivity` on a captured graph."""
    choices = candidates if candidates is not None else target.candidates
    if not choices:
        raise QCompileError(f"target '{target.name}' lists no candidate formats to search (Target.candidates)")
    if not evaluation:
        raise QCompileError("sensitivity needs at least one evaluation batch")
    score = metric or output_cosine
    cleaned = CompileContext(target, example).run_stage("clean-up", Pipeline.parse(CLEANUP), graph)
    nodes = _searched_nodes(cleaned, choices)
    if not nodes:
        raise QCompileError(f"no node of kinds {', '.join(choices)} with a constant weight to search")
    references, values = zip(*(run_recording(cleaned, {n.input for n in nodes}, a, k, keep=_shape)
                               for a, k in evaluation), strict=True)
    shapes = {n.name: _shape_of(cleaned, n, values[0][n.input]) for n in nodes}
    float_score = _score(score, references, references)
    names = list(dict.fromkeys(c.name for kind in choices.values() for c in kind))
    table = Sensitivity(target.name, getattr(metric, "__name__", "metric") if metric else "output cosine",
                        float_score, 0.0, names,
                        [SearchedNode(n.name, n.kind, n.module, str(shapes[n.name])) for n in nodes])
    baselines = []
    for name in names:
        configs = {kind: next((c for c in options if c.name == name), None) for kind, options in choices.items()}
        if all(c is None or c.config is None for c in configs.values()):
            for node in nodes:  # float: nothing to quantize, the baseline itself
                if (candidate := configs.get(node.kind)) is not None:
                    table.measurements.append(Measurement(node.name, name, 0.0, math.inf, latency.weight_op_ms(
                        target.name, candidate, shapes[node.name]), _weight_bytes(shapes[node.name], None)))
            continue
        baselines.append(_measure_candidate(table, cleaned, graph, target, example, batches, evaluation, score,
                                            references, nodes, configs, shapes, outlier_smoothing, latency))
    table.baseline_loss = baselines[0] if baselines else 0.0
    return table


def _shape(value: torch.Tensor) -> torch.Size:
    return value.shape


@dataclass(frozen=True)
class _Node:
    name: str
    kind: str
    module: str
    input: str  # the value it reads as its activation


def _searched_nodes(gm: fx.GraphModule, choices: dict[str, tuple[Candidate, ...]]) -> list[_Node]:
    """The ops of a kind with candidates whose weight is a constant and input a value."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or op_kind(node) not in choices:
            continue
        arguments = op_arguments(node)
        if constant_value(gm, arguments.get("weight")) is None or not isinstance(arguments.get("input"), fx.Node):
            continue
        module = source_module(node)
        found.append(_Node(node.name, op_kind(node), module[0] if module else "", arguments["input"].name))
    return found


def _shape_of(gm: fx.GraphModule, node: _Node, input_shape: torch.Size) -> WeightOpShape:
    """The node's op shape: its weight's, and its input's as the first evaluation batch had it."""
    arguments = op_arguments(next(n for n in gm.graph.nodes if n.name == node.name))
    weight = constant_value(gm, arguments["weight"])
    bias = arguments.get("bias") is not None
    if node.kind == "linear":
        rows = math.prod(input_shape[:-1])
        return WeightOpShape("linear", (rows, int(input_shape[-1])), tuple(weight.shape), bias)
    conv = (*(tuple(arguments[k]) for k in ("stride", "padding", "dilation")), int(arguments["groups"]))
    return WeightOpShape(node.kind, tuple(input_shape), tuple(weight.shape), bias, conv)


def _weight_bytes(shape: WeightOpShape, candidate_config: Any) -> int:
    """Bytes of the weight stored in the format: fp32 when float; integers at their bit width
    plus an fp32 scale per channel or group (and a zero point per group when affine)."""
    elements = math.prod(shape.weight_shape)
    spec: QuantSpec | None = None if candidate_config is None else candidate_config.weight
    if spec is None:
        return 4 * elements
    bits = 8 if spec.is_float8 else math.ceil(math.log2(spec.qmax - spec.qmin + 1))
    granularity = spec.granularity
    scales = elements // granularity.group_size if isinstance(granularity, PerGroup) else shape.weight_shape[0]
    per_scale = 4 if spec.symmetric else 8
    return math.ceil(elements * bits / 8) + scales * per_scale


def _score(metric: Metric, references: Iterable[Any], outputs: Iterable[Any]) -> float:
    pairs = list(zip(references, outputs, strict=True))
    return sum(metric(r, o) for r, o in pairs) / len(pairs)


def _measure_candidate(table: Sensitivity, cleaned: fx.GraphModule, graph: fx.GraphModule, target: Target,
                       example: Call, batches: list[Any], evaluation: list[Call], metric: Metric,
                       references: tuple[Any, ...], nodes: list[_Node], configs: dict[str, Candidate | None],
                       shapes: dict[str, WeightOpShape], outlier_smoothing: Smoothing,
                       latency: LatencyTable) -> float:
    """One candidate on every node it applies to (appended to ``table``); returns the baseline loss."""
    qconfig = target.preset()
    for node in nodes:
        candidate = configs.get(node.kind)
        qconfig = qconfig.set_node(node.name, None if candidate is None else candidate.config)
    report = CompileReport(target.name, "static")
    context = CompileContext(target, example, qconfig=qconfig, calibration_data=batches,
                             outlier_smoothing=outlier_smoothing, report=report, progress=False)
    prepared = context.run_stage("prepare", target.pipeline("prepare"), graph)
    planned = context.snapshots["plan"]
    convert = target.pipeline("convert")
    if "eliminate-dequant" in convert.names():  # dequantizes stay next to the ops that read them
        convert.remove("eliminate-dequant")
    qdq = context.run_stage("convert", convert, prepared)
    searched = {n.name for n in planned.graph.nodes
                if (plan := get_qspec(n)) is not None and plan.quantized and op_kind(n) in configs}
    base = isolate(qdq, planned, searched)
    base_outputs, base_values = zip(*(run_recording(base, {n.name for n in nodes}, a, k, keep=sample)
                                      for a, k in evaluation), strict=True)
    base_score = _score(metric, references, base_outputs)
    smoothing = _smoothing_costs(report, cleaned, nodes, shapes, latency)
    for node in nodes:
        candidate = configs.get(node.kind)
        if candidate is None:
            continue
        shape = shapes[node.name]
        cost = latency.weight_op_ms(target.name, candidate, shape)
        bytes_ = _weight_bytes(shape, candidate.config)
        if node.name not in searched:
            plan = get_qspec(next(n for n in planned.graph.nodes if n.name == node.name))
            reason = plan.float_reason if plan is not None and plan.float_reason else "not quantized by the plan"
            table.measurements.append(Measurement(node.name, candidate.name, 0.0, math.inf, cost, bytes_, reason))
            continue
        alone = isolate(qdq, planned, searched - {node.name})
        signal = noise = 0.0
        outputs = []
        for (args, kwargs), reference in zip(evaluation, base_values, strict=True):
            out, values = run_recording(alone, {node.name}, args, kwargs, keep=sample)
            outputs.append(out)
            exact, approx = reference[node.name].double(), values[node.name].double()
            signal += exact.pow(2).sum().item()
            noise += (exact - approx).pow(2).sum().item()
        loss = base_score - _score(metric, references, outputs)
        sqnr = power_ratio_db(signal, noise)
        extra = smoothing.get(node.name, 0.0) if candidate.config is not None and candidate.config.smooth else 0.0
        table.measurements.append(Measurement(node.name, candidate.name, loss, sqnr, cost + extra, bytes_))
    return table.float_score - base_score


def isolate(qdq: fx.GraphModule, planned: fx.GraphModule, to_float: set[str]) -> fx.GraphModule:
    """A copy of the Q/DQ graph in which the nodes named in ``to_float`` read float inputs:
    each quantized activation its quantize's input, each quantized weight and bias the float
    constant the planned graph holds (``op(DQ(Q(x)), DQ(W_q), DQ(b_q)) -> op(x, W, b)``). An
    op that shares its input's qparams (a max-pool between two convolutions) reads its input
    float too when every node that observes that input is in ``to_float``."""
    gm = copy_graph_module(qdq)
    planned_nodes = {n.name: n for n in planned.graph.nodes}
    observers: dict[str, set[str]] = {}
    for node in planned.graph.nodes:
        for _, edge in (plan.inputs if (plan := get_qspec(node)) is not None else ()):
            if edge.role == "activation" and edge.observe_at:
                observers.setdefault(edge.observe_at, set()).add(node.name)
    for node in list(gm.graph.nodes):
        source = planned_nodes.get(node.name)
        plan = get_qspec(source) if source is not None else None
        if plan is None:
            continue
        if plan.shares_qparams_of is not None:
            for value in node.all_input_nodes:
                dq = DequantizeCall.of(value)
                quantize = QuantizeCall.of(dq.q) if dq is not None else None
                readers = observers.get(quantize.x.name) if quantize is not None else None
                if readers and readers <= to_float:
                    node.replace_input_with(value, quantize.x)
            continue
        if node.name not in to_float:
            continue
        schema = node.target._schema.arguments
        for index, edge in plan.inputs:
            name = schema[index].name
            current = op_arguments(node)[name]
            if edge.role == "activation":
                dq = DequantizeCall.of(current)
                quantize = QuantizeCall.of(dq.q) if dq is not None else None
                if quantize is not None:
                    set_argument(node, name, quantize.x)
            else:
                value = constant_value(planned, op_arguments(source)[name])
                if value is not None:
                    set_argument(node, name, add_constant(gm, value, f"{node.name}_float_{name}", before=node))
    remove_dead_nodes(gm)
    gm.recompile()
    return gm


def _smoothing_costs(report: CompileReport, cleaned: fx.GraphModule, nodes: list[_Node],
                     shapes: dict[str, WeightOpShape], latency: LatencyTable) -> dict[str, float]:
    """Per searched linear, the latency of the float ops ``smooth-outliers`` put in front of it
    (its stats name the values split or scaled, with their channel counts); a scaled value's
    multiply is shared by the linears reading it."""
    stats = next((p.stats for p in report.passes if p.name.startswith("smooth-outliers")), {})
    by_name = {n.name: n for n in cleaned.graph.nodes}
    readers: dict[str, list[_Node]] = {}
    for node in nodes:
        readers.setdefault(node.input, []).append(node)
    costs: dict[str, float] = {}
    for form, key in (("split", "split"), ("scale", "scaled")):
        for value, channels in stats.get(key, {}).items():
            for reader in readers.get(value, []):
                rows, width = shapes[reader.name].input_shape[0], shapes[reader.name].input_shape[-1]
                out_features = shapes[reader.name].weight_shape[0]
                if form == "split":
                    producer = op_arguments(op_arguments(by_name[value])["self"])
                    width = constant_value(cleaned, producer["weight"]).shape[1]
                    costs[reader.name] = latency.smoothing_ms("split", rows, width, int(channels), out_features)
                else:
                    costs[reader.name] = latency.smoothing_ms("scale", rows, width, 0, 0) / len(readers[value])
    return costs
