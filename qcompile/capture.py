"""The front end: ``torch.export`` (non-strict) to one ATen-level fx graph.

The batch dimension (dim 0 of every tensor input) is captured as dynamic when export allows it;
where the model pins it (a reshape to a literal batch, an example batch of 1), the graph stays
static and a warning names the input. A model export cannot capture gets a :class:`CaptureError`
that names the user module and source line at fault instead of export's bare traceback.
"""

from __future__ import annotations

import inspect
import linecache
import warnings
from types import TracebackType
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from qcompile.errors import CaptureError


def _batch_dynamic_shapes(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    bound = inspect.signature(model.forward).bind(*args, **kwargs)

    def spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return {0: Dim.AUTO}
        return None

    return {name: pytree.tree_map(spec, value) for name, value in bound.arguments.items()}


def _module_frames(exc: BaseException, model: nn.Module) -> list[tuple[str, nn.Module, str, int]]:
    """(qualified name, module, file, line) for each traceback frame running one of our modules."""
    names = {id(m): name for name, m in model.named_modules()}
    frames: list[tuple[str, nn.Module, str, int]] = []
    seen: set[int] = set()
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    for link in reversed(chain):
        tb: TracebackType | None = link.__traceback__
        while tb is not None:
            owner = tb.tb_frame.f_locals.get("self")
            if isinstance(owner, nn.Module) and id(owner) in names:
                frames.append((names[id(owner)], owner, tb.tb_frame.f_code.co_filename, tb.tb_lineno))
            tb = tb.tb_next
    return frames


def _capture_error(exc: BaseException, model: nn.Module) -> CaptureError:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    frames = _module_frames(exc, model)
    if not frames:
        return CaptureError(f"torch.export could not capture {type(model).__name__}: {reason}")
    name, module, filename, lineno = frames[-1]
    code = linecache.getline(filename, lineno).strip()
    where = f"module '{name or '<root>'}' ({type(module).__name__}) at {filename}:{lineno}"
    return CaptureError(
        f"cannot capture {where}: {reason}\n    {code}\n"
        "Data-dependent Python control flow cannot be captured: use torch.cond/torch.where, "
        "or move the branch outside the model."
    )


def capture(
    model: nn.Module,
    args: tuple[Any, ...] | list[Any] = (),
    kwargs: dict[str, Any] | None = None,
    dynamic_batch: bool = True,
) -> fx.GraphModule:
    """Capture ``model`` into an fx.GraphModule of ATen ops with ``torch.export`` (non-strict)."""
    gm = export_program(model, args, kwargs, dynamic_batch).module()
    if dynamic_batch:
        _warn_static_batch(gm)
    return gm


def export_program(
    model: nn.Module,
    args: tuple[Any, ...] | list[Any] = (),
    kwargs: dict[str, Any] | None = None,
    dynamic_batch: bool = True,
) -> torch.export.ExportedProgram:
    """The ``ExportedProgram`` behind :func:`capture`: what saving a compiled model serializes."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture() needs an nn.Module, got {type(model).__name__}")
    if not isinstance(args, (tuple, list)):
        args = (args,)
    args, kwargs = tuple(args), dict(kwargs or {})
    try:
        dynamic_shapes = _batch_dynamic_shapes(model, args, kwargs) if dynamic_batch else None
    except TypeError as exc:
        raise CaptureError(f"example inputs do not fit {type(model).__name__}.forward: {exc}") from exc
    try:
        exported = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:  # export raises many unrelated types; all become one clear error
        raise _capture_error(exc, model) from exc
    return exported


def _warn_static_batch(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and isinstance(val, torch.Tensor) and val.dim() >= 1:
            if not isinstance(val.shape[0], torch.SymInt):
                warnings.warn(
                    f"input '{node.target}': export kept the batch dimension static at {val.shape[0]} "
                    "(an example batch of 1, or the model fixes it); the graph only accepts that batch size",
                    stacklevel=3,
                )
