"""convert (passes/convert.py): observers to Q/DQ, weights to int8 constants, bias to int32 with the derived scale."""

import pytest
import torch
from qcompile.passes import Convert, InsertObservers

import qcompile
from qcompile.testing import assert_outputs_close, assert_pass_contract, check_graph
from tests.models import TinyBlock
from tests.quant_stages import annotated, calibrated


def test_observed_graph_becomes_reference_qdq():
    x = torch.randn(4, 16)
    before = calibrated(TinyBlock(), x)
    out = assert_pass_contract(Convert(), before)
    check_graph(out, """
    CHECK: %1 = constant x_scale : f32[]
    CHECK: qc.quantize.default(%0, %1, %2, None, 0, 255, torch.uint8) : u8[s0,16]
    CHECK: qc.dequantize.default({{%[0-9]+}}, %1, %2, None, torch.float32) : f32[s0,16]
    CHECK: constant up_weight_q : i8[32,16]
    CHECK: qc.dequantize.default({{.*}}, 0, torch.float32) : f32[32,16]
    CHECK: constant up_bias_q : i32[32]
    CHECK: aten.linear.default
    """)
    assert_outputs_close(before, out, [x], rtol=0.05)


def test_bias_scale_is_input_scale_times_weight_scale():
    model = TinyBlock()
    out = Convert()(calibrated(model, torch.randn(4, 16))).graph_module
    torch.testing.assert_close(out.up_bias_scale, out.x_scale * out.up_weight_scale)
    assert out.up_bias_q.dtype == torch.int32
    # int32 with that scale represents the float bias to within half a step
    error = (out.up_bias_q * out.up_bias_scale - model.up.bias.detach()).abs()
    assert (error <= out.up_bias_scale / 2 + 1e-9).all()


def test_uncalibrated_graph_is_refused_naming_the_observer():
    observed = InsertObservers()(annotated(TinyBlock(), torch.randn(4, 16))).graph_module
    with pytest.raises(qcompile.NodeError, match="observer 'observer_0' saw no data: the graph was never calibrated"):
        Convert()(observed)


def test_dynamic_convert_computes_scales_at_run_time():
    x = torch.randn(4, 16)
    out = Convert(dynamic=True)(annotated(TinyBlock(), x)).graph_module
    check_graph(out, """
    CHECK: qc.choose_qparams.default(%0, 0, 255, False)
    CHECK: qc.quantize.default(%0,
    """)
    assert not any(n.name.endswith("bias_q") for n in out.graph.nodes)  # bias stays float
    assert_outputs_close(annotated(TinyBlock(), x), out, [x], rtol=0.05)
