"""What cpu-int8's oneDNN kernels run: the one table its op rules, its group marking
(``fuse-patterns``), its lowering (``lower-cpu-int8``) and its kernels' argument checks read.

    op        kernel            activations x weights    unary post-ops          residual add        after an add
    linear    qc.linear_int8    uint8 x int8 (axis 0)    relu, relu6, gelu(-tanh) binary: float other  relu
              (uint8 per tensor, or per token at run time)
    conv2d    qc.conv2d_int8    uint8 x int8 (axis 0)    relu, relu6              sum: uint8 other     relu
              (or float activations, quantized per tensor by the kernel: fuse-conv-input-quantize)

A "binary" residual add is oneDNN's binary post-op, which reads the other operand in the
output's dtype, so the other stays float and the output must be float; a "sum" add reads a
uint8 other through its own qparams, so a ResNet block's shortcut stays in integers. Besides
the anchors, cpu-int8 quantizes embedding tables (int8 rows, dequantized after the lookup) and
residual adds only as a convolution's sum epilogue.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

from qcompile.qconfig import INT8_ACTIVATION, INT8_WEIGHT, TOKEN_ACTIVATION, Candidate, OpQuantConfig
from qcompile.spec import PerGroup, PerTensor, PerToken, QuantSpec
from qcompile.targets.base import OpRule
from qcompile.targets.cpu_features import U8S8_NARROWING_REASON, u8s8_weight_bits

aten = torch.ops.aten

ACTIVATION_DTYPES = ("uint8",)
# int2..int7 weights are int8 values in a narrower range: the int8 kernels run them as they are.
WEIGHT_DTYPES = ("int8", *(f"int{bits}" for bits in range(2, 8)))
# Without VNNI, oneDNN's u8s8 kernels add products in saturating int16 pairs (cpu_features): exact
# for weights of at most 7 bits, so int8 weights with uint8 activations are planned as int7 there.
EXACT_WEIGHT_BITS = u8s8_weight_bits()
KERNEL_WEIGHT_DTYPE = "int8" if EXACT_WEIGHT_BITS is None else f"int{EXACT_WEIGHT_BITS}"  # what plans hold here
KERNEL_WEIGHT = replace(INT8_WEIGHT, dtype=KERNEL_WEIGHT_DTYPE)  # the int8 kernels' weight spec on this CPU


# The unary epilogues by name, and what each computes: the kernels' contract. How oneDNN runs each
# (its post-op name and algorithm) is the kernels' own table, in qcompile/csrc/int8_kernels.cpp.
POST_OPS: dict[str, Callable[[Tensor], Tensor]] = {
    "none": lambda y: y,
    "relu": torch.relu,
    "gelu": F.gelu,
    "gelu-tanh": lambda y: F.gelu(y, approximate="tanh"),
    "relu6": lambda y: F.hardtanh(y, 0.0, 6.0),  # MobileNet's activation, clamp(y, 0, 6)
}


@dataclass(frozen=True)
class Int8Anchor:
    """An op with an int8 kernel, and the epilogues that kernel fuses."""

    kind: str  # the op kind QConfig and op rules use
    kernel: str  # the qc op it lowers to
    unary: tuple[str, ...]
    residual: Literal["binary", "sum"]
    after_add: tuple[str, ...] = ("relu",)  # oneDNN follows a binary/sum post-op with relu only

    def post_ops(self, with_add: bool) -> tuple[str, ...]:
        """The unary post-op names the kernel accepts, "none" included."""
        return ("none", *(u for u in self.unary if not with_add or u in self.after_add))


ANCHORS: dict[torch._ops.OpOverload, Int8Anchor] = {
    aten.linear.default: Int8Anchor("linear", "linear_int8", ("relu", "relu6", "gelu", "gelu-tanh"), "binary"),
    aten.conv2d.default: Int8Anchor("conv2d", "conv2d_int8", ("relu", "relu6"), "sum"),
}
BY_KERNEL: dict[str, Int8Anchor] = {anchor.kernel: anchor for anchor in ANCHORS.values()}
assert all(u in POST_OPS for anchor in ANCHORS.values() for u in anchor.unary)


def op_rules() -> dict[str, OpRule]:
    """cpu-int8's op rules, read off the table."""
    rules = {anchor.kind: OpRule(activation_dtypes=ACTIVATION_DTYPES, weight_dtypes=WEIGHT_DTYPES,
                                 weight_bits=EXACT_WEIGHT_BITS, narrowing_reason=U8S8_NARROWING_REASON)
             for anchor in ANCHORS.values()}
    # A linear also runs weight-only: int8 per channel or int4 per group, on bf16 activations
    # (weight_only_kernels; the dispatch table there says which weights each kernel takes).
    # With uint8 activations, int4 groups (W4A8) run on that kernel too, after the activations'
    # quantize/dequantize: no kernel here multiplies uint8 by grouped int4 in integers.
    # Its activations may also be quantized per token at run time (each row's own scale and zero
    # point, applied in the kernel's epilogue): dynamic int8 for activations whose range varies by row.
    rules["linear"] = replace(rules["linear"], weight_only=True, weight_only_granularities=(PerGroup,),
                              dequantized_activation_granularities=(PerGroup,),
                              activation_granularities=(PerTensor, PerToken))
    # A table lookup reads its int8 rows and dequantizes them with their own scales.
    rules["embedding"] = OpRule(activations=(), weight=0, bias=None, weight_dtypes=WEIGHT_DTYPES, lookup_indices=1)
    # A residual add between convolutions: the sum post-op reads the other input as uint8, so
    # the block's output leaves the kernel as uint8. Its inputs come from int8 paths only.
    rules["add"] = OpRule(activations=(0, 1), weight=None, bias=None, activation_dtypes=ACTIVATION_DTYPES,
                          producers=("conv2d", "relu", "max_pool2d"),
                          epilogue_of=tuple(a.kind for a in ANCHORS.values() if a.residual == "sum"))
    return rules


