"""Outlier channels: the input channels of a linear whose range dwarfs the others.

Transformer activations concentrate their extremes in a handful of fixed channels (in
all-MiniLM-L6-v2 one GELU channel reaches 25 where the rest stay under 6; LayerNorm channel
99 reaches 28 where the median is 2). A per-tensor scale must cover them, so every other
channel is quantized several times more coarsely than it needs. ``smooth-outliers`` takes
the range out of the int8 linear's input; this module measures it, on the float graph run
over the calibration batches, and chooses per value:

* after a GELU/ReLU (split into a float path): the channels over ``SPLIT_RATIO`` x the median
  channel's magnitude, at most ``MAX_SPLIT_FRACTION`` of them (the float path must stay small);
* elsewhere (scaled into the weights, which costs the same for any number of channels): every
  channel above the median, divided by ``(magnitude / median) ** alpha``: SmoothQuant's
  migration strength, measured on activations (0: nothing moves; 1: every channel down to the
  median, all the range in the weights).

With ``alpha="auto"`` each value takes its own strength: the one of :data:`AUTO_ALPHAS` (0, no
smoothing, among them) whose quantized linears move least from float on a sample of the value's
calibration rows X, with every reader r's planned activation and weight formats:

    e(α) = Σ_r ‖Q_x(X ⊙ s_α⁻¹) · Q_w(W_r ⊙ s_α)ᵀ − X · W_rᵀ‖² / Σ_r ‖X · W_rᵀ‖²

(Q_x on the sample's range per tensor, Q_w on the weight's own grid). A layer whose weights
are coarse (int4) keeps its range in the activations, one whose outliers dominate moves it.

What one compile measured it can hand to another (:class:`MeasuredSmoothing`, keyed by the
weights that read each value): ``compile_decoder``'s decode step smooths as its prefill did.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx

from qcompile.calibration import record
from qcompile.errors import QCompileError
from qcompile.fake_quant import fake_quantize, token_qparams, weight_qparams
from qcompile.ir.graph import constant_value, op_arguments
from qcompile.spec import QuantSpec, compute_qparams

LINEAR = torch.ops.aten.linear.default
# Activations with act(0) = 0: after them, outlier channels can be split off for free.
ZERO_PRESERVING = frozenset({torch.ops.aten.gelu.default, torch.ops.aten.relu.default})
SPLIT_RATIO = 4.0
# At most this share of a linear's input channels goes to the float path: 30 of MiniLM's 1536
# FFN channels.
MAX_SPLIT_FRACTION = 0.02
# The strengths alpha="auto" chooses from, per value.
AUTO_ALPHAS = (0.0, 0.25, 0.5, 0.75, 0.9)
# Rows of each calibration batch kept for alpha="auto"'s local error, evenly spaced.
SAMPLED_ROWS = 256

Channels = tuple[tuple[int, float], ...]  # (channel, factor) pairs of one value
# (activation spec, weight spec) of each quantized linear, by node name.
LinearSpecs = Mapping[str, tuple[QuantSpec, QuantSpec | None]]


@dataclass(frozen=True)
class MeasuredSmoothing:
    """The channels one compile's ``smooth-outliers`` measured, to apply as they are in another
    compile of the same weights.

    The measurement is per value, a node of one graph, and node names belong to that graph; the
    linears reading the value belong to the model. So the channels are kept under the name of
    each reading linear's weight (its captured parameter, e.g. ``model.layers.0.mlp.up_proj.weight``),
    which every program capturing the same modules shares. Two programs of one model (a
    decoder's prefill and step) then smooth the same weights by the same factors, so they
    quantize the same integers and hold them once."""

    channels: Mapping[str, Channels]

    @classmethod
    def of(cls, gm: fx.GraphModule, plan: Iterable[tuple[str, Channels]]) -> MeasuredSmoothing:
        """``plan``'s channels ((value name, channels) pairs of ``gm``) under their readers' weights."""
        nodes = {n.name: n for n in gm.graph.nodes}
        return cls({weight: channels for name, channels in plan for weight in reader_weights(nodes[name])})

    def plan(self, gm: fx.GraphModule, values: Iterable[str]) -> tuple[tuple[str, Channels], ...]:
        """(value, channels) for each of ``values`` whose reading linears' weights were measured;
        refused when the channels do not fit the value (another model's measurement)."""
        nodes, found = {n.name: n for n in gm.graph.nodes}, []
        for name in values:
            measured = [(weight, self.channels[weight]) for weight in reader_weights(nodes[name]) if weight in self.channels]
            if not measured:
                continue
            weight, channels = measured[0]
            width = int(nodes[name].meta["val"].shape[-1])
            if any(c >= width for c, _ in channels) or any(other != channels for _, other in measured[1:]):
                raise QCompileError(f"outlier_smoothing: the channels measured for the linears reading '{name}' "
                                    f"(weight '{weight}') do not fit it: {width} channels, or its readers were "
                                    f"measured differently; were they measured on another model?")
            found.append((name, channels))
        return tuple(found)


def reader_weights(value: fx.Node) -> list[str]:
    """The names of the constant weights of the linears that read ``value`` as their input."""
    names = []
    for reader in value.users:
        if reader.op != "call_function" or reader.target != LINEAR:
            continue
        linear = op_arguments(reader)
        weight = linear["weight"]
        if linear["input"] is value and isinstance(weight, fx.Node) and weight.op == "get_attr":
            names.append(str(weight.target))
    return names


Smoothing = float | Literal["auto"] | MeasuredSmoothing | None


def check_smoothing(outlier_smoothing: Smoothing) -> None:
    """A migration strength in [0, 1], ``"auto"``, another compile's measurement or None (off);
    anything else is refused."""
    if outlier_smoothing is None or outlier_smoothing == "auto" or isinstance(outlier_smoothing, MeasuredSmoothing):
        return
    strength = isinstance(outlier_smoothing, (int, float)) and not isinstance(outlier_smoothing, bool)
    if not strength or not 0.0 <= outlier_smoothing <= 1.0:
        raise QCompileError(f"outlier_smoothing is a migration strength between 0 and 1, \"auto\" (chosen per value), "
                            f"another compile's measurement (QuantizedModel.smoothing) or None for off, "
                            f"got {outlier_smoothing!r}")


class _ChannelStatistics(torch.nn.Module):
    """Largest magnitude per channel and, when ``rows`` > 0, that many evenly spaced rows of each batch."""

    def __init__(self, rows: int = 0) -> None:
        super().__init__()
        self.rows = rows
        self.absmax: torch.Tensor | None = None
        self.sample: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        seen = flat.abs().amax(0)
        self.absmax = seen if self.absmax is None else torch.maximum(self.absmax, seen)
        if self.rows:
            self.sample.append(flat[torch.linspace(0, flat.shape[0] - 1, min(self.rows, flat.shape[0])).long()])
        return x


def channel_statistics(
    gm: fx.GraphModule,
    values: Iterable[str],
    batches: Iterable[Any],
    example: tuple[tuple[Any, ...], dict[str, Any]],
    rows: int = 0,
) -> dict[str, _ChannelStatistics]:
    """Largest magnitude per last-dimension channel of each named value over ``batches`` (and
    ``rows`` sampled rows of each batch)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    recorders = {name: _ChannelStatistics(rows) for name in values if _channelled(nodes[name])}
    record(gm, recorders.items(), batches, example)
    return {name: r for name, r in recorders.items() if r.absmax is not None}


def _channelled(value: fx.Node) -> bool:
    val = value.meta.get("val")
    return isinstance(val, torch.Tensor) and val.is_floating_point() and val.dim() > 0


def outlier_channels(absmax: torch.Tensor, ratio: float, max_fraction: float) -> Channels:
    """``(channel, factor)`` for each channel whose magnitude exceeds ``ratio`` x the median
    channel's, largest first; ``factor`` is its magnitude over the largest remaining channel's
    (what scaling it down to the ordinary range divides it by)."""
    threshold = ratio * float(absmax.median())
    order = torch.argsort(absmax, descending=True)
    limit = max(1, int(max_fraction * absmax.numel()))
    found = [int(c) for c in order[:limit] if float(absmax[c]) > threshold]
    if not found:
        return ()
    ordinary = float(absmax[order[len(found)]])
    return tuple((c, float(absmax[c]) / ordinary) for c in found)


def smoothing_factors(absmax: torch.Tensor, alpha: float) -> Channels:
    """``(channel, (magnitude / median) ** alpha)`` for every channel above the median."""
    median = float(absmax.median())
    if median <= 0.0:
        return ()
    return tuple((c, (float(absmax[c]) / median) ** alpha) for c in range(absmax.numel())
                 if float(absmax[c]) > median)


def factor_vector(width: int, channels: Channels) -> torch.Tensor:
    """The per-channel factors s of ``channels`` ((channel, factor) pairs) over ``width``
    channels, 1 for the channels not listed."""
    factors = torch.ones(width, dtype=torch.float32)
    for channel, factor in channels:
        factors[channel] = factor
    return factors


Readers = list[tuple[torch.Tensor, QuantSpec, QuantSpec | None]]  # (weight, activation spec, weight spec)


def float_outputs(x: torch.Tensor, readers: Readers) -> list[torch.Tensor]:
    """x Wᵀ for each reader's weight W: the outputs :func:`local_error` compares with."""
    return [x @ weight.float().T for weight, _, _ in readers]


@torch.no_grad()
def local_error(x: torch.Tensor, readers: Readers, factors: torch.Tensor,
                references: list[torch.Tensor] | None = None) -> float:
    """e(α) of the module docstring for the smoothing ``factors`` s (one per channel of ``x``),
    over ``readers``' (weight, activation spec, weight spec or None for a float weight);
    ``references`` are the float outputs x Wᵀ per reader, where the caller has them already."""
    if references is None:
        references = float_outputs(x, readers)
    smoothed = x / factors
    lo, hi = smoothed.amin(), smoothed.amax()
    quantized: dict[QuantSpec, torch.Tensor] = {}  # Q_x(X / s) per activation format among the readers
    error = total = 0.0
    for (weight, activation, weight_spec), reference in zip(readers, references, strict=True):
        if activation not in quantized:
            scale, zero_point = (token_qparams(smoothed, activation) if activation.dynamic
                                 else compute_qparams(lo, hi, activation))
            quantized[activation] = fake_quantize(smoothed, scale, zero_point.float(), activation)
        xq = quantized[activation]
        w = weight.float() * factors
        if weight_spec is not None:
            w_scale, w_zero_point = weight_qparams(w, weight_spec)
            w = fake_quantize(w, w_scale, w_zero_point.float(), weight_spec)
        error += float((xq @ w.T - reference).square().sum())
        total += float(reference.square().sum())
    return error / max(total, 1e-30)


def _auto_factors(gm: fx.GraphModule, value: fx.Node, statistics: _ChannelStatistics,
                  specs: LinearSpecs) -> tuple[Channels, float, float]:
    """The smoothing of ``value`` with the AUTO_ALPHAS strength of least local error: (channels,
    alpha, error)."""
    readers = [(constant_value(gm, op_arguments(r)["weight"]), *specs[r.name]) for r in value.users
               if r.target == LINEAR and r.name in specs and op_arguments(r)["input"] is value
               and constant_value(gm, op_arguments(r)["weight"]) is not None]
    if not readers:
        return (), 0.0, 0.0
    x = torch.cat(statistics.sample)
    references = float_outputs(x, readers)  # the same for every alpha
    best = ((), 0.0, local_error(x, readers, torch.ones(x.shape[-1]), references))
    for alpha in AUTO_ALPHAS:
        channels = smoothing_factors(statistics.absmax, alpha) if alpha > 0 else ()
        if not channels:
            continue
        error = local_error(x, readers, factor_vector(x.shape[-1], channels), references)
        if error < best[2]:
            best = (channels, alpha, error)
    return best


def smoothing_plan(
    gm: fx.GraphModule,
    values: Iterable[str],
    batches: Iterable[Any],
    example: tuple[tuple[Any, ...], dict[str, Any]],
    alpha: float | Literal["auto"],
    specs: LinearSpecs | None = None,
) -> tuple[tuple[tuple[str, Channels], ...], dict[str, float]]:
    """``smooth-outliers``' channels for each value, measured on ``batches``, and with
    ``alpha="auto"`` the strength chosen for each scaled value (by the local error of the
    quantized linears ``specs`` names)."""
    if alpha == "auto" and specs is None:
        raise ValueError('alpha="auto" chooses by the readers\' formats: give specs')
    nodes = {n.name: n for n in gm.graph.nodes}
    plan, chosen = [], {}
    statistics = channel_statistics(gm, values, batches, example, SAMPLED_ROWS if alpha == "auto" else 0)
    for name, stats in statistics.items():
        if nodes[name].target in ZERO_PRESERVING:
            channels = outlier_channels(stats.absmax, SPLIT_RATIO, MAX_SPLIT_FRACTION)
        elif alpha == "auto":
            channels, chosen[name], _ = _auto_factors(gm, nodes[name], stats, specs)
        else:
            channels = smoothing_factors(stats.absmax, alpha)
        if channels:
            plan.append((name, channels))
    return tuple(plan), chosen


def quantized_linear_inputs(gm: fx.GraphModule, quantized: set[str]) -> list[str]:
    """Values that feed a linear in ``quantized`` as its input: where outliers cost int8 precision."""
    names = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == LINEAR and node.name in quantized:
            source = op_arguments(node)["input"]
            if isinstance(source, fx.Node) and source.name not in names:
                names.append(source.name)
    return names
