"""uint8 kernels (qcompile/uint8_kernels.py): max-pool on uint8 bytes equals ATen's pool, on
every instruction-set path this CPU has."""

import pytest
import torch
import torch.nn.functional as F

import qcompile  # noqa: F401  (registers torch.ops.qc.*)
from qcompile import native

ISAS = native.available_isas()


@pytest.mark.parametrize("kernel, stride, padding", [(3, 2, 1), (2, 2, 0), (3, 1, 1), (2, 1, 0)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool2d_uint8_equals_aten(kernel, stride, padding, channels_last):
    x = torch.randint(0, 256, (2, 5, 11, 9), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = F.max_pool2d(x.float(), kernel, stride, padding).to(torch.uint8)
    actual = torch.ops.qc.max_pool2d_uint8(x, [kernel] * 2, [stride] * 2, [padding] * 2)
    assert torch.equal(actual, expected)
    assert actual.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape, kernel, stride, padding", [
    ((8, 64, 56, 56), 3, 2, 1),  # ResNet's stem pool, split across threads
    ((2, 130, 7, 6), 3, 2, 1),  # two whole 64-channel slices and a partial one
    ((1, 1, 1, 1), 1, 1, 0), ((3, 7, 2, 5), 2, 1, 0), ((2, 3, 9, 9), 3, 3, 1)])
def test_max_pool2d_uint8_equals_aten_on_every_layout(isa, shape, kernel, stride, padding):
    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    expected = F.max_pool2d(x.float(), kernel, stride, padding).to(torch.uint8)
    with native.running_on(isa):
        for case in (x, x.contiguous(memory_format=torch.channels_last), x.repeat_interleave(2, dim=1)[:, ::2]):
            assert torch.equal(torch.ops.qc.max_pool2d_uint8(case, [kernel] * 2, [stride] * 2, [padding] * 2),
                               expected)


def test_max_pool2d_uint8_refuses_float():
    with pytest.raises(ValueError, match="takes a 4-D uint8 tensor, got torch.float32"):
        torch.ops.qc.max_pool2d_uint8(torch.zeros(1, 1, 4, 4), [2, 2], [2, 2], [0, 0])


def test_max_pool2d_uint8_refuses_padding_of_half_the_kernel():
    with pytest.raises(ValueError, match="padding \\[1, 1\\] must be less than half of kernel \\[2, 2\\]"):
        torch.ops.qc.max_pool2d_uint8(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), [2, 2], [2, 2], [1, 1])
