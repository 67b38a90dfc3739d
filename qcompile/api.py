"""``qcompile.compile``: capture, prepare, calibrate, convert to Q/DQ, lower; and the model it returns.

    qm = qcompile.compile(model, example_inputs, target="cpu-int8", calibration_data=batches)

Example inputs come from ``example_inputs``, else the first calibration batch, else the model's
own ``dummy_inputs`` (Hugging Face models have them); without calibration data, activations are
quantized dynamically. The user's model is never changed: capture works on a functional copy of
its forward, passes never write shared tensors, and a model left in training mode is captured
in eval mode with its flags restored afterwards.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from qcompile.artifact import ArtifactError, read_artifact, write_artifact
from qcompile.calibration import as_call, empty_calibration_error
from qcompile.capture import capture, eval_mode, export_program, static_dimensions
from qcompile.context import CompileContext
from qcompile.errors import QCompileError
from qcompile.input_check import check_call
from qcompile.ir.meta import get_provenance, get_qspec, stand_ins
from qcompile.kernel_check import check_kernels
from qcompile.memory import release_freed_memory
from qcompile.mixed_precision import compile_within_budget
from qcompile.outliers import MeasuredSmoothing, Smoothing, check_smoothing
from qcompile.pipeline import Instrument
from qcompile.plan import plan_qconfig, resolved_plan
from qcompile.program import NativeProgram, UnsupportedNode
from qcompile.qconfig import Candidate, QConfig
from qcompile.qdq import DequantizeCall
from qcompile.report import CompileReport, describe_plan, flat_inputs, node_sqnr, plan_graph
from qcompile.sensitivity import Metric
from qcompile.targets import Target, get_target

if TYPE_CHECKING:
    from qcompile.targets.onnx_qdq.export import OnnxExport

# The report's SQNR runs the float and the Q/DQ graph on this many calibration batches at most.
SQNR_BATCHES = 8
# Below this output SQNR (dB; about 10 % relative error in amplitude) compile warns.
LOW_SQNR_DB = 20.0


def find_example(
    model: nn.Module, example_inputs: Any, example_kwargs: dict | None, calibration_data: Iterable | None
) -> tuple[tuple[Any, ...], dict[str, Any], Iterable | None]:
    if example_inputs is not None or example_kwargs:
        args = example_inputs if isinstance(example_inputs, (tuple, list)) else (
            () if example_inputs is None else (example_inputs,))
        return tuple(args), dict(example_kwargs or {}), calibration_data
    if calibration_data is not None:
        iterator = iter(calibration_data)
        try:
            first = next(iterator)
        except StopIteration:
            raise empty_calibration_error() from None
        args, kwargs = as_call(first)
        rest = calibration_data if iterator is not calibration_data else chain([first], iterator)
        return args, kwargs, rest
    dummy = getattr(model, "dummy_inputs", None)
    if dummy:
        args, kwargs = as_call(dummy)
        return args, kwargs, None
    raise QCompileError(
        f"no example inputs for {type(model).__name__}: pass example_inputs=(...), calibration_data, "
        "or give the model a dummy_inputs attribute"
    )


def _kernel_descriptions(lowered: fx.GraphModule, target: Target) -> dict[str, str]:
    """What each planned node became, by name: its kernel, as the target describes it; for a
    piece of a merged linear, the merged kernel it was cut from; for a table lookup, the int8
    rows it reads."""
    kernels, by_node = {}, {}
    for node in lowered.graph.nodes:
        description = target.describe_kernel(node) if node.op == "call_function" else None
        provenance = get_provenance(node)
        if description is not None and provenance is not None and provenance.sources:
            by_node[node] = kernels[provenance.sources[0]] = description
    for source, stand_in in stand_ins(lowered.graph).items():
        producer = next(iter(stand_in.all_input_nodes), None)  # the value the stand-in slices or reads
        if producer in by_node:
            kernels[source] = f"{by_node[producer]} (a slice of one merged GEMM)"
        elif (rows := DequantizeCall.of(producer)) is not None:
            dtype = str(stand_in.meta["val"].dtype).removeprefix("torch.")
            stored = str(rows.integer_dtype).removeprefix("torch.")
            kernels[source] = f"{stored} rows looked up, then dequantized -> {dtype}"
    return kernels


def _through_merges(lowered: fx.GraphModule, kept: dict[str, str]) -> dict[str, str]:
    """``kept`` (why a node stayed reference Q/DQ, by name) with each merged node's reason also
    given to the nodes its slices stand for: the q/k/v projections of one merged linear."""
    found = dict(kept)
    for source, stand_in in stand_ins(lowered.graph).items():
        producer = next(iter(stand_in.all_input_nodes), None)
        if producer is not None and producer.name in kept:
            found.setdefault(source, kept[producer.name])
    return found


class QuantizedModel(nn.Module):
    """A compiled model: callable like the original, carrying its report and its Q/DQ graph.

    It runs its lowered graph as one native call (:mod:`qcompile.program`); ``runs_on`` says so,
    or names the node that keeps it on the GraphModule's Python code.

    ``smoothing`` is the outlier smoothing the compile measured and applied, for another compile
    of the same weights (``compile(..., outlier_smoothing=qm.smoothing)``); None when there was
    none, and for a loaded model (the saved Q/DQ program has the smoothing folded in)."""

    def __init__(self, lowered: fx.GraphModule, qdq: fx.GraphModule, report: CompileReport,
                 example: tuple[tuple[Any, ...], dict[str, Any]], smoothing: MeasuredSmoothing | None = None):
        super().__init__()
        self.graph_module = lowered
        self.qdq_graph_module = qdq
        self.report = report
        self.example = example
        self.smoothing = smoothing
        self._read_program()

    def _read_program(self) -> None:
        """Read the lowered graph into its native program and check it on the example inputs;
        where that cannot be done, ``runs_on`` says why and the GraphModule runs."""
        self._program: NativeProgram | None = None
        try:
            program = NativeProgram(self.graph_module)
            program.check_against(self.graph_module, *self.example)
        except UnsupportedNode as exc:
            self.runs_on = f"the fx GraphModule's Python code: {exc}"
            return
        self._program = program
        self.runs_on = f"one native call ({len(program)} calls"
        if program.python_calls:
            names = program.python_calls
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            self.runs_on += f"; {len(names)} back into Python: {shown}"
        self.runs_on += ")"

    def _apply(self, fn: Any, recurse: bool = True) -> QuantizedModel:
        # .to(), .half() and the like may give buffers new tensors: the program holds the old ones.
        applied = super()._apply(fn, recurse)
        self._read_program()
        return applied

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_program"] = None  # native, not picklable: read again from the graph
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._read_program()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(check_call(self.graph_module, args, kwargs), args, kwargs)

    def run_unchecked(self, *args: Any, **kwargs: Any) -> Any:
        """The call without the input check (a read of every float input for NaN): for timing
        the kernels of a small graph, where that read would be a large share."""
        return self._run(flat_inputs(self.graph_module, args, kwargs), args, kwargs)

    def _run(self, values: list[Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # Integer kernels have no gradient, and recording autograd nodes around each custom op
        # costs real time per call, so the compiled model always runs without grad. The native
        # program runs the graph it was read from; a graph recompiled since runs as fx code.
        with torch.no_grad():
            if self._program is not None and self._program.code is self.graph_module.code:
                return self._program(values)
            return self.graph_module(*args, **kwargs)

    def save(self, path: str | Path) -> Path:
        """Write the Q/DQ program and the report as data (:mod:`qcompile.artifact`: graph JSON,
        safetensors, a content hash; nothing pickled); loading lowers it again for this machine.
        The same model, data and options give the same bytes."""
        args, kwargs = self.example
        program = export_program(self.qdq_graph_module, args, kwargs)
        return write_artifact(Path(path), program, self.report.target, self.report.to_json(timings=False))

    def export_onnx(self, path: str | Path, *, check: bool = True, tolerance_steps: float = 1.0,
                    accuracy_level: int | str = "auto") -> OnnxExport:
        """Write the Q/DQ graph as an ONNX QDQ file, cross-checked in ONNX Runtime on the example
        inputs (see :func:`qcompile.targets.onnx_qdq.export.export_onnx`; ``accuracy_level`` is
        that of the 4-bit weight-only ``MatMulNBits`` nodes: "auto", 1 or 4)."""
        from qcompile.targets.onnx_qdq.export import export_onnx  # onnxscript loads only when exporting

        args, kwargs = self.example
        return export_onnx(self.qdq_graph_module, path, args, kwargs, check=check, tolerance_steps=tolerance_steps,
                           accuracy_level=accuracy_level)


def load(path: str | Path) -> QuantizedModel:
    """A model saved by :meth:`QuantizedModel.save`, lowered again for its target."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no saved qcompile model at '{path}'")
    artifact = read_artifact(Path(path))
    try:
        report = CompileReport.from_json(artifact.report)
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"'{path}': its report is not a qcompile report ({type(exc).__name__}: {exc})") from exc
    target = get_target(artifact.target)
    args, kwargs = artifact.example
    context = CompileContext(target, artifact.example, properties=frozenset({"qdq"}))
    lowered = context.run_stage("lower", target.pipeline("lower"), artifact.graph_module)
    check_kernels(lowered, [("on the saved example inputs", args, kwargs)])
    return QuantizedModel(lowered, artifact.graph_module, report, artifact.example)


