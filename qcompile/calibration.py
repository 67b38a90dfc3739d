"""Calibration: run the observed graph over user data so its observers see real activations.

A step of ``compile``, not a pass: it changes observer state, not the graph. Batches may be
tuples or lists (positional inputs), dicts or other mappings (keyword inputs, as tokenizers
return them) or single tensors. Each batch is checked against the example inputs the graph
was captured with, so a wrong shape is an error naming the input, not a failure deep inside
an op.
"""

from __future__ import annotations

import statistics
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
from torch import fx
from tqdm.auto import tqdm

from qcompile.errors import CalibrationError, InputError
from qcompile.input_check import check_call
from qcompile.ir.graph import copy_graph_module, remove_dead_nodes
from qcompile.observers import Observer
from qcompile.spec import MIN_SCALE

# A batch whose largest magnitude at a node is this many times the other batches' median is
# outlying. Measured on all-MiniLM-L6-v2 (16 batches of 8 real sentences, all 42 observed
# nodes): ordinary batches reach at most 1.31x the median of the others; one corrupted input
# value of 1e4 is over 1000x. 10 leaves room for small, more variable batches.
OUTLIER_RATIO = 10.0


def empty_calibration_error() -> CalibrationError:
    return CalibrationError("calibration data is empty: give at least one batch, or none for dynamic quantization")


def as_call(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(args, kwargs) for one batch."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    raise CalibrationError(
        f"a calibration batch must be a tensor, a tuple/list of inputs or a dict of keyword inputs, "
        f"got {type(batch).__name__}"
    )


def check_batch(number: int, args: tuple[Any, ...], kwargs: dict[str, Any],
                example: tuple[tuple[Any, ...], dict[str, Any]], gm: fx.GraphModule) -> None:
    """Raise naming the batch and the input when ``args``/``kwargs`` do not fit the graph: the
    example's inputs and keywords, each input's dtype and every dimension the graph was captured
    with as fixed (dynamic ones, the batch or a sequence length, may differ)."""
    example_args, example_kwargs = example
    if len(args) != len(example_args) or set(kwargs) != set(example_kwargs):
        raise CalibrationError(
            f"calibration batch {number} has {len(args)} positional inputs and keywords {sorted(kwargs)}; "
            f"the example had {len(example_args)} and {sorted(example_kwargs)}"
        )
    try:
        check_call(gm, args, kwargs, finite=False)
    except InputError as exc:
        raise CalibrationError(f"calibration batch {number}: {exc}") from None


def calibrate(
    gm: fx.GraphModule,
    data: Iterable[Any],
    example: tuple[tuple[Any, ...], dict[str, Any]],
    *,
    progress: bool | None = None,
    skip: Collection[int] = (),
) -> int:
    """Run ``gm`` over ``data`` (batches numbered from 1, those in ``skip`` left out); returns
    the number of batches run. ``progress=None`` shows a bar on a terminal."""
    batches = 0
    disable = None if progress is None else not progress  # tqdm's None: a bar on terminals only
    with torch.no_grad():
        for number, batch in enumerate(tqdm(data, desc="calibrating", unit="batch", disable=disable), start=1):
            args, kwargs = as_call(batch)
            check_batch(number, args, kwargs, example, gm)
            check_device(number, args, kwargs, gm)
            if number in skip:
                continue
            gm(*args, **kwargs)
            batches += 1
    if batches == 0:
        raise empty_calibration_error()
    return batches


def record(
    gm: fx.GraphModule,
    recorders: Iterable[tuple[str, torch.nn.Module]],
    data: Iterable[Any],
    example: tuple[tuple[Any, ...], dict[str, Any]],
) -> int:
    """Run a copy of ``gm`` over ``data`` with each ``(value, recorder)``'s module called on the
    named value, and nothing else computed: the copy's outputs become None, so only the values
    the recorders read (and side effects) run. ``gm`` is not touched; returns the batches run."""
    recorded = copy_graph_module(gm)
    nodes = {n.name: n for n in recorded.graph.nodes}
    for number, (name, recorder) in enumerate(recorders):
        recorder._is_impure = True  # kept by dead-code elimination though nothing reads it
        recorded.add_submodule(f"_recorder_{number}", recorder)
        with recorded.graph.inserting_after(nodes[name]):
            recorded.graph.call_module(f"_recorder_{number}", (nodes[name],))
    output = recorded.graph.output_node()
    output.args = (fx.node.map_arg(output.args[0], lambda _: None),)
    remove_dead_nodes(recorded)
    recorded.recompile()
    return calibrate(recorded, data, example, progress=False)


