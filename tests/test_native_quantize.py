"""qc.quantize's native per-tensor path: the same integers as the formula, on every instruction set."""

import pytest
import torch

from qcompile import native

ISAS = native.available_isas()


def formula(x, scale, zero_point, qmin, qmax, dtype):
    """clamp(round(x / S) + Z, qmin, qmax), round half to even, in ATen ops."""
    return torch.clamp(torch.round(x.float() / scale) + zero_point, qmin, qmax).to(dtype)


def values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 97, generator=g) * 4
    # ties at every parity, both signs, saturation both ways
    x[0, :8] = torch.tensor([0.01, 0.03, 0.05, -0.01, -0.03, 1e9, -1e9, 0.0])
    return x


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("zero_point, qmin, qmax, dtype", [
    (128, 0, 255, torch.uint8), (0, -128, 127, torch.int8), (3, -8, 7, torch.int8), (0, -127, 127, torch.int8)])
def test_native_quantize_equals_the_formula(isa, zero_point, qmin, qmax, dtype):
    x = values()
    for case in (x, x[:, 1::3], x.bfloat16(), x[:1, :13]):
        with native.running_on(isa):
            q = torch.ops.qc.quantize(case, torch.tensor([0.02]), torch.tensor([zero_point], dtype=torch.int32),
                                      None, qmin, qmax, dtype)
        assert q.dtype == dtype and q.shape == case.shape
        assert torch.equal(q, formula(case, 0.02, zero_point, qmin, qmax, dtype)), isa


def test_a_range_the_storage_cannot_hold_is_refused():
    with pytest.raises(RuntimeError, match=r"range \[0, 300\] does not fit"):
        native.quantize_per_tensor(torch.randn(4), 0.1, 0, 0, 300, torch.uint8)


def test_a_dense_layout_is_kept_and_a_strided_view_is_read_right():
    """A convolution's channels-last output is quantized in place of its layout, for the next one."""
    x = torch.randn(2, 16, 5, 7).contiguous(memory_format=torch.channels_last)
    for case in (x, x[:, :, 1:4], x.permute(0, 1, 3, 2)):
        q = torch.ops.qc.quantize(case, torch.tensor([0.02]), torch.tensor([3], dtype=torch.int32), None, 0, 255,
                                  torch.uint8)
        assert torch.equal(q, formula(case, 0.02, 3, 0, 255, torch.uint8))
    assert torch.ops.qc.quantize(x, torch.tensor([0.02]), torch.tensor([3], dtype=torch.int32), None, 0, 255,
                                 torch.uint8).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype, zero_point", [(torch.uint8, 128), (torch.uint8, 0), (torch.int8, 0), (torch.int8, -3)])
@pytest.mark.parametrize("scale", [0.02, 1 / 3, 7.3e-5])
def test_native_dequantize_equals_the_formula(isa, dtype, zero_point, scale):
    """Every code of the storage, in four layouts: (q − Z)·S as ATen's cast, subtraction and
    product compute it in float32, bit for bit."""
    info = torch.iinfo(dtype)
    codes = torch.arange(info.min, info.max + 1, dtype=torch.int32).to(dtype)
    q = codes.repeat(3 * 5 * 7).reshape(3, 5, 7, 2 ** 8).permute(0, 3, 1, 2)  # dense, not contiguous
    cases = (q, q.contiguous(), q.contiguous(memory_format=torch.channels_last), q[:, ::3], codes[:13])
    for case in cases:
        with native.running_on(isa):
            r = torch.ops.qc.dequantize(case, torch.tensor(scale), torch.tensor(zero_point, dtype=torch.int32), None,
                                        torch.float32)
        assert r.dtype == torch.float32 and r.shape == case.shape
        assert torch.equal(r, (case.to(torch.float32) - zero_point) * scale), isa
