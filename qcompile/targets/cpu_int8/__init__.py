"""cpu-int8: oneDNN int8 kernels on x86 CPUs, all of it in this folder.

* kernels (native operators from ``qcompile/csrc``, each with its fake kernel here):
  ``onednn`` (``qc.linear_int8``, ``qc.conv2d_int8``), ``uint8_kernels`` (``qc.max_pool2d_uint8``),
  ``attention`` (``qc.attention``, the native fused fp32 attention, and ``qc.attention_quantize``, the
  same with its output quantized),
  ``recurrence`` (``qc.gru_recurrence``, ``qc.lstm_recurrence``: a GRU's / LSTM's steps, native fp32),
  ``layer_norm_quantize`` (``qc.layer_norm_quantize``, native, and the pass that makes it),
  ``bf16_kernels`` (``qc.linear_bf16``),
  ``weight_only_kernels`` (``qc.linear_weight_only``: int8 / int4 weights, bf16 activations;
  ``qc.linear_w4a8``: int4 weights on uint8 activations, summed in integers),
  each registering its Q/DQ reference with :mod:`qcompile.kernel_check`;
* passes: ``split-recurrent`` (a GRU / LSTM as its input linear and its recurrence), ``merge-sibling-linears``,
  ``fuse-patterns`` (the groups one oneDNN kernel runs),
  ``lower-cpu-int8``, ``lower-weight-only``, ``lower-float-bf16``, ``fuse-rms-norm`` (an RMSNorm,
  written out op by op or ATen's, as the native ``qc.rms_norm``), ``fuse-rotary`` (rotary position
  embedding as the native ``qc.rotary``), ``fuse-token-quantize`` (a dynamic per-token quantize
  as one ``qc.quantize_per_token``), ``fuse-layer-norm-quantize``, ``fuse-attention-quantize`` (an
  attention output only an int8 linear reads, smoothed and quantized as the kernel writes it),
  ``fuse-matmul-add`` (a float product with a constant matrix and the add after it as one ``addmm``),
  ``fuse-conv-input-quantize`` (a convolution quantizing the float activations it alone reads);
* ``capabilities``: the one table of what the kernels run, which the op rules, the marking,
  the lowering and the kernels' argument checks read;
* the target: op rules, preset, pipelines, and how the report names a kernel node.
"""

from torch import fx

from qcompile.qconfig import int8_preset
from qcompile.targets.base import CLEANUP, CONVERT, PLAN, Target, register_target
from qcompile.targets.cpu_int8.attention import attention, attention_quantize
from qcompile.targets.cpu_int8.fuse_attention_quantize import FuseAttentionQuantize
from qcompile.targets.cpu_int8.fuse_conv_input_quantize import FuseConvInputQuantize
from qcompile.targets.cpu_int8.fuse_matmul_add import FuseMatmulAdd
from qcompile.targets.cpu_int8.bf16_kernels import linear_bf16
from qcompile.targets.cpu_int8.capabilities import op_rules, search_candidates
from qcompile.targets.cpu_int8.fuse_patterns import FusePatterns
from qcompile.targets.cpu_int8.fuse_rms_norm import FuseRmsNorm
from qcompile.targets.cpu_int8.fuse_rotary import FuseRotary
from qcompile.targets.cpu_int8.fuse_token_quantize import FuseTokenQuantize
from qcompile.targets.cpu_int8.layer_norm_quantize import FuseLayerNormQuantize, layer_norm_quantize
from qcompile.targets.cpu_int8.lower_cpu_int8 import LowerCpuInt8
from qcompile.targets.cpu_int8.lower_float_bf16 import LowerFloatBf16
from qcompile.targets.cpu_int8.merge_sibling_linears import MergeSiblingLinears
from qcompile.targets.cpu_int8.onednn import conv2d_int8, describe_int8_kernel, linear_int8
from qcompile.targets.cpu_int8.recurrence import gru_recurrence, lstm_recurrence
from qcompile.targets.cpu_int8.split_recurrent import SplitRecurrent
from qcompile.targets.cpu_int8.lower_weight_only import LowerWeightOnly
from qcompile.targets.cpu_int8.uint8_kernels import max_pool2d_uint8
from qcompile.targets.cpu_int8.weight_only_kernels import describe_weight_only_kernel, linear_w4a8, linear_weight_only

def describe_kernel(node: fx.Node) -> str | None:
    """The report's name for one of cpu-int8's kernel nodes."""
    return describe_int8_kernel(node) or describe_weight_only_kernel(node)


register_target(
    Target(
        name="cpu-int8",
        description="oneDNN int8 kernels on x86 CPUs: uint8 activations, int8 per-channel weights",
        op_rules=op_rules(),
        preset=int8_preset,
        # A GRU / LSTM splits into its input linear (planned like any other) and its recurrence.
        prepare=f"{CLEANUP},split-recurrent,{PLAN}",
        convert=CONVERT,
        # Fusion is read off the Q/DQ graph, so a saved Q/DQ program lowers the same way.
        lower="canonicalize,merge-sibling-linears,quantize-before-pad,fuse-patterns,lower-cpu-int8,lower-weight-only,lower-float-bf16,"
              "fuse-token-quantize,fuse-rms-norm,fuse-rotary,fuse-layer-norm-quantize,fuse-attention-quantize,fuse-matmul-add,"
              "relax-views,eliminate-dead-code,fuse-conv-input-quantize",
        dynamic_prepare=f"{CLEANUP},split-recurrent,annotate",
        dynamic_convert="cast-fp8{dynamic=true},convert{dynamic=true},eliminate-dequant,eliminate-dead-code",
        describe_kernel=describe_kernel,
        candidates=search_candidates(),
        passes=(SplitRecurrent, MergeSiblingLinears, FusePatterns, LowerCpuInt8, LowerWeightOnly, LowerFloatBf16, FuseRmsNorm,
                FuseRotary, FuseTokenQuantize, FuseLayerNormQuantize, FuseAttentionQuantize,
                FuseMatmulAdd, FuseConvInputQuantize),
    )
)


__all__ = ["FuseAttentionQuantize", "FuseConvInputQuantize", "FuseLayerNormQuantize", "FuseMatmulAdd", "FusePatterns", "FuseRmsNorm", "FuseRotary", "FuseTokenQuantize", "LowerCpuInt8", "LowerFloatBf16", "LowerWeightOnly", "MergeSiblingLinears",
           "SplitRecurrent", "attention", "attention_quantize", "conv2d_int8", "gru_recurrence", "layer_norm_quantize",
           "linear_bf16", "linear_int8", "linear_w4a8", "linear_weight_only", "lstm_recurrence", "max_pool2d_uint8"]
