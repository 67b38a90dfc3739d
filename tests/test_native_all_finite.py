"""native.all_finite, the input check's one read per input, agrees with torch.isfinite(x).all()."""

import pytest
import torch

from qcompile import native

ISAS = native.available_isas()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("size", [1, 15, 16, 17, 1000, 200_003])  # tails, one vector, several parallel tasks
def test_every_position_and_kind_of_non_finite_value_is_found(isa, size):
    g = torch.Generator().manual_seed(size)
    x = torch.randn(size, generator=g) * 1e30
    with native.running_on(isa):
        assert native.all_finite(x)
        for position in {0, size // 2, size - 1}:
            for bad in (float("nan"), float("inf"), float("-inf")):
                y = x.clone()
                y[position] = bad
                assert not native.all_finite(y), (position, bad)


def test_other_layouts_and_dtypes_follow_isfinite():
    x = torch.randn(64, 64)
    x[3, 5] = float("nan")
    for case in (x.t(), x.bfloat16(), x.half(), x.double(), x[:, 6:], x[::2]):
        assert native.all_finite(case) == bool(torch.isfinite(case).all())
    assert native.all_finite(torch.tensor([torch.finfo(torch.float32).max, -0.0, 1e-45]))
    assert native.all_finite(torch.empty(0))
    assert native.all_finite(torch.arange(5))  # integers are always finite
