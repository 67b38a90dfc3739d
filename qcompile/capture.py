"""The front end: ``torch.export`` (non-strict) to one ATen-level fx graph.

Every dimension of every tensor input is captured as dynamic where export allows it (the
batch, a sequence length, an image size); the dimensions the model pins (a position table's
length, a reshape to a literal, a linear after a flatten, an example size of 0 or 1) stay
static, and :func:`static_dimensions` says which, for the report. A static batch dimension is
also a warning naming the input: the graph then only accepts that batch size. A model export cannot capture gets a :class:`CaptureError`
that names the user module and source line at fault instead of export's bare traceback.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import linecache
from collections.abc import Iterator
import warnings
from types import TracebackType
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from qcompile.errors import CaptureError
from qcompile.ir.graph import aliases, is_mutating, op_arguments


def _dynamic_shapes(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``Dim.AUTO`` for every dimension: export keeps dynamic what the model allows and
    specializes the rest, without an error."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs)

    def spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return dict.fromkeys(range(value.dim()), Dim.AUTO)
        return None

    return {name: pytree.tree_map(spec, value) for name, value in bound.arguments.items()}


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[bool]:
    """Eval mode for the duration (capture, a float reference run), the user's per-module training
    flags restored after; yields whether any module was training."""
    with _mode(model, training=False) as flags:
        yield any(flags)


@contextlib.contextmanager
def train_mode(model: nn.Module) -> Iterator[bool]:
    """Training mode for the duration (QAT's capture, with dropout and BatchNorm as training ops),
    the user's per-module flags restored after; yields whether any module was in eval mode."""
    with _mode(model, training=True) as flags:
        yield not all(flags)


@contextlib.contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[list[bool]]:
    flags = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        yield list(flags.values())
    finally:
        for module, was_training in flags.items():
            module.training = was_training


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
    dynamic: bool = True,
) -> fx.GraphModule:
    """Capture ``model`` into an fx.GraphModule of ATen ops with ``torch.export`` (non-strict).

    The graph owns a copy of every buffer its forward writes (a call counter, EMA statistics):
    running it, in calibration or as the compiled model, never writes into the user's model."""
    with _python_state_kept(model):
        program = export_program(model, args, kwargs, dynamic)
    gm = program.module()
    _concrete_static_sizes(gm)
    _own_written_buffers(gm)
    if dynamic:
        _warn_static_batch(gm)
    return gm


def _concrete_static_sizes(gm: fx.GraphModule) -> None:
    """Sizes export specialized (``Dim.AUTO`` on a dimension the model fixes) come back on the
    inputs as symbols equal to a number; they become that number, so passes read a static
    dimension as an int, the way every other value in the graph carries it."""

    def concrete(size: Any) -> Any:
        if isinstance(size, torch.SymInt):
            number = size.node.maybe_as_int()
            return size if number is None else number
        return size

    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op != "placeholder" or not isinstance(val, torch.Tensor):
            continue
        shape, stride = [concrete(s) for s in val.shape], [concrete(s) for s in val.stride()]
        symbols_before = sum(isinstance(s, torch.SymInt) for s in (*val.shape, *val.stride()))
        if sum(isinstance(s, torch.SymInt) for s in (*shape, *stride)) < symbols_before:
            with val.fake_mode:
                node.meta["val"] = torch.empty_strided(shape, stride, dtype=val.dtype, device=val.device)


def static_dimensions(gm: fx.GraphModule) -> dict[str, list[tuple[int, int]]]:
    """(dimension, size) of each input's static dimensions, by input name: what capture could
    not make dynamic because the model fixes it (or the example's size there was 0 or 1)."""
    found = {}
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and isinstance(val, torch.Tensor):
            static = [(d, int(size)) for d, size in enumerate(val.shape) if not isinstance(size, torch.SymInt)]
            if static:
                found[str(node.target)] = static
    return found


