"""Quantization math: r = S·(q − Z), q = clamp(round(r / S) + Z, qmin, qmax), and the qparams."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qcompile.ops  # noqa: F401  (registers torch.ops.qc)
from qcompile.ops import quantize_with
from qcompile.spec import PerChannel, PerGroup, QuantSpec, compute_qparams

qc = torch.ops.qc


def test_quantize_hand_worked_uint8():
    # S = 0.5, Z = 3: -1 -> -2 + 3 = 1; 0.26 -> round(0.52) + 3 = 4; 2 -> 4 + 3 = 7; 200 -> clamp 255
    x = torch.tensor([-1.0, 0.0, 0.26, 2.0, 200.0])
    q = qc.quantize(x, torch.tensor(0.5), torch.tensor(3, dtype=torch.int32), None, 0, 255, torch.uint8)
    assert q.tolist() == [1, 3, 4, 7, 255] and q.dtype == torch.uint8
    r = qc.dequantize(q, torch.tensor(0.5), torch.tensor(3, dtype=torch.int32), None, torch.float32)
    assert r.tolist() == [-1.0, 0.0, 0.5, 2.0, 126.0]


def test_round_half_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5])
    q = qc.quantize(x, torch.tensor(1.0), torch.tensor(0, dtype=torch.int32), None, -128, 127, torch.int8)
    assert q.tolist() == [0, 2, 2, 0, -2]


def test_per_channel_axis():
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    scale = torch.tensor([1.0, 0.5])
    q = qc.quantize(x, scale, torch.zeros(2, dtype=torch.int32), 0, -128, 127, torch.int8)
    assert q.tolist() == [[1, 2], [2, 4]]
    q1 = qc.quantize(x, scale, torch.zeros(2, dtype=torch.int32), 1, -128, 127, torch.int8)
    assert q1.tolist() == [[1, 4], [1, 4]]
    with pytest.raises(ValueError, match="axis 0 has 2 channels but 3 parameters"):
        qc.quantize(x, torch.ones(3), torch.zeros(3, dtype=torch.int32), 0, -128, 127, torch.int8)


def test_qparams_hand_worked():
    # int8 symmetric over [-1, 2]: S = 2 / 127, Z = 0
    s, z = compute_qparams(torch.tensor(-1.0), torch.tensor(2.0), QuantSpec("int8"))
    assert s.item() == pytest.approx(2 / 127) and z.item() == 0
    # uint8 affine over [-1, 2]: S = 3 / 255, Z = 0 - round(-1 / S) = 85
    s, z = compute_qparams(torch.tensor(-1.0), torch.tensor(2.0), QuantSpec("uint8", symmetric=False))
    assert s.item() == pytest.approx(3 / 255) and z.item() == 85
    # uint8 symmetric: Z = 128; int4 symmetric over [-7, 7]: S = 1
    assert compute_qparams(torch.tensor(-1.0), torch.tensor(1.0), QuantSpec("uint8"))[1].item() == 128
    assert compute_qparams(torch.tensor(-7.0), torch.tensor(7.0), QuantSpec("int4"))[0].item() == 1.0
    # a range that excludes 0 is widened to include it: [2, 4] affine uint8 -> [0, 4], Z = 0
    s, z = compute_qparams(torch.tensor(2.0), torch.tensor(4.0), QuantSpec("uint8", symmetric=False))
    assert s.item() == pytest.approx(4 / 255) and z.item() == 0


def test_zero_range_gets_a_valid_scale():
    s, z = compute_qparams(torch.tensor(0.0), torch.tensor(0.0), QuantSpec("uint8", symmetric=False))
    assert s.item() > 0 and torch.isfinite(s)
    q = qc.quantize(torch.zeros(4), s, z, None, 0, 255, torch.uint8)
    assert qc.dequantize(q, s, z, None, torch.float32).tolist() == [0.0] * 4


def test_nan_range_is_refused():
    with pytest.raises(ValueError, match="NaN or infinite"):
        compute_qparams(torch.tensor(float("nan")), torch.tensor(1.0), QuantSpec())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dtype": "int9"}, "dtype 'int9'"),
        ({"observer": "magic"}, "observer 'magic'"),
        ({"percentile": 30.0}, "percentile"),
        ({"dtype": "float8_e4m3fn", "symmetric": False}, "scale-only"),
        ({"granularity": "per-tensor"}, "granularity"),
    ],
)
def test_spec_validation(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        QuantSpec(**kwargs)


def test_spec_text_and_ranges():
    spec = QuantSpec("int4", granularity=PerGroup(1, 32))
    assert str(spec) == "int4/sym/per-group(1,32)/minmax"
    assert (spec.qmin, spec.qmax, spec.storage_dtype) == (-8, 7, torch.int8)
    assert QuantSpec(granularity=PerChannel(0)).axis == 0


finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(finite, min_size=1, max_size=64),
    dtype=st.sampled_from(["int8", "uint8", "int4"]),
    symmetric=st.booleans(),
)
def test_round_trip_error_is_at_most_half_a_step(values, dtype, symmetric):
    x = torch.tensor(values, dtype=torch.float32)
    spec = QuantSpec(dtype, symmetric=symmetric)
    scale, zero_point = compute_qparams(x.min(), x.max(), spec)
    q = quantize_with(x, scale, zero_point, spec)
    assert q.dtype == spec.storage_dtype
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    r = qc.dequantize(q, scale, zero_point, None, torch.float32)
    # Half a step for rounding, plus float32 slack relative to the largest magnitude.
    slack = 1e-5 * float(x.abs().max()) + 1e-6
    assert float((r - x).abs().max()) <= float(scale) / 2 + slack


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-2000, 2000), min_size=1, max_size=64), st.integers(0, 255),
       st.sampled_from([0.1, 0.02, 1 / 3, 0.7]))
def test_quantize_matches_onnx_quantize_linear_on_ties(halves, zero_point, scale):
    """Values at and beside exact .5 ties: qc.quantize gives ONNX's integers (round, then add Z)."""
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    x = (torch.tensor(halves, dtype=torch.float32) / 2 + 0.25 * (torch.arange(len(halves)) % 3 - 1)) * scale
    s, z = torch.tensor(scale, dtype=torch.float32), torch.tensor(zero_point, dtype=torch.int32)
    ours = torch.ops.qc.quantize(x, s, z, None, 0, 255, torch.uint8)
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
                              [helper.make_tensor("s", TensorProto.FLOAT, [], [scale]),
                               helper.make_tensor("z", TensorProto.UINT8, [], [zero_point])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    (theirs,) = ReferenceEvaluator(model).run(None, {"x": x.numpy()})
    assert ours.numpy().tolist() == theirs.tolist()
