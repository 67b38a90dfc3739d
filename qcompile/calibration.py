"""Calibration: run the observed graph over user data so its observers see real activations.

A step of ``compile``, not a pass: it changes observer state, not the graph. Batches may be
tuples or lists (positional inputs), dicts or other mappings (keyword inputs, as tokenizers
return them) or single tensors. Each batch is checked against the example inputs the graph
was captured with, so a wrong shape is an error naming the input, not a failure deep inside
an op.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import fx
from tqdm.auto import tqdm

from qcompile.errors import CalibrationError


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


def check_batch(
    number: int, args: tuple[Any, ...], kwargs: dict[str, Any], example: tuple[tuple[Any, ...], dict[str, Any]]
) -> None:
    """Raise naming the input when ``args``/``kwargs`` do not look like the example inputs."""
    example_args, example_kwargs = example
    if len(args) != len(example_args) or set(kwargs) != set(example_kwargs):
        raise CalibrationError(
            f"calibration batch {number} has {len(args)} positional inputs and keywords {sorted(kwargs)}; "
            f"the example had {len(example_args)} and {sorted(example_kwargs)}"
        )
    named = [(f"input {i}", a, e) for i, (a, e) in enumerate(zip(args, example_args))]
    named += [(f"input '{k}'", kwargs[k], example_kwargs[k]) for k in kwargs]
    for name, value, expected in named:
        if not isinstance(expected, torch.Tensor):
            continue
        if not isinstance(value, torch.Tensor):
            raise CalibrationError(f"calibration batch {number}: {name} is {type(value).__name__}, not a tensor")
        if value.dtype != expected.dtype:
            raise CalibrationError(
                f"calibration batch {number}: {name} has dtype {value.dtype}, the example had {expected.dtype}"
            )
        if value.dim() != expected.dim() or value.shape[1:] != expected.shape[1:]:
            raise CalibrationError(
                f"calibration batch {number}: {name} has shape {list(value.shape)}, the example had "
                f"{list(expected.shape)} (only the batch dimension, dim 0, may differ)"
            )


def calibrate(
    gm: fx.GraphModule,
    data: Iterable[Any],
    example: tuple[tuple[Any, ...], dict[str, Any]],
    *,
    progress: bool | None = None,
) -> int:
    """Run ``gm`` over ``data``; returns the number of batches. ``progress=None`` shows a bar on a terminal."""
    batches = 0
    disable = None if progress is None else not progress  # tqdm's None: a bar on terminals only
    with torch.no_grad():
        for batch in tqdm(data, desc="calibrating", unit="batch", disable=disable):
            args, kwargs = as_call(batch)
            check_batch(batches, args, kwargs, example)
            gm(*args, **kwargs)
            batches += 1
    if batches == 0:
        raise empty_calibration_error()
    return batches
