"""FP8 numerics and the cast-fp8 pass (passes/cast_fp8.py): the scaled saturating cast against ONNX Runtime on every
code and at the formats' edges, amax scales with a margin, per-token scales, and the pass's
graph diff."""

import math

import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from qcompile.passes import CastFp8, Convert, EliminateDequant

import qcompile
from qcompile.ops import FLOAT8_VALUES, float8_rounding_limit, float8_to_float32
from qcompile.qconfig import fp8_qconfig
from qcompile.spec import PerChannel, PerTensor, PerToken, QuantSpec, compute_qparams
from qcompile.testing import assert_outputs_close, assert_pass_contract, check_graph
from tests.models import TinyBlock
from tests.quant_stages import annotated, calibrated

FORMATS = [(torch.float8_e4m3fn, 448, TensorProto.FLOAT8E4M3FN), (torch.float8_e5m2, 57344, TensorProto.FLOAT8E5M2)]
ONE = torch.tensor([1.0])
ZERO = torch.tensor([0], dtype=torch.int32)


def cast(x: torch.Tensor, dtype: torch.dtype, finite_max: int, scale: torch.Tensor = ONE) -> torch.Tensor:
    return torch.ops.qc.quantize(x, scale, torch.zeros_like(scale, dtype=torch.int32), None, -finite_max, finite_max,
                                 dtype)


