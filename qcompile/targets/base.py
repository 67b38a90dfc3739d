"""Targets as data: what a backend can run in integer arithmetic, and the pipelines that get there.

A target is one folder under ``qcompile/targets/`` (its kernels, its passes, its registration)
and one :func:`register_target` call; this module is the data model and the registry.

A target names its operator rules (which op kinds it has quantized kernels for, which of their
arguments are activations, weight and bias, and which specs those kernels accept), the QConfig
preset used when the user gives none, and three pipelines:

* ``prepare``: capture clean-up, outlier smoothing, the plan, observers and calibration
  (:data:`PREPARE`); the passes that need the calibration data read it from the compile
  context (:mod:`qcompile.context`);
* ``convert``: observers to the Q/DQ form, the common ground of all targets;
* ``lower``: Q/DQ to the target's kernels.

``dynamic_prepare`` / ``dynamic_convert`` replace the first two when there is no calibration
data: activations get scales computed at run time.

Users add targets with :func:`register_target`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from torch import fx

from qcompile.errors import QCompileError
from qcompile.pipeline import Pass, Pipeline, register_pass
from qcompile.qconfig import Candidate, OpQuantConfig, QConfig
from qcompile.spec import PerChannel, PerGroup, PerTensor


@dataclass(frozen=True)
class OpRule:
    """Which arguments of an op kind are quantized, and the specs its int8 kernel accepts."""

    activations: tuple[int, ...] = (0,)
    weight: int | None = 1
    bias: int | None = 2
    activation_dtypes: tuple[str, ...] = ("uint8",)
    weight_dtypes: tuple[str, ...] = ("int8",)
    # Op kinds every activation input must come from (None: any). An elementwise op is worth
    # quantizing only where it joins int8 paths (conv -> add -> relu -> conv); on a float path,
    # like a transformer's residual stream, quantizing it only adds error.
    producers: tuple[str, ...] | None = None
    # Op kinds whose int8 kernel runs this op in its epilogue (conv -> add -> relu as one oneDNN
    # convolution with a sum post-op). The op has no kernel of its own: one input must come
    # straight from such a producer that feeds nothing else, and stays float inside that
    # kernel; the other inputs are quantized. Empty: the op has its own kernel.
    epilogue_of: tuple[str, ...] = ()
    # The argument holding a table lookup's indices. A lookup whose indices are computed from
    # constants alone (position ids, token-type ids) adds the same rows to every input, so
    # their rounding error would be systematic rather than noise; such a table stays float
    # (it is also small: the vocabulary table is the one worth its bytes).
    lookup_indices: int | None = None
    # The kernel also runs with float activations and a quantized weight (weight-only), whose
    # weights may then also come in these granularities (groups of inputs sharing a scale).
    weight_only: bool = False
    weight_only_granularities: tuple[type, ...] = ()
    # Weight granularities also taken with quantized activations, which the kernel then reads
    # dequantized: the activations' Q/DQ runs in front of the weight-only kernel (W4A8 in groups
    # keeps its numerics, with no integer kernel for it).
    dequantized_activation_granularities: tuple[type, ...] = ()
    # Activation granularities the kernel takes: per-token scales come with each row.
    activation_granularities: tuple[type, ...] = (PerTensor,)
    # The kernel exists only with a quantized output (ONNX Runtime's QLinearConv): an output some
    # reader would take float is quantized with the activation spec, and read dequantized.
    quantized_output: bool = False
    # The widest integer weight the kernel multiplies exactly with quantized activations on this
    # CPU (None: any it takes). A wider weight spec is planned narrowed to it, for the reason
    # given: int8 -> int7 where the u8s8 GEMM adds products in saturating int16 pairs.
    weight_bits: int | None = None
    narrowing_reason: str = ""

    @property
    def formats(self) -> tuple[str, ...]:
        """Every dtype this kernel reads, activations and weights."""
        return tuple(dict.fromkeys((*(self.activation_dtypes if self.activations else ()), *self.weight_dtypes)))

    def activations_of(self, config: OpQuantConfig) -> tuple[int, ...]:
        """The inputs ``config`` quantizes: none for a weight-only config on a kernel that runs one."""
        return () if config.activation is None and self.weight_only else self.activations

    def narrowed(self, config: OpQuantConfig) -> OpQuantConfig:
        """``config`` with its integer weight narrowed to :attr:`weight_bits` where it is wider and
        the kernel multiplies it with quantized activations; otherwise ``config`` itself. A narrower
        integer keeps the spec's scheme: symmetric int7 is S = max|w| / 63, q in [-63, 63]."""
        weight = config.weight
        if (self.weight_bits is None or weight is None or weight.is_float8 or not self.activations_of(config)
                or weight.bits <= self.weight_bits
                or isinstance(weight.granularity, self.dequantized_activation_granularities)):
            return config
        return replace(config, weight=replace(weight, dtype=f"int{self.weight_bits}"))

    def unsupported(self, config: OpQuantConfig) -> str | None:
        """Why ``config`` cannot run on this kernel, or None when it can."""
        act, weight = config.activation, config.weight
        if self.activations_of(config):  # no activations: a weight-only op (a table lookup)
            if act is None:
                return "the kernel needs quantized activations (the config gives no activation spec)"
            if act.dtype not in self.activation_dtypes:
                return f"activation dtype {act.dtype} (kernel takes {', '.join(self.activation_dtypes)})"
            # Activations read dequantized are quantized in float in front of the kernel: any granularity.
            read_dequantized = weight is not None and isinstance(weight.granularity,
                                                                 self.dequantized_activation_granularities)
            if not isinstance(act.granularity, self.activation_granularities) and not read_dequantized:
                taken = ", ".join(str(kind()) for kind in self.activation_granularities)
                return f"activation granularity {act.granularity} (kernel takes {taken})"
        if self.weight is None:
            return None
        if weight is None:
            return "the kernel needs a quantized weight (the config gives no weight spec)"
        if weight.dtype not in self.weight_dtypes:
            return f"weight dtype {weight.dtype} (kernel takes {', '.join(self.weight_dtypes)})"
        weight_only = not self.activations_of(config)
        taken = (PerTensor, PerChannel, *(self.weight_only_granularities if weight_only
                                          else self.dequantized_activation_granularities))
        # A kernel that takes weight-only groups takes each group's zero point with its scale.
        if not weight.symmetric and not (isinstance(weight.granularity, PerGroup) and PerGroup in taken):
            return "affine weights (kernel takes symmetric weights, zero point 0; affine only in groups)"
        if isinstance(weight.granularity, PerChannel) and weight.granularity.axis != 0:
            return f"weight {weight.granularity} (kernel takes output channels, axis 0)"
        if isinstance(weight.granularity, PerGroup) and weight.granularity.axis not in (1, -1) and PerGroup in taken:
            return f"weight {weight.granularity} (kernel takes groups of input channels, axis 1)"
        if not isinstance(weight.granularity, taken):
            grouped = ["per-group (weight-only)"] if PerGroup in self.weight_only_granularities else []
            names = ", ".join(("per-tensor", "per-channel", *grouped))
            return f"weight granularity {weight.granularity} (kernel takes {names})"
        return None


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    op_rules: dict[str, OpRule]
    preset: Callable[[], QConfig]
    # Pipeline text, or a Pipeline (with_pass puts in pass instances that need no registered name).
    prepare: str | Pipeline
    convert: str | Pipeline
    lower: str | Pipeline
    dynamic_prepare: str | Pipeline = ""
    dynamic_convert: str | Pipeline = ""
    # The target's own passes (its lowering), reachable by name in pipeline text once the
    # target is registered.
    passes: tuple[type[Pass], ...] = ()
    # What the report says of a quantized node that no lowering pass turned into a kernel.
    unlowered: str = "reference Q/DQ, not lowered"
    # How the report names a kernel node of this target's lowered graph (None: not a kernel).
    describe_kernel: Callable[[fx.Node], str | None] = lambda node: None
    # Per op kind, the formats a precision search (qcompile.sensitivity) tries, each one a
    # kernel of this target; op kinds not listed keep the preset's plan in a search.
    candidates: dict[str, tuple[Candidate, ...]] = field(default_factory=dict)

    def pipeline(self, stage: str) -> Pipeline:
        """A fresh copy of the pipeline of ``stage`` (``prepare``, ``dynamic_prepare``, ...)."""
        text = getattr(self, stage)
        return Pipeline(text) if isinstance(text, Pipeline) else Pipeline.parse(text)

    def with_pass(self, new_pass: Pass, *, after: str | None = None, before: str | None = None,
                  stage: str | None = None) -> Target:
        """This target with ``new_pass`` in its pipelines next to the pass named ``after`` (or
        ``before``): what ``compile(model, target=get_target("cpu-int8").with_pass(MyPass(),
        after="annotate"))`` runs, without registering a target or the pass. ``stage``
        (``prepare``, ``convert``, ``lower``) says which pipeline when the anchor runs in
        several; the dynamic pipelines follow their static stage."""
        if (after is None) == (before is None):
            raise QCompileError("with_pass needs exactly one of after= or before= (a pass name)")
        anchor = after or before
        stages = [stage] if stage else list(STAGES)
        holding = [name for name in stages if anchor in self.pipeline(name).names()]
        if len(holding) != 1:
            where = ", ".join(holding) if holding else "none of " + ", ".join(stages)
            raise QCompileError(f"with_pass: '{anchor}' runs in {where} of target '{self.name}'; "
                                "name one stage with stage=")
        changes = {}
        for name in (holding[0], f"dynamic_{holding[0]}"):
            if getattr(self, name, "") and anchor in self.pipeline(name).names():
                pipeline = self.pipeline(name)
                (pipeline.insert_after if after else pipeline.insert_before)(anchor, new_pass)
                changes[name] = pipeline
        return replace(self, **changes)


