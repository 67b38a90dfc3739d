"""What this CPU has, read once: the features kernel dispatch tables are keyed by.

Kernels are chosen from measurements made on CPUs with and without each feature (the tables
live with each target's capabilities), never assumed from the instruction set alone: a native
FP8 GEMM needs AMX (torch's CPU ``_scaled_mm`` converts its operands to fp32 elsewhere), and the
bf16 GEMMs of the weight-only and FP8 paths need AVX512-BF16 or AMX-BF16 to beat fp32.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path


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
    than converting its operands to fp32 first."""
    flags = cpu_flags()
    return "amx_tile" in flags and bool({"amx_int8", "amx_fp16"} & flags)


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