def onnx_round_trip(x: torch.Tensor, element_type: int) -> torch.Tensor:
    """ONNX Runtime's QuantizeLinear -> DequantizeLinear with scale 1 and a float8 zero point (saturating)."""
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "cast", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [1.0]), helper.make_tensor("z", element_type, [], [0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


@pytest.mark.parametrize("dtype, finite_max, element_type", FORMATS)
def test_cast_matches_onnx_quantize_linear_on_every_code_tie_and_edge(dtype, finite_max, element_type):
    values = FLOAT8_VALUES[dtype]
    finite = values[torch.isfinite(values)].unique()
    ties = (finite[1:] + finite[:-1]) / 2  # round half to even decides these
    edges = torch.tensor([finite_max * 1.01, -finite_max * 3.0, math.inf, -math.inf, math.nan, 1e-30, -1e-30, 0.0])
    x = torch.cat([finite, ties, ties + ties.abs() * 1e-6, ties - ties.abs() * 1e-6, edges])
    ours = torch.ops.qc.dequantize(cast(x, dtype, finite_max), ONE, ZERO, None, torch.float32)
    theirs = onnx_round_trip(x, element_type)
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
    assert torch.equal(ours.nan_to_num(), theirs.nan_to_num())


def test_hand_worked_e4m3_values():
    x = torch.tensor([448.0, 464.0, 470.0, 1e6, -1e6, 2.0**-9, 2.0**-10, 3 * 2.0**-10, 2.0**-6, 17.0, 18.0, 19.0,
                      math.inf, math.nan])
    q = cast(x, torch.float8_e4m3fn, 448).float()
    # saturation at ±448 (inf too); the smallest subnormal 2^-9 exact; 2^-10 a tie to 0 (even);
    # 3·2^-10 a tie between 2^-9 and 2^-8, to the even mantissa 2^-8; 17 a tie between 16 and 18
    # (steps of 2 in [16, 32)) to 16; 19 a tie to 20; NaN stays NaN.
    expected = torch.tensor([448.0, 448.0, 448.0, 448.0, -448.0, 2.0**-9, 0.0, 2.0**-8, 2.0**-6, 16.0, 18.0, 20.0,
                             448.0, math.nan])
    torch.testing.assert_close(q, expected, equal_nan=True, rtol=0, atol=0)


def test_hand_worked_e5m2_values():
    x = torch.tensor([57344.0, 61439.0, 61441.0, 2.0**-16, 2.0**-17, 3 * 2.0**-17, -math.inf, 7.0, 4.5, 5.5])
    q = cast(x, torch.float8_e5m2, 57344).float()
    # steps of 1 in [4, 8): 7 exact, the ties 4.5 and 5.5 to the even mantissas 4 and 6
    expected = torch.tensor([57344.0, 57344.0, 57344.0, 2.0**-16, 0.0, 2.0**-15, -57344.0, 7.0, 4.0, 6.0])
    torch.testing.assert_close(q, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_table_decode_equals_torch_conversion_on_all_256_codes(dtype):
    codes = torch.arange(256, dtype=torch.uint8).view(dtype)
    torch.testing.assert_close(float8_to_float32(codes), codes.float(), equal_nan=True, rtol=0, atol=0)
    assert float8_rounding_limit(torch.float8_e4m3fn) == 464.0 and float8_rounding_limit(torch.float8_e5m2) == 61440.0


def test_amax_scale_with_margin():
    lo, hi = torch.tensor([-4.48]), torch.tensor([2.0])
    scale, zero_point = compute_qparams(lo, hi, QuantSpec("float8_e4m3fn"))
    torch.testing.assert_close(scale, torch.tensor([0.01]))
    assert int(zero_point) == 0
    # margin 2: the largest value lands 2^2 below the maximum: S = amax·4/448
    scale, _ = compute_qparams(lo, hi, QuantSpec("float8_e4m3fn", margin=2))
    torch.testing.assert_close(scale, torch.tensor([0.04]))
    scale, _ = compute_qparams(lo, hi, QuantSpec("float8_e5m2", margin=1))
    torch.testing.assert_close(scale, torch.tensor([4.48 * 2 / 57344]))


def test_spec_validation():
    with pytest.raises(ValueError, match="margin is a float8 option"):
        QuantSpec("int8", margin=1)
    with pytest.raises(ValueError, match=r"margin must be in \[0, 6\]"):
        QuantSpec("float8_e4m3fn", margin=7)
    with pytest.raises(ValueError, match="scale-only"):
        QuantSpec("float8_e4m3fn", symmetric=False)
    spec = QuantSpec("float8_e4m3fn", granularity=PerToken())
    assert spec.dynamic and spec.axis is None and str(spec) == "float8_e4m3fn/sym/per-token/minmax"
    with pytest.raises(ValueError, match="activations must be one of"):
        fp8_qconfig(activations="per-channel")


def test_per_token_scales_are_each_rows_amax():
    x = torch.randn(2, 3, 8)
    x[1, 2] *= 100
    scale, zero_point = torch.ops.qc.choose_qparams_per_token(x, -448, 448, True)
    assert scale.shape == (2, 3, 1) and not zero_point.any()
    torch.testing.assert_close(scale, x.abs().amax(-1, keepdim=True) / 448)
    q = torch.ops.qc.quantize(x, scale, zero_point, None, -448, 448, torch.float8_e4m3fn)
    # every row's largest magnitude lands on ±448 exactly
    assert torch.equal(q.float().abs().amax(-1), torch.full((2, 3), 448.0))
    with pytest.raises(ValueError, match=r"per-token scales are shaped \[2, 3, 1\]"):
        torch.ops.qc.quantize(x, scale[:, :2], zero_point[:, :2], None, -448, 448, torch.float8_e4m3fn)


def test_cast_fp8_graph_diff_static():
    x = torch.randn(4, 16)
    before = calibrated(TinyBlock(), x, qconfig=fp8_qconfig(), target="cpu-fp8")
    out = assert_pass_contract(CastFp8(), before)
    check_graph(out, """
    CHECK: %1 = constant x_scale : f32[]
    CHECK: qc.quantize.default(%0, %1, %2, None, -448, 448, torch.float8_e4m3fn) : f8e4m3fn[s0,16]
    CHECK: qc.dequantize.default({{%[0-9]+}}, %1, %2, None, torch.float32) : f32[s0,16]
    CHECK: constant up_weight_q : f8e4m3fn[32,16]
    CHECK: qc.dequantize.default({{.*}}, 0, torch.float32) : f32[32,16]
    CHECK-NOT: bias_q
    CHECK: aten.linear.default
    """)
    assert_outputs_close(before, out, [x], rtol=0.1)
    # convert has nothing left to do, and leaves the graph as it is
    assert not Convert()(out).modified


def test_cast_fp8_per_token_is_dynamic_whatever_the_calibration():
    x = torch.randn(4, 16)
    before = calibrated(TinyBlock(), x, qconfig=fp8_qconfig(activations="per-token", margin=1), target="cpu-fp8")
    assert not any(n.op == "call_module" for n in before.graph.nodes)  # nothing observed
    out = assert_pass_contract(CastFp8(), before)
    check_graph(out, """
    CHECK: qc.choose_qparams_per_token.default(%0, -224, 224, True)
    CHECK: qc.quantize.default(%0, {{%[0-9]+}}, {{%[0-9]+}}, None, -448, 448, torch.float8_e4m3fn)
    """)
    assert_outputs_close(before, out, [torch.randn(3, 16)], rtol=0.1)
    # a per-token dequantize does not move through a view: its scales belong to the rows
    sunk = EliminateDequant()(out).graph_module
    assert_outputs_close(before, sunk, [torch.randn(5, 16)], rtol=0.1)


def test_convert_refuses_a_float8_observer_naming_it():
    before = calibrated(TinyBlock(), torch.randn(4, 16), qconfig=fp8_qconfig(), target="cpu-fp8")
    with pytest.raises(qcompile.NodeError, match="observer 'observer_0' is planned as float8_e4m3fn: float8 edges "
                                                 "are converted by cast-fp8"):
        Convert()(before)


def test_fp8_spec_on_a_target_without_fp8_is_an_error_listing_its_formats():
    with pytest.raises(qcompile.NodeError, match=r"asks for float8_e4m3fn, which target cpu-int8 has no kernels "
                                                 r"for: it runs .*int8, uint8. Targets with float8: cpu-fp8, onnx-qdq"):
        annotated(TinyBlock(), torch.randn(4, 16), qconfig=fp8_qconfig(), target="cpu-int8")


def test_weight_only_plan_has_no_activation_edge_and_float_bias():
    gm = annotated(TinyBlock(), torch.randn(4, 16), qconfig=fp8_qconfig(activations=None), target="cpu-fp8")
    plans = [qcompile.ir.meta.get_qspec(n) for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert [[edge.role for _, edge in plan.inputs] for plan in plans] == [["weight"], ["weight"]]
    assert all(isinstance(edge.spec.granularity, PerChannel) for plan in plans for _, edge in plan.inputs)
    assert isinstance(fp8_qconfig().by_op["linear"].activation.granularity, PerTensor)


def test_saturation_and_e5m2_are_reported():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    clip = QuantSpec("float8_e4m3fn", observer="percentile", percentile=99.0)
    config = qcompile.QConfig(by_op={"linear": qcompile.OpQuantConfig(clip, QuantSpec("float8_e4m3fn",
                                                                                       granularity=PerChannel(0)))})
    data = [(torch.randn(8, 16),) for _ in range(3)]
    # onnx-qdq keeps every planned format (cpu-fp8 would run these well-behaved linears in INT8)
    report = qcompile.compile(model, target="onnx-qdq", qconfig=config, calibration_data=data,
                              outlier_smoothing=None).report
    saturated = [note for note in report.notes if note.startswith("float8 saturation")]
    assert saturated and "of 'input_1'" in saturated[0]
    with pytest.warns(UserWarning, match=r"2 nodes read float8_e5m2 activations .* SQNR down to"):
        qcompile.compile(model, target="onnx-qdq", qconfig=fp8_qconfig("float8_e5m2"), calibration_data=data)
