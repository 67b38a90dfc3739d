"""compile as declared stages in one context: calibration and smoothing as passes, snapshots,
properties flowing from stage to stage, and diagnostics as data."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from qcompile.passes import Annotate, Calibrate, InsertObservers, SmoothOutliers

import qcompile
from qcompile.observers import Observer
from tests.models import TinyBlock
from tests.quant_stages import cleaned


def batches(shape, count=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g),) for _ in range(count)]


def test_calibration_and_smoothing_are_stages_of_the_prepare_pipeline_text():
    target = qcompile.get_target("cpu-int8")
    assert target.prepare.endswith("smooth-outliers,annotate,gptq,correct-bias,insert-observers,calibrate")
    qm = qcompile.compile(TinyBlock(), calibration_data=batches((4, 16)), progress=False)
    prepare = [p.name for p in qm.report.passes if p.stage == "prepare"]
    assert prepare[-6:] == ["smooth-outliers", "annotate", "gptq", "correct-bias", "insert-observers", "calibrate"]
    calibrate = next(p for p in qm.report.passes if p.name == "calibrate")
    assert calibrate.stats == {"batches": 4} and not calibrate.changed
    # Without data the dynamic stages run: no smoothing, no calibration.
    dynamic = qcompile.compile(TinyBlock(), (torch.randn(4, 16),), progress=False)
    assert "calibrate" not in [p.name for p in dynamic.report.passes]


def test_calibrate_outside_a_compile_says_what_it_needs_and_inside_a_context_leaves_its_input_empty():
    x = torch.randn(4, 16)
    observed = InsertObservers()(Annotate()(cleaned(TinyBlock(), x)).graph_module).graph_module
    with pytest.raises(qcompile.PassError, match="calibrate reads the calibration data of a compile"):
        qcompile.PassManager([Calibrate()], initial_properties={"observed"})(observed)
    context = qcompile.CompileContext(qcompile.get_target("cpu-int8"), ((x,), {}), calibration_data=batches((4, 16)),
                                      progress=False)
    result = qcompile.PassManager([Calibrate()], initial_properties={"observed"}, context=context)(observed)
    filled = [m for m in result.graph_module.modules() if isinstance(m, Observer)]
    given = [m for m in observed.modules() if isinstance(m, Observer)]
    assert filled and all(m.batches == 4 for m in filled)  # ranges seen
    assert given and all(m.batches == 0 for m in given)  # the graph it was given is untouched
    assert context.calibration.batches == 4 and context.calibration.skipped == frozenset()


def test_smoothing_measures_on_the_context_data_and_does_nothing_without_it():
    x = torch.randn(4, 16)
    gm = cleaned(TinyBlock(), x)
    alone = SmoothOutliers().run(gm, None)
    assert not alone.modified
    context = qcompile.CompileContext(qcompile.get_target("cpu-int8"), ((x,), {}), calibration_data=batches((4, 16)),
                                      outlier_smoothing=0.75, progress=False)
    measured = SmoothOutliers().run(gm, context)
    assert measured.modified and measured.stats  # the scaled or split channels, by value
    off = qcompile.CompileContext(context.target, context.example, calibration_data=context.calibration_data)
    assert not SmoothOutliers().run(gm, off).modified  # outlier_smoothing=None


def test_stages_leave_snapshots_and_properties_for_the_next_stage():
    x = torch.randn(4, 16)
    report = qcompile.CompileReport("cpu-int8", "static")
    context = qcompile.CompileContext(qcompile.get_target("cpu-int8"), ((x,), {}), calibration_data=batches((4, 16)),
                                      outlier_smoothing=0.75, progress=False, report=report)
    graph = qcompile.capture(TinyBlock(), (x,))
    for stage, pipeline in context.stages():
        graph = context.run_stage(stage, pipeline, graph)
        assert context.snapshots[stage] is graph
    assert {"annotate", "prepare", "convert", "lower"} <= set(context.snapshots)
    assert {"annotated", "calibrated", "qdq", "lowered"} <= context.properties
    planned = context.snapshots["annotate"].graph.nodes
    assert any(qcompile.get_qspec(n) is not None for n in planned)  # the plan,
    assert all(n.op != "call_module" for n in planned)  # before observers
    assert {p.stage for p in report.passes} == {"prepare", "convert", "lower"}


@dataclass(frozen=True)
class NeedsCalibrated(qcompile.Pass):
    name: ClassVar[str] = "test-needs-calibrated"
    requires: ClassVar[frozenset[str]] = frozenset({"calibrated"})

    def call(self, gm):
        return qcompile.PassResult(gm, False)


def test_a_property_one_stage_establishes_is_required_by_a_pass_in_the_next():
    target = qcompile.get_target("cpu-int8").with_pass(NeedsCalibrated(), before="convert")
    qm = qcompile.compile(TinyBlock(), calibration_data=batches((4, 16)), target=target, progress=False)
    assert ("convert", "test-needs-calibrated") in [(p.stage, p.name) for p in qm.report.passes]
    # The dynamic stages never calibrate, so the same pass is refused before anything runs.
    with pytest.raises(qcompile.PipelineOrderError, match="'test-needs-calibrated' requires 'calibrated'"):
        qcompile.compile(TinyBlock(), (torch.randn(4, 16),), target=target, progress=False)


def test_diagnostics_are_typed_records_kept_in_the_report():
    qconfig = qcompile.QConfig(by_op={"layer_norm": qcompile.int8_preset().by_op["linear"]})
    with pytest.warns(UserWarning, match="layer_norm stays float: cpu-int8 has no int8 kernel for 'layer_norm'"):
        qm = qcompile.compile(TinyBlock(), calibration_data=batches((4, 16)), qconfig=qconfig, progress=False)
    annotate = next(p for p in qm.report.passes if p.name == "annotate")
    assert annotate.diagnostics == [{"node": "layer_norm", "kind": "unsupported",
                                     "reason": "cpu-int8 has no int8 kernel for 'layer_norm'"}]
    assert qm.report.diagnostics("unsupported") == {"layer_norm": "cpu-int8 has no int8 kernel for 'layer_norm'"}
    again = qcompile.CompileReport.from_json(qm.report.to_json())
    assert again.diagnostics("unsupported") == qm.report.diagnostics("unsupported")
