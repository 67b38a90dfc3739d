"""FakeQuantize: the forward is qc.quantize -> qc.dequantize bit for bit (integer and float8); the backward
is LSQ/LSQ+.
DynamicFakeQuantize: the per-token run-time Q/DQ bit for bit, straight through."""

import dataclasses
import math

import pytest
import torch

from qcompile.errors import QCompileError
from qcompile.fake_quant import DynamicFakeQuantize, FakeQuantize, fake_quantize, fake_quantize_bias, weight_qparams
from qcompile.ops import quantize_with
from qcompile.spec import PerChannel, PerGroup, PerToken, QuantSpec


def learnable(spec):
    return dataclasses.replace(spec, learnable_scale=True)


def _reference(x, scale, zero_point, spec):
    q = quantize_with(x, scale, zero_point.to(torch.int32), spec)
    return torch.ops.qc.dequantize(q, scale, zero_point.to(torch.int32), spec.axis, x.dtype)


@pytest.mark.parametrize("spec, scale, zero_point", [
    (QuantSpec("uint8", symmetric=False), torch.tensor([0.037]), torch.tensor([121.0])),
    (QuantSpec("int8", granularity=PerChannel(0)), torch.tensor([0.01, 0.2, 0.05]), torch.zeros(3)),
    (QuantSpec("int4", granularity=PerChannel(0)), torch.tensor([0.3, 0.11, 0.07]), torch.zeros(3)),
    (QuantSpec("int2"), torch.tensor([0.5]), torch.zeros(1)),
])
def test_forward_equals_quantize_dequantize(spec, scale, zero_point):
    torch.manual_seed(0)
    x = torch.randn(3, 50) * 3
    x[0, :4] = torch.tensor([0.5, 1.5, -2.5, 2.5]) * scale[0]  # ties: both round half to even
    assert torch.equal(fake_quantize(x, scale, zero_point, spec), _reference(x, scale, zero_point, spec))


def test_bit_widths_2_to_8_have_their_ranges():
    for bits in range(2, 9):
        spec = QuantSpec(f"int{bits}")
        assert (spec.qmin, spec.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        out = fake_quantize(torch.linspace(-1000, 1000, 11), torch.tensor([1.0]), torch.zeros(1), spec)
        assert out.max() == spec.qmax and out.min() == spec.qmin


def test_per_group_scales_apply_to_consecutive_input_channels():
    spec = QuantSpec("int4", granularity=PerGroup(1, 2))
    w = torch.tensor([[0.1, 0.7, 3.0, -2.0]])
    scale = torch.tensor([[0.1, 1.0]])
    out = fake_quantize(w, scale, torch.zeros(1, 2), spec)
    # group 0 (S = 0.1): 0.1 -> 1 step, 0.7 -> 7 steps; group 1 (S = 1): 3 -> 3, -2 -> -2
    torch.testing.assert_close(out, torch.tensor([[0.1, 0.7, 3.0, -2.0]]))
    out = fake_quantize(torch.tensor([[1.0, -1.0, 9.0, 0.4]]), scale, torch.zeros(1, 2), spec)
    torch.testing.assert_close(out, torch.tensor([[0.7, -0.8, 7.0, 0.0]]))  # clamped to [-8, 7] steps


def test_lsq_gradients_by_hand():
    """S = 0.5, Z = 0, int4 [-8, 7]: x/S = -6, 0.52, 1.48, 200, -200 rounds to -6, 1, 1, 7 (clamped), -8."""
    spec = QuantSpec("int4")
    x = torch.tensor([-3.0, 0.26, 0.74, 100.0, -100.0], requires_grad=True)
    scale = torch.tensor([0.5], requires_grad=True)
    out = fake_quantize(x, scale, torch.zeros(1), spec, grad_scale=1.0)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(x.grad, torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0]))
    # inside: round(v) - v = 0, 0.48, -0.48; above: qmax - Z = 7; below: qmin - Z = -8
    torch.testing.assert_close(scale.grad, torch.tensor([0.0 + 0.48 - 0.48 + 7 - 8]))


