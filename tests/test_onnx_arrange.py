"""onnx-blocked-weights, onnx-float-matmul-biases, onnx-residual-sums and onnx-float8-relu-as-max
(targets/onnx_qdq/arrange.py): the export's copy arranged for ONNX Runtime, values unchanged."""

import pytest
import torch

import qcompile
from qcompile.qconfig import fp8_qconfig
from qcompile.targets.onnx_qdq import BlockedWeights, Float8ReluAsMax, FloatMatmulBiases, ResidualAddsAsSums
from qcompile.testing import assert_graph_diff, assert_outputs_close, assert_pass_contract
from tests.models import TinyBlock


@pytest.fixture(scope="module")
def block():
    """TinyBlock's Q/DQ graph on [batch, tokens, width]: linear -> gelu -> linear + x -> LayerNorm."""
    data = [(torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(i)),) for i in range(3)]
    qm = qcompile.compile(TinyBlock(), target="onnx-qdq", calibration_data=data, progress=False,
                          outlier_smoothing=None)
    return qm.qdq_graph_module, data[0][0]


def test_structure_batched_linears_take_their_bias_as_a_float_constant(block):
    gm, x = block
    after = assert_pass_contract(FloatMatmulBiases(), gm, [x])
    assert_graph_diff(gm, after, exact=False,
                      added=["aten.linear.default({{.*}}up_bias_q_float)", "constant up_bias_q_float : f32[32]"],
                      removed=["aten.linear.default({{.*}}%dequantize"])
    assert_outputs_close(gm, after, [x], rtol=1e-6)


def test_structure_the_residual_add_into_layer_norm_is_a_sum_holding_the_linear_bias(block):
    gm, x = block
    biased = FloatMatmulBiases()(gm).graph_module
    after = assert_pass_contract(ResidualAddsAsSums(), biased, [x])
    assert_graph_diff(biased, after, exact=False,
                      added=["qc.unfused_sum.default([%linear_1, %x, %down_bias_q_float])"],
                      removed=["aten.add.Tensor(%linear_1, %x)"])
    assert_outputs_close(gm, after, [x], rtol=1e-5)


def test_negative_an_add_that_is_not_a_layer_norm_input_stays_an_add():
    class AddNotNormed(torch.nn.Module):
        def forward(self, x, y):
            return torch.relu(x + y)

    gm = qcompile.capture(AddNotNormed(), (torch.randn(2, 4), torch.randn(2, 4)))
    result = ResidualAddsAsSums()(gm)
    assert not result.modified and result.stats == {}


def test_the_export_runs_them_as_a_pipeline_that_dumps_like_any_other(block, tmp_path, monkeypatch):
    gm, x = block
    monkeypatch.setenv("QCOMPILE_DUMP_DIR", str(tmp_path / "dumps"))
    qcompile.export_onnx(gm, tmp_path / "block.onnx", (x,))
    dumped = sorted(p.name for p in (tmp_path / "dumps").glob("*.diff"))
    assert dumped[:4] == ["001_quantize-before-pad.diff", "002_onnx-blocked-weights.diff",
                          "003_onnx-float-matmul-biases.diff", "004_onnx-residual-sums.diff"]


def test_structure_a_relu_into_a_float8_quantize_is_a_maximum_with_zero():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    data = [(torch.randn(4, 16, generator=torch.Generator().manual_seed(i)),) for i in range(3)]
    gm = qcompile.compile(model, target="onnx-qdq", qconfig=fp8_qconfig(), calibration_data=data,
                          progress=False).qdq_graph_module
    after = assert_pass_contract(Float8ReluAsMax(), gm, [data[0][0]])
    assert_graph_diff(gm, after, exact=False, added=["aten.maximum.default(%linear, %relu_zero)"],
                      removed=["aten.relu.default(%linear)"])
    assert_outputs_close(gm, after, [data[1][0]], rtol=0)
    # an integer quantize's relu stays: uint8 with zero point 0 does clip negatives
    int8 = qcompile.compile(model, target="onnx-qdq", calibration_data=data, progress=False).qdq_graph_module
    assert not Float8ReluAsMax()(int8).modified


@pytest.mark.parametrize("symmetric", [True, False])
def test_structure_a_grouped_weight_is_a_blocked_dequantize_into_a_matmul(symmetric):
    x = torch.randn(3, 5, 64)
    spec = qcompile.QuantSpec("int4", symmetric=symmetric, granularity=qcompile.PerGroup(1, 32))
    qm = qcompile.compile(TinyBlock(width=64, hidden=128), calibration_data=[(x,)], progress=False,
                          qconfig=qcompile.QConfig(by_op={"linear": qcompile.OpQuantConfig(None, spec)}))
    gm = qm.qdq_graph_module
    after = assert_pass_contract(BlockedWeights(), gm, [x])
    assert_graph_diff(gm, after, exact=False, added=[
        "constant linear_blocked_q : i8[64,128]", "constant linear_blocked_scale : f32[2,128]",
        "constant linear_blocked_zero_point : i32[2,128]",
        "qc.dequantize_blocked.default(%linear_blocked_q, %linear_blocked_scale, %linear_blocked_zero_point, 32, 4)"
        " : f32[64,128]",
        "aten.matmul.default(%x, %dequantize_blocked_default) : f32[s0,s1,128]",
        "aten.add.Tensor(%matmul_default, %up_bias) : f32[s0,s1,128]",
    ], removed=["aten.linear.default(%x, %view_default, %up_bias)"])
    # the same products as the grouped dequantize: bit for bit
    torch.testing.assert_close(after(x), gm(x), rtol=0, atol=0)
