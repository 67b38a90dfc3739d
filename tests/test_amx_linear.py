"""The u8s8 kernel on AMX tiles: the same int32 sums and epilogue as its AVX512-VNNI path (bit for
bit), the linear_int8 contract at the row counts qc.linear_int8 sends it, and its guards."""

import pytest
import torch

from qcompile import native
from qcompile.kernel_check import difference
from qcompile.targets.cpu_int8.onednn import reference_linear_int8

pytestmark = pytest.mark.skipif(not native.has_amx(), reason="this CPU has no AMX-INT8 tiles")

EPILOGUES = ["float", "add+relu", "uint8+gelu", "bfloat16+gelu-tanh", "relu6, no bias", "per token"]


def operands(rows, k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (rows, k), dtype=torch.uint8, generator=g)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    return x, w, torch.rand(n, generator=g) * 0.01, torch.randn(n, generator=g), torch.randn(rows, n, generator=g)


def epilogue_args(epilogue, rows, bias, other):
    """(x_scale, x_zero_point, bias, other, out_scale, out_zero_point, out_dtype, post_op)."""
    per_tensor = (torch.tensor([0.02]), torch.tensor([117], dtype=torch.int32))
    per_token = (torch.linspace(0.01, 0.03, rows), torch.arange(rows, dtype=torch.int32) % 256)
    return {"float": (*per_tensor, bias, None, 1.0, 0, torch.float32, "none"),
            "add+relu": (*per_tensor, bias, other, 1.0, 0, torch.float32, "relu"),
            "uint8+gelu": (*per_tensor, bias, None, 0.05, 100, torch.uint8, "gelu"),
            "bfloat16+gelu-tanh": (*per_tensor, bias, None, 1.0, 0, torch.bfloat16, "gelu-tanh"),
            "relu6, no bias": (*per_tensor, None, None, 1.0, 0, torch.float32, "relu6"),
            "per token": (*per_token, bias, None, 1.0, 0, torch.float32, "none")}[epilogue]


@pytest.mark.parametrize("rows, k, n", [(native.TILE_MIN_ROWS, 64, 16), (31, 128, 40), (33, 384, 100),
                                         (128, 384, 384), (257, 64, 70)])
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_tiles_give_the_vnni_kernels_result_bit_for_bit(rows, k, n, epilogue):
    """Rows not a multiple of 32 (padded), outputs not a multiple of 32 (masked): the same bytes."""
    x, w, ws, b, other = operands(rows, k, n)
    xs, xz, bias, other, out_scale, out_zero_point, out_dtype, post_op = epilogue_args(epilogue, rows, b, other)
    packed, sums = native.pack_u8s8_weight(w)
    results = []
    for tiles in (True, False):
        with native.amx_tiles(tiles):
            results.append(native.linear_u8s8(x, xs, xz, packed, sums, ws, bias, other, post_op, out_scale,
                                              out_zero_point, out_dtype))
    assert torch.equal(*results)


@pytest.mark.parametrize("rows", [native.FEW_ROWS + 1, 128, native.TILED_ROWS])
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_linear_int8_on_tiles_holds_the_contract(rows, epilogue):
    """Above FEW_ROWS and up to TILED_ROWS qc.linear_int8 runs on tiles, at its contract."""
    x, w, ws, b, other = operands(rows, 384, 96, seed=1)
    xs, xz, *rest = epilogue_args(epilogue, rows, b, other)
    args = (x, xs, xz, w, ws, *rest)
    with native.amx_tiles(True):
        out = torch.ops.qc.linear_int8(*args)
    reference = reference_linear_int8(*args)
    error, allowed = difference(out, reference)
    assert out.dtype == reference.dtype and out.shape == reference.shape and error <= allowed, error


def test_inputs_not_a_multiple_of_64_stay_on_vnni():
    """A depth of 200 is not whole tile products: the kernel runs VNNI whether or not tiles are on."""
    x, w, ws, b, _ = operands(40, 200, 48, seed=2)
    packed, sums = native.pack_u8s8_weight(w)
    results = []
    for tiles in (True, False):
        with native.amx_tiles(tiles):
            results.append(native.linear_u8s8(x, 0.02, 117, packed, sums, ws, b, None, "gelu", 1.0, 0, torch.float32))
    assert torch.equal(*results)
    reference = reference_linear_int8(x, torch.tensor([0.02]), torch.tensor([117]), w, ws, b, None, 1.0, 0,
                                      torch.float32, "gelu")
    error, allowed = difference(results[0], reference)
    assert error <= allowed


def test_the_portable_isa_is_refused_on_tiles_too():
    x, w, ws, b, _ = operands(64, 64, 32)
    packed, sums = native.pack_u8s8_weight(w)
    with native.amx_tiles(True), native.running_on("portable"), pytest.raises(RuntimeError, match="AVX512-VNNI only"):
        native.linear_u8s8(x, 0.02, 117, packed, sums, ws, b, None, "none", 1.0, 0, torch.float32)
