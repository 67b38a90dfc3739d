"""fuse-token-quantize (qcompile/targets/cpu_int8/fuse_token_quantize.py) and the native qc.quantize_per_token."""

import pytest
import torch
from qcompile.targets.cpu_int8 import FuseTokenQuantize
from qcompile.targets.cpu_int8.fuse_token_quantize import reference_quantize_per_token

import qcompile
from qcompile.testing import assert_graph_diff, assert_pass_contract


class TokenQuantized(torch.nn.Module):
    """A dynamic per-token quantize as convert writes it, its scale also read elsewhere; and one
    whose quantize clamps to another range than its parameters were chosen for (not fused)."""

    def forward(self, x):
        scale, zero_point = torch.ops.qc.choose_qparams_per_token(x, 0, 255, False)
        q = torch.ops.qc.quantize(x, scale, zero_point, None, 0, 255, torch.uint8)
        other_scale, other_zero_point = torch.ops.qc.choose_qparams_per_token(x, -127, 127, True)
        narrower = torch.ops.qc.quantize(x, other_scale, other_zero_point, None, -100, 100, torch.int8)
        return q, scale * 2, zero_point, narrower


def test_the_parameters_and_the_quantize_become_one_call_with_the_same_bits():
    x = torch.randn(2, 5, 16)
    before = qcompile.capture(TokenQuantized(), (x,))
    after = assert_pass_contract(FuseTokenQuantize(), before, [x])
    assert FuseTokenQuantize()(before).stats == {"fused": 1}
    assert_graph_diff(before, after, removed=[
        "%choose_qparams_per_token = qc.choose_qparams_per_token.default(%x, 0, 255, False)",
        "%getitem = operator.getitem(%choose_qparams_per_token, 0)",
        "%getitem_1 = operator.getitem(%choose_qparams_per_token, 1)",
        "%quantize = qc.quantize.default(%x, %getitem, %getitem_1, None, 0, 255, torch.uint8)",
        "%mul = aten.mul.Tensor(%getitem, 2)", "return (%quantize, %mul, %getitem_1, %quantize_1)",
    ], added=[
        "%quantize_per_token_default = qc.quantize_per_token.default(%x, 0, 255, False, torch.uint8) : "
        "(u8[s0,s1,s2], f32[s0,s1,1], i32[s0,s1,1])",
        "%getitem_4 = operator.getitem(%quantize_per_token_default, 0) : u8[s0,s1,s2]",
        "%getitem_5 = operator.getitem(%quantize_per_token_default, 1) : f32[s0,s1,1]",
        "%getitem_6 = operator.getitem(%quantize_per_token_default, 2) : i32[s0,s1,1]",
        "%mul = aten.mul.Tensor(%getitem_5, 2)", "return (%getitem_4, %mul, %getitem_6, %quantize_1)",
    ], exact=False)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(before(x), after(x), strict=True))


@pytest.mark.parametrize("shape", [(1, 1, 896), (3, 7, 40), (4100, 33)])
@pytest.mark.parametrize("qmin, qmax, symmetric, dtype", [(0, 255, False, torch.uint8), (-127, 127, True, torch.int8),
                                                           (-128, 127, False, torch.int8)])
def test_native_quantize_per_token_is_the_pair_it_replaces_bit_for_bit(shape, qmin, qmax, symmetric, dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*shape, generator=g) * torch.rand(*shape[:-1], 1, generator=g) * 10
    x.view(-1, shape[-1])[0] = 0.0  # a row of zeros: the smallest scale
    expected = reference_quantize_per_token(x, qmin, qmax, symmetric, dtype)
    actual = torch.ops.qc.quantize_per_token(x, qmin, qmax, symmetric, dtype)
    assert all(torch.equal(a, e) for a, e in zip(actual, expected, strict=True))
    assert actual[0].dtype == dtype and actual[1].shape == (*shape[:-1], 1)


def test_native_quantize_per_token_gives_a_row_with_a_nan_a_nan_scale_as_the_pair_does():
    x = torch.randn(3, 8)
    x[1, 2] = float("nan")
    q, scale, zero_point = torch.ops.qc.quantize_per_token(x, 0, 255, False, torch.uint8)
    expected = reference_quantize_per_token(x, 0, 255, False, torch.uint8)
    assert torch.isnan(scale[1]).all() and torch.equal(q, expected[0]) and torch.equal(zero_point, expected[2])


def test_native_quantize_per_token_refuses_what_it_does_not_write():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="quantize_per_token writes uint8 or int8"):
        torch.ops.qc.quantize_per_token(x, 0, 255, False, torch.int32)
    with pytest.raises(ValueError, match=r"quantize_per_token: range \[0, 300\] does not fit"):
        torch.ops.qc.quantize_per_token(x, 0, 300, False, torch.uint8)
    with pytest.raises(ValueError, match="quantize_per_token takes a float tensor"):
        torch.ops.qc.quantize_per_token(torch.ones(2, 8, dtype=torch.int32), 0, 255, False, torch.uint8)