def check_device(number: int, args: tuple[Any, ...], kwargs: dict[str, Any], gm: fx.GraphModule) -> None:
    """Calibration runs where the model's tensors are: a batch elsewhere is named, not a raw device error."""
    device = next((t.device for t in chain(gm.parameters(), gm.buffers())), torch.device("cpu"))
    for name, value in [*((f"input {i}", a) for i, a in enumerate(args)), *((f"input '{k}'", v) for k, v in kwargs.items())]:
        if isinstance(value, torch.Tensor) and value.device != device:
            raise CalibrationError(f"calibration batch {number}: {name} is on {value.device}, the model is on {device}")


@dataclass(frozen=True)
class CalibrationFinding:
    """Something calibration saw that the user should know: the node, the batch (if one), what."""

    node: str
    batch: int | None
    message: str

    def __str__(self) -> str:
        where = f"batch {self.batch}, " if self.batch is not None else ""
        return f"calibration ({where}{self.node}): {self.message}"


@dataclass(frozen=True)
class CalibrationOutcome:
    """What the ``calibrate`` stage did: batches run, what it saw, the batches it left out, and
    each observed value's (lo, hi) per batch, every batch included (batch ``i + 1`` at index
    ``i``), which the report draws."""

    batches: int
    findings: tuple[CalibrationFinding, ...]
    skipped: frozenset[int]
    ranges: dict[str, list[tuple[float, float]]] = field(default_factory=dict)


def observers(gm: fx.GraphModule) -> list[Observer]:
    return [m for m in gm.modules() if isinstance(m, Observer)]


def check_calibration(gm: fx.GraphModule, batch_numbers: list[int]) -> tuple[set[int], list[CalibrationFinding]]:
    """Batches to leave out, and what to tell the user, from each observer's per-batch ranges.

    A batch is *outlying* at a node when its largest magnitude there is over ``OUTLIER_RATIO``
    times the median of the other batches': one such batch stretches a min-max range over
    values no other input produces, and every ordinary value is then quantized coarsely. It is
    left out of calibration, unless half the batches or more are outlying (then the data is
    simply wide-spread, and is kept). A range that is constant over every batch (all-zero
    calibration data) or narrower than the smallest scale can represent is reported too: its
    scale says nothing about real inputs.
    """
    outlying: dict[int, CalibrationFinding] = {}
    findings = []
    for observer in observers(gm):
        ranges = observer.batch_ranges
        if not ranges:
            continue
        magnitudes = [max(-lo, hi) for lo, hi in ranges]
        for i, magnitude in enumerate(magnitudes):
            others = statistics.median(magnitudes[:i] + magnitudes[i + 1:]) if len(magnitudes) > 1 else 0.0
            if others > 0 and magnitude > OUTLIER_RATIO * others and batch_numbers[i] not in outlying:
                outlying[batch_numbers[i]] = CalibrationFinding(
                    observer.name, batch_numbers[i],
                    f"range up to {magnitude:.3g}, {magnitude / others:.0f}x the other batches' median {others:.3g}")
        lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
        if lo == hi:
            findings.append(CalibrationFinding(observer.name, None, f"every batch gave the constant {lo:.3g}: its "
                                               "scale is a guess; calibrate with data like real inputs"))
        elif hi - lo < MIN_SCALE * (observer.spec.qmax - observer.spec.qmin):
            findings.append(CalibrationFinding(observer.name, None, f"range {hi - lo:.3g} is below what the smallest "
                                               f"scale ({MIN_SCALE:.3g}) resolves: values there are rounded to a few steps"))
    if 2 * len(outlying) >= len(batch_numbers):
        return set(), findings + [CalibrationFinding(
            f.node, f.batch, f.message + " (kept: half the batches or more are as wide)") for f in outlying.values()]
    return set(outlying), [CalibrationFinding(f.node, f.batch, f.message + "; the batch is left out of calibration")
                           for f in outlying.values()] + findings


def calibrate_robustly(
    gm: fx.GraphModule,
    data: Iterable[Any],
    example: tuple[tuple[Any, ...], dict[str, Any]],
    *,
    progress: bool | None = None,
) -> CalibrationOutcome:
    """:func:`calibrate`, then :func:`check_calibration`; when a batch is outlying, the observers
    start over without it (``data`` must be re-iterable then)."""
    run = calibrate(gm, data, example, progress=progress)
    ranges = {observer.name: list(observer.batch_ranges) for observer in observers(gm)}
    skip, findings = check_calibration(gm, list(range(1, run + 1)))
    if skip:
        for observer in observers(gm):
            observer.reset()
        run = calibrate(gm, data, example, progress=progress, skip=skip)
    return CalibrationOutcome(run, tuple(findings), frozenset(skip), ranges)
