"""qc.choose_qparams_per_token, native: the same bits as integer_qparams of each row's range."""

import pytest
import torch

from qcompile import native
from qcompile.ops import choose_qparams_per_token
from qcompile.spec import integer_qparams


def formula(x, qmin, qmax, symmetric):
    """integer_qparams over each row's range widened to contain 0, in ATen ops."""
    lo = torch.clamp(x.amin(dim=-1, keepdim=True).float(), max=0.0)
    hi = torch.clamp(x.amax(dim=-1, keepdim=True).float(), min=0.0)
    return integer_qparams(lo, hi, qmin, qmax, symmetric)


def rows(depth=97):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 50, depth, generator=g) * torch.logspace(-6, 6, 50).view(1, 50, 1)
    x[0, 0] = 0.0                    # all zero: the smallest scale
    x[0, 1] = x[0, 1].abs() + 1      # all positive: lo = 0
    x[0, 2] = -x[0, 2].abs() - 1     # all negative: hi = 0
    x[0, 3, 5] = -0.0
    return x


@pytest.mark.parametrize("isa", native.available_isas())
@pytest.mark.parametrize("depth", [8, 32, 97])  # the AVX-512 path reads 32 lanes a step: less, exactly, and a tail
@pytest.mark.parametrize(("qmin", "qmax", "symmetric"), [(0, 255, False), (-128, 127, True), (-128, 127, False),
                                                          (-224, 224, True), (-8, 7, False)])
def test_the_parameters_are_the_formulas_bits(qmin, qmax, symmetric, depth, isa):
    x = rows(depth)
    with native.running_on(isa):
        scale, zero_point = choose_qparams_per_token(x, qmin, qmax, symmetric)
    expected_scale, expected_zero_point = formula(x, qmin, qmax, symmetric)
    assert scale.shape == (4, 50, 1) and scale.dtype == torch.float32 and zero_point.dtype == torch.int32
    torch.testing.assert_close(scale, expected_scale, rtol=0, atol=0)
    torch.testing.assert_close(zero_point, expected_zero_point, rtol=0, atol=0)


@pytest.mark.parametrize("isa", native.available_isas())
def test_bf16_rows_and_a_nan_row(isa):
    x = rows()[1].bfloat16()
    x[3, 7] = float("nan")
    with native.running_on(isa):
        scale, zero_point = choose_qparams_per_token(x, 0, 255, False)
    expected_scale, expected_zero_point = formula(x, 0, 255, False)
    keep = torch.arange(50) != 3
    torch.testing.assert_close(scale[keep], expected_scale[keep], rtol=0, atol=0)
    torch.testing.assert_close(zero_point[keep], expected_zero_point[keep], rtol=0, atol=0)
    assert torch.isnan(scale[3]).all() and int(zero_point[3]) == 0


def test_bad_input_is_refused_by_name():
    with pytest.raises(ValueError, match="choose_qparams_per_token takes a float tensor"):
        choose_qparams_per_token(torch.ones(3, 4, dtype=torch.int32), 0, 255, False)
    with pytest.raises(ValueError, match="qmin 255 is not below qmax 0"):
        choose_qparams_per_token(torch.ones(3, 4), 255, 0, False)