def test_lsq_plus_zero_point_gradient_is_minus_scale_where_clamped():
    spec = QuantSpec("uint8", symmetric=False, learnable_zero_point=True)
    x = torch.tensor([-10.0, 0.3, 100.0])
    scale = torch.tensor([0.1])
    zero_point = torch.tensor([20.0], requires_grad=True)
    out = fake_quantize(x, scale, zero_point, spec, grad_scale=1.0)
    out.backward(torch.ones_like(out))
    # -10/0.1 + 20 = -80 < 0 (clamped), 3 + 20 inside, 1000 + 20 > 255 (clamped)
    torch.testing.assert_close(zero_point.grad, torch.tensor([-0.1 * 2]))


def test_scale_gradient_matches_finite_differences_where_the_value_is_clamped():
    """Clamped elements give (q_bound − Z) · S exactly, linear in S: the finite difference is exact."""
    spec = QuantSpec("int8")
    x = torch.tensor([50.0, -70.0, 33.0], dtype=torch.float64)
    s = 0.1
    fake = FakeQuantize(learnable(spec), torch.tensor([s]), torch.zeros(1))
    out = fake(x.float()).sum()
    out.backward()
    h = 1e-3
    plus = fake_quantize(x.float(), torch.tensor([s + h]), torch.zeros(1), spec).double().sum()
    minus = fake_quantize(x.float(), torch.tensor([s - h]), torch.zeros(1), spec).double().sum()
    finite_difference = float(plus - minus) / (2 * h)
    grad_scale = 1 / math.sqrt(3 * 127)
    # the parameter is log S: ∂L/∂log S = S · ∂L/∂S
    assert fake.log_scale.grad.item() == pytest.approx(s * finite_difference * grad_scale, rel=1e-3)


def test_mse_weight_init_clips_the_outlier_weight_for_a_lower_error():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    w[:, 0] = 12.0  # one large weight per channel
    minmax = QuantSpec("int4", granularity=PerChannel(0))
    mse = QuantSpec("int4", granularity=PerChannel(0), observer="mse")
    errors = []
    for spec in (minmax, mse):
        scale, zero_point = weight_qparams(w, spec)
        errors.append(float((fake_quantize(w, scale, zero_point.float(), spec) - w).square().sum()))
    assert errors[1] < errors[0]  # ratio 1 (min-max) is a candidate, so MSE is never worse


def test_a_diverged_scale_is_an_error_naming_the_value():
    fake = FakeQuantize(learnable(QuantSpec("int8")), torch.tensor([0.1]), torch.zeros(1),
                        name="relu in module 'block.act'")
    with torch.no_grad():
        fake.log_scale.fill_(float("nan"))
    with pytest.raises(QCompileError, match="relu in module 'block.act'.*diverged"):
        fake(torch.randn(4))


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_a_float8_forward_is_the_saturating_cast_bit_for_bit(dtype):
    spec = QuantSpec(dtype, granularity=PerChannel(0))
    scale = torch.tensor([0.013, 0.4])
    x = torch.randn(2, 300) * 40
    largest = torch.finfo(spec.storage_dtype).max
    x[:, :3] = torch.tensor([2.0, -3.0, 1e-9]) * largest * scale[:, None]  # saturating, both signs; subnormal
    out = fake_quantize(x, scale, torch.zeros(2), spec)
    assert torch.equal(out, _reference(x, scale, torch.zeros(2), spec))
    assert torch.equal(out[:, :2], torch.stack([largest * scale, -largest * scale], 1))


