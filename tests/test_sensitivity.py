"""qcompile.sensitivity: the isolation rewrite, the measured loss against a real one-node compile,
the latency table's cache, the table's forms."""

import math
import xml.etree.ElementTree as ElementTree

import pytest
import torch

import qcompile
from qcompile.capture import capture
from qcompile.context import CompileContext
from qcompile.errors import QCompileError
from qcompile.latency import LatencyTable, WeightOpShape
from qcompile.qconfig import Candidate
from qcompile.qdq import DequantizeCall
from qcompile.sensitivity import Sensitivity, isolate, output_cosine
from qcompile.targets import get_target
from tests.models import OutlierBlock, TinyConvNet

CPU_INT8 = get_target("cpu-int8")


def _batches(shape, count, seed):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=generator),) for _ in range(count)]


def _qdq(model, batches):
    """(planned, Q/DQ graph) of the preset, dequantizes left beside their readers."""
    context = CompileContext(CPU_INT8, (batches[0], {}), calibration_data=batches, outlier_smoothing=None)
    prepared = context.run_stage("prepare", CPU_INT8.pipeline("prepare"), capture(model, batches[0], {}))
    convert = CPU_INT8.pipeline("convert").remove("eliminate-dequant")
    return context.snapshots["plan"], context.run_stage("convert", convert, prepared)


def _reads_dequantized(gm, name):
    node = next(n for n in gm.graph.nodes if n.name == name)
    return sorted(i for i, a in enumerate(node.args) if DequantizeCall.of(a) is not None
                  or (isinstance(a, torch.fx.Node) and a.target == torch.ops.aten.view.default
                      and DequantizeCall.of(a.args[0]) is not None))


def test_isolate_puts_back_float_inputs_of_the_named_nodes_only():
    model, batches = OutlierBlock(), _batches((4, 8, 32), 2, 0)
    planned, qdq = _qdq(model, batches)
    assert _reads_dequantized(qdq, "linear") == [0, 1, 2] and _reads_dequantized(qdq, "linear_1") == [0, 1, 2]
    alone = isolate(qdq, planned, {"linear"})
    assert _reads_dequantized(alone, "linear") == [] and _reads_dequantized(alone, "linear_1") == [0, 1, 2]
    # the float weight is the planned graph's own
    weight = next(n for n in alone.graph.nodes if n.name == "linear").args[1]
    assert torch.equal(getattr(alone, weight.target), model.up.weight.detach())
    assert _reads_dequantized(qdq, "linear") == [0, 1, 2]  # the Q/DQ graph itself is untouched