def search_candidates() -> dict[str, tuple[Candidate, ...]]:
    """The formats a precision search tries, per op kind, each one a kernel here: int8 with and
    without outlier smoothing, int8 on activations quantized per token at run time (each row's own
    range: dynamic int8; all-MiniLM without smoothing measured cosine 0.99899 so, against 0.99312 per
    tensor), weight-only int8 per channel and int4 in groups of 32 (affine,
    clip searched by MSE: the best round-to-nearest int4 measured on all-MiniLM) on bf16
    activations, those int4 groups with uint8 activations (W4A8, smoothed; per token, since the
    kernel reads them dequantized: on all-MiniLM, GPTQ W4A8-g32 measures cosine 0.9948 per token
    against 0.9888 per tensor at the same kernel), and float (bf16 GEMMs where the CPU has them)."""
    int8 = OpQuantConfig(INT8_ACTIVATION, INT8_WEIGHT, smooth=False)
    linear = (
        Candidate("int8", int8),
        Candidate("int8-smooth", replace(int8, smooth=True)),
        Candidate("int8-token", OpQuantConfig(TOKEN_ACTIVATION, INT8_WEIGHT, smooth=False)),
        Candidate("w8", OpQuantConfig(None, INT8_WEIGHT)),
        Candidate("w4-g32", OpQuantConfig(None, QuantSpec("int4", False, PerGroup(1, 32), "mse"))),
        Candidate("w4a8-g32", OpQuantConfig(TOKEN_ACTIVATION, QuantSpec("int4", False, PerGroup(1, 32), "mse"))),
        Candidate("float", None),
    )
    return {"linear": linear, "conv2d": (Candidate("int8", OpQuantConfig(INT8_ACTIVATION, INT8_WEIGHT)),
                                         Candidate("float", None))}