STAGES = ("prepare", "convert", "lower")


_TARGETS: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    """Make ``target`` reachable by name, and its own passes by theirs."""
    for pass_cls in target.passes:
        register_pass(pass_cls)
    _TARGETS[target.name] = target
    return target


def get_target(name: str) -> Target:
    if name not in _TARGETS:
        raise QCompileError(f"unknown target '{name}'; known targets: {', '.join(sorted(_TARGETS))}")
    return _TARGETS[name]


def targets() -> dict[str, Target]:
    return dict(_TARGETS)


# The clean-up every target's prepare stage starts with.
CLEANUP = "inline-regions,canonicalize,normalize-linears,fold-batchnorm,conv1d-as-conv2d,eliminate-dead-code"
# Prepare with calibration data: clean up, smooth outlier channels (measured on the data), plan,
# observe, calibrate (PLAN: what follows the clean-up, after a target's own rewrites). Without data: clean up and plan; activations get run-time scales.
PLAN = "smooth-outliers,annotate,gptq,correct-bias,insert-observers,calibrate"
PREPARE = f"{CLEANUP},{PLAN}"
DYNAMIC_PREPARE = f"{CLEANUP},annotate"
# Observers to the Q/DQ form: float8 edges as scaled casts, then the integer ones; dequantizes sunk.
CONVERT = "cast-fp8,convert,eliminate-dequant,eliminate-dead-code"

__all__ = ["CLEANUP", "CONVERT", "DYNAMIC_PREPARE", "PLAN", "PREPARE", "STAGES", "OpRule", "Target", "get_target", "register_target", "targets"]