def written_buffers(gm: fx.GraphModule) -> set[str]:
    """The buffers an in-place op of the graph can reach (through views): its state, which every
    run advances (export keeps ``calls.add_(1)`` as an in-place op on the module's buffer)."""
    buffers = {name for name, _ in gm.named_buffers()}
    written = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in buffers:
            if any(alias in _written_arguments(user) for alias in aliases(node) for user in alias.users):
                written.add(node.target)
    return written


def _own_written_buffers(gm: fx.GraphModule) -> None:
    """Every buffer the graph writes becomes the graph's own copy."""
    for name in sorted(written_buffers(gm)):
        owner_name, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_name)
        owner.register_buffer(attr, getattr(owner, attr).detach().clone(),
                              persistent=attr not in owner._non_persistent_buffers_set)


def _written_arguments(node: fx.Node) -> list[Any]:
    """The arguments an in-place op writes (``self`` of ``add_``, ``out=`` tensors), by schema."""
    if not is_mutating(node):
        return []
    named = op_arguments(node)
    return [named.get(a.name) for a in node.target._schema.arguments if a.alias_info is not None and a.alias_info.is_write]


@contextlib.contextmanager
def _python_state_kept(model: nn.Module) -> Iterator[None]:
    """Non-strict export runs ``forward`` as Python, so ``self.steps += 1`` or
    ``self.seen.append(...)`` would change the user's modules: their plain attributes are
    copied before and put back after (tensors, parameters, buffers and submodules are not
    touched by tracing; what cannot be copied is restored by reference)."""
    saved = []
    for module in model.modules():
        attributes = {k: v for k, v in vars(module).items()
                      if k not in ("_parameters", "_buffers", "_modules") and not isinstance(v, torch.Tensor)}
        saved.append((module, attributes, _copied(attributes)))
    try:
        yield
    finally:
        for module, originals, copies in saved:
            for key, original in originals.items():
                if _same(original, copies[key]):
                    vars(module)[key] = original  # rebound (``self.steps += 1``): the user's own object back
                else:
                    vars(module)[key] = copies[key]  # changed in place (``self.seen.append``): its copy


def _copied(attributes: dict[str, Any]) -> dict[str, Any]:
    copies = {}
    for key, value in attributes.items():
        try:
            copies[key] = copy.deepcopy(value)
        except Exception:  # locks, generators, C handles: the reference is all we can restore
            copies[key] = value
    return copies


def _same(original: Any, copy_: Any) -> bool:
    """Whether ``original`` still equals its copy; objects without a value equality of their own
    cannot tell, and are taken as unchanged (so the user keeps the very object)."""
    if type(original).__eq__ is object.__eq__:
        return True
    try:
        return bool(original == copy_)
    except Exception:
        return True


def export_program(
    model: nn.Module,
    args: tuple[Any, ...] | list[Any] = (),
    kwargs: dict[str, Any] | None = None,
    dynamic: bool = True,
) -> torch.export.ExportedProgram:
    """The ``ExportedProgram`` behind :func:`capture`: what saving a compiled model serializes."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture() needs an nn.Module, got {type(model).__name__}")
    if not isinstance(args, (tuple, list)):
        args = (args,)
    args, kwargs = tuple(args), dict(kwargs or {})
    try:
        dynamic_shapes = _dynamic_shapes(model, args, kwargs) if dynamic else None
    except TypeError as exc:
        raise CaptureError(f"example inputs do not fit {type(model).__name__}.forward: {exc}") from exc
    try:
        return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:  # export raises many unrelated types; all become one clear error
        if dynamic_shapes is None:
            raise _capture_error(exc, model) from exc
        dynamic_error = exc
    # Some forwards export only with static shapes (torch.export cannot take dynamic shapes for
    # a ``forward(*args, **kwargs)``): capture those static, and say so.
    try:
        exported = torch.export.export(model, args, kwargs, strict=False)
    except Exception as exc:
        raise _capture_error(exc, model) from exc
    reason = (str(dynamic_error).strip().splitlines() or [type(dynamic_error).__name__])[0]
    warnings.warn(f"{type(model).__name__} was captured with static shapes: capture with dynamic dimensions failed "
                  f"({reason[:160]}); the compiled model accepts the example's sizes only", stacklevel=3)
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
