"""GPTQ: the rounding (qcompile/gptq.py) and the pass that applies it (passes/gptq.py)."""

import json

import pytest
import torch
import torch.nn.functional as F
from qcompile.passes import Annotate, CorrectBias, Gptq

import qcompile
from qcompile import OpQuantConfig, PerChannel, PerGroup, QConfig, QuantSpec
from qcompile.context import CompileContext
from qcompile.fake_quant import weight_qparams
from qcompile.gptq import (
    HessianRecorder,
    descend_codes,
    elementwise,
    gptq_round,
    refit_scales,
    upper_inverse_factor,
)
from qcompile.ir.graph import constant_expression
from qcompile.pass_manager import PassManager
from qcompile.passes.gptq import input_rows, levels
from qcompile.qdq import quantized_weight
from qcompile.targets import get_target
from qcompile.testing import assert_graph_diff
from tests.models import TinyBlock, TinyConvNet
from tests.quant_stages import cleaned

INT4_G32 = QuantSpec("int4", granularity=PerGroup(1, 32), rounding="gptq")
INT4_CHANNEL = QuantSpec("int4", granularity=PerChannel(0), rounding="gptq")


def correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Rows with strongly correlated, unequal-variance features (as a layer's inputs are)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=generator) / k**0.5 + torch.eye(k)
    return (torch.randn(n, k, generator=generator) * torch.linspace(0.2, 3.0, k)) @ mixing


def rtn(weight, scale, zero_point, spec):
    """Each element rounded to nearest with its own scale and zero point (given per element)."""
    values, scale, zero_point = (t.reshape(-1, 1) for t in (weight, scale, zero_point))
    q = torch.ops.qc.quantize(values, scale, zero_point, None, spec.qmin, spec.qmax, spec.storage_dtype)
    return torch.ops.qc.dequantize(q, scale, zero_point, None, torch.float32).reshape(weight.shape)


def test_two_columns_by_hand():
    # H = [[1, ρ], [ρ, 1]]: with column 0 rounded (δ0 = q0 − w0), the δ1 minimizing δᵀHδ is −ρ·δ0,
    # so column 1 is rounded from w1 + ρ·(w0 − q0), not from w1.
    spec = QuantSpec("int8", granularity=PerChannel(0))
    rho, weight = 0.9, torch.tensor([[0.4, 0.3]])
    hessian = torch.tensor([[1.0, rho], [rho, 1.0]], dtype=torch.float64)
    ones, zeros = torch.ones(1, 2), torch.zeros(1, 2, dtype=torch.int32)
    rounded = gptq_round(weight, hessian, ones, zeros, spec, damping=0.0, act_order=False)
    # w0 = 0.4 -> 0; w1 + 0.9·0.4 = 0.66 -> 1 (round to nearest would give 0)
    torch.testing.assert_close(rounded, torch.tensor([[0.0, 1.0]]))


def test_an_identity_hessian_is_round_to_nearest():
    # Uncorrelated inputs of equal variance: no column can absorb another's error.
    weight = torch.randn(16, 64)
    spec = QuantSpec("int4", granularity=PerGroup(1, 32))
    scale, zero_point = weight_qparams(weight, spec)
    s, z = elementwise(scale, spec, weight.shape), elementwise(zero_point, spec, weight.shape)
    rounded = gptq_round(weight, torch.eye(64, dtype=torch.float64), s, z, spec)
    torch.testing.assert_close(rounded, rtn(weight, s, z, spec), rtol=0, atol=0)


@pytest.mark.parametrize("spec", [QuantSpec("int4", granularity=PerGroup(1, 32)),
                                  QuantSpec("int4", symmetric=False, granularity=PerGroup(1, 32)),
                                  QuantSpec("int8", granularity=PerChannel(0)),
                                  QuantSpec("float8_e4m3fn", granularity=PerChannel(0))])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_lands_on_the_grid_and_beats_round_to_nearest_on_the_output(spec, act_order):
    x = correlated_inputs(2048, 64)
    weight = torch.randn(24, 64)
    scale, zero_point = weight_qparams(weight, spec)
    s, z = elementwise(scale, spec, weight.shape), elementwise(zero_point, spec, weight.shape)
    rounded = gptq_round(weight, (x.T @ x).double() / len(x), s, z, spec, act_order=act_order)
    torch.testing.assert_close(rtn(rounded, s, z, spec), rounded, rtol=0, atol=0)  # every value on its grid
    gptq_error = (x @ (rounded - weight).T).square().mean()
    rtn_error = (x @ (rtn(weight, s, z, spec) - weight).T).square().mean()
    assert gptq_error < 0.8 * rtn_error


def test_refit_scales_recover_the_scales_that_made_the_codes():
    # W = S_true · d exactly; rounded on the wrong grid S = 1.3 S_true the same codes d give
    # 1.3 W, and the least-squares refit under any positive definite H returns S_true.
    spec = QuantSpec("int4", granularity=PerGroup(1, 32))
    codes = torch.randint(-8, 8, (6, 64), generator=torch.Generator().manual_seed(0)).float()
    codes[0, 32:] = 0  # a group of zero codes: any scale gives the same values; its scale is kept
    true_scale = torch.rand(6, 2, generator=torch.Generator().manual_seed(1)) + 0.1
    weight = codes * elementwise(true_scale, spec, codes.shape)
    x = correlated_inputs(512, 64)
    hessian = (x.T @ x).double() / len(x)
    scale, rounded = refit_scales(weight, hessian, codes * elementwise(1.3 * true_scale, spec, codes.shape),
                                  1.3 * true_scale, spec)
    expected = true_scale.clone()
    expected[0, 1] *= 1.3
    torch.testing.assert_close(scale, expected)
    torch.testing.assert_close(rounded, weight)


@pytest.mark.parametrize("spec", [QuantSpec("int4", symmetric=False, granularity=PerGroup(1, 32)),
                                  QuantSpec("int4", granularity=PerChannel(0))])
def test_refit_scales_lower_the_output_error_of_gptq_codes(spec):
    x = correlated_inputs(2048, 64)
    weight = torch.randn(24, 64)
    hessian = (x.T @ x).double() / len(x)
    scale, zero_point = weight_qparams(weight, spec)
    s, z = elementwise(scale, spec, weight.shape), elementwise(zero_point, spec, weight.shape)
    rounded = gptq_round(weight, hessian, s, z, spec)
    refit, refit_rounded = refit_scales(weight, hessian, rounded, scale, spec)
    assert refit.shape == scale.shape and (refit > 0).all()
    refit_s = elementwise(refit, spec, weight.shape)
    torch.testing.assert_close(rtn(refit_rounded, refit_s, z, spec), refit_rounded)  # on the new grid, same codes
    torch.testing.assert_close(torch.round(refit_rounded / refit_s), torch.round(rounded / s))
    error = lambda w: float((x @ (w - weight).T).square().mean())  # noqa: E731
    assert error(refit_rounded) < error(rounded)  # least squares over the scales: never worse


def test_the_hessian_recorder_accumulates_xtx_and_the_mean_row_over_calls():
    recorder = HessianRecorder(lambda x: x.reshape(-1, x.shape[-1]))
    a, b = torch.randn(3, 5, 8), torch.randn(7, 8) + 2.0
    recorder(a)
    recorder(b)
    rows = torch.cat([a.reshape(-1, 8), b])
    torch.testing.assert_close(recorder.hessian(), rows.double().T @ rows.double() / 22)  # both in fp64
    torch.testing.assert_close(recorder.mean(), rows.double().mean(0))


def output_error(weight, rounded, hessian):
    """Σ_r (ŵ_r − w_r)ᵀ H (ŵ_r − w_r): the squared output error per calibration row."""
    delta = (rounded - weight).double()
    return float(torch.einsum("rk,kl,rl->", delta, hessian, delta))


@pytest.mark.parametrize("spec", [QuantSpec("int4", symmetric=False, granularity=PerGroup(1, 8)),
                                  QuantSpec("int3", granularity=PerChannel(0))])
def test_descent_lowers_the_error_each_sweep_and_stops_where_no_single_code_can(spec):
    x = correlated_inputs(512, 16)
    x[:, 5] = 0  # a column no input reaches: left as it is
    weight = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    hessian = (x.T @ x).double() / len(x)
    scale, zero_point = weight_qparams(weight, spec)
    s, z = elementwise(scale, spec, weight.shape), elementwise(zero_point, spec, weight.shape)
    rounded = gptq_round(weight, hessian, s, z, spec)
    errors, moved = [output_error(weight, rounded, hessian)], None
    while moved != 0:
        descended, moved = descend_codes(weight, hessian, rounded, s, z, spec, block_size=4)
        assert int(torch.count_nonzero(descended != rounded)) == moved
        torch.testing.assert_close(rtn(descended, s, z, spec), descended, rtol=0, atol=0)  # on the grid
        torch.testing.assert_close(descended[:, 5], rounded[:, 5], rtol=0, atol=0)
        rounded = descended
        errors.append(output_error(weight, rounded, hessian))
    assert len(errors) > 2 and all(b <= a * (1 + 1e-6) for a, b in zip(errors, errors[1:]))
    assert errors[-1] < errors[0]
    # a fixed point: no value moved alone to any other grid point lowers the error
    for r in range(6):
        for j in set(range(16)) - {5}:
            for code in range(spec.qmin, spec.qmax + 1):
                trial = rounded.clone()
                trial[r, j] = (code - z[r, j]) * s[r, j]
                assert output_error(weight, trial, hessian) >= errors[-1] * (1 - 1e-9)


def test_damping_grows_until_the_factorisation_exists():
    singular = torch.zeros(4, 4, dtype=torch.float64)
    singular[0, 0] = 1.0
    singular[1, 1] = -1e-3  # not positive semi-definite: float rounding of a rank-deficient XᵀX can do this
    upper, damp = upper_inverse_factor(singular, 0.0001)
    assert damp > 1e-3 and torch.allclose(upper.T @ upper, torch.linalg.inv(singular + damp * torch.eye(4, dtype=torch.float64)))


def test_a_convolution_reads_its_input_patches_as_rows():
    model = TinyConvNet()
    x = torch.randn(2, 1, 8, 8)
    gm = cleaned(model, x)
    conv = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.conv2d.default and n.name == "conv2d_1")
    rows = input_rows(gm, conv, 1, INT4_CHANNEL)
    weight = constant_expression(gm, conv.args[1])
    h = torch.randn(2, 8, 4, 4)
    expected = F.conv2d(h, weight, padding=1).permute(0, 2, 3, 1).reshape(-1, weight.shape[0])
    torch.testing.assert_close(rows(h) @ weight.reshape(weight.shape[0], -1).T, expected, rtol=1e-4, atol=1e-4)


