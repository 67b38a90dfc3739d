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
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import fx

from qcompile.calibration import record
from qcompile.ir.graph import op_arguments

LINEAR = torch.ops.aten.linear.default
# Activations with act(0) = 0: after them, outlier channels can be split off for free.
ZERO_PRESERVING = frozenset({torch.ops.aten.gelu.default, torch.ops.aten.relu.default})
SPLIT_RATIO = 4.0
# At most this share of a linear's input channels goes to the float path: 30 of MiniLM's 1536
# FFN channels.
MAX_SPLIT_FRACTION = 0.02


class _ChannelAbsMax(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.absmax: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seen = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
        self.absmax = seen if self.absmax is None else torch.maximum(self.absmax, seen)
        return x


def channel_absmax(
    gm: fx.GraphModule,
    values: Iterable[str],
    batches: Iterable[Any],
    example: tuple[tuple[Any, ...], dict[str, Any]],
) -> dict[str, torch.Tensor]:
    """Largest magnitude per last-dimension channel of each named value over ``batches``."""
    nodes = {n.name: n for n in gm.graph.nodes}
    recorders = {name: _ChannelAbsMax() for name in values if _channelled(nodes[name])}
    record(gm, recorders.items(), batches, example)
    return {name: r.absmax for name, r in recorders.items() if r.absmax is not None}


def _channelled(value: fx.Node) -> bool:
    val = value.meta.get("val")
    return isinstance(val, torch.Tensor) and val.is_floating_point() and val.dim() > 0


def outlier_channels(absmax: torch.Tensor, ratio: float, max_fraction: float) -> tuple[tuple[int, float], ...]:
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


def smoothing_factors(absmax: torch.Tensor, alpha: float) -> tuple[tuple[int, float], ...]:
    """``(channel, (magnitude / median) ** alpha)`` for every channel above the median."""
    median = float(absmax.median())
    if median <= 0.0:
        return ()
    return tuple((c, (float(absmax[c]) / median) ** alpha) for c in range(absmax.numel())
                 if float(absmax[c]) > median)


def smoothing_plan(
    gm: fx.GraphModule,
    values: Iterable[str],
    batches: Iterable[Any],
    example: tuple[tuple[Any, ...], dict[str, Any]],
    alpha: float,
) -> tuple[tuple[str, tuple[tuple[int, float], ...]], ...]:
    """``smooth-outliers``' channels for each value, measured on ``batches``."""
    nodes = {n.name: n for n in gm.graph.nodes}
    plan = []
    for name, absmax in channel_absmax(gm, values, batches, example).items():
        if nodes[name].target in ZERO_PRESERVING:
            channels = outlier_channels(absmax, SPLIT_RATIO, MAX_SPLIT_FRACTION)
        else:
            channels = smoothing_factors(absmax, alpha)
        if channels:
            plan.append((name, channels))
    return tuple(plan)


def quantized_linear_inputs(gm: fx.GraphModule, quantized: set[str]) -> list[str]:
    """Values that feed a linear in ``quantized`` as its input: where outliers cost int8 precision."""
    names = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == LINEAR and node.name in quantized:
            source = op_arguments(node)["input"]
            if isinstance(source, fx.Node) and source.name not in names:
                names.append(source.name)
    return names
