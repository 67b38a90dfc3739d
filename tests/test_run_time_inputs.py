"""A compiled model refuses inputs it cannot answer for, naming the input, and runs float16 models."""

import pytest
import torch

import qcompile
from qcompile.input_check import InputError
from tests.models import TinyBlock, TinyConvNet


def calibration(shape, dtype=torch.float32, count=3):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(shape, generator=g).to(dtype),) for _ in range(count)]


@pytest.fixture(scope="module")
def compiled():
    return qcompile.compile(TinyBlock(), calibration_data=calibration((4, 16)), progress=False)


@pytest.mark.parametrize("value, kind", [(float("nan"), "NaN"), (float("inf"), "an infinite value"),
                                         (float("-inf"), "an infinite value")])
def test_a_non_finite_input_is_refused_instead_of_clamped_to_a_plausible_answer(compiled, value, kind):
    x = torch.randn(3, 16)
    x[1, 2] = value
    with pytest.raises(InputError, match=f"input 'x' contains {kind}"):
        compiled(x)


def test_a_wrong_dtype_or_feature_size_names_the_input(compiled):
    with pytest.raises(InputError, match=r"input 'x' has dtype torch.float64; the model was compiled for torch.float32"):
        compiled(torch.randn(3, 16, dtype=torch.float64))
    with pytest.raises(InputError, match=r"input 'x' has shape \[3, 15\]; the model was compiled for \[any, 16\]"):
        compiled(torch.randn(3, 15))
    with pytest.raises(InputError, match=r"compiled for \[any, 16\]"):
        compiled(torch.randn(3, 16, 1))
    with pytest.raises(InputError, match=r"the compiled model takes 1 inputs \(x\), got 2"):
        compiled(torch.randn(3, 16), torch.randn(3, 16))


def test_the_batch_dimension_takes_any_size(compiled):
    for batch in (1, 7, 33):
        assert compiled(torch.randn(batch, 16)).shape == (batch, 16)


@pytest.mark.parametrize("model, shape", [(TinyBlock(), (4, 16)), (TinyConvNet().eval(), (4, 1, 8, 8))])
def test_a_float16_model_compiles_and_answers_in_float16(model, shape):
    model = model.half()
    data = calibration(shape, torch.float16)
    qm = qcompile.compile(model, calibration_data=data, progress=False)
    x = data[0][0]
    out = qm(x)
    assert out.dtype == torch.float16
    with torch.no_grad():
        torch.testing.assert_close(out.float(), model(x).float(), rtol=0.05, atol=0.05)
