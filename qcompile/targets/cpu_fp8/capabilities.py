"""What cpu-fp8 can run on this CPU: the one table its op rules, its preset, its lowering and
the report read.

FP8 is a storage and numerics format on most CPUs, not a speed format. Measured on an AMD Zen 4
(AVX512-BF16 and VNNI, no AMX), 2 threads: torch's CPU ``_scaled_mm`` runs oneDNN's FP8 GEMM
only where the CPU has AMX-FP16 (a Sapphire Rapids' AMX-INT8 gets a reference kernel); elsewhere
it converts both operands to fp32 element by element and runs an fp32 GEMM (a 1024³ product
47–56 ms against bf16's 14–16 ms; a 4096² weight at batch 1 spends 205 ms on the conversion). So the paths, best first:

    path        when                          linear computes
    scaled-mm   AMX-FP16, timed native       torch._scaled_mm(fp8(x/S_x), W_q, S_x, S_W) + b
    bf16        always                        (S_x·fp8(x/S_x))_bf16 · (S_W·W_q)_bf16 + b

The bf16 path decodes each FP8 weight once (a table lookup of its bytes, scaled per channel)
and keeps it for the model's life; an FP8 activation is cast (vectorized), and decoded through
a 256-entry table that already holds S_x·v for each code, so its cost is two passes over the
activation. Where several paths exist they are timed at the node's shape, once per machine
(:func:`fastest_path`).
"""

from __future__ import annotations

from collections.abc import Callable

from qcompile.latency import LatencyTable
from qcompile.qconfig import INT8_ACTIVATION, INT8_WEIGHT, TOKEN_ACTIVATION, Candidate, OpQuantConfig
from qcompile.spec import FLOAT8_DTYPES, PerChannel, PerTensor, PerToken, QuantSpec
from qcompile.targets.base import OpRule
from qcompile.targets.cpu_features import U8S8_NARROWING_REASON, has_fp8_gemm
from qcompile.targets.cpu_int8.capabilities import ACTIVATION_DTYPES, EXACT_WEIGHT_BITS, WEIGHT_DTYPES

PATHS = ("scaled-mm", "bf16")


def available_paths() -> tuple[str, ...]:
    """The linear paths worth running on this CPU, best first; never an emulated FP8 GEMM."""
    return PATHS if has_fp8_gemm() else ("bf16",)


def why_path(path: str, candidates: tuple[str, ...]) -> str:
    """The report's reason for ``path``."""
    if path == "scaled-mm":
        return "native FP8 GEMM (AMX)" + (", timed faster than bf16 at this shape" if len(candidates) > 1 else "")
    if "scaled-mm" in candidates:
        return "FP8 weights decoded once to bf16: timed faster than the FP8 GEMM at this shape"
    return ("FP8 weights decoded once to bf16: this CPU has no FP8 GEMM (no AMX), and torch's "
            "would convert both operands to fp32 on every call")


def fastest_path(candidates: tuple[str, ...], run: Callable[[str], object], shape: str,
                 table: LatencyTable | None = None) -> str:
    """The candidate with the lowest median time of ``run(path)`` at ``shape`` (what the time
    depends on), each measured once per machine and cached in the latency table: compile and a
    later ``load`` here choose the same path, so the loaded model answers bit for bit the same."""
    if len(candidates) == 1:
        return candidates[0]
    table = table or LatencyTable()
    times = {path: table.call_ms(f"cpu-fp8 linear_fp8 {path} {shape}", lambda: run(path)) for path in candidates}
    return min(candidates, key=times.__getitem__)


def op_rules() -> dict[str, OpRule]:
    """cpu-fp8's op rules: linears with FP8 weights and FP8 (per tensor or per token) or float
    activations, or INT8 ones (what ``fp8-or-int8`` plans, run on cpu-int8's kernels);
    embedding tables with FP8 rows."""
    return {
        "linear": OpRule(activation_dtypes=(*FLOAT8_DTYPES, *ACTIVATION_DTYPES),
                         weight_dtypes=(*FLOAT8_DTYPES, *WEIGHT_DTYPES), weight_only=True,
                         activation_granularities=(PerTensor, PerToken), weight_bits=EXACT_WEIGHT_BITS,
                         narrowing_reason=U8S8_NARROWING_REASON),
        "embedding": OpRule(activations=(), weight=0, bias=None, weight_dtypes=FLOAT8_DTYPES, lookup_indices=1),
    }


def search_candidates() -> dict[str, tuple[Candidate, ...]]:
    """The formats a precision search on cpu-fp8 tries for a linear: E4M3 weights per channel
    with E4M3 activations per tensor (calibrated) or per token (each row's amax at run time), or
    weight-only (bf16 activations: the fast FP8 form on a CPU without an FP8 GEMM); INT8 on
    uint8 activations per tensor or per token (cpu-int8's kernels); float. On all-MiniLM the FFN
    down-projections, whose inputs carry outlier channels, are where E4M3's relative steps beat
    INT8's uniform grid. ``fp8-or-int8`` may still plan an E4M3 W8A8 linear as INT8 where INT8
    measures as faithful on a CPU without an FP8 GEMM, and the search then measures what it became."""
    e4m3 = QuantSpec("float8_e4m3fn", granularity=PerChannel(0))
    return {"linear": (
        Candidate("fp8", OpQuantConfig(QuantSpec("float8_e4m3fn", granularity=PerTensor()), e4m3)),
        Candidate("fp8-token", OpQuantConfig(QuantSpec("float8_e4m3fn", granularity=PerToken()), e4m3)),
        Candidate("fp8-weight", OpQuantConfig(None, e4m3)),
        Candidate("int8", OpQuantConfig(INT8_ACTIVATION, INT8_WEIGHT)),
        Candidate("int8-token", OpQuantConfig(TOKEN_ACTIVATION, INT8_WEIGHT)),
        Candidate("float", None),
    )}