def test_levels_put_parallel_ops_together_and_chained_ones_apart():
    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (torch.nn.Linear(8, 8) for _ in range(4))

        def forward(self, x):
            return self.o(torch.softmax(self.q(x) @ self.k(x).T, -1) @ self.v(x))

    gm = cleaned(Attention().eval(), torch.randn(4, 8))
    linears = [n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert [[n.name for n in level] for level in levels(gm, linears)] == [["linear", "linear_1", "linear_2"],
                                                                          ["linear_3"]]


def planned(model, x, spec):
    return Annotate(qconfig=QConfig(by_op={"linear": OpQuantConfig(None, spec)}))(cleaned(model, x)).graph_module


@pytest.mark.parametrize("sequential", [False, True])
def test_the_pass_writes_the_qdq_form_convert_keeps(sequential):
    model, x = TinyBlock(width=64, hidden=128), torch.randn(16, 64)
    data = [(torch.randn(64, 64),) for _ in range(4)]
    before = planned(model, x, INT4_G32)
    context = CompileContext(get_target("cpu-int8"), ((x,), {}), calibration_data=data)
    after = PassManager([Gptq(sequential=sequential, refit_scales=False)], context=context,
                        initial_properties=frozenset({"annotated"}))(before).graph_module
    assert_graph_diff(before, after, removed=[
        "%linear = aten.linear.default(%x, %up_weight, %up_bias)",
        "%linear_1 = aten.linear.default(%gelu, %down_weight, %down_bias)",
        "constant up.weight", "constant down.weight",
    ], added=[
        "constant up_weight_q : i8[128,2,32]", "constant up_weight_scale : f32[128,2,1]",
        "constant up_weight_zero_point : i32[128,2,1]",
        "%dequantize_default = qc.dequantize.default(%up_weight_q, %up_weight_scale, %up_weight_zero_point, None, "
        "torch.float32) : f32[128,2,32]",
        "%view_default = aten.view.default(%dequantize_default, [128, 64]) : f32[128,64]",
        "%linear = aten.linear.default(%x, %view_default, %up_bias) : f32[s0,128]",
        "constant down_weight_q : i8[64,4,32]", "constant down_weight_scale : f32[64,4,1]",
        "constant down_weight_zero_point : i32[64,4,1]",
        "%dequantize_default_1 = qc.dequantize.default(%down_weight_q, %down_weight_scale, %down_weight_zero_point, "
        "None, torch.float32) : f32[64,4,32]",
        "%view_default_1 = aten.view.default(%dequantize_default_1, [64, 128]) : f32[64,128]",
        "%linear_1 = aten.linear.default(%gelu, %view_default_1, %down_bias) : f32[s0,64]",
    ])
    # the scales are round-to-nearest's own (static groups): only the integers differ
    up = quantized_weight(after, next(n for n in after.graph.nodes if n.name == "linear").args[1])[0]
    scale, _ = weight_qparams(model.up.weight.detach(), INT4_G32)
    torch.testing.assert_close(constant_expression(after, up.scale), scale.reshape(128, 2, 1))


def test_by_default_the_pass_refits_the_scales_for_the_integers_it_chose():
    model, x = TinyBlock(width=64, hidden=128), torch.randn(16, 64)
    data = [(correlated_inputs(64, 64, seed=i),) for i in range(4)]
    context = CompileContext(get_target("cpu-int8"), ((x,), {}), calibration_data=data)
    outputs = {}
    for refit in (False, True):
        after = PassManager([Gptq(refit_scales=refit)], context=context, initial_properties=frozenset({"annotated"}))(
            planned(model, x, INT4_G32)).graph_module
        up = quantized_weight(after, next(n for n in after.graph.nodes if n.name == "linear").args[1])[0]
        outputs[refit] = constant_expression(after, up.scale), constant_expression(after, up.node)
    (static_scale, static_w), (refit_scale, refit_w) = outputs[False], outputs[True]
    assert static_scale.shape == refit_scale.shape and not torch.equal(static_scale, refit_scale)
    inputs = torch.cat([x for x, in data])
    error = lambda w: float((inputs @ (w.reshape(128, 64) - model.up.weight.detach()).T).square().mean())  # noqa: E731
    assert error(refit_w) < error(static_w)


def test_with_bias_correction_gptq_rounds_for_the_centred_error_and_shifts_the_bias():
    # Inputs far from zero: most of XᵀX is μμᵀ, the part of the error a bias shift removes.
    model, x = TinyBlock(width=64, hidden=128), torch.randn(16, 64)
    offset = 3.0 * torch.randn(64, generator=torch.Generator().manual_seed(5))
    data = [(correlated_inputs(64, 64, seed=i) + offset,) for i in range(4)]
    inputs = torch.cat([x for x, in data])
    context = CompileContext(get_target("cpu-int8"), ((x,), {}), calibration_data=data)
    centred_spec = QuantSpec("int4", granularity=PerGroup(1, 32), rounding="gptq", bias_correction=True)
    before = planned(model, x, centred_spec)
    result = PassManager([Gptq(), CorrectBias()], context=context, initial_properties=frozenset({"annotated"}))(before)
    after = result.graph_module
    assert [r.modified for r in result.records] == [True, False]  # correct-bias leaves GPTQ's weights to it
    assert_graph_diff(before, after, removed=[
        "%linear = aten.linear.default(%x, %up_weight, %up_bias)",
        "%linear_1 = aten.linear.default(%gelu, %down_weight, %down_bias)",
        "constant up.weight", "constant down.weight", "constant up.bias", "constant down.bias",
    ], added=[
        "constant up_weight_q : i8[128,2,32]", "constant up_weight_scale : f32[128,2,1]",
        "constant up_weight_zero_point : i32[128,2,1]", "constant linear_corrected_bias : f32[128]",
        "%dequantize_default = qc.dequantize.default(%up_weight_q, %up_weight_scale, %up_weight_zero_point, None, "
        "torch.float32) : f32[128,2,32]",
        "%view_default = aten.view.default(%dequantize_default, [128, 64]) : f32[128,64]",
        "%linear = aten.linear.default(%x, %view_default, %linear_corrected_bias) : f32[s0,128]",
        "constant down_weight_q : i8[64,4,32]", "constant down_weight_scale : f32[64,4,1]",
        "constant down_weight_zero_point : i32[64,4,1]", "constant linear_1_corrected_bias : f32[64]",
        "%dequantize_default_1 = qc.dequantize.default(%down_weight_q, %down_weight_scale, %down_weight_zero_point, "
        "None, torch.float32) : f32[64,4,32]",
        "%view_default_1 = aten.view.default(%dequantize_default_1, [64, 128]) : f32[64,128]",
        "%linear_1 = aten.linear.default(%gelu, %view_default_1, %linear_1_corrected_bias) : f32[s0,64]",
    ])
    up = next(n for n in after.graph.nodes if n.name == "linear")
    rounded, bias = constant_expression(after, up.args[1]), constant_expression(after, up.args[2])
    error = inputs @ (rounded - model.up.weight.detach()).T + (bias - model.up.bias.detach())
    # b' = b − (Ŵ − W) μ: the error's mean over the calibration rows is zero
    torch.testing.assert_close(error.mean(0), torch.zeros(128), rtol=0, atol=1e-4)
    plain = PassManager([Gptq()], context=context, initial_properties=frozenset({"annotated"}))(
        planned(model, x, INT4_G32)).graph_module
    plain_up = constant_expression(plain, next(n for n in plain.graph.nodes if n.name == "linear").args[1])
    plain_error = inputs @ (plain_up - model.up.weight.detach()).T
    assert float(error.square().mean()) < 0.9 * float(plain_error.square().mean())


def test_a_centred_convolution_takes_the_mean_error_over_every_patch_out_of_its_bias():
    # Padding makes border patches differ from the rest: the shift is E·μ over the unfolded
    # patches, which is the mean over every output position of conv2d(x, Ŵ − W).
    conv = torch.nn.Conv2d(3, 8, 3, padding=1).eval()
    data = [(torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i)) + 2.0,) for i in range(3)]
    spec = QuantSpec("int8", granularity=PerChannel(0), rounding="gptq", bias_correction=True)
    gm = Annotate(target="onnx-qdq", qconfig=QConfig(by_op={"conv2d": OpQuantConfig(
        QuantSpec("uint8", symmetric=False), spec)}))(cleaned(conv, data[0][0])).graph_module
    context = CompileContext(get_target("onnx-qdq"), ((data[0][0],), {}), calibration_data=data)
    after = PassManager([Gptq()], context=context, initial_properties=frozenset({"annotated"}))(gm).graph_module
    node = next(n for n in after.graph.nodes if n.target == torch.ops.aten.conv2d.default)
    rounded, bias = constant_expression(after, node.args[1]), constant_expression(after, node.args[2])
    assert not torch.equal(bias, conv.bias.detach())
    inputs = torch.cat([x for x, in data])
    error = F.conv2d(inputs, rounded, bias, padding=1) - conv(inputs).detach()
    torch.testing.assert_close(error.mean((0, 2, 3)), torch.zeros(8), rtol=0, atol=1e-4)


