"""Quantization specs: what a tensor is quantized to, and the affine map that does it.

A value r is stored as an integer q with a scale S and zero point Z:

    q = clamp(round(r / S) + Z, qmin, qmax)        r ≈ S · (q − Z)

Given an observed range [lo, hi] (always widened to contain 0, so that 0 is exact, which zero
padding and ReLU rely on):

    affine:     S = (hi − lo) / (qmax − qmin),  Z = clamp(qmin − round(lo / S), qmin, qmax)
    symmetric:  S = max(|lo|, |hi|) / ⌊(qmax − qmin) / 2⌋,  Z = 0 (signed) or 128 (uint8)

(the floor makes ±max land on ±127 exactly for int8, not on a clipped 127.5)

A float8 value is stored as r / S cast to E4M3 (largest finite 448) or E5M2 (57344), saturated
there, and S is chosen so that the largest magnitude lands on that maximum (less a margin):

    float8:     S = max(|lo|, |hi|) · 2^margin / max,  Z = 0

A zero range (an all-zero tensor) would give S = 0; S is floored at float32's machine epsilon,
as torch's observers do, so quantization never divides by zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qcompile.errors import QCompileError

# Storage dtype and integer range of each quantized dtype: int2 to int7 (QAT's narrow weights)
# live in int8 storage, so an int8 kernel runs them unchanged.
_INTEGER_RANGES: dict[str, tuple[torch.dtype, int, int]] = {
    "int8": (torch.int8, -128, 127),
    "uint8": (torch.uint8, 0, 255),
    **{f"int{bits}": (torch.int8, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) for bits in range(2, 8)},
    "int32": (torch.int32, -(2**31), 2**31 - 1),  # biases, whose scale is derived, never observed
}
_FLOAT8 = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
FLOAT8_DTYPES = tuple(_FLOAT8)
FLOAT8_STORAGE = tuple(_FLOAT8.values())  # the torch dtypes float8 values are stored in
# 448 = 7·2^6: the E4M3 range narrowed by up to 2^6 stays an integer (E5M2's 57344 = 7·2^13).
MAX_MARGIN = 6
OBSERVERS = ("minmax", "moving-average", "percentile", "entropy", "mse")
# How a weight's values are put on its grid: each to its nearest step, or by GPTQ (the
# ``gptq`` pass: columns rounded in turn, the error of each spread over the columns not yet
# rounded, weighted by the calibration inputs' Hessian).
ROUNDINGS = ("nearest", "gptq")
MIN_SCALE = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class PerTensor:
    def __str__(self) -> str:
        return "per-tensor"


@dataclass(frozen=True)
class PerChannel:
    axis: int = 0

    def __str__(self) -> str:
        return f"per-channel({self.axis})"


@dataclass(frozen=True)
class PerGroup:
    """Groups of ``group_size`` consecutive elements along ``axis`` share a scale (weights only)."""

    axis: int = 1
    group_size: int = 128

    def __post_init__(self) -> None:
        if self.group_size <= 0:
            raise ValueError(f"PerGroup group_size must be positive, got {self.group_size}")

    def __str__(self) -> str:
        return f"per-group({self.axis},{self.group_size})"


@dataclass(frozen=True)
class PerToken:
    """One scale per row (every index of all dimensions but the last), computed at run time from
    the row's own range: dynamic activations only, since rows are not known before the input."""

    def __str__(self) -> str:
        return "per-token"


