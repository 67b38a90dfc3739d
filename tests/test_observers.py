"""Observers: ranges, merging, degenerate data, and the clipping searches."""

import pytest
import torch

import qcompile.ops  # noqa: F401
from qcompile.errors import CalibrationError
from qcompile.observers import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageObserver,
    make_observer,
)
from qcompile.spec import PerChannel, QuantSpec

qc = torch.ops.qc


def round_trip_mse(x, observer):
    scale, zero_point = observer.qparams()
    spec = observer.spec
    q = qc.quantize(x, scale, zero_point, spec.axis, spec.qmin, spec.qmax, spec.storage_dtype)
    return float(((qc.dequantize(q, scale, zero_point, spec.axis, torch.float32) - x) ** 2).mean())


def test_minmax_per_tensor_and_per_channel():
    x = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, 0.5]])
    per_tensor = MinMaxObserver(QuantSpec())
    per_tensor(x)
    assert [v.item() for v in per_tensor.range()] == [-4.0, 5.0]
    per_channel = MinMaxObserver(QuantSpec(granularity=PerChannel(0)))
    per_channel(x)
    lo, hi = per_channel.range()
    assert lo.tolist() == [-2.0, -4.0] and hi.tolist() == [3.0, 5.0]
    scale, _ = per_channel.qparams()
    assert scale.tolist() == pytest.approx([3 / 127, 5 / 127])


def test_moving_average_hand_worked():
    obs = MovingAverageObserver(QuantSpec(), averaging_constant=0.5)
    obs(torch.tensor([-1.0, 1.0]))
    obs(torch.tensor([-3.0, 5.0]))  # lo = -1 + 0.5(-3 + 1) = -2, hi = 1 + 0.5(5 - 1) = 3
    assert [v.item() for v in obs.range()] == [-2.0, 3.0]


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_merge_equals_observing_everything(method):
    torch.manual_seed(0)
    a, b = torch.randn(4000), torch.randn(4000) * 3
    whole, left, right = (make_observer(QuantSpec(observer=method)) for _ in range(3))
    whole(a)
    whole(b)
    left(a)
    right(b)
    left.merge(right)
    assert left.batches == 2
    for merged, direct in zip(left.qparams(), whole.qparams()):
        torch.testing.assert_close(merged.float(), direct.float(), rtol=0.02, atol=0)


def test_merge_refuses_a_different_spec():
    with pytest.raises(TypeError, match="cannot merge"):
        MinMaxObserver(QuantSpec()).merge(MinMaxObserver(QuantSpec("uint8")))


def test_constant_tensor_gives_valid_qparams():
    for method in ("minmax", "percentile", "entropy", "mse"):
        obs = make_observer(QuantSpec("uint8", symmetric=False, observer=method))
        obs(torch.zeros(16))
        scale, zero_point = obs.qparams()
        assert scale.item() > 0 and 0 <= zero_point.item() <= 255


def test_nan_names_node_and_batch():
    obs = MinMaxObserver(QuantSpec(), name="linear_3")
    obs(torch.ones(3))
    with pytest.raises(CalibrationError, match="'linear_3': batch 2 contains NaN"):
        obs(torch.tensor([1.0, float("nan")]))
    with pytest.raises(CalibrationError, match="batch 3 contains an infinite value"):
        obs(torch.tensor([float("inf")]))


def test_no_data_is_an_error():
    with pytest.raises(CalibrationError, match="saw no data"):
        MinMaxObserver(QuantSpec(), name="x").qparams()


def test_percentile_clips_rare_outliers():
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    x[:5] = 100.0
    obs = make_observer(QuantSpec(observer="percentile", percentile=99.9))
    obs(x)
    lo, hi = obs.range()
    assert 2.5 < hi.item() < 4.5 and lo.item() == -hi.item()


@pytest.mark.parametrize("method, dtype", [("entropy", "int8"), ("mse", "int8"), ("mse", "int4")])
def test_search_clips_heavy_tails_and_beats_minmax(method, dtype):
    # Laplace data: most mass near 0, a long tail that min-max spends most levels on.
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((200_000,))
    searched, minmax = make_observer(QuantSpec(dtype, observer=method)), MinMaxObserver(QuantSpec(dtype))
    searched(x)
    minmax(x)
    assert searched.range()[1] < minmax.range()[1]
    assert round_trip_mse(x, searched) < round_trip_mse(x, minmax)


def test_mse_affine_finds_a_better_range_than_minmax():
    torch.manual_seed(0)
    x = torch.distributions.Exponential(1.0).sample((100_000,))  # one-sided, long tail
    mse = HistogramObserver(QuantSpec("uint8", symmetric=False, observer="mse"))
    minmax = MinMaxObserver(QuantSpec("uint8", symmetric=False))
    mse(x)
    minmax(x)
    assert round_trip_mse(x, mse) <= round_trip_mse(x, minmax)


def test_histogram_is_per_tensor_only():
    with pytest.raises(ValueError, match="per-tensor only"):
        HistogramObserver(QuantSpec(observer="mse", granularity=PerChannel(0)))