def test_a_gptq_plan_without_calibration_data_is_an_error_naming_the_node():
    model, x = TinyBlock(width=64, hidden=128), torch.randn(16, 64)
    with pytest.raises(qcompile.NodeError, match="rounding='gptq', which reads calibration data.*module 'up'"):
        Gptq()(planned(model, x, INT4_G32))
    with pytest.raises(qcompile.QCompileError, match="pass 'convert': its weight is planned with gptq.*no data.*'up'"):
        qcompile.compile(model, x, qconfig=QConfig(by_op={"linear": OpQuantConfig(None, INT4_G32)}))  # dynamic


def test_compile_with_gptq_is_closer_to_float_than_round_to_nearest_and_replays():
    torch.manual_seed(0)
    model = TinyBlock(width=64, hidden=128)
    model.up.weight.data *= torch.linspace(0.3, 3.0, 64)  # columns of unequal weight, as trained layers have
    offset = torch.randn(64) * 2
    data = [(torch.randn(32, 64) @ (torch.eye(64) + 0.3 * torch.randn(64, 64)) + offset,) for _ in range(8)]
    test = torch.randn(256, 64) @ (torch.eye(64) + 0.3 * torch.randn(64, 64)) + offset
    errors = {}
    for rounding in ("nearest", "gptq"):
        spec = QuantSpec("int4", granularity=PerGroup(1, 32), rounding=rounding)
        qm = qcompile.compile(model, data[0], calibration_data=data, progress=False,
                              qconfig=QConfig(by_op={"linear": OpQuantConfig(None, spec)}))
        errors[rounding] = float((qm(test) - model(test)).square().mean())
    assert errors["gptq"] < 0.7 * errors["nearest"]
    plan = {"target": "cpu-int8", "nodes": qm.report.plan}
    assert {e["rounding"] for n in plan["nodes"] for e in n.get("inputs", ()) if e["role"] == "weight"} == {"gptq"}
    plan = json.loads(json.dumps(plan))
    replayed = qcompile.compile(model, data[0], calibration_data=data, plan=plan, progress=False)
    torch.testing.assert_close(replayed(test), qm(test), rtol=0, atol=0)
    assert torch.equal(model.up.weight, model.up.weight.clone())  # and the model is the user's still