Granularity = PerTensor | PerChannel | PerGroup | PerToken


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized. Frozen and validated, so it can be shared between nodes.

    ``observer`` picks the calibration method for activations: ``minmax``, ``moving-average``,
    ``percentile`` (clip at ``percentile`` of |x|), ``entropy`` (KL-optimal clip) or ``mse``
    (least-squares S and Z). ``learnable_scale`` marks a scale trained in QAT (LSQ);
    ``learnable_zero_point`` a zero point trained with it (LSQ+, affine specs only).
    ``margin`` (float8 only) leaves 2^margin of headroom above the calibrated magnitude: the
    scale is amax · 2^margin / max, so values up to 2^margin times the largest seen do not
    saturate, at 2^margin coarser steps (an E4M3 step is relative, so only the smallest values
    lose: they fall into the subnormals sooner).

    ``rounding`` (weights only) says how the weight's values are put on the grid the scale
    defines: ``nearest`` each on its own, ``gptq`` by the ``gptq`` pass from the calibration
    inputs. ``bias_correction`` (weights only) takes the mean output error the rounded weight
    makes on the calibration inputs out of the op's bias: the ``correct-bias`` pass does it
    after rounding to nearest; with ``gptq`` that pass rounds for the error left once the bias
    takes its mean, and shifts the bias itself.
    """

    dtype: str = "int8"
    symmetric: bool = True
    granularity: Granularity = field(default_factory=PerTensor)
    observer: str = "minmax"
    percentile: float = 99.99
    learnable_scale: bool = False
    learnable_zero_point: bool = False
    margin: int = 0
    rounding: str = "nearest"
    bias_correction: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in _INTEGER_RANGES and self.dtype not in _FLOAT8:
            known = ", ".join([*_INTEGER_RANGES, *_FLOAT8])
            raise ValueError(f"QuantSpec dtype '{self.dtype}' is not one of: {known}")
        if self.observer not in OBSERVERS:
            raise ValueError(f"QuantSpec observer '{self.observer}' is not one of: {', '.join(OBSERVERS)}")
        if not isinstance(self.granularity, (PerTensor, PerChannel, PerGroup, PerToken)):
            raise TypeError("QuantSpec granularity must be PerTensor, PerChannel, PerGroup or PerToken, "
                            f"got {self.granularity!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"QuantSpec percentile must be in (50, 100], got {self.percentile}")
        if self.learnable_zero_point and self.symmetric:
            raise ValueError("a learnable zero point needs an affine spec (symmetric=False)")
        if self.is_float8 and not self.symmetric:
            raise ValueError("float8 quantization is scale-only: use symmetric=True")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"QuantSpec rounding '{self.rounding}' is not one of: {', '.join(ROUNDINGS)}")
        if (self.rounding != "nearest" or self.bias_correction) and isinstance(self.granularity, PerToken):
            raise ValueError("rounding and bias_correction are weight options; per-token specs are activations'")
        if self.margin and not self.is_float8:
            raise ValueError("a margin is a float8 option (an integer format's steps are uniform: widen its range)")
        if not 0 <= self.margin <= MAX_MARGIN:
            raise ValueError(f"QuantSpec margin must be in [0, {MAX_MARGIN}], got {self.margin}")

    @property
    def is_float8(self) -> bool:
        return self.dtype in _FLOAT8

    @property
    def bits(self) -> int:
        """How many bits the format has: 8 for int8 / uint8 / float8, 4 for int4, 32 for int32."""
        return 8 if self.is_float8 else int(self.dtype.removeprefix("u").removeprefix("int"))

    @property
    def storage_dtype(self) -> torch.dtype:
        return _FLOAT8[self.dtype] if self.is_float8 else _INTEGER_RANGES[self.dtype][0]

    @property
    def qmin(self) -> int:
        """The lowest value ``quantize`` clamps to: the integer range's, or for float8 minus its
        largest finite magnitude (-448 for E4M3, -57344 for E5M2; both integers)."""
        if self.is_float8:
            return -int(torch.finfo(self.storage_dtype).max)
        return _INTEGER_RANGES[self.dtype][1]

    @property
    def qmax(self) -> int:
        """The highest value ``quantize`` clamps to (see :attr:`qmin`)."""
        if self.is_float8:
            return int(torch.finfo(self.storage_dtype).max)
        return _INTEGER_RANGES[self.dtype][2]

    @property
    def axis(self) -> int | None:
        """The ops' ``axis`` argument: None for one scale, per token and per group (whose scales
        arrive shaped to broadcast: [..., 1] per row, [out, in / size, 1] against the weight
        viewed by :func:`grouped`); the channel axis otherwise."""
        return None if isinstance(self.granularity, (PerTensor, PerToken, PerGroup)) else self.granularity.axis

    @property
    def dynamic(self) -> bool:
        """Scales computed at run time whatever the calibration (per token)."""
        return isinstance(self.granularity, PerToken)

    @property
    def scale_range(self) -> tuple[int, int]:
        """The (qmin, qmax) the scale is computed for: the clamping range, narrowed by the margin."""
        return -(-self.qmin >> self.margin), self.qmax >> self.margin

    def __str__(self) -> str:
        scheme = "sym" if self.symmetric else "affine"
        rounding = ("" if self.rounding == "nearest" else f"/{self.rounding}") + ("/bias-corrected" if self.bias_correction else "")
        return f"{self.dtype}/{scheme}/{self.granularity}/{self.observer}{rounding}"


def compute_qparams(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) for observed ranges ``lo``..``hi`` (see module doc)."""
    lo = torch.as_tensor(lo, dtype=torch.float32)
    hi = torch.as_tensor(hi, dtype=torch.float32)
    if torch.isnan(lo).any() or torch.isnan(hi).any() or torch.isinf(lo).any() or torch.isinf(hi).any():
        raise ValueError("cannot compute quantization parameters from a NaN or infinite range")
    if (lo > hi).any():
        raise ValueError("observed range has lo > hi")
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if spec.is_float8:
        # Scale-only: the largest magnitude maps to the format's largest finite value (or
        # 2^margin below it), amax / (max / 2^margin); the symmetric formula with that range.
        qmin, qmax = spec.scale_range
        scale, _ = integer_qparams(lo, hi, qmin, qmax, symmetric=True)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    return integer_qparams(lo, hi, spec.qmin, spec.qmax, spec.symmetric)


def integer_qparams(
    lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer formulas of the module doc for a range already widened to contain 0."""
    if symmetric:
        amax = torch.maximum(-lo, hi)
        scale = torch.clamp(amax / ((qmax - qmin) // 2), min=MIN_SCALE)
        zero_point = torch.full_like(scale, (qmin + qmax + 1) // 2, dtype=torch.int32)
    else:
        scale = torch.clamp((hi - lo) / (qmax - qmin), min=MIN_SCALE)
        zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point


def group_mismatch(granularity: PerGroup, shape: tuple[int, ...]) -> str | None:
    """Why ``granularity`` cannot split a weight of ``shape`` into whole groups, or None when it can:
    groups run along the input channels of a 2-D weight, and their size must divide them."""
    if len(shape) != 2 or granularity.axis % 2 != 1:
        return f"per-group quantization takes 2-D weights grouped along axis 1, got {shape} along axis {granularity.axis}"
    if shape[1] % granularity.group_size:
        return f"per-group size {granularity.group_size} does not divide the {shape[1]} input channels"
    return None


def grouped(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """A per-group spec's view of a weight: each group on a last dimension of its own,
    [out, in] -> [out, in / size, size], so that its scales broadcast as [out, in / size, 1]."""
    granularity = spec.granularity
    if not isinstance(granularity, PerGroup):
        raise TypeError(f"grouped() takes a per-group spec, got {granularity}")
    reason = group_mismatch(granularity, tuple(x.shape))
    if reason is not None:
        raise QCompileError(reason)
    return x.reshape(x.shape[0], -1, granularity.group_size)