def test_float8_gradients_by_hand():
    """S = 0.5, E4M3 (M = 448): v = x/S = 3.1, -0.3, 1000, -1000 cast to 3.0, -0.3125 (steps of
    1/8 from 2 to 4, of 1/64 from 0.25 to 0.5), and 448, -448 saturated."""
    spec = QuantSpec("float8_e4m3fn")
    x = torch.tensor([1.55, -0.15, 500.0, -500.0], requires_grad=True)
    scale = torch.tensor([0.5], requires_grad=True)
    out = fake_quantize(x, scale, torch.zeros(1), spec, grad_scale=1.0)
    torch.testing.assert_close(out.detach(), torch.tensor([1.5, -0.15625, 224.0, -224.0]))
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(x.grad, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    # inside: q - v = 3.0 - 3.1 and -0.3125 + 0.3; above: M; below: -M
    torch.testing.assert_close(scale.grad, torch.tensor([(3.0 - 3.1) + (-0.3125 + 0.3) + 448 - 448]), rtol=0,
                               atol=1e-4)  # v in float32: 1.55 / 0.5 = 3.1000001


def test_a_float8_scale_gradient_matches_finite_differences_where_the_value_saturates():
    spec = QuantSpec("float8_e4m3fn")
    x = torch.tensor([500.0, -700.0, 900.0], dtype=torch.float64)
    s = 0.5
    fake = FakeQuantize(learnable(spec), torch.tensor([s]), torch.zeros(1))
    fake(x.float()).sum().backward()
    h = 1e-3
    plus = fake_quantize(x.float(), torch.tensor([s + h]), torch.zeros(1), spec).double().sum()
    minus = fake_quantize(x.float(), torch.tensor([s - h]), torch.zeros(1), spec).double().sum()
    grad_scale = 1 / math.sqrt(3 * 448)  # LSQ's g with Q_P = M
    assert fake.log_scale.grad.item() == pytest.approx(s * float(plus - minus) / (2 * h) * grad_scale, rel=1e-3)


def test_a_learnable_zero_point_needs_an_affine_spec():
    with pytest.raises(ValueError, match="affine"):
        QuantSpec("int8", symmetric=True, learnable_zero_point=True)


def test_bias_rounding_is_the_int32_bias_the_lowering_stores():
    torch.manual_seed(0)
    bias = torch.randn(6) * 0.3
    activation_log_scale, weight_log_scale = torch.tensor([-3.1]), torch.randn(6) - 6
    scale = activation_log_scale.exp() * weight_log_scale.exp()
    spec = QuantSpec("int32", granularity=PerChannel(0))
    zero = torch.zeros(6, dtype=torch.int32)
    stored = torch.ops.qc.dequantize(quantize_with(bias, scale, zero, spec), scale, zero, 0, torch.float32)
    assert torch.equal(fake_quantize_bias(bias, activation_log_scale, weight_log_scale), stored)
    bias.requires_grad_()
    fake_quantize_bias(bias, activation_log_scale, weight_log_scale).sum().backward()
    assert torch.equal(bias.grad, torch.ones(6))  # straight through


def test_a_per_token_fake_quant_is_the_run_time_qdq_bit_for_bit_with_a_straight_through_gradient():
    """Each row quantized with its own range's parameters, as choose_qparams_per_token ->
    quantize -> dequantize compute them; with a row's own range nothing is clamped, so the
    gradient is 1 everywhere."""
    spec = QuantSpec("uint8", symmetric=False, granularity=PerToken())
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 24, generator=generator) * torch.tensor([0.01, 1.0, 40.0]).view(3, 1, 1)).requires_grad_()
    out = DynamicFakeQuantize(spec, name="x")(x)
    scale, zero_point = torch.ops.qc.choose_qparams_per_token(x.detach(), spec.qmin, spec.qmax, spec.symmetric)
    assert scale.shape == (3, 5, 1)
    expected = _reference(x.detach(), scale, zero_point, spec)
    assert torch.equal(out.detach(), expected)
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_a_per_token_fake_quant_takes_only_integer_per_token_specs():
    with pytest.raises(QCompileError, match="'x' takes an integer per-token spec"):
        DynamicFakeQuantize(QuantSpec("uint8", symmetric=False), name="x")