def test_gptq_with_quantized_activations_keeps_the_int32_bias_and_lowers_to_int8_kernels():
    model, x = TinyBlock(width=64, hidden=128), torch.randn(16, 64)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    data = [(torch.randn(32, 64),) for _ in range(4)]
    spec = QuantSpec("int8", granularity=PerChannel(0), rounding="gptq")
    qm = qcompile.compile(model, x, calibration_data=data, progress=False,
                          qconfig=QConfig(by_op={"linear": OpQuantConfig(QuantSpec("uint8", symmetric=False), spec)}))
    assert any(n.name.endswith("bias_q") for n in qm.qdq_graph_module.graph.nodes)
    linears = [n for n in qm.report.nodes if n.op == "linear"]
    assert all("linear_int8" in n.detail for n in linears)
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())


def test_a_grouped_convolution_is_rounded_to_nearest_with_a_diagnostic():
    class Depthwise(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, groups=4)

        def forward(self, x):
            return self.conv(x)

    x = torch.randn(2, 4, 8, 8)
    gm = Annotate(target="onnx-qdq", qconfig=QConfig(by_op={"conv2d": OpQuantConfig(
        QuantSpec("uint8", symmetric=False), QuantSpec("int8", granularity=PerChannel(0), rounding="gptq"))}))(
        cleaned(Depthwise().eval(), x)).graph_module
    context = CompileContext(get_target("onnx-qdq"), ((x,), {}), calibration_data=[(x,)])
    result = PassManager([Gptq()], context=context, initial_properties=frozenset({"annotated"}))(gm)
    (record,) = result.records
    assert record.stats == {"rounded": 1, "nearest": 1}
    assert [str(d) for d in record.diagnostics] == ["conv2d: GPTQ left it at round-to-nearest: a convolution in 4 groups"]


def test_spec_checks():
    with pytest.raises(ValueError, match="rounding 'optimal' is not one of: nearest, gptq"):
        QuantSpec("int4", rounding="optimal")
    assert str(QuantSpec("int4", rounding="gptq", bias_correction=True)) == "int4/sym/per-tensor/minmax/gptq/bias-corrected"
    assert str(INT4_G32) == "int4/sym/per-group(1,32)/minmax/gptq"
