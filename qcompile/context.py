"""The compile context: what a compile's stages read besides the graph, and what they leave behind.

``compile`` is the target's declared pipelines run one stage after another in one context:

    context = CompileContext(target, example, qconfig=..., calibration_data=batches, ...)
    graph = capture(model, ...)
    for stage, pipeline in context.stages():   # prepare, convert, lower
        graph = context.run_stage(stage, pipeline, graph)

Passes that need more than the graph read it through :meth:`Pass.run` instead of looking the
target up themselves: ``annotate`` the target and the QConfig, ``smooth-outliers`` the
calibration data and the migration strength (and it leaves the channels it smoothed in
:attr:`CompileContext.smoothing`), ``calibrate`` the data (and it leaves its outcome,
the batches it used and left out, in :attr:`CompileContext.calibration`). The graph after each
pass named in ``snapshot_after`` and after each stage is kept in ``snapshots`` by that name, the
graph after the last pass that decides the plan as ``plan`` (the report reads that plan and the
stage ``convert`` produced), and the graph
properties a stage establishes are where the next stage's order check starts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import fx

from qcompile.calibration import CalibrationOutcome
from qcompile.memory import release_freed_memory
from qcompile.outliers import MeasuredSmoothing, Smoothing
from qcompile.pass_manager import PassManager
from qcompile.pipeline import Instrument, Pipeline
from qcompile.qconfig import QConfig
from qcompile.report import CompileReport
from qcompile.targets.base import STAGES, Target


@dataclass
class CompileContext:
    target: Target
    example: tuple[tuple[Any, ...], dict[str, Any]]
    qconfig: QConfig | None = None
    # None: no calibration data, activations are quantized at run time (the dynamic stages).
    # Otherwise re-iterable: smoothing, calibration and the report's SQNR each read it.
    calibration_data: Iterable[Any] | None = None
    outlier_smoothing: Smoothing = None
    progress: bool | None = None
    instruments: Sequence[Instrument] = ()
    verify: bool = False
    report: CompileReport | None = None
    snapshot_after: frozenset[str] = frozenset({"annotate"})
    snapshots: dict[str, fx.GraphModule] = field(default_factory=dict)
    properties: frozenset[str] = frozenset()
    calibration: CalibrationOutcome | None = None
    smoothing: MeasuredSmoothing | None = None

    @property
    def dynamic(self) -> bool:
        return self.calibration_data is None

    def resolved_qconfig(self) -> QConfig:
        """The user's QConfig, else the target's preset."""
        return self.qconfig if self.qconfig is not None else self.target.preset()

    def stages(self) -> list[tuple[str, Pipeline]]:
        """(stage, pipeline) in order: the target's dynamic forms when there is no data."""
        forms = ("dynamic_prepare", "dynamic_convert", "lower") if self.dynamic else ("prepare", "convert", "lower")
        return [(stage, self.target.pipeline(form)) for stage, form in zip(STAGES, forms, strict=True)]

    def run_stage(self, stage: str, pipeline: str | Pipeline, gm: fx.GraphModule) -> fx.GraphModule:
        """One stage's pipeline over ``gm`` in this context: its order checked from the
        properties earlier stages established, its records added to the report, its output
        kept as the snapshot ``stage``."""
        pipeline = pipeline if isinstance(pipeline, Pipeline) else Pipeline.parse(pipeline)
        manager = PassManager(pipeline, list(self.instruments), verify=self.verify,
                              initial_properties=self.properties, context=self)
        result = manager(gm)
        self.properties = frozenset(pipeline.properties_after(self.properties))
        release_freed_memory()
        if self.report is not None:
            self.report.add_stage(stage, result.records)
        self.snapshots[stage] = result.graph_module
        return result.graph_module
