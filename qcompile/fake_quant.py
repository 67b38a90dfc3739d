"""Fake quantization for training: the Q/DQ round trip as a differentiable module (LSQ / LSQ+).

In the forward pass a :class:`FakeQuantize` computes exactly what ``qc.quantize`` followed by
``qc.dequantize`` compute with the same scale and zero point (same float32 division, round
half to even, clamp), so a trained model lowers to its Q/DQ graph without moving a value:

    v = x / S          q = clamp(round(v) + round(Z), qmin, qmax)          x̂ = (q − round(Z)) · S

The backward pass is Learned Step Size Quantization (Esser et al. 2020) with LSQ+'s learnable
offset (Bhalgat et al. 2020). With the straight-through estimator for round, and
``inside`` meaning qmin ≤ round(v) + round(Z) ≤ qmax:

    ∂x̂/∂x = 1 inside, 0 where clamped
    ∂x̂/∂S = round(v) − v inside, qmin − round(Z) below, qmax − round(Z) above   (times g)
    ∂x̂/∂Z = 0 inside, −S where clamped

with LSQ's gradient scale g = 1 / √(N · Q_P): N the number of elements sharing one scale, Q_P
the largest positive integer level. Without it the step's gradient, summed over N elements,
dwarfs the weights' and training is unstable.

A float8 spec (E4M3 / E5M2, scale only: Z = 0) is the same with the float8 cast in place of
round and the format's largest finite value M as the bounds, as ``qc.quantize`` computes it:

    q = fp8(clamp(v, −M, M))           x̂ = q · S
    ∂x̂/∂x = 1 where |v| ≤ M, else 0    ∂x̂/∂S = q − v where |v| ≤ M, else ±M   (times g, Q_P = M)

Its steps are relative (3 mantissa bits for E4M3), so S sets mostly where the range saturates
and where values fall below the normal range.

Scales are per tensor, per channel (along ``axis``) or per group (``group_size`` consecutive
elements along axis 1 of a 2-D weight share one). Integer specs of 2 to 8 bits and float8
specs are taken.
A per-token spec is dynamic: :class:`DynamicFakeQuantize` takes each row's scale and zero point
from the row's own range, as the lowered graph's ``qc.choose_qparams_per_token`` will, and
has nothing to learn (the straight-through gradient for ``x`` alone).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from qcompile.errors import QCompileError
from qcompile.observers import make_observer
from qcompile.ops import choose_qparams_per_token
from qcompile.spec import PerGroup, PerTensor, PerToken, QuantSpec, compute_qparams, grouped


def _shaped(param: Tensor, x: Tensor, spec: QuantSpec) -> Tensor:
    """A scale or zero point shaped to broadcast against ``x`` (already grouped when per-group)."""
    if isinstance(spec.granularity, PerTensor):
        return param.reshape([1] * x.dim())
    if isinstance(spec.granularity, PerGroup):
        return param.reshape(x.shape[0], x.shape[1], 1)
    if isinstance(spec.granularity, PerToken):
        return param.reshape(*x.shape[:-1], 1)
    shape = [1] * x.dim()
    shape[spec.granularity.axis % x.dim()] = -1
    return param.reshape(shape)


class _LsqFakeQuantize(torch.autograd.Function):
    """The forward and the LSQ/LSQ+ backward of the module docstring, on broadcast parameters."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                grad_scale: float, float8: torch.dtype | None = None) -> Tensor:
        z = zero_point.round().clamp(qmin, qmax)
        v = x.to(torch.float32) / scale
        if float8 is not None:  # Z = 0; the cast of the saturated value is the rounding
            rounded = v.clamp(qmin, qmax).to(float8).to(torch.float32)
            q, below, above = rounded, v < qmin, v > qmax
        else:
            rounded = v.round()
            unclamped = rounded + z
            q = unclamped.clamp(qmin, qmax)
            below, above = unclamped < qmin, unclamped > qmax
        ctx.save_for_backward(v, rounded, below, above, scale, z)
        ctx.bounds = (qmin, qmax, grad_scale)
        ctx.shapes = (x.dtype, scale.shape, zero_point.shape)
        return ((q - z) * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        v, rounded, below, above, scale, z = ctx.saved_tensors
        qmin, qmax, grad_scale = ctx.bounds
        x_dtype, scale_shape, zero_point_shape = ctx.shapes
        clamped = below | above
        grad = grad.to(torch.float32)
        grad_x = grad.masked_fill(clamped, 0.0).to(x_dtype) if ctx.needs_input_grad[0] else None
        grad_scale_out = grad_zero_point = None
        if ctx.needs_input_grad[1]:
            step = torch.where(below, qmin - z, torch.where(above, qmax - z, rounded - v))
            grad_scale_out = _reduce_to(grad * step * grad_scale, scale_shape)
        if ctx.needs_input_grad[2]:
            grad_zero_point = _reduce_to(torch.where(clamped, -grad * scale, 0.0) * grad_scale, zero_point_shape)
        return grad_x, grad_scale_out, grad_zero_point, None, None, None, None


def _reduce_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to the parameter's shape."""
    dims = [d for d, (g, s) in enumerate(zip(grad.shape, shape, strict=True)) if s == 1 and g != 1]
    return grad.sum(dim=dims, keepdim=True) if dims else grad


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec, grad_scale: float = 1.0) -> Tensor:
    """``x`` quantized and dequantized with ``spec``'s range (module docstring), differentiable
    in ``x``, ``scale`` and ``zero_point``."""
    values = grouped(x, spec) if isinstance(spec.granularity, PerGroup) else x
    out = _LsqFakeQuantize.apply(values, _shaped(scale, values, spec), _shaped(zero_point, values, spec),
                                 spec.qmin, spec.qmax, grad_scale, spec.storage_dtype if spec.is_float8 else None)
    return out.reshape(x.shape)


