"""fuse-layer-norm-quantize (targets/cpu_int8/layer_norm_quantize.py): LayerNorm, smoothing's multiply
and the quantize become one native qc.layer_norm_quantize, held to the ops it replaces."""

import operator

import pytest
import torch

import qcompile
from qcompile import native
from qcompile.ir.graph import op_arguments
from qcompile.kernel_check import difference
from qcompile.targets.cpu_int8 import FuseLayerNormQuantize
from qcompile.qconfig import INT8_WEIGHT, TOKEN_ACTIVATION
from qcompile.targets.cpu_int8.layer_norm_quantize import (
    reference_layer_norm_quantize,
    reference_layer_norm_quantize_per_token,
)
from qcompile.testing import check_graph

ISAS = native.available_isas()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("width, affine, smoothed, dtype", [
    (384, True, True, torch.uint8), (37, True, False, torch.uint8), (16, False, True, torch.int8), (1, True, False, torch.uint8)])
def test_kernel_holds_its_contract(isa, width, affine, smoothed, dtype):
    g = torch.Generator().manual_seed(width)
    x = torch.randn(3, 17, width, generator=g) * 2 + 0.5
    weight, bias = (torch.randn(width, generator=g), torch.randn(width, generator=g)) if affine else (None, None)
    multiplier = torch.rand(width, generator=g) + 0.5 if smoothed else None
    qmin, qmax, zero_point = (0, 255, 120) if dtype == torch.uint8 else (-128, 127, 0)
    args = (x, weight, bias, 1e-5, multiplier, 0.03, zero_point, qmin, qmax, dtype)
    with native.running_on(isa):
        y, q = torch.ops.qc.layer_norm_quantize(*args)
    y_ref, q_ref = reference_layer_norm_quantize(*args)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    error, allowed = difference(q.view(torch.uint8) if dtype == torch.int8 else q,
                                q_ref.view(torch.uint8) if dtype == torch.int8 else q_ref)
    assert (q.int() - q_ref.int()).abs().max() <= 1 and error <= allowed


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("width, affine, smoothed, symmetric, dtype", [
    (384, True, True, False, torch.uint8), (37, True, False, False, torch.uint8), (16, False, True, True, torch.int8),
    (1, True, False, False, torch.uint8)])
def test_per_token_kernel_holds_its_contract(isa, width, affine, smoothed, symmetric, dtype):
    # each row's S and Z from its own normalized (and smoothed) values, as quantize_per_token chooses them
    g = torch.Generator().manual_seed(width)
    x = torch.randn(3, 17, width, generator=g) * torch.logspace(-1, 1, 17)[:, None] + 0.5
    weight, bias = (torch.randn(width, generator=g), torch.randn(width, generator=g)) if affine else (None, None)
    multiplier = torch.rand(width, generator=g) + 0.5 if smoothed else None
    qmin, qmax = (0, 255) if dtype == torch.uint8 else (-127, 127)
    args = (x, weight, bias, 1e-5, multiplier, qmin, qmax, symmetric, dtype)
    with native.running_on(isa):
        y, q, scale, zero_point = torch.ops.qc.layer_norm_quantize_per_token(*args)
    y_ref, q_ref, scale_ref, zero_point_ref = reference_layer_norm_quantize_per_token(*args)
    assert scale.shape == zero_point.shape == (3, 17, 1) and zero_point.dtype == torch.int32
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-5, atol=0)
    assert (zero_point - zero_point_ref).abs().max() <= 1
    assert (q.int() - q_ref.int()).abs().max() <= 2


def test_per_token_a_row_holding_nan_gets_a_nan_scale():
    x = torch.randn(4, 24)
    x[2, 5] = float("nan")
    _, _, scale, zero_point = torch.ops.qc.layer_norm_quantize_per_token(x, None, None, 1e-5, None, 0, 255, False,
                                                                        torch.uint8)
    assert torch.isnan(scale[2]).all() and int(zero_point[2]) == 0
    assert torch.isfinite(scale[[0, 1, 3]]).all()


