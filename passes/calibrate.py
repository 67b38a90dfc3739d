"""calibrate: run the compile's calibration data through the observed graph.

    o = call_module observer_0(y)      (ranges empty)   ->   o = call_module observer_0(y)   (ranges seen)

A stage of the prepare pipeline, written in the target's text after ``insert-observers``, not
a step ``compile`` splices in. The observers this pass fills are its own copies, so the graph it
was given (and any snapshot of it) keeps empty observers; the graph's text does not change, so
the pass reports ``modified=False`` while its observers now hold ranges. When one batch is far
wider than the others (:func:`qcompile.calibration.check_calibration`), the observers start
over without it; what was seen and left out is in the pass's diagnostics and in the context's
:class:`~qcompile.calibration.CalibrationOutcome`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from torch import fx

from qcompile.calibration import calibrate_robustly
from qcompile.errors import QCompileError
from qcompile.ir.graph import copy_graph_module
from qcompile.observers import Observer
from qcompile.pipeline import Diagnostic, Pass, PassResult

if TYPE_CHECKING:
    from qcompile.context import CompileContext


@dataclass(frozen=True)
class Calibrate(Pass):
    name: ClassVar[str] = "calibrate"
    requires: ClassVar[frozenset[str]] = frozenset({"observed"})
    establishes: ClassVar[frozenset[str]] = frozenset({"calibrated"})
    preserves_semantics: ClassVar[bool] = True

    def call(self, gm: fx.GraphModule) -> PassResult:
        raise QCompileError("calibrate reads the calibration data of a compile: run it through compile() or "
                            "PassManager(..., context=CompileContext(...)), or call qcompile.calibrate(gm, data)")

    def run(self, gm: fx.GraphModule, context: CompileContext | None = None) -> PassResult:
        if context is None or context.calibration_data is None:
            return self(gm)  # says what is missing
        observed = copy_graph_module(gm)
        for name, module in list(observed.named_children()):
            if isinstance(module, Observer):
                setattr(observed, name, copy.deepcopy(module))
        outcome = calibrate_robustly(observed, context.calibration_data, context.example, progress=context.progress)
        context.calibration = outcome
        diagnostics = tuple(Diagnostic(f.node, "calibration", str(f)) for f in outcome.findings)
        stats: dict[str, object] = {"batches": outcome.batches}
        if outcome.skipped:
            stats["left-out"] = sorted(outcome.skipped)
        return PassResult(observed, False, stats, diagnostics)