def fake_quantize_bias(bias: Tensor, activation_log_scale: Tensor, weight_log_scale: Tensor) -> Tensor:
    """A bias rounded as the integer kernel will add it: int32 steps of S_x · S_W,

        b̂ = round(b / (S_x · S_W)) · (S_x · S_W)        S = exp(log_scale), as the fake-quants compute it

    with the straight-through gradient for b and none for the scales (the rounding moves b by
    half a step of the int32 accumulator at most). Training through it makes the lowered
    model's int32 biases the trained ones exactly: a quantized transformer can be so sensitive
    that a 1e-5 nudge of one bias moves its output by 27 dB of SQNR."""
    scale = (activation_log_scale.detach().exp() * weight_log_scale.detach().exp()).reshape(-1)
    rounded = torch.div(bias.to(torch.float32), scale).round().clamp(-(2**31), 2**31 - 1) * scale
    return bias + (rounded.to(bias.dtype) - bias).detach()


def token_qparams(x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """A scale and zero point per row of ``x`` (over its last dimension, shaped [..., 1]) from
    the row's own range, by the very op the lowered graph computes them with at run time."""
    return choose_qparams_per_token(x.detach(), spec.qmin, spec.qmax, spec.symmetric)


def weight_qparams(weight: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Initial scale and zero point of a weight: its range per tensor, channel or group; with
    ``observer="mse"``, each channel's (group's) clipping ratio in [0.5, 1] that minimizes the
    squared rounding-plus-clipping error, which matters at 2 to 4 bits where the largest
    weight would otherwise waste most levels."""
    w = weight.detach().float()
    if isinstance(spec.granularity, PerGroup):
        values = grouped(w, spec)
        lo, hi = values.amin(dim=-1), values.amax(dim=-1)
    elif isinstance(spec.granularity, PerTensor) or spec.observer != "mse":
        observer = make_observer(spec if spec.observer in ("minmax", "moving-average") else
                                 QuantSpec(spec.dtype, spec.symmetric, spec.granularity), name="weight")
        observer(w)
        return observer.qparams()
    else:
        dims = [d for d in range(w.dim()) if d != spec.granularity.axis % w.dim()]
        lo, hi = w.amin(dim=dims), w.amax(dim=dims)
    if spec.observer != "mse":
        return compute_qparams(lo, hi, spec)
    best_scale, best_zero_point, best_error = None, None, None
    for ratio in torch.linspace(1.0, 0.5, 21).tolist():
        scale, zero_point = compute_qparams(lo * ratio, hi * ratio, spec)
        error = (fake_quantize(w, scale, zero_point.float(), spec) - w).square()
        error = _per_parameter(error, w, spec)
        if best_error is None:
            best_scale, best_zero_point, best_error = scale, zero_point, error
        else:
            better = error < best_error
            best_scale = torch.where(better, scale, best_scale)
            best_zero_point = torch.where(better, zero_point, best_zero_point)
            best_error = torch.minimum(error, best_error)
    return best_scale, best_zero_point


def _per_parameter(error: Tensor, x: Tensor, spec: QuantSpec) -> Tensor:
    """Squared errors summed over the elements that share one parameter."""
    if isinstance(spec.granularity, PerGroup):
        return grouped(error, spec).sum(dim=-1)
    axis = spec.granularity.axis % x.dim()
    return error.sum(dim=[d for d in range(x.dim()) if d != axis])


class FakeQuantize(nn.Module):
    """The trainable Q/DQ round trip of one value (a weight or an activation edge).

    The scale is trained in log space, S = exp(log_scale), as TQT does (Jain et al. 2020): it
    stays positive, and an optimizer's step (Adam's is about its learning rate whatever the
    gradient) changes it by a ratio, not by an amount that would overshoot a step of 1e-3 to
    below zero. It is trained when the spec's ``learnable_scale`` says so, else fixed at its
    initial value; ``zero_point`` is a float parameter rounded in the forward, trained when
    ``learnable_zero_point`` says so (LSQ+). ``enabled=False`` passes values through unchanged
    (the float model inside the QAT graph). A scale that is no longer finite is an error naming
    the value it quantizes: training diverged there.
    """

    def __init__(self, spec: QuantSpec, scale: Tensor, zero_point: Tensor, name: str = ""):
        super().__init__()
        self.spec = spec
        self.name = name
        self.enabled = True
        self.log_scale = nn.Parameter(scale.detach().float().reshape(-1).log(), requires_grad=spec.learnable_scale)
        self.zero_point = nn.Parameter(zero_point.detach().float().clone().reshape(self.log_scale.shape),
                                       requires_grad=spec.learnable_zero_point)

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp()

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if self.log_scale.requires_grad and not bool(torch.isfinite(self.log_scale).all()):
            raise QCompileError(f"fake quantization of '{self.name}': its learned scale is no longer finite; "
                                "training diverged at this node (lower the learning rate, or clip gradients)")
        per_scale = x.numel() / self.log_scale.numel()
        grad_scale = 1.0 / math.sqrt(max(per_scale, 1.0) * self.spec.qmax)
        return fake_quantize(x, self.scale, self.zero_point, self.spec, grad_scale)

    def qparams(self) -> tuple[Tensor, Tensor]:
        """The constants the Q/DQ graph takes: the learned scale (float32, exactly as the forward
        computes it) and the zero point, rounded and clamped to the integer range (int32)."""
        zero_point = self.zero_point.detach().round().clamp(self.spec.qmin, self.spec.qmax).to(torch.int32)
        return self.scale.detach(), zero_point

    def extra_repr(self) -> str:
        return f"{self.name!r}, {self.spec}, enabled={self.enabled}"


class FakeQuantizeBias(nn.Module):
    """:func:`fake_quantize_bias` as a graph module, called with the two fake-quants' log scales
    (``get_attr`` nodes), so that ``enabled=False`` turns it off with them."""

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True

    def forward(self, bias: Tensor, activation_log_scale: Tensor, weight_log_scale: Tensor) -> Tensor:
        return fake_quantize_bias(bias, activation_log_scale, weight_log_scale) if self.enabled else bias


class DynamicFakeQuantize(nn.Module):
    """The Q/DQ round trip of a per-token (dynamic) activation: each row quantized with the
    parameters of its own range (:func:`token_qparams`), bit for bit what the lowered graph's
    ``choose_qparams_per_token`` -> ``quantize`` -> ``dequantize`` computes. Nothing is learned:
    the gradient is the straight-through one for ``x`` (0 where a value is clamped, which with
    a row's own range is nowhere)."""

    def __init__(self, spec: QuantSpec, name: str = ""):
        super().__init__()
        if not spec.dynamic or spec.is_float8:
            raise QCompileError(f"dynamic fake quantization of '{name}' takes an integer per-token spec, not {spec}")
        self.spec = spec
        self.name = name
        self.enabled = True

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        scale, zero_point = token_qparams(x, self.spec)
        return fake_quantize(x, scale, zero_point.float(), self.spec)

    def extra_repr(self) -> str:
        return f"{self.name!r}, {self.spec}, enabled={self.enabled}"
