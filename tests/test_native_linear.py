"""qc.linear_int8's few-row path (native AVX512-VNNI kernel) holds the linear_int8 contract."""

import pytest
import torch

from qcompile import native
from qcompile.kernel_check import difference
from qcompile.native import FEW_ROWS
from qcompile.targets.cpu_int8.onednn import reference_conv2d_int8, reference_linear_int8

pytestmark = pytest.mark.skipif(not native.has_vnni(), reason="this CPU has no AVX512-VNNI: oneDNN runs every row count")


def operands(rows, k, n, seed=0, batch=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (*batch, rows, k), dtype=torch.uint8, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    return (x, torch.tensor([0.02]), torch.tensor([117], dtype=torch.int32), w, torch.rand(n, generator=g) * 0.01,
            torch.randn(n, generator=g))


@pytest.mark.parametrize("rows, k, n", [(1, 384, 384), (3, 37, 70), (5, 1536, 384), (FEW_ROWS, 64, 1), (1, 1, 65)])
@pytest.mark.parametrize("epilogue", ["float", "add+relu", "uint8+relu", "bfloat16", "no bias"])
def test_few_rows_hold_the_contract(rows, k, n, epilogue):
    x, xs, xz, w, ws, b = operands(rows, k, n)
    other = torch.randn(rows, n)
    args = {"float": (b, None, 1.0, 0, torch.float32, "none"),
            "add+relu": (b, other, 1.0, 0, torch.float32, "relu"),
            "uint8+relu": (b, None, 0.05, 100, torch.uint8, "relu"),
            "bfloat16": (b, None, 1.0, 0, torch.bfloat16, "none"),
            "no bias": (None, None, 1.0, 0, torch.float32, "none")}[epilogue]
    out = torch.ops.qc.linear_int8(x, xs, xz, w, ws, *args)
    reference = reference_linear_int8(x, xs, xz, w, ws, *args)
    error, allowed = difference(out, reference)
    assert out.dtype == reference.dtype and out.shape == reference.shape and error <= allowed


def test_few_rows_give_the_same_result_as_onednn():
    """The same int32 sums: the float outputs of both paths agree to fp32 rounding."""
    x, xs, xz, w, ws, b = operands(FEW_ROWS + 1, 200, 96, seed=1)
    onednn = torch.ops.qc.linear_int8(x, xs, xz, w, ws, b, None, 1.0, 0, torch.float32, "none")
    few = torch.cat([torch.ops.qc.linear_int8(x[i:i + 4], xs, xz, w, ws, b, None, 1.0, 0, torch.float32, "none")
                     for i in range(0, FEW_ROWS + 1, 4)])
    torch.testing.assert_close(few, onednn, rtol=1e-5, atol=1e-4)


def test_leading_dimensions_and_strided_rows():
    x, xs, xz, w, ws, b = operands(3, 64, 32, seed=2, batch=(2,))
    strided = x.transpose(0, 1)  # [3, 2, 64]: not contiguous
    out = torch.ops.qc.linear_int8(strided, xs, xz, w, ws, b, None, 1.0, 0, torch.float32, "none")
    reference = reference_linear_int8(strided, xs, xz, w, ws, b, None, 1.0, 0, torch.float32, "none")
    assert out.shape == (3, 2, 32)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-4)


def test_the_portable_isa_is_refused_by_the_vnni_kernel():
    x, xs, xz, w, ws, b = operands(1, 8, 8)
    packed, sums = native.pack_u8s8_weight(w)
    with native.running_on("portable"), pytest.raises(RuntimeError, match="runs on AVX512-VNNI only"):
        native.linear_u8s8(x, 0.02, 117, packed, sums, ws, b, None, "none", 1.0, 0, torch.float32)


def conv_operands(batch, channels, size, outputs, kernel, seed=0, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randint(-127, 128, (outputs, channels, kernel, kernel), dtype=torch.int8, generator=g)
    return (x, torch.tensor([0.02]), torch.tensor([117], dtype=torch.int32), w,
            torch.rand(outputs, generator=g) * 0.01, torch.randn(outputs, generator=g))


@pytest.mark.parametrize("shape", [(16, 1, 8, 8, 3), (2, 8, 4, 16, 3), (3, 5, 7, 70, 1), (1, 3, 9, 4, 5)])
@pytest.mark.parametrize("geometry", [([1, 1], [1, 1], [1, 1]), ([2, 1], [0, 2], [1, 1]), ([1, 1], [2, 2], [2, 2])])
@pytest.mark.parametrize("epilogue", ["float", "uint8+relu", "bfloat16", "no bias"])
def test_small_convolutions_hold_the_contract(shape, geometry, epilogue):
    """Convolutions under the size where oneDNN's fixed cost dominates run as im2col and the VNNI
    kernel (padding reads the zero point): the conv2d_int8 contract, in either input layout."""
    stride, padding, dilation = geometry
    for channels_last in (False, True):
        x, xs, xz, w, ws, b = conv_operands(*shape, channels_last=channels_last)
        bias, out_scale, out_zero_point, out_dtype, post_op = {
            "float": (b, 1.0, 0, torch.float32, "none"), "uint8+relu": (b, 0.05, 100, torch.uint8, "relu"),
            "bfloat16": (b, 1.0, 0, torch.bfloat16, "none"), "no bias": (None, 1.0, 0, torch.float32, "relu")}[epilogue]
        args = (x, xs, xz, w, ws, bias, None, 1.0, 0, stride, padding, dilation, 1, out_scale, out_zero_point,
                out_dtype, post_op)
        out = torch.ops.qc.conv2d_int8(*args)
        reference = reference_conv2d_int8(*args)
        error, allowed = difference(out, reference)
        assert out.dtype == reference.dtype and out.shape == reference.shape and error <= allowed, (channels_last, error)


@pytest.mark.skipif(native.has_amx(), reason="this CPU has AMX tiles")
def test_tiles_are_refused_where_the_cpu_has_none():
    with pytest.raises(RuntimeError, match="no AMX-INT8 tiles"), native.amx_tiles(True):
        pass
