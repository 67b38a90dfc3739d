"""What ``compile`` did, in one object: per pass time and change, per node int8 or float and why,
and the signal-to-quantization-noise ratio at each quantized node.

SQNR at a node is measured end to end: the float graph and the Q/DQ graph run on the same
example inputs, and the node's output in the Q/DQ graph (which carries the error of every
quantized node before it) is compared with the float one:

    SQNR = 10 · log10( Σ y² / Σ (y − ŷ)² )   dB      (∞ when identical)

so the first node where it drops is where fidelity is lost. The report is plain data and
serializes to JSON, which is how a saved model carries it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from qcompile.ir.meta import QuantAnnotation, get_qspec, source_module, stand_ins
from qcompile.native import broadcast_param
from qcompile.ops import float8_rounding_limit
from qcompile.pipeline import PassRecord
from qcompile.qconfig import op_kind
from qcompile.observers import Observer
from qcompile.qdq import QuantizeCall


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    reference, approximation = reference.double(), approximation.double()
    return power_ratio_db(reference.pow(2).sum().item(), (reference - approximation).pow(2).sum().item())


class _Recorder(fx.Interpreter):
    """Keeps the named values; observers pass their input through untouched (a planned graph
    may hold calibrated ones, whose state is not this run's to change)."""

    def __init__(self, gm: fx.GraphModule, names: set[str], keep: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__(gm)
        self.names, self.keep, self.values = names, keep, {}

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if isinstance(self.module.get_submodule(target), Observer):
            return args[0]
        return super().call_module(target, args, kwargs)

    def run_node(self, node: fx.Node) -> Any:
        value = super().run_node(node)
        if node.name in self.names and isinstance(value, torch.Tensor):
            self.values[node.name] = self.keep(value.detach())
        return value


def node_outputs(gm: fx.GraphModule, names: set[str], args: tuple, kwargs: dict,
                 keep: Callable[[torch.Tensor], torch.Tensor] = lambda value: value) -> dict[str, torch.Tensor]:
    """The values of the named nodes when ``gm`` runs on ``args``/``kwargs``, each as ``keep``
    stores it (as it is, by default)."""
    return run_recording(gm, names, args, kwargs, keep)[1]


def run_recording(gm: fx.GraphModule, names: set[str], args: tuple, kwargs: dict,
                  keep: Callable[[torch.Tensor], torch.Tensor] = lambda value: value
                  ) -> tuple[Any, dict[str, torch.Tensor]]:
    """``gm``'s outputs for a call, in the structure ``gm(*args, **kwargs)`` returns, and the
    values of the named nodes as ``node_outputs`` keeps them."""
    recorder = _Recorder(gm, names, keep)
    with torch.no_grad():
        flat = recorder.run(*flat_inputs(gm, args, kwargs))
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is not None and info.out_spec is not None:
        flat = pytree.tree_unflatten(pytree.tree_leaves(flat), info.out_spec)
    return flat, recorder.values


def flat_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list[Any]:
    """The graph's placeholder values for a call: exported graphs take (args, kwargs) flattened
    by their input spec, keyword order included."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is None or info.in_spec is None:
        return [*args, *kwargs.values()]
    keys = info.in_spec.child(1).context if kwargs else []
    return pytree.tree_leaves((tuple(args), {k: kwargs[k] for k in keys}))


def node_sqnr(planned: fx.GraphModule, qdq: fx.GraphModule, calls: list[tuple[tuple, dict]],
              reference: fx.GraphModule | None = None,
              saturation: dict[str, list[int]] | None = None) -> tuple[dict[str, float], list[float]]:
    """SQNR of each planned node and of each output, Q/DQ graph against float graph, with signal
    and noise summed over all ``calls`` (one batch is not the data: an SQNR measured on the
    first batch only looked healthy while the model was ruined on others). The float values
    come from ``reference`` when given (QAT's: the float model before training, whose nodes
    have the planned graph's names), else from the planned graph itself.

    Memory: a value larger than ``SQNR_SAMPLE`` elements is compared on that many of its
    elements, the same positions in both graphs, taken at a prime stride so that no channel
    period aliases them onto a few channels. The estimate of a noise power from n samples is
    within about 1/√n (0.4 % here, 0.02 dB) of the whole tensor's; the float graph's values then
    take 256 KB a node instead of its activations (all-MiniLM, 8x128 tokens: 362 MB -> ~30).

    ``saturation``, when given, receives for each float8 quantize (by the value it casts) the
    count of elements the cast saturated (beyond the largest finite value by more than half a
    step, :func:`~qcompile.ops.float8_rounding_limit`), and of all elements."""
    outputs = [a.name for a in planned.graph.output_node().all_input_nodes]
    names = {n.name for n in planned.graph.nodes
             if (plan := get_qspec(n)) is not None and not plan.shares_qparams_of} | set(outputs)
    renamed = {n.name: source for source, n in stand_ins(qdq.graph).items() if source in names}
    sums: dict[str, list[float]] = {}
    for args, kwargs in calls:
        values = node_outputs(reference if reference is not None else planned, names, args, kwargs, keep=sample)
        comparer = _Comparer(qdq, values, renamed, sums, saturation)
        with torch.no_grad():
            comparer.run(*flat_inputs(qdq, args, kwargs))
    sqnr = {name: power_ratio_db(signal, noise) for name, (signal, noise) in sums.items()}
    return sqnr, [sqnr[name] for name in outputs if name in sqnr]


SQNR_SAMPLE = 1 << 16


def sample(value: torch.Tensor) -> torch.Tensor:
    """At most ``SQNR_SAMPLE`` elements of a float value, in float32, at a prime stride."""
    if not value.is_floating_point():
        return value
    flat = value.reshape(-1)
    stride = _prime_at_least(-(-flat.numel() // SQNR_SAMPLE))
    return flat[::stride].float().clone() if stride > 1 else flat.float().clone()


def _prime_at_least(n: int) -> int:
    if n <= 2:
        return max(n, 1)
    while any(n % d == 0 for d in range(2, int(n**0.5) + 1)):
        n += 1
    return n


class _Comparer(fx.Interpreter):
    """Runs the Q/DQ graph, adding each named value's signal and noise against the float graph's
    samples and dropping each sample there and then."""

    def __init__(self, gm: fx.GraphModule, reference: dict[str, torch.Tensor], renamed: dict[str, str],
                 sums: dict[str, list[float]], saturation: dict[str, list[int]] | None = None):
        super().__init__(gm)
        self.reference, self.renamed, self.sums, self.saturation = reference, renamed, sums, saturation

    def _count_saturated(self, quantize: QuantizeCall) -> None:
        x, scale = self.env[quantize.x], self.env[quantize.scale]
        limit = broadcast_param(scale.float(), x, quantize.axis) * float8_rounding_limit(quantize.dtype)
        counts = self.saturation.setdefault(quantize.x.name, [0, 0])
        counts[0] += int((x.float().abs() > limit).sum())
        counts[1] += x.numel()

    def run_node(self, node: fx.Node) -> Any:
        quantize = QuantizeCall.of(node) if self.saturation is not None else None
        if quantize is not None and quantize.dtype.is_floating_point and isinstance(quantize.scale, fx.Node):
            self._count_saturated(quantize)
        value = super().run_node(node)
        name = self.renamed.get(node.name, node.name)
        y = self.reference.pop(name, None)
        kept = sample(value) if y is not None and isinstance(value, torch.Tensor) else None
        if kept is not None and y.is_floating_point() and kept.is_floating_point() and kept.shape == y.shape:
            error = kept - y
            sums = self.sums.setdefault(name, [0.0, 0.0])
            sums[0] += float(y.double().square().sum())
            sums[1] += float(error.double().square().sum())
        return value


def power_ratio_db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


@dataclass
class NodeReport:
    name: str
    op: str
    module: str
    precision: str  # "int8" or "fp8" (lowered to a kernel), "int8-ref" / "fp8-ref" (reference Q/DQ), "float"
    detail: str  # the kernel it lowered to, or why it stays float
    sqnr_db: float | None = None


@dataclass
class PassReport:
    stage: str
    index: int
    name: str
    changed: bool
    ms: float
    stats: dict[str, Any] = field(default_factory=dict)
    # The pass's diagnostics ({"node", "kind", "reason"}; qcompile.pipeline.Diagnostic).
    diagnostics: list[dict[str, str]] = field(default_factory=list)

    def of_kind(self, kind: str) -> dict[str, str]:
        """This pass's diagnostics of one kind: reasons by node name."""
        return {d["node"]: d["reason"] for d in self.diagnostics if d["kind"] == kind}


@dataclass
class CompileReport:
    target: str
    # "static" (calibrated scales), "dynamic" (scales computed at run time) or "qat" (trained scales)
    mode: str
    calibration_batches: int = 0
    capture_s: float = 0.0
    # Kernel calls held to their Q/DQ reference at compile time (qcompile.kernel_check).
    kernel_calls_checked: int = 0
    # What calibration saw that the user should know (qcompile.calibration.check_calibration).
    calibration_findings: list[str] = field(default_factory=list)
    sqnr_batches: int = 0  # the SQNR columns sum signal and noise over this many batches
    passes: list[PassReport] = field(default_factory=list)
    nodes: list[NodeReport] = field(default_factory=list)
    output_sqnr_db: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # The resolved plan, one dict per node (qcompile.plan.resolved_plan): what write_plan saves.
    plan: list[dict[str, Any]] = field(default_factory=list)
    # The graph as the HTML report draws it (plan_graph): inputs and planned nodes, each with the
    # nearest of them it reads.
    graph: list[dict[str, Any]] = field(default_factory=list)
    # Each observed value's (lo, hi) per calibration batch, every batch included, and the
    # batches left out as outlying.
    calibration_ranges: dict[str, list[list[float]]] = field(default_factory=dict)
    calibration_skipped: list[int] = field(default_factory=list)
    # Where the compiled model's time goes, when measured (qcompile.profile): op, calls, ms.
    profile: list[dict[str, Any]] = field(default_factory=list)
    # compile(accuracy_budget=...): the budget, each compile's formats with the predicted and
    # measured loss, and the sensitivity table they came from (qcompile.mixed_precision).
    budget: dict[str, Any] = field(default_factory=dict)

    def add_stage(self, stage: str, records: list[PassRecord]) -> None:
        for r in records:
            stats = json.loads(json.dumps(dict(r.stats), default=str))
            diagnostics = [asdict(d) for d in r.diagnostics]
            self.passes.append(PassReport(stage, r.index, r.text, r.modified, round(r.seconds * 1e3, 2), stats,
                                          diagnostics))

    def diagnostics(self, kind: str, stage: str | None = None) -> dict[str, str]:
        """Every pass's diagnostics of one kind (in one stage, or all): reasons by node name."""
        found: dict[str, str] = {}
        for p in self.passes:
            if stage is None or p.stage == stage:
                found.update(p.of_kind(kind))
        return found

    @property
    def int8_nodes(self) -> list[NodeReport]:
        return [n for n in self.nodes if n.precision == "int8"]

    def __str__(self) -> str:
        lines = [f"qcompile report: target {self.target}, {self.mode} quantization"
                 + (f", calibrated on {self.calibration_batches} batches" if self.calibration_batches else "")]
        if self.kernel_calls_checked:
            lines.append(f"  {self.kernel_calls_checked} kernel calls matched their Q/DQ reference")
        if self.capture_s:
            lines.append(f"  capture took {self.capture_s:.2f} s")
        lines += [f"  note: {note}" for note in self.notes]
        lines += [f"  warning: {finding}" for finding in self.calibration_findings]
        lines.append(f"\n{'stage':<9}{'pass':<40}{'changed':<9}{'ms':>8}  stats")
        for p in self.passes:
            stats = ", ".join(f"{k}={v}" for k, v in p.stats.items())
            # A pass whose options are data (smooth-outliers' channels) shows its name only;
            # the options stay in the JSON form.
            name = p.name if len(p.name) < 40 else p.name.split("{")[0] + "{...}"
            lines.append(f"{p.stage:<9}{name:<40}{'yes' if p.changed else 'no':<9}{p.ms:>8.1f}  {stats}")
        fp8 = sum(n.precision == "fp8" for n in self.nodes)
        formats = f"in int8, {fp8} in fp8" if fp8 else "in int8"
        lines.append(f"\n{len(self.int8_nodes)} of {len(self.nodes)} planned nodes {formats} (every op with weights "
                     "is one, quantized or float with its reason)")
        lines.append(f"{'node':<26}{'module':<42}{'precision':<10}{'SQNR dB':>8}  detail")
        for n in self.nodes:
            sqnr = "" if n.sqnr_db is None else f"{n.sqnr_db:.1f}"
            lines.append(f"{n.name:<26}{n.module[:41]:<42}{n.precision:<10}{sqnr:>8}  {n.detail}")
        if self.output_sqnr_db:
            lines.append("output SQNR dB: " + ", ".join(f"{s:.1f}" for s in self.output_sqnr_db)
                         + f" (over {self.sqnr_batches} batch{'es' if self.sqnr_batches != 1 else ''})")
        return "\n".join(lines)

    def write_html(self, path: str | Path, dumps: str | Path | None = None) -> Path:
        """One self-contained HTML page of this report (:mod:`qcompile.html_report`); ``dumps``,
        a folder a ``DumpIR`` wrote during the compile, adds each pass's change side by side."""
        from qcompile.html_report import write_html  # the page's templates load only when asked for

        return write_html(self, Path(path), Path(dumps) if dumps is not None else None)

    def write_plan(self, path: str | Path) -> Path:
        """The resolved plan as a JSON file: per node its specs, rule and calibrated qparams, or
        why it stayed float."""
        path = Path(path)
        path.write_text(json.dumps({"target": self.target, "mode": self.mode, "nodes": self.plan}, indent=1) + "\n")
        return path

    def to_json(self, timings: bool = True) -> str:
        """The report as JSON; ``timings=False`` zeroes the times, so that equal compiles save equal bytes."""
        data = asdict(self)
        if not timings:
            data["capture_s"] = 0.0
            for p in data["passes"]:
                p["ms"] = 0.0
        return json.dumps(data, indent=1, default=str)

    @classmethod
    def from_json(cls, text: str) -> CompileReport:
        data = json.loads(text)
        data["passes"] = [PassReport(**p) for p in data["passes"]]
        data["nodes"] = [NodeReport(**n) for n in data["nodes"]]
        return cls(**data)


def describe_plan(
    planned: fx.GraphModule, lowered_kernels: dict[str, str], kept: dict[str, str], sqnr: dict[str, float],
    unlowered: str = "reference Q/DQ, not lowered",
) -> list[NodeReport]:
    """One line per node the plan decided on: int8 with its kernel, or float with the reason."""
    reports = []
    for node in planned.graph.nodes:
        plan = get_qspec(node)
        if plan is None or plan.shares_qparams_of:
            continue
        module = source_module(node)
        module_text = f"{module[0]} ({module[1]})" if module else ""
        if plan.quantized and node.name in lowered_kernels:
            precision, detail = _format(plan), lowered_kernels[node.name]
        elif plan.quantized:
            precision = f"{_format(plan)}-ref"
            detail = f"{unlowered}: {kept[node.name]}" if node.name in kept else unlowered
        else:
            precision, detail = "float", plan.float_reason or ""
        reports.append(NodeReport(node.name, op_kind(node), module_text, precision, detail, sqnr.get(node.name)))
    return reports


def plan_graph(planned: fx.GraphModule) -> list[dict[str, Any]]:
    """The graph as the report draws it: the inputs and every node the plan decided on, in
    graph order, each with the nearest of them it reads through the ops in between, and the
    output with what it returns."""
    shown = {n for n in planned.graph.nodes if n.op == "placeholder"
             or ((plan := get_qspec(n)) is not None and not plan.shares_qparams_of)}
    nearest: dict[fx.Node, list[str]] = {}
    entries = []
    for node in planned.graph.nodes:
        reads: list[str] = []
        for source in node.all_input_nodes:
            for name in nearest.get(source, []):
                if name not in reads:
                    reads.append(name)
        if node in shown or node.op == "output":
            entries.append({"name": node.name if node.op != "output" else "output", "op": (
                "input" if node.op == "placeholder" else "output" if node.op == "output" else op_kind(node)),
                "inputs": reads})
        nearest[node] = [node.name] if node in shown else reads
    return entries


def _format(plan: QuantAnnotation) -> str:
    """How the report names a quantized node's number format: fp8 where any edge is float8."""
    return "fp8" if any(edge.spec.is_float8 for _, edge in plan.inputs) else "int8"
