"""What this CPU has, read once: the features kernel dispatch tables are keyed by.

Kernels are chosen from measurements made on CPUs with and without each feature (the tables
live with each target's capabilities), never assumed from the instruction set alone: a native
FP8 GEMM needs AMX-FP16 (torch's CPU ``_scaled_mm`` converts its operands to fp32 elsewhere, and a
Sapphire Rapids' AMX-INT8 runs oneDNN's reference FP8 kernel; it is timed as well), and the
bf16 GEMMs of the float and FP8 paths need AVX512-BF16 or AMX-BF16 to beat fp32 (weight-only
linears run ATen's integer-weight GEMVs or an fp32 GEMM without them: ``weight_only.cpp``).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch

from qcompile.profile import fastest_ms


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere: nothing assumed)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def has_fp8_gemm() -> bool:
    """Whether torch's CPU ``_scaled_mm`` runs a native FP8 GEMM here (oneDNN on AMX) rather
    than converting its operands first. AMX-INT8 is not enough: on a Sapphire Rapids Xeon
    (AMX-INT8 and AMX-BF16, no AMX-FP16) it ran oneDNN's reference kernel, 711 ms for a
    128 x 384 x 384 product that bf16 multiplies in 0.12 ms, and a timing probe alone misread
    that kernel as native in one of two loaded CI runs. So AMX-FP16 (which oneDNN's FP8 GEMM
    converts through) is required, and the GEMM is timed as well (:func:`fp8_gemm_runs_natively`);
    elsewhere both operands are converted to fp32 element by element."""
    flags = cpu_flags()
    return {"amx_tile", "amx_fp16"} <= flags and fp8_gemm_runs_natively()


# The probe's product (rows, inner, outer): the reference kernel spends about 20 ms on it.
FP8_PROBE_SHAPE = (32, 128, 128)


@functools.cache
def fp8_gemm_runs_natively() -> bool:
    """Whether ``_scaled_mm`` multiplies a small FP8 product within 8x of bf16's time (or 1 ms):
    a native GEMM is about as fast as bf16 there, the reference kernel about 1000x slower.
    Timed once per process, on the fastest of 5 calls each, so a stall during the bf16 calls
    cannot pass the reference kernel off as native (which would plan FP8 activations and time
    a 9 s call at every linear)."""
    rows, inner, outer = FP8_PROBE_SHAPE
    x, w = torch.randn(rows, inner), torch.randn(outer, inner)
    x8, w8, one = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn), torch.ones(())
    xb, wb = x.bfloat16(), w.bfloat16()
    try:
        fp8_ms = fastest_ms(lambda: torch._scaled_mm(x8, w8.t(), one, one, out_dtype=torch.bfloat16))
    except (RuntimeError, NotImplementedError):  # a build without a CPU FP8 GEMM
        return False
    return fp8_ms <= max(8 * fastest_ms(lambda: torch.nn.functional.linear(xb, wb)), 1.0)


def has_exact_int8_gemm() -> bool:
    """Whether oneDNN's u8s8 GEMMs and convolutions add every uint8·int8 product exactly into int32
    (AVX512-VNNI, AVX-VNNI or AMX-INT8). Without these it multiplies with ``vpmaddubsw``, which adds
    each pair of products in saturating int16: exact only while |w| ≤ 64, since
    2·255·64 = 32640 ≤ 32767. Measured on a Zen 1 (AVX2) CPU: weights in [-64, 64] give oneDNN's
    result bit for bit for any uint8 input; one weight of -65 puts a 829-wide output 7.3 off, and
    full-range weights 409."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())


# What targets whose int8 GEMMs are u8s8 (oneDNN's; ONNX Runtime's MLAS, whose U8S8 kernels
# saturate the same way without VNNI) plan for weights multiplied with uint8 activations.
U8S8_NARROWING_REASON = (
    "this CPU has no VNNI: u8s8 int8 GEMMs add each pair of products in saturating int16, exact only for "
    "|w| <= 64, so int8 weights are planned as int7 (q in [-63, 63])")


def u8s8_weight_bits() -> int | None:
    """The widest integer weight a u8s8 GEMM multiplies exactly here: None (any) with VNNI, else 7."""
    return None if has_exact_int8_gemm() else 7


def has_bf16_gemm() -> bool:
    """Whether bf16 GEMMs run natively (AVX512-BF16 or AMX-BF16) rather than emulated in fp32."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


@functools.cache
def cpu_signature() -> str:
    """This CPU's model name and a digest of its flags: the key measured latencies are cached
    under, so a table measured on one machine is never read on another."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                 "unknown CPU")
    digest = hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:12]
    return f"{model} [{digest}]"