def compile(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    target: str | Target = "cpu-int8",
    calibration_data: Iterable[Any] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    qconfig: QConfig | None = None,
    instruments: Iterable[Instrument] = (),
    verify: bool = False,
    progress: bool | None = None,
    outlier_smoothing: Smoothing = 0.75,
    plan: str | Path | dict[str, Any] | None = None,
    accuracy_budget: float | None = None,
    metric: Metric | None = None,
    eval_data: Iterable[Any] | None = None,
    objective: str = "latency",
    candidates: dict[str, tuple[Candidate, ...]] | None = None,
) -> QuantizedModel:
    """Quantize ``model`` for ``target``: capture, the target's stages (prepare, convert, lower)
    run in one :class:`~qcompile.context.CompileContext`, the kernel check, the report. See the
    module docstring for how inputs are found.

    ``outlier_smoothing``: with calibration data, the input channels of quantized linears are
    measured and wide ones taken out of the int8 range (``smooth-outliers``): after a GELU/ReLU
    the outliers are split into a float matmul, elsewhere channels are scaled into the weights
    with this migration strength (SmoothQuant's alpha, 0 to 1; see ``qcompile.outliers``);
    ``"auto"`` chooses it per value from the local error of its quantized linears; another
    compile's ``QuantizedModel.smoothing`` applies the channels it measured, by the weights
    that read them (the same model captured another way). None leaves the channels as they
    are. Smoothing, an outlying batch left out of calibration and the report's SQNR read the
    calibration data again, so a one-shot iterator is kept in a list.

    ``plan``: a plan written by ``qm.report.write_plan`` (a path or its JSON), replayed instead of
    a ``qconfig``: every node gets the specs the plan lists (edited plans too: a node whose
    entry has no inputs stays float), so the same model and data give the same Q/DQ graph.

    ``accuracy_budget``: instead of one format for every node, search per node
    (:mod:`qcompile.mixed_precision`): the fastest (``objective="size"``: smallest) formats among
    the target's ``candidates`` whose loss, the drop of ``metric`` (default: output cosine) on
    ``eval_data`` (default: the calibration data), stays within the budget, verified on the
    compiled model and repaired until it holds. The report's notes and ``report.budget`` say
    what was chosen, predicted and measured; each node's plan rule says why."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"compile() needs an nn.Module, got {type(model).__name__}")
    check_smoothing(outlier_smoothing)
    if accuracy_budget is not None:
        if qconfig is not None or plan is not None:
            raise QCompileError("compile searches the formats under an accuracy_budget: give no qconfig or plan with it")
        if calibration_data is None:
            raise QCompileError("an accuracy_budget needs calibration_data (the search calibrates each format)")
        return compile_within_budget(
            model, example_inputs, accuracy_budget=accuracy_budget, calibration_data=calibration_data,
            eval_data=eval_data, metric=metric, objective=objective, target=target, candidates=candidates,
            example_kwargs=example_kwargs, instruments=instruments, verify=verify, progress=progress,
            outlier_smoothing=outlier_smoothing)
    if plan is not None:
        if qconfig is not None:
            raise QCompileError("compile takes a qconfig or a plan to replay, not both")
        qconfig = plan_qconfig(plan)
    target = target if isinstance(target, Target) else get_target(target)
    args, kwargs, calibration_data = find_example(model, example_inputs, example_kwargs, calibration_data)
    report = CompileReport(target.name, "dynamic" if calibration_data is None else "static")
    context = CompileContext(
        target, (args, kwargs), qconfig=qconfig, report=report, outlier_smoothing=outlier_smoothing,
        calibration_data=None if calibration_data is None else _reiterable(calibration_data),
        progress=progress, instruments=list(instruments), verify=verify)
    graph, initial_buffers = _capture(model, args, kwargs, report)
    for stage, pipeline in context.stages():
        graph = context.run_stage(stage, pipeline, graph)
    qdq = context.snapshots["convert"]
    report.kernel_calls_checked = check_kernels(graph, kernel_checks(context))
    release_freed_memory()
    complete_report(context, graph)
    _restore_buffers((graph, qdq), initial_buffers)
    return QuantizedModel(graph, qdq, report, (args, kwargs), context.smoothing)


def _capture(model: nn.Module, args: tuple, kwargs: dict, report: CompileReport
             ) -> tuple[fx.GraphModule, dict[str, torch.Tensor]]:
    """The model's graph (captured in eval mode, its flags restored) and the graph's buffers as
    they were, to start the compiled model from."""
    start = time.perf_counter()
    with eval_mode(model) as was_training:
        graph = capture(model, args, kwargs)
    if was_training:
        report.notes.append("the model was in training mode; it was captured in eval mode and left as it was")
    static = static_dimensions(graph)
    report.notes.append("every input dimension is dynamic" if not static else (
        "input dimensions kept static (the model fixes them, or the example's size there was 0 or 1), the rest "
        "dynamic: " + ", ".join(f"{name}[{d}]={size}" for name, dims in static.items() for d, size in dims)))
    report.capture_s = round(time.perf_counter() - start, 2)
    return graph, {name: b.clone() for name, b in graph.named_buffers()}


def kernel_checks(context: CompileContext) -> list[tuple[str, tuple, dict]]:
    """The inputs kernels are checked on: the example inputs; with ``verify``, every batch."""
    args, kwargs = context.example
    checks = [("on the example inputs", args, kwargs)]
    if context.verify and not context.dynamic:
        checks += ((f"on calibration batch {i}", *as_call(b)) for i, b in enumerate(context.calibration_data, start=1))
    return checks


def complete_report(context: CompileContext, lowered: fx.GraphModule) -> None:
    """What calibration saw, the warnings, per-node precision and SQNR, and the plan to replay."""
    report, target, calibration = context.report, context.target, context.calibration
    if calibration is not None:
        report.calibration_batches = calibration.batches
        report.calibration_findings = [str(f) for f in calibration.findings]
        report.calibration_ranges = {name: [list(r) for r in ranges] for name, ranges in calibration.ranges.items()}
        report.calibration_skipped = sorted(calibration.skipped)
    if context.dynamic:
        report.notes.append("no calibration data: activations are quantized with scales computed at run time")
    for node, reason in report.diagnostics("unsupported").items():
        warnings.warn(f"{node} stays float: {reason}", stacklevel=3)
    narrowed = report.diagnostics("narrowed")
    for reason in dict.fromkeys(narrowed.values()):
        nodes = [node for node, why in narrowed.items() if why == reason]
        report.notes.append(f"{len(nodes)} weight(s) narrowed ({', '.join(nodes[:4])}{', ...' if len(nodes) > 4 else ''}): "
                            f"{reason}")
    for finding in report.calibration_findings:
        warnings.warn(finding, stacklevel=3)
    planned, qdq = context.snapshots.get("plan"), context.snapshots["convert"]
    if planned is None:
        report.notes.append(f"target {target.name} runs no 'annotate': there is no per-node plan to report")
        return
    skipped = calibration.skipped if calibration is not None else frozenset()
    sqnr_calls = [context.example] if context.dynamic else _spread(context.calibration_data, skipped)
    saturation: dict[str, list[int]] = {}
    sqnr, report.output_sqnr_db = node_sqnr(planned, qdq, sqnr_calls, context.snapshots.get("float-reference"),
                                            saturation)
    report.sqnr_batches = len(sqnr_calls)
    release_freed_memory()
    _note_float8(report, planned, sqnr, saturation)
    if report.mode == "qat":  # training moves the model away from the float one on purpose
        report.notes.append("SQNR is measured against the float model as it was before QAT")
    else:
        _warn_low_fidelity(report, sqnr)
    kept = _through_merges(lowered, report.diagnostics("kept", stage="lower"))
    report.nodes = describe_plan(planned, _kernel_descriptions(lowered, target), kept, sqnr, target.unlowered)
    report.plan = resolved_plan(planned, qdq)
    report.graph = plan_graph(planned)


def _note_float8(report: CompileReport, planned: fx.GraphModule, sqnr: dict[str, float],
                 saturation: dict[str, list[int]]) -> None:
    """Say what float8 did that the user should know: values its casts saturated on the
    calibration data (per cast value), and E5M2 activations (2 mantissa bits: a training format
    for gradients; E4M3 is the inference one) with the SQNR they measured."""
    for value, (over, total) in saturation.items():
        if over:
            report.notes.append(f"float8 saturation: {over} of {total} values of '{value}' ({over / total:.2%}) were "
                                "beyond the format's largest value on the calibration data and were clamped to it "
                                "(a margin keeps them)")
    e5m2 = [node.name for node in planned.graph.nodes if (plan := get_qspec(node)) is not None
            and any(edge.role == "activation" and edge.spec.dtype == "float8_e5m2" for _, edge in plan.inputs)]
    if e5m2:
        worst = min(e5m2, key=lambda name: sqnr.get(name, math.inf))
        message = (f"{len(e5m2)} nodes read float8_e5m2 activations (2 mantissa bits, meant for gradients; "
                   f"float8_e4m3fn has 3): SQNR down to {sqnr.get(worst, math.inf):.1f} dB at '{worst}'")
        report.notes.append(message)
        warnings.warn(message, stacklevel=5)


def _warn_low_fidelity(report: CompileReport, sqnr: dict[str, float]) -> None:
    """An output far from float is said out loud, with the node where the error entered: the
    first planned node whose SQNR falls below ``LOW_SQNR_DB`` on the calibration data."""
    if not report.output_sqnr_db or min(report.output_sqnr_db) >= LOW_SQNR_DB:
        return
    first = next((name for name, db in sqnr.items() if db < LOW_SQNR_DB), None)
    where = f"; SQNR first falls below {LOW_SQNR_DB:g} dB at node '{first}'" if first else ""
    message = (f"output SQNR {min(report.output_sqnr_db):.1f} dB on the calibration data: the quantized model "
               f"is far from the float one{where} (keep the nodes from there on float, or give data like real inputs)")
    report.notes.append(message)
    warnings.warn(message, stacklevel=4)


def _restore_buffers(graphs: Iterable[fx.GraphModule], initial: dict[str, torch.Tensor]) -> None:
    """Buffers the forward writes start the compiled model where the user's model was at
    compile time, not where calibration and the compile-time checks left them."""
    for gm in graphs:
        for name, buffer in gm.named_buffers():
            value = initial.get(name)
            if value is not None and value.shape == buffer.shape and value.dtype == buffer.dtype \
                    and not torch.equal(value, buffer):
                buffer.copy_(value)


def _spread(data: Iterable[Any], skipped: frozenset[int], count: int = SQNR_BATCHES) -> list[tuple[tuple, dict]]:
    """Up to ``count`` calibration batches spread evenly over the data (outlying ones left out):
    what the report's SQNR is measured on."""
    batches = [as_call(b) for i, b in enumerate(data, start=1) if i not in skipped]
    step = max(1, len(batches) // count)
    return batches[::step][:count]


def _reiterable(data: Iterable[Any]) -> Iterable[Any]:
    """Calibration data that can be read twice (outlier statistics, then calibration)."""
    return list(data) if iter(data) is data else data