def test_isolating_every_node_gives_back_the_float_function():
    """With nothing quantized outside the searched ops (a conv net: no residual add), the
    baseline is the float model, through a max-pool that shares its input's qparams."""
    model, batches = TinyConvNet(), _batches((4, 1, 8, 8), 2, 1)
    planned, qdq = _qdq(model, batches)
    everything = isolate(qdq, planned, {"conv2d", "conv2d_1", "linear"})
    assert not any(DequantizeCall.of(n) for n in everything.graph.nodes)
    x = _batches((3, 1, 8, 8), 1, 2)[0][0]
    torch.testing.assert_close(everything(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_node_s_measured_loss_is_the_loss_of_compiling_it_alone():
    """loss(n, int8) from the shared capture = the drop of a compile that quantizes n and nothing else."""
    model, batches, held_out = OutlierBlock(width=32, hidden=64), _batches((4, 8, 32), 3, 3), _batches((4, 8, 32), 2, 4)
    candidates = {"linear": (Candidate("int8", qcompile.OpQuantConfig(qcompile.qconfig.INT8_ACTIVATION,
                                                                       qcompile.qconfig.INT8_WEIGHT, smooth=False)),)}
    table = qcompile.sensitivity(model, batches, eval_data=held_out, candidates=candidates, outlier_smoothing=None)
    assert [n.name for n in table.nodes] == ["linear", "linear_1"] and table.baseline_loss == pytest.approx(0, abs=1e-9)
    for name, other, module in (("linear", "linear_1", model.up), ("linear_1", "linear", model.down)):
        qconfig = qcompile.int8_preset().set_node(other, None)
        qm = qcompile.compile(model, calibration_data=batches, qconfig=qconfig, outlier_smoothing=None)
        with torch.no_grad():
            drop = sum(1 - output_cosine(model(*b), qm.qdq_graph_module(*b)) for b in held_out) / len(held_out)
        measured = table.of(name)["int8"]
        assert measured.loss == pytest.approx(drop, rel=1e-6, abs=1e-12)
        assert 20 < measured.sqnr_db < 60 and measured.latency_ms > 0
        assert measured.weight_bytes == module.weight.numel() + 4 * module.weight.shape[0]


def test_the_table_covers_every_candidate_and_round_trips_as_json(tmp_path):
    model, batches = OutlierBlock(), _batches((4, 8, 32), 2, 5)
    table = qcompile.sensitivity(model, batches)
    names = [c.name for c in CPU_INT8.candidates["linear"]]
    assert table.candidates == names
    for node in table.nodes:
        row = table.of(node.name)
        assert list(row) == names
        assert row["float"].loss == 0 and math.isinf(row["float"].sqnr_db)
        # more bits, less error: int4 groups lose more than int8 weights alone
        assert row["w4-g32"].sqnr_db < row["w8"].sqnr_db
        assert row["w4-g32"].weight_bytes < row["w8"].weight_bytes < row["float"].weight_bytes
        assert row["w4a8-g32"].weight_bytes == row["w4-g32"].weight_bytes
        assert row["w4a8-g32"].sqnr_db < row["int8"].sqnr_db  # int4 weights lose more than int8's
        assert row["w4a8-g32"].float_reason is None  # planned: cpu-int8 runs W4A8 groups
        # each row's own range is within the calibrated one: finer steps than per tensor
        assert row["int8-token"].float_reason is None and row["int8-token"].sqnr_db > row["int8"].sqnr_db
    assert Sensitivity.from_json(table.to_json()) == table
    assert "linear_1" in str(table) and "w4-g32" in str(table)
    svg = ElementTree.parse(table.write_svg(str(tmp_path / "s.svg"))).getroot()
    circles = svg.findall("{http://www.w3.org/2000/svg}circle")
    assert len(circles) == sum(m.candidate != "float" and m.float_reason is None for m in table.measurements)


def test_smoothing_s_float_ops_are_in_the_smoothed_candidate_s_latency(tmp_path):
    """OutlierBlock's GELU output is split: int8-smooth costs its GEMM plus the float path."""
    model, batches = OutlierBlock(), _batches((4, 8, 32), 2, 6)
    latency = LatencyTable(tmp_path / "latency.json")
    table = qcompile.sensitivity(model, batches, latency=latency)
    down = table.of("linear_1")
    split = [key for key in latency.entries if "smooth-outliers | split" in key]
    assert len(split) == 1, "the split's float path was measured"
    assert down["int8-smooth"].latency_ms == pytest.approx(down["int8"].latency_ms + latency.entries[split[0]], rel=1e-3)
    # smoothing is what a node with outliers gains from: less loss than plain int8
    assert down["int8-smooth"].loss < down["int8"].loss


def test_latencies_are_cached_per_machine(tmp_path):
    shape = WeightOpShape("linear", (16, 32), (32, 32), True)
    candidate = CPU_INT8.candidates["linear"][0]
    first = LatencyTable(tmp_path / "latency.json")
    ms = first.weight_op_ms("cpu-int8", candidate, shape)
    assert ms > 0 and first.measured == 1
    again = LatencyTable(tmp_path / "latency.json")
    assert again.weight_op_ms("cpu-int8", candidate, shape) == ms and again.measured == 0
    # an entry measured on another CPU is not read here
    (key,) = again.entries
    foreign = {key.replace(key.split(" | ")[0], "Another CPU [000000000000]"): 1e-9}
    (tmp_path / "other.json").write_text(__import__("json").dumps(foreign))
    other = LatencyTable(tmp_path / "other.json")
    assert other.weight_op_ms("cpu-int8", candidate, shape) != 1e-9 and other.measured == 1


def test_sensitivity_refuses_what_it_cannot_measure():
    model = OutlierBlock()
    with pytest.raises(QCompileError, match="calibration data"):
        qcompile.sensitivity(model, None, example_inputs=(torch.randn(2, 32),))
    with pytest.raises(QCompileError, match="no node of kinds conv2d"):
        qcompile.sensitivity(model, _batches((2, 32), 1, 0), candidates={"conv2d": CPU_INT8.candidates["conv2d"]})


def test_cpu_fp8_searches_e4m3_formats_beside_int8(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path))
    model, batches = OutlierBlock(), _batches((4, 8, 32), 2, 5)
    table = qcompile.sensitivity(model, batches, target="cpu-fp8")
    assert table.candidates == ["fp8", "fp8-token", "fp8-weight", "int8", "int8-token", "float"]
    for node in table.nodes:
        row = table.of(node.name)
        assert all(m.float_reason is None for m in row.values())  # every format planned and lowered
        assert all(20 < m.sqnr_db < 60 for name, m in row.items() if name != "float")
        assert row["fp8-weight"].weight_bytes == row["int8"].weight_bytes < row["float"].weight_bytes
    qm = qcompile.compile(model, calibration_data=batches, target="cpu-fp8", accuracy_budget=1e-4, progress=False)
    rounds = qm.report.budget["rounds"]
    assert rounds[-1]["measured_loss"] <= 1e-4 and qm.report.notes[-1].startswith("accuracy budget 0.0001")
    assert all(n.precision in ("int8", "fp8") for n in qm.report.nodes if n.op == "linear")
