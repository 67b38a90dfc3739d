"""Calibration data that would ruin the model is reported with node and batch, and handled."""

import math
import warnings

import pytest
import torch

import qcompile
from qcompile.calibration import OUTLIER_RATIO
from tests.models import TinyBlock


def batches(count=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 16, generator=g),) for _ in range(count)]


def cosine(qm, model, x):
    with torch.no_grad():
        return float(torch.nn.functional.cosine_similarity(qm(x).flatten(), model(x).flatten(), dim=0))


def compile_quietly(model, data, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qm = qcompile.compile(model, calibration_data=data, progress=False, outlier_smoothing=None, **options)
    return qm, [str(w.message) for w in caught]


@pytest.mark.parametrize("value", [1e4, 1e30])
def test_one_wild_value_in_one_batch_is_named_and_left_out(value):
    model, data = TinyBlock(), batches()
    data[2][0][3, 5] = value
    qm, messages = compile_quietly(model, data)
    assert any("batch 3" in m and "left out of calibration" in m for m in messages)
    assert any("batch 3" in f for f in qm.report.calibration_findings)
    assert qm.report.calibration_batches == 5
    clean, _ = compile_quietly(model, data[:2] + data[3:])
    x = batches(seed=1)[0][0]
    assert torch.equal(qm(x), clean(x))  # the same model as calibrating without that batch
    assert cosine(qm, model, x) > 0.995


def test_all_zero_calibration_is_reported_as_a_constant_range():
    model = TinyBlock()
    data = [(torch.zeros(8, 16),) for _ in range(3)]
    qm, messages = compile_quietly(model, data)
    assert any("constant 0" in m for m in messages)
    assert any("constant 0" in f for f in qm.report.calibration_findings)


def test_a_range_narrower_than_the_smallest_scale_is_reported():
    model = TinyBlock()
    data = [(torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) * 1e-7,) for i in range(3)]
    _, messages = compile_quietly(model, data)
    assert any("below what the smallest scale" in m for m in messages)


def test_ordinary_spread_between_batches_is_not_an_outlier():
    model = TinyBlock()
    data = [(torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) * (1 + i),) for i in range(6)]
    qm, _ = compile_quietly(model, data)  # 6x spread, under OUTLIER_RATIO
    assert 6 < OUTLIER_RATIO and qm.report.calibration_findings == [] and qm.report.calibration_batches == 6


def test_when_half_the_batches_are_wide_they_are_kept_and_reported():
    model = TinyBlock()
    data = [(torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) * (100 if i % 2 else 1),) for i in range(4)]
    qm, _ = compile_quietly(model, data)
    assert qm.report.calibration_batches == 4
    assert any("kept: half the batches" in f for f in qm.report.calibration_findings)


def test_sqnr_is_summed_over_calibration_batches_not_the_first():
    model = TinyBlock()
    data = batches(count=4)
    data[3] = (data[3][0] * 4,)  # a wider (not outlying) batch, where int8 does worse
    qm, _ = compile_quietly(model, data)
    with torch.no_grad():
        pairs = [(model(x), qm.qdq_graph_module(x)) for (x,) in data]
    signal = sum(float(y.double().pow(2).sum()) for y, _ in pairs)
    noise = sum(float((y.double() - y_hat.double()).pow(2).sum()) for y, y_hat in pairs)
    assert qm.report.sqnr_batches == 4
    assert qm.report.output_sqnr_db[0] == pytest.approx(10 * math.log10(signal / noise), abs=1e-6)
    first = pairs[0]
    first_only = 10 * math.log10(float(first[0].double().pow(2).sum()) /
                                 float((first[0].double() - first[1].double()).pow(2).sum()))
    assert abs(qm.report.output_sqnr_db[0] - first_only) > 0.1


def test_a_calibration_batch_on_another_device_is_named():
    model = TinyBlock()
    data = batches(count=2)
    data[1] = (torch.randn(8, 16, device="meta"),)
    with pytest.raises(qcompile.CalibrationError, match="calibration batch 2: input 0 is on meta"):
        qcompile.compile(model, calibration_data=data, progress=False, outlier_smoothing=None)
