"""qcompile's native kernels: the ``qcompile._native`` extension, built from ``qcompile/csrc`` at install.

Importing it registers the native ``qc::`` operators with torch's dispatcher. They run on
torch's own thread pool, on the best instruction set this CPU has (AVX-512, or a portable C++
path chosen at run time). A missing or broken build is an import error that says how to
rebuild: no operator quietly falls back to a slower path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch  # the extension links against torch's libraries: loaded first

try:
    from qcompile import _native
except ImportError as error:  # pragma: no cover - exercised only by a broken install
    raise ImportError(
        f"qcompile's native kernels (qcompile._native, built from qcompile/csrc) did not load: {error}. "
        "Reinstall after torch==2.13.0 with `pip install --no-build-isolation -e .` (it needs a C++17 compiler)."
    ) from error

ISAS = ("portable", "avx2", "avx512")  # each has the ones before it
INTEGER_STORAGE = (torch.uint8, torch.int8)
FEW_ROWS = _native.FEW_ROWS  # qc.linear_int8 runs the native VNNI kernel up to this many rows, oneDNN above
_VNNI = _native.has_vnni()  # a CPU flag: read once, not on every int8 linear call


def quantize_per_tensor(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int,
                        dtype: torch.dtype) -> torch.Tensor:
    """clamp(round(x / scale) + zero_point, qmin, qmax) as ``dtype`` (uint8 or int8), in one pass:
    the integers ``qc.quantize``'s ATen form gives, bit for bit."""
    return _native.quantize_per_tensor(x, scale, zero_point, qmin, qmax, dtype)


def all_finite(x: torch.Tensor) -> bool:
    """Whether ``x`` holds no NaN and no infinity: ``torch.isfinite(x).all()`` in one read of a
    float32 tensor (what a compiled model checks of every input on every call)."""
    return _native.all_finite(x)


def broadcast_param(param: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """A quantization parameter shaped to broadcast against ``x`` as ``qc.quantize`` reads it: along
    ``axis`` for a per-channel one, as it is for per-token / per-group ones ([..., 1]), 0-dim for a
    per-tensor one; a ValueError for a shape that is none of these."""
    return _native.broadcast_param(param, x, axis)


def isa() -> str:
    """The instruction set the native kernels use now: ``"avx512"``, ``"avx2"`` or ``"portable"``."""
    return _native.isa()


def detected_isa() -> str:
    """The best instruction set this CPU offers them."""
    return _native.detected_isa()


def available_isas() -> tuple[str, ...]:
    """Every instruction set the kernels can run on here (the detected one and those below it):
    what tests run each kernel on."""
    return ISAS[: ISAS.index(detected_isa()) + 1]


def has_vnni() -> bool:
    """Whether the few-row int8 linear runs on AVX512-VNNI here (this CPU has it and the kernels
    are not held to the portable path)."""
    return _VNNI and isa() == "avx512"


def has_amx() -> bool:
    """Whether this CPU has AMX-INT8 tiles and the kernel lets the process use them: the u8s8 kernel
    then multiplies on tiles (inputs a multiple of 64, from ``TILE_MIN_ROWS`` rows), and
    ``qc.linear_int8`` runs it up to ``TILED_ROWS`` rows in place of oneDNN."""
    return _native.has_amx()


TILED_ROWS = _native.TILED_ROWS  # qc.linear_int8 runs the u8s8 kernel up to this many rows where has_amx()
TILE_MIN_ROWS = _native.TILE_MIN_ROWS  # the u8s8 kernel runs on tiles from this many rows (VNNI below)


@contextmanager
def amx_tiles(enabled: bool) -> Iterator[None]:
    """Run the u8s8 kernel on AMX tiles (``enabled``, where :func:`has_amx`) or on AVX512-VNNI
    inside the block: how tests and benchmarks compare both paths on one machine."""
    before = _native.amx_active()
    _native.use_amx(enabled)
    try:
        yield
    finally:
        _native.use_amx(before)


GEMV_ROWS = _native.GEMV_ROWS  # from this many rows on, qc.linear_weight_only runs a GEMM (bf16 or fp32)


def has_avx512_bf16() -> bool:
    """Whether this CPU has AVX512-BF16, which ``qc.linear_weight_only``'s int4 kernel and bf16
    GEMMs need (on the avx512 instruction set; elsewhere it runs ATen's integer-weight kernels
    for fewer than ``GEMV_ROWS`` rows and an fp32 GEMM for more)."""
    return _native.has_avx512_bf16()


def w4a8_in_integers() -> bool:
    """Whether ``qc.linear_w4a8`` runs its integer kernel now (AVX2, and not AVX512-BF16's int4
    kernel on the avx512 instruction set) rather than ``qc.linear_weight_only`` on dequantized
    activations."""
    return _native.w4a8_in_integers()


def pack_u8s8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An int8 [out, in] weight packed in VNNI blocks for :func:`linear_u8s8`, and its column sums."""
    return _native.pack_u8s8_weight(weight)


def linear_u8s8(x: torch.Tensor, x_scale: float | torch.Tensor, x_zero_point: int | torch.Tensor,
                packed: torch.Tensor, column_sums: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                other: torch.Tensor | None, post_op: str, out_scale: float, out_zero_point: int,
                out_dtype: torch.dtype) -> torch.Tensor:
    """S_x·S_W·(x·Wᵀ − Z_x·ΣW) + b (+ other), then ``post_op`` (none, relu, relu6, gelu or gelu-tanh);
    float32 / bfloat16, or uint8 requantized
    with ``out_scale`` / ``out_zero_point``: ``qc.linear_int8``'s contract for a few rows, and for
    activations quantized per token (``x_scale`` and ``x_zero_point`` one element per row)."""
    return _native.linear_u8s8(x, torch.as_tensor(x_scale, dtype=torch.float32).reshape(-1),
                               torch.as_tensor(x_zero_point, dtype=torch.int32).reshape(-1), packed, column_sums,
                               weight_scale, bias, other, post_op, out_scale, out_zero_point, out_dtype)


def packs_made() -> int:
    """How many weight packs the int8 kernels have made (each weight once, again after an in-place write)."""
    return _native.packs_made()


def packed_weights() -> int:
    """How many live weights the int8 kernels hold packed (a dead weight's entry is dropped here)."""
    return _native.packed_weights()


@contextmanager
def running_on(name: str) -> Iterator[None]:
    """Run the native kernels on ``name`` (one this CPU has) inside the block: how tests cover
    every code path on one machine."""
    before = isa()
    _native.use_isa(name)
    try:
        yield
    finally:
        _native.use_isa(before)