def test_a_multiplier_of_the_wrong_width_is_refused():
    with pytest.raises(RuntimeError, match="multiplier must be 8 contiguous float32 values"):
        torch.ops.qc.layer_norm_quantize(torch.randn(2, 8), None, None, 1e-5, torch.ones(7), 0.1, 0, 0, 255,
                                         torch.uint8)


class Block(torch.nn.Module):
    """LayerNorm read by an int8 linear and by the residual add, as in a transformer block."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = torch.nn.LayerNorm(32)
        self.up = torch.nn.Linear(32, 32)

    def forward(self, x):
        h = self.norm(x)
        return self.up(h) + h


def test_compile_fuses_the_norm_and_the_quantize_and_keeps_the_residual():
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(2, 8, 32, generator=g) * 3,) for _ in range(4)]
    for smoothing in (None, 0.75):
        qm = qcompile.compile(Block(), calibration_data=batches, progress=False, outlier_smoothing=smoothing)
        # the bytes feed the int8 linear, the float output its residual add
        check_graph(qm.graph_module, """
        CHECK: qc.layer_norm_quantize.default
        CHECK: operator.getitem({{%[0-9]+}}, 1) : u8[s0,s1,32]
        CHECK: operator.getitem({{%[0-9]+}}, 0) : f32[s0,s1,32]
        CHECK: qc.linear_int8.default
        """)
        nodes = list(qm.graph_module.graph.nodes)
        assert not any(n.target == torch.ops.aten.layer_norm.default for n in nodes)
        fused_call = next(n for n in nodes if n.target == torch.ops.qc.layer_norm_quantize.default)
        kernel = op_arguments(next(n for n in nodes if n.target == torch.ops.qc.linear_int8.default))
        assert [(kernel[name].target, kernel[name].args) for name in ("x", "other")] == [
            (operator.getitem, (fused_call, 1)), (operator.getitem, (fused_call, 0))]
        fused = next(p for p in qm.report.passes if p.name == "fuse-layer-norm-quantize")
        assert fused.stats == {"fused": 1}
        x = batches[0][0]
        with torch.no_grad():
            assert torch.nn.functional.cosine_similarity(qm(x).flatten(), Block()(x).flatten(), dim=0) > 0.999


def test_compile_fuses_the_norm_and_a_per_token_quantize_into_one_call():
    # dynamic int8: the linear reads the bytes and each row's S and Z the norm call chose
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(2, 8, 32, generator=g) * 3,) for _ in range(2)]
    token = qcompile.QConfig(by_op={"linear": qcompile.OpQuantConfig(TOKEN_ACTIVATION, INT8_WEIGHT)})
    qm = qcompile.compile(Block(), calibration_data=batches, qconfig=token, progress=False)
    check_graph(qm.graph_module, """
    CHECK: qc.layer_norm_quantize_per_token.default({{.*}}, 0, 255, False, torch.uint8)
    CHECK: qc.linear_int8.default
    """)
    nodes = list(qm.graph_module.graph.nodes)
    targets = [n.target for n in nodes]
    assert torch.ops.aten.layer_norm.default not in targets and torch.ops.qc.quantize_per_token.default not in targets
    fused_call = next(n for n in nodes if n.target == torch.ops.qc.layer_norm_quantize_per_token.default)
    kernel = op_arguments(next(n for n in nodes if n.target == torch.ops.qc.linear_int8.default))
    assert [(kernel[name].target, kernel[name].args) for name in ("x", "x_scale", "x_zero_point", "other")] == [
        (operator.getitem, (fused_call, 1)), (operator.getitem, (fused_call, 2)), (operator.getitem, (fused_call, 3)),
        (operator.getitem, (fused_call, 0))]
    assert next(p for p in qm.report.passes if p.name == "fuse-layer-norm-quantize").stats == {"fused": 1}
    x = batches[0][0]
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(qm(x).flatten(), Block()(x).flatten(), dim=0) > 0.999


def test_a_norm_whose_output_is_not_quantized_is_left_alone():
    class NormOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(16)

        def forward(self, x):
            return self.norm(x) * 2

    result = FuseLayerNormQuantize()(qcompile.capture(NormOnly(), (torch.randn(2, 16),)))
    assert not result.modified and result.stats == {}
