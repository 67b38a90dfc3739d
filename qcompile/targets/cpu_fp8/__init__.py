"""cpu-fp8: FP8 (E4M3 / E5M2) weights and activations on CPUs, all of it in this folder.

* ``capabilities``: what this CPU runs (a native FP8 GEMM needs AMX) and the op rules;
* ``kernels``: ``qc.linear_fp8`` and its paths (``scaled-mm``, ``bf16``);
* ``fp8_or_int8``: plans a W8A8 linear as INT8 where INT8 is as faithful and the CPU has no FP8
  GEMM (oneDNN's u8s8 GEMM is then the fast one);
* ``lower_cpu_fp8``: the lowering pass, which picks a path per linear and says why;
* the target: op rules, the preset (chosen by the CPU), pipelines, how the report names a kernel.

The preset is W8A8 E4M3 where the CPU has an FP8 GEMM. Elsewhere FP8 saves bytes, not time: an
FP8 activation must be decoded before a bf16 GEMM reads it, which only adds work, so the preset
is weight-only E4M3 (bf16 activations, as fast as the bf16 model with a quarter of fp32's
weight bytes). A QConfig with activation specs (``fp8_qconfig()``) gives W8A8 numerics anywhere.
Outlier smoothing is not run: E4M3's relative steps already cover outlier channels.
"""

from torch import fx

from qcompile.qconfig import QConfig, fp8_qconfig

from qcompile.targets.base import CLEANUP, CONVERT, DYNAMIC_PREPARE, Target, register_target
from qcompile.targets.cpu_features import has_fp8_gemm
from qcompile.targets.cpu_fp8.capabilities import op_rules, search_candidates
from qcompile.targets.cpu_fp8.fp8_or_int8 import Fp8OrInt8
from qcompile.targets.cpu_fp8.kernels import describe_fp8_kernel, linear_fp8
from qcompile.targets.cpu_fp8.lower_cpu_fp8 import LowerCpuFp8
from qcompile.targets.cpu_int8.onednn import describe_int8_kernel


def cpu_fp8_preset() -> QConfig:
    """W8A8 E4M3 on a CPU with an FP8 GEMM, weight-only E4M3 elsewhere (see the module doc)."""
    return fp8_qconfig(activations="per-tensor" if has_fp8_gemm() else None)


def describe_kernel(node: fx.Node) -> str | None:
    """The report's name for a kernel node: an FP8 linear, or a linear fp8-or-int8 made INT8."""
    return describe_fp8_kernel(node) or describe_int8_kernel(node)


register_target(
    Target(
        name="cpu-fp8",
        description="FP8 (E4M3/E5M2) linears and tables on CPUs: a native FP8 GEMM with AMX, else FP8 weights "
                    "decoded once into bf16 GEMMs",
        op_rules=op_rules(),
        preset=cpu_fp8_preset,
        prepare=f"{CLEANUP},annotate,insert-observers,calibrate,fp8-or-int8",
        convert=CONVERT,
        # The linears fp8-or-int8 planned as INT8 run on cpu-int8's kernels; attention and float
        # linears go to cpu-int8's native and bf16 kernels before the FP8 linears are lowered.
        lower="canonicalize,merge-sibling-linears,fuse-patterns,lower-cpu-int8,lower-float-bf16,lower-cpu-fp8,"
              "relax-views,eliminate-dead-code",
        dynamic_prepare=DYNAMIC_PREPARE,
        dynamic_convert="cast-fp8{dynamic=true},convert{dynamic=true},eliminate-dequant,eliminate-dead-code",
        describe_kernel=describe_kernel,
        passes=(Fp8OrInt8, LowerCpuFp8),
        candidates=search_candidates(),
    )
)

__all__ = ["Fp8OrInt8", "LowerCpuFp8", "cpu_fp8_preset", "linear_fp8"]
