"""qcompile.compile end to end: real int8 kernels, the report, save/load, and bad input."""

import json
import warnings
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import qcompile
from qcompile.ir.graph import op_arguments
from qcompile.qconfig import INT8_WEIGHT, TOKEN_ACTIVATION
from qcompile.targets.cpu_int8.capabilities import EXACT_WEIGHT_BITS
from tests.models import (
    SentenceEmbedder,
    TinyBlock,
    TinyConvNet,
    docstring_sentences,
    minilm_inputs,
)


def batches(shape, count=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g),) for _ in range(count)]


def test_static_compile_runs_int8_kernels_and_reports_every_planned_node():
    model = TinyBlock()
    qm = qcompile.compile(model, calibration_data=batches((8, 16)), progress=False)
    x = torch.randn(5, 16)  # another batch size: the batch dimension is dynamic
    with torch.no_grad():
        torch.testing.assert_close(qm(x), model(x), rtol=0.05, atol=0.05)
    kernels = [n.target for n in qm.graph_module.graph.nodes if n.op == "call_function"]
    assert kernels.count(torch.ops.qc.linear_int8.default) == 2
    report = qm.report
    assert report.mode == "static" and report.calibration_batches == 4
    assert [(n.name, n.precision) for n in report.nodes] == [("linear", "int8"), ("linear_1", "int8")]
    assert report.nodes[0].detail == "qc.linear_int8+gelu -> uint8"
    assert all(n.sqnr_db > 25 for n in report.nodes)
    assert "2 of 2 planned nodes in int8 (" in str(report)


def test_no_calibration_data_means_dynamic_quantization():
    qm = qcompile.compile(TinyBlock(), (torch.randn(4, 16),))
    assert qm.report.mode == "dynamic"
    assert any("computed at run time" in note for note in qm.report.notes)
    assert any(n.target == torch.ops.qc.choose_qparams.default for n in qm.graph_module.graph.nodes)


def test_the_users_model_and_parameters_are_never_changed():
    model = TinyConvNet().train()  # even in training mode, which compile must not leave changed
    state = {k: v.clone() for k, v in model.state_dict().items()}
    qcompile.compile(model, calibration_data=batches((4, 1, 8, 8)), progress=False)
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_save_and_load_round_trip(tmp_path):
    qm = qcompile.compile(TinyConvNet(), calibration_data=batches((4, 1, 8, 8)), progress=False)
    path = qm.save(tmp_path / "tiny.qc")
    loaded = qcompile.load(path)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(qm(x), loaded(x))
    assert loaded.report.nodes == qm.report.nodes
    with pytest.raises(FileNotFoundError, match="no saved qcompile model"):
        qcompile.load(tmp_path / "missing.qc")


def test_example_inputs_fall_back_to_dummy_inputs_then_fail_clearly():
    class WithDummy(TinyBlock):
        dummy_inputs = {"x": torch.randn(2, 16)}

    assert qcompile.compile(WithDummy()).report.mode == "dynamic"
    with pytest.raises(qcompile.QCompileError, match="no example inputs for TinyBlock"):
        qcompile.compile(TinyBlock())


def test_bad_input_errors_name_what_is_wrong():
    with pytest.raises(qcompile.QCompileError, match="unknown target 'tpu'; known targets: cpu-fp8, cpu-int8, onnx-qdq"):
        qcompile.compile(TinyBlock(), (torch.randn(2, 16),), target="tpu")
    with pytest.raises(qcompile.CalibrationError, match="calibration data is empty"):
        qcompile.compile(TinyBlock(), (torch.randn(2, 16),), calibration_data=[])
    with pytest.raises(qcompile.CalibrationError, match="calibration data is empty"):
        qcompile.compile(TinyBlock(), calibration_data=iter([]))
    nan_batches = batches((4, 16)) + [(torch.full((4, 16), float("nan")),)]
    with pytest.raises(qcompile.CalibrationError, match=r"observer of 'x': batch 5 contains NaN"):
        qcompile.compile(TinyBlock(), calibration_data=nan_batches, progress=False)
    inf_batches = batches((4, 16)) + [(torch.full((4, 16), float("inf")),)]
    with pytest.raises(qcompile.CalibrationError, match=r"observer of 'x': batch 5 contains an infinite value"):
        qcompile.compile(TinyBlock(), calibration_data=inf_batches, progress=False)
    # Batches are numbered from 1 in every message: the second batch is batch 2, here as for NaN.
    with pytest.raises(qcompile.CalibrationError, match=r"batch 2: input 'x' has shape \[4, 15\]; the model was compiled for \[any, 16\]"):
        qcompile.compile(TinyBlock(), calibration_data=[(torch.randn(4, 16),), (torch.randn(4, 15),)],
                         progress=False)


