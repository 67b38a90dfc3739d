"""Kernels checked against their Q/DQ reference on real inputs, at compile time.

Every lowered kernel states its contract as a *reference*: the same function written with the
reference ops it replaced (``dequantize -> op -> quantize``), which is what the Q/DQ graph
computes. :func:`check_kernels` runs the lowered graph and, at each kernel node, also runs the
reference on the very inputs the kernel got (teacher forcing: a rounding flip upstream does
not cascade into a false alarm downstream) and compares:

* a uint8 output in quantization steps: ``max |q_kernel − q_reference| ≤ 2`` (oneDNN rounds
  its epilogue in a different order, which may move a value across a rounding boundary once);
* a float output relative to the reference's largest magnitude: ``max |y − ŷ| / max |ŷ| ≤ tol``,
  ``tol`` from the output's precision (two bf16 ulps, 2⁻⁷; fp32 1e-3 for accumulation order).

A kernel outside its contract is a :class:`KernelMismatchError` naming the node, the user module
it came from and the difference: a lowered model never silently disagrees with its Q/DQ graph
on the inputs compile saw.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx

from qcompile.errors import KernelMismatchError, QCompileError
from qcompile.ir.graph import describe_node
from qcompile.report import flat_inputs

# Relative tolerance of a float output by dtype: two ulps of bf16's 8-bit mantissa, and for fp32
# the reordering of a long int32-exact accumulation scaled in float.
FLOAT_TOLERANCE = {torch.bfloat16: 2.0**-7, torch.float32: 1e-3, torch.float16: 2.0**-9}
STEP_TOLERANCE = 2


@dataclass(frozen=True)
class KernelContract:
    """``reference(*args, **kwargs)`` computes what the kernel must, with reference ops. A float
    output is held to the tolerance of ``precision`` (the dtype the kernel computes in; by
    default its output's) times ``tolerance_scale``, for kernels that are lower-precision
    algorithms (a bf16 linear rounds its operands)."""

    reference: Callable[..., Tensor]
    precision: torch.dtype | None = None
    tolerance_scale: float = 1.0
    # The largest absolute error the kernel's algorithm can make on these very inputs (a
    # rounding analysis), for kernels whose error grows with the data: a bf16 GEMM's grows with
    # its reduction length and operands. The check allows the larger of this and the relative tolerance.
    bound: Callable[..., float] | None = None


_CONTRACTS: dict[Any, KernelContract] = {}

BF16_UNIT_ROUNDOFF = 2.0**-8  # bf16 keeps 8 significant bits


def bf16_linear_bound(x: Tensor, weight: Tensor) -> float:
    """The error a GEMM with bf16 operands and fp32 accumulation may make, absolute:
    2·u·max(|x|·|W|ᵀ) + u·max|x·Wᵀ|. Each operand is rounded once (relative u each, so a
    product term is off by at most 2u of its magnitude, and a sum of terms by 2u of the sum of
    their magnitudes) and the result once more; accumulation in fp32 adds nothing that shows.
    A relative tolerance cannot stand for it where the terms cancel: the error follows Σ|x||w|
    while the output, the sum, may be much smaller."""
    rows = x.reshape(-1, x.shape[-1]).float()
    magnitudes = rows.abs() @ weight.float().abs().t()
    return float(2 * BF16_UNIT_ROUNDOFF * magnitudes.max() + BF16_UNIT_ROUNDOFF * (rows @ weight.float().t()).abs().max())


def register_kernel(op: Any, reference: Callable[..., Tensor], precision: torch.dtype | None = None,
                    tolerance_scale: float = 1.0, bound: Callable[..., float] | None = None) -> None:
    """Declare ``op``'s reference; :func:`check_kernels` then holds every call of ``op`` to it."""
    op = getattr(op, "_opoverload", op)  # a torch.library.custom_op definition
    _CONTRACTS[getattr(op, "default", op)] = KernelContract(reference, precision, tolerance_scale, bound)


def kernel_contracts() -> dict[Any, KernelContract]:
    return dict(_CONTRACTS)


def difference(kernel: Tensor, reference: Tensor, precision: torch.dtype | None = None) -> tuple[float, float]:
    """(difference, allowed): steps for 8-bit integer outputs, relative to the largest magnitude for floats
    (allowed by ``precision``, else by the output's dtype). Computed in the narrowest exact type
    (int16 for bytes, float32 for floats): this runs on every kernel of a model at compile time."""
    if kernel.shape != reference.shape or kernel.dtype != reference.dtype:
        return float("inf"), 0.0
    if not kernel.numel():
        return 0.0, STEP_TOLERANCE
    if kernel.dtype in (torch.uint8, torch.int8):
        return float((kernel.to(torch.int16) - reference.to(torch.int16)).abs_().max()), STEP_TOLERANCE
    allowed = FLOAT_TOLERANCE.get(precision or kernel.dtype, 1e-3)
    k, r = kernel.float(), reference.float()
    finite = torch.isfinite(r)
    if not bool(finite.all()):  # rare: compare where the reference is finite, and agree on where it is not
        if not torch.equal(finite, torch.isfinite(k)):
            return float("inf"), 0.0
        k, r = k[finite], r[finite]
        if not r.numel():
            return 0.0, allowed
    scale = float(r.abs().max())
    error = float((k - r).abs_().max())
    return (error / scale if scale else error), allowed


class _Checker(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, where: str):
        super().__init__(gm)
        self.where = where
        self.checked = 0

    def run_node(self, node: fx.Node) -> Any:
        try:
            value = super().run_node(node)
        except QCompileError:
            raise
        except Exception as exc:  # a lowered graph that fails must say where, not just how
            raise KernelMismatchError(
                f"the lowered graph fails {self.where} at {describe_node(node)}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
        contract = _CONTRACTS.get(node.target) if node.op == "call_function" else None
        if contract is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(node)
            expected = contract.reference(*args, **kwargs)
            outputs = zip(value, expected) if isinstance(value, tuple) else [(value, expected)]
            for output, reference in outputs:  # a kernel with several outputs holds each to its reference
                self._compare(node, contract, output, reference, args, kwargs)
            self.checked += 1
        return value


    def _compare(self, node: fx.Node, contract: KernelContract, value: Tensor, expected: Tensor, args: tuple,
                 kwargs: dict) -> None:
        error, allowed = difference(value, expected, contract.precision)
        allowed *= contract.tolerance_scale
        if error > allowed and contract.bound is not None and value.is_floating_point():
            largest = float(expected.float().abs().max())  # the bound is absolute; error is relative to this
            allowed = max(allowed, contract.bound(*args, **kwargs) / largest if largest else float("inf"))
        if error > allowed:
            unit = "steps" if value.dtype == torch.uint8 else "of the largest magnitude"
            raise KernelMismatchError(
                f"kernel {describe_node(node)} differs from its Q/DQ reference {self.where}: "
                f"{error:.3g} {unit} (allowed {allowed:.3g}); "
                "keep its module float with QConfig.set_module_name(..., None) and report this")


def check_kernels(gm: fx.GraphModule, calls: Iterable[tuple[str, tuple, dict]]) -> int:
    """Run ``gm`` on each ``(label, args, kwargs)`` ("on the example inputs", "on calibration batch
    3") with every kernel held to its reference; returns how many kernel calls were checked.
    Raises :class:`KernelMismatchError` on the first one out of bounds."""
    checked = 0
    with torch.no_grad():
        for where, args, kwargs in calls:
            checker = _Checker(gm, where)
            checker.run(*flat_inputs(gm, args, kwargs))
            checked += checker.checked
    return checked
