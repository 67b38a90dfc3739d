"""What a compiled model checks of each call before its kernels see the inputs.

A quantized model cannot follow fp32 semantics for a non-finite input: ``quantize`` clamps NaN
and ±inf to finite integers, and the answer would come back finite and plausible. So a NaN or
infinite value in a floating-point input is an error naming the input (one native read of
each input, ``native.all_finite``, small next to the model). A wrong dtype or a wrong size in a dimension the graph was
captured with as fixed is an error naming the input too, instead of a raw oneDNN message from
deep inside a kernel. Dimensions captured as dynamic (the batch) take any size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from qcompile import native
from qcompile.errors import InputError
from qcompile.report import flat_inputs


def _shape_text(shape: Any) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else "any" for d in shape) + "]"


def check_call(gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any], *,
               finite: bool = True) -> list[Any]:
    """The graph's placeholder values for this call (:func:`~qcompile.report.flat_inputs`), or
    :class:`InputError` naming the first input that does not fit the compiled graph;
    ``finite=False`` leaves non-finite values to the caller (calibration's observers name the
    node and batch where they enter)."""
    placeholders = gm.graph.find_nodes(op="placeholder")
    try:
        values = flat_inputs(gm, args, kwargs)
    except (KeyError, ValueError, TypeError) as exc:
        names = ", ".join(n.target for n in placeholders)
        raise InputError(f"the compiled model takes ({names}); got {len(args)} positional inputs and keywords "
                         f"{sorted(kwargs)} ({type(exc).__name__}: {exc})") from exc
    if len(values) != len(placeholders):
        names = ", ".join(n.target for n in placeholders)
        raise InputError(f"the compiled model takes {len(placeholders)} inputs ({names}), got {len(values)}")
    for node, value in zip(placeholders, values):
        expected = node.meta.get("val")
        if isinstance(expected, torch.Tensor):
            _check_tensor(f"input '{node.target}'", value, expected, finite)
    return values


def _check_tensor(name: str, value: Any, expected: torch.Tensor, finite: bool) -> None:
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{name} is a {type(value).__name__}, the model was compiled for a tensor")
    if value.dtype != expected.dtype:
        raise InputError(f"{name} has dtype {value.dtype}; the model was compiled for {expected.dtype}")
    fixed = [d if isinstance(d, int) else None for d in expected.shape]
    if value.dim() != len(fixed) or any(f is not None and f != v for f, v in zip(fixed, value.shape)):
        raise InputError(f"{name} has shape {list(value.shape)}; the model was compiled for "
                         f"{_shape_text(fixed)} (dimensions shown as 'any' may vary)")
    if finite and value.is_floating_point() and not native.all_finite(value):
        kind = "NaN" if bool(torch.isnan(value).any()) else "an infinite value"
        raise InputError(f"{name} contains {kind}; a quantized model would clamp it to a finite number, "
                         "so it is refused (fp32 would return NaN)")