def test_constant_calibration_data_gives_a_valid_scale():
    qm = qcompile.compile(TinyBlock(), calibration_data=[(torch.zeros(4, 16),)] * 2, progress=False)
    assert torch.isfinite(qm(torch.zeros(2, 16))).all()


def test_an_op_the_target_cannot_quantize_stays_float_with_a_warning_and_a_report_line():
    qconfig = qcompile.int8_preset().set_op("layer_norm", qcompile.int8_preset().by_op["linear"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qm = qcompile.compile(TinyBlock(), calibration_data=batches((4, 16)), qconfig=qconfig, progress=False)
    assert any("layer_norm stays float: cpu-int8 has no int8 kernel for 'layer_norm'" in str(w.message)
               for w in caught)
    line = next(n for n in qm.report.nodes if n.name == "layer_norm")
    assert (line.precision, line.detail) == ("float", "cpu-int8 has no int8 kernel for 'layer_norm'")


def minilm_sentences(minilm):
    """all-MiniLM as a sentence embedder, 4 calibration batches of 8 sentences and 16 others to evaluate."""
    model, tokenizer = minilm
    sentences = docstring_sentences(48)
    calibration = [minilm_inputs(tokenizer, sentences[i:i + 8], length=32) for i in range(0, 32, 8)]
    return SentenceEmbedder(model).eval(), calibration, minilm_inputs(tokenizer, sentences[32:48], length=32)


def test_minilm_compiles_to_int8_with_an_int8_vocabulary_table(minilm):
    embedder, calibration, evaluation = minilm_sentences(minilm)
    qm = qcompile.compile(embedder, calibration_data=calibration, progress=False)
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(qm(**evaluation), embedder(**evaluation))
    # 0.9937 mean / 0.987 min without outlier smoothing, 0.9987 / 0.9975 with it
    # int7 weights where the CPU has no VNNI (capabilities.EXACT_WEIGHT_BITS): 0.9968 / 0.9953 on a Zen 1
    floor = (0.997, 0.995) if EXACT_WEIGHT_BITS is None else (0.996, 0.994)
    assert cosine.mean() > floor[0] and cosine.min() > floor[1]
    # every encoder linear (the unused pooler was removed), one more per FFN whose GELU
    # outliers smooth-outliers split off into a linear of their own, and the vocabulary table
    smoothing = next(p.stats for p in qm.report.passes if p.name.startswith("smooth-outliers"))
    assert len(qm.report.int8_nodes) == 36 + len(smoothing.get("split", {})) + 1
    lines = {n.name: n for n in qm.report.nodes}
    assert lines["embedding"].detail == "int8 rows looked up, then dequantized -> float32"
    # position and token-type rows are looked up at constant indices: they stay float
    for name in ("embedding_1", "embedding_2"):
        assert lines[name].precision == "float" and lines[name].detail.startswith("looked up at constant indices")
    # each attention quantizes its output for the output projection as it writes it
    assert sum(n.target == torch.ops.qc.attention_quantize.default for n in qm.graph_module.graph.nodes) == 6
    # each split FFN's float outlier path accumulates into the residual in one addmm
    targets = [n.target for n in qm.graph_module.graph.nodes]
    assert targets.count(torch.ops.aten.addmm.default) == len(smoothing.get("split", {}))
    assert torch.ops.aten.matmul.default not in targets


def test_minilm_with_activations_quantized_per_token_runs_every_linear_in_int8_closer_to_float(minilm):
    # Dynamic int8: each token's activations quantized with their own range at run time, no
    # calibrated activation range; all-MiniLM's per-token ranges differ by orders of magnitude.
    embedder, calibration, evaluation = minilm_sentences(minilm)
    token = qcompile.int8_preset()
    token.by_op["linear"] = qcompile.OpQuantConfig(TOKEN_ACTIVATION, INT8_WEIGHT)
    qm = qcompile.compile(embedder, calibration_data=calibration, qconfig=token, progress=False,
                          outlier_smoothing=None)
    kernels = [n for n in qm.graph_module.graph.nodes if n.target == torch.ops.qc.linear_int8.default]
    # six layers of one query/key/value call (merged: they read the same input), output, and two FFN linears
    assert len(kernels) == 24 and not any(n.target == torch.ops.aten.linear.default for n in qm.graph_module.graph.nodes)
    # every kernel reads one scale per token: the query/key/value and first FFN linears from the
    # LayerNorm before them, which quantizes each row as it writes it; the others from a per-token quantize
    inputs = [op_arguments(n) for n in kernels]
    assert all(tuple(i["x_scale"].meta["val"].shape) == (*i["x"].meta["val"].shape[:-1], 1) for i in inputs)
    producers = [i["x"].args[0].target for i in inputs]  # x is getitem(producer, index)
    assert producers.count(torch.ops.qc.layer_norm_quantize_per_token.default) == 12
    assert producers.count(torch.ops.qc.quantize_per_token.default) == 12
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(qm(**evaluation), embedder(**evaluation))
    # per tensor without smoothing: 0.9934 mean / 0.9896 min on these sentences; per token 0.9990 / 0.9985
    floor = (0.998, 0.997) if EXACT_WEIGHT_BITS is None else (0.997, 0.995)  # int7 weights without VNNI
    assert cosine.mean() > floor[0] and cosine.min() > floor[1]


def test_the_resolved_plan_is_written_as_json_with_calibrated_qparams(tmp_path):
    qconfig = qcompile.int8_preset().set_module_name("down", None)
    qm = qcompile.compile(TinyBlock(), calibration_data=batches((8, 16)), qconfig=qconfig, progress=False,
                          outlier_smoothing=None)
    written = json.loads(qm.report.write_plan(tmp_path / "plan.json").read_text())
    assert written["target"] == "cpu-int8" and written["mode"] == "static"
    nodes = {entry["node"]: entry for entry in written["nodes"]}
    assert nodes["linear_1"] == {"node": "linear_1", "op": "linear", "module": "down",
                                 "rule": "module name 'down'",
                                 "float_reason": "the QConfig keeps it float (module name 'down')"}
    up = nodes["linear"]
    assert up["rule"] == "op kind 'linear'"
    activation, weight, bias = up["inputs"]
    assert activation["role"] == "activation" and activation["dtype"] == "uint8" and activation["observe_at"] == "x"
    observer = qm.qdq_graph_module.x_scale  # what convert made of the observer on the input
    assert activation["scale"] == pytest.approx(float(observer)) and 0 <= activation["zero_point"] <= 255
    assert weight["granularity"] == "per-channel(0)" and weight["symmetric"] and "scale" not in weight
    assert bias["dtype"] == "int32"
    loaded = qcompile.load(qm.save(tmp_path / "m.qc"))
    assert loaded.report.plan == qm.report.plan


@pytest.mark.parametrize("alpha", [-3, 1.5])
def test_an_outlier_smoothing_strength_outside_0_to_1_is_refused(alpha):
    with pytest.raises(qcompile.QCompileError, match=f"outlier_smoothing is a migration strength between 0 and 1.*{alpha}"):
        qcompile.compile(TinyBlock(), calibration_data=batches((4, 16)), outlier_smoothing=alpha)


@dataclass(frozen=True)
class CountLinears(qcompile.Pass):
    """A user's pass: counts the linears the plan quantizes, changes nothing."""

    name: ClassVar[str] = "test-count-linears"
    requires: ClassVar[frozenset[str]] = frozenset({"annotated"})

    def call(self, gm):
        planned = [n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default
                   and qcompile.get_qspec(n) is not None and qcompile.get_qspec(n).quantized]
        return qcompile.PassResult(gm, False, {"quantized-linears": len(planned)})


def test_a_user_pass_runs_inside_compile_through_with_pass_without_registering_a_target():
    target = qcompile.get_target("cpu-int8").with_pass(CountLinears(), after="annotate")
    qm = qcompile.compile(TinyBlock(), calibration_data=batches((4, 16)), target=target, progress=False)
    record = next(p for p in qm.report.passes if p.name == "test-count-linears")
    assert (record.stage, record.stats) == ("prepare", {"quantized-linears": 2})
    names = [p.name for p in qm.report.passes if p.stage == "prepare"]
    assert names.index("test-count-linears") == names.index("annotate") + 1
    assert "test-count-linears" not in qcompile.get_target("cpu-int8").prepare  # the registered target is as it was
    with pytest.raises(qcompile.QCompileError, match="'canonicalize' runs in prepare, lower.*stage="):
        qcompile.get_target("cpu-int8").with_pass(CountLinears(), after="canonicalize")


def test_dumps_of_a_whole_compile_are_one_numbered_sequence(tmp_path):
    qm = qcompile.compile(TinyBlock(), calibration_data=batches((4, 16)), progress=False,
                          instruments=[qcompile.DumpIR(tmp_path)])
    diffs = sorted(p.name for p in tmp_path.glob("*.diff"))
    ran = [p for p in qm.report.passes]
    assert [d.split("_", 1)[1].removesuffix(".diff") for d in diffs] == [p.name.split("{")[0] for p in ran]
    assert [int(d[:3]) for d in diffs] == list(range(1, len(ran) + 1))
    stages = (tmp_path / "pipeline.txt").read_text().splitlines()
    assert len(stages) == 3 and stages[0].startswith("001: inline-regions") and "lower-cpu-int8" in stages[-1]


def test_a_written_plan_replays_to_the_same_qdq_graph_and_an_edited_one_keeps_its_float_node(tmp_path):
    data = batches((4, 16))
    first = qcompile.compile(TinyBlock(), calibration_data=data, progress=False)
    path = first.report.write_plan(tmp_path / "plan.json")
    replayed = qcompile.compile(TinyBlock(), calibration_data=data, progress=False, plan=path)
    # The same ops, constants and numbers; only the recorded reasons differ ("replayed plan").
    assert _without_annotations(replayed.qdq_graph_module) == _without_annotations(first.qdq_graph_module)
    x = batches((3, 16), count=1, seed=9)[0][0]
    assert torch.equal(replayed(x), first(x))
    assert all("replayed plan" in n["rule"] for n in replayed.report.plan if "inputs" in n)

    edited = json.loads(path.read_text())
    second = next(n for n in edited["nodes"] if n["node"] == "linear_1")
    del second["inputs"]  # the user sets the second linear to float
    replayed = qcompile.compile(TinyBlock(), calibration_data=data, progress=False, plan=edited)
    precision = {n.name: n.precision for n in replayed.report.nodes}
    assert (precision["linear"], precision["linear_1"]) == ("int8", "float")
    with pytest.raises(qcompile.QCompileError, match="a qconfig or a plan"):
        qcompile.compile(TinyBlock(), calibration_data=data, plan=edited, qconfig=qcompile.int8_preset())


def _without_annotations(gm):
    import re

    return re.sub(r"  \{qc\.qspec=.*\}$", "", qcompile.print_graph(gm), flags=re.M)


class Cancelling(torch.nn.Module):
    """The output is the small difference of two large, nearly equal products: int8 rounding of
    each swamps it, the kind of model whose quantized answer is far from float."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight + 1e-3 * torch.randn(16, 16))
            self.b.bias.copy_(self.a.bias)

    def forward(self, x):
        return self.a(x) - self.b(x)


def test_an_output_far_from_float_is_a_warning_naming_where_the_error_enters():
    with pytest.warns(UserWarning, match=r"output SQNR -?\d+\.\d dB on the calibration data: the quantized model is "
                                         r"far from the float one; SQNR first falls below 20 dB at node 'sub'"):
        qm = qcompile.compile(Cancelling(), calibration_data=batches((8, 16)), progress=False)
    assert any(note.startswith("output SQNR") for note in qm.report.notes)
