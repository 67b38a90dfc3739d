"""GPTQ: round a weight's columns one at a time, each column's error spread over the columns
not yet rounded, so that the layer's output on the calibration inputs moves as little as it can.

For a layer ``y = x Wᵀ`` (a linear, or a convolution read as one over its input patches) with
calibration inputs X [n, k], the output error of a rounded weight Ŵ is ‖X (W − Ŵ)ᵀ‖², a
quadratic form in the Hessian H = XᵀX / n, one per output row. Rounding column j to the grid
and solving for the best update of the columns after it (Optimal Brain Quantization) gives

    e = (w_j − ŵ_j) / [H⁻¹]_jj          W[:, j:] −= e · [U]_{j, j:}       (U = chol(H⁻¹), upper)

where U's rows are the inverse Hessian's Cholesky factor: each step's update and the next
step's inverse follow from it without refactoring. Columns go in blocks (a block's updates
are applied to the columns after it in one matrix product), in decreasing order of H's
diagonal (*act-order*: the columns the inputs use most are rounded while the most columns are
left to absorb their error). The grid is fixed before any column moves (*static groups*): each
group's scale and zero point are the ones round-to-nearest would use, so the weight is stored
in its natural order and kernels need no permutation. H is damped by ``damping`` x its mean
diagonal so its factorisation exists for inputs that span few directions; a column no input
ever reached (H_jj = 0) is decoupled from the others, so it is rounded to nearest and moves
none of them.

Rounding is the spec's own ``qc.quantize`` / ``qc.dequantize``, so every format (int2..int8,
float8) and granularity (per tensor, channel, group) rounds exactly as the Q/DQ graph will.

Once the integers are chosen, the grid's scales need not stay round-to-nearest's: with the codes
d = q − Z fixed, a row's rounded weight Ŵ_r = D_r s_r is linear in its scales s_r (one per group,
D_r [k, groups] holding d in each group's column), so the scales that minimise the same output
error (w_r − D_r s)ᵀ H (w_r − D_r s) solve the small system (D_rᵀ H D_r) s = D_rᵀ H w_r
(:func:`refit_scales`; integer formats per group or channel, a scale kept where its group's
system is degenerate or its solution not positive).

GPTQ decides each column once, against the columns after it; the columns before it never see
the later ones' errors. Coordinate descent (:func:`descend_codes`) then revisits every column
with all the others fixed: with the rounded row's error e = ŵ − w and g = e H, the output
error as a function of ŵ_j alone is the parabola  2 (v − ŵ_j) g_j + (v − ŵ_j)² H_jj + const,
whose minimum is at v* = ŵ_j − g_j / H_jj. The grid point nearest v* is the best one (a
parabola is symmetric about its vertex; the clamp to [qmin, qmax] keeps that true), so each
step lowers the error or leaves it, and a step that moves ŵ_j by δ updates g += δ H_j. Sweeps
alternate with the scale refit (each lowers the same error with the other's variables fixed)
until no code moves; the Hessian here is the undamped one, the error itself.

An op with a bias can also take the mean of its output error out of that bias (the spec's
``bias_correction``). The error left is then the centred one: for E = Ŵ − W and rows X with
mean μ, min over c of ‖X Eᵀ − 1 cᵀ‖² / n is reached at c = E μ and equals Σ_r e_rᵀ (H − μμᵀ) e_r,
so every step above runs on the covariance C = H − μμᵀ in place of H, and the bias becomes
b − (Ŵ − W) μ. Rounding then spends nothing on the part of the error a constant removes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from qcompile.spec import PerChannel, PerGroup, QuantSpec

DAMPING = 0.01
BLOCK_SIZE = 128
DESCENT_SWEEPS = 3
REFIT_ROWS = 64  # rows per chunk of refit_scales' systems


class HessianRecorder(nn.Module):
    """Accumulates XᵀX, the column sums and the row count of the rows ``rows(x)`` makes of each
    input it is called on."""

    def __init__(self, rows: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.rows = rows
        self.xtx: Tensor | None = None
        self.total: Tensor | None = None
        self.count = 0

    def forward(self, x: Tensor) -> Tensor:
        rows = self.rows(x.detach()).float()
        product, total = (rows.T @ rows).double(), rows.double().sum(0)
        self.xtx = product if self.xtx is None else self.xtx + product
        self.total = total if self.total is None else self.total + total
        self.count += rows.shape[0]
        return x

    def hessian(self) -> Tensor:
        """H = XᵀX / n (float64)."""
        if self.xtx is None:
            raise ValueError("the recorder saw no input")
        return self.xtx / max(self.count, 1)

    def mean(self) -> Tensor:
        """μ = Xᵀ1 / n (float64), the mean row."""
        if self.total is None:
            raise ValueError("the recorder saw no input")
        return self.total / max(self.count, 1)


def elementwise(param: Tensor, spec: QuantSpec, shape: torch.Size) -> Tensor:
    """A scale or zero point as one value per element of the 2-D weight ``shape`` [out, k]: per
    group [out, k / size, 1], per output channel [out], per tensor one value."""
    out, k = shape
    if isinstance(spec.granularity, PerGroup):
        size = spec.granularity.group_size
        return param.reshape(out, k // size, 1).expand(out, k // size, size).reshape(out, k)
    if isinstance(spec.granularity, PerChannel):
        return param.reshape(out, 1).expand(out, k)
    return param.reshape(1, 1).expand(out, k)


def _round(column: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """``dequantize(quantize(column))`` with one scale per row, as the Q/DQ graph computes it."""
    q = torch.ops.qc.quantize(column, scale, zero_point, 0, spec.qmin, spec.qmax, spec.storage_dtype)
    return torch.ops.qc.dequantize(q, scale, zero_point, 0, column.dtype)


def refit_scales(weight: Tensor, hessian: Tensor, rounded: Tensor, scale: Tensor,
                 spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """The scales (shaped as ``scale``: one per group or per output channel) that
    minimise the output error of ``rounded``'s integer codes on inputs with Hessian ``hessian``
    (module doc), and the rounded weight on them. ``weight`` [out, k] is the float weight,
    ``rounded`` its rounded values on the grid of ``scale`` (and a zero point, which stays)."""
    if spec.is_float8 or not isinstance(spec.granularity, (PerGroup, PerChannel)):
        return scale, rounded
    w = weight.detach().double()
    out, k = w.shape
    size = spec.granularity.group_size if isinstance(spec.granularity, PerGroup) else k
    groups = k // size
    codes = torch.round(rounded.double() / elementwise(scale, spec, w.shape).double())  # q − Z, integers
    by_group = codes.reshape(out, groups, size)
    h = hessian.double().reshape(k, groups, size)
    # M[r, g, g'] = Σ_{i∈g, j∈g'} d_ri H_ij d_rj  and  b[r, g] = Σ_{i∈g} d_ri (H w_r)_i, rows in chunks
    # so that H D_r ([rows, groups, k]) stays small.
    m = torch.empty(out, groups, groups, dtype=torch.float64)
    for r in range(0, out, REFIT_ROWS):
        d = by_group[r:r + REFIT_ROWS]
        hd = torch.einsum("igs,rgs->rgi", h, d).reshape(d.shape[0], groups, groups, size)  # (H D_r)[:, g]
        m[r:r + REFIT_ROWS] = torch.einsum("rhs,rghs->rhg", d, hd)
    b = (by_group * (w @ h.reshape(k, k)).reshape(out, groups, size)).sum(-1)
    old = scale.reshape(out, groups).double()
    degenerate = m.diagonal(dim1=1, dim2=2) <= 0
    m = m + torch.diag_embed(degenerate.double())
    b = torch.where(degenerate, old, b)
    solved, info = torch.linalg.solve_ex(m, b.unsqueeze(-1))
    solved = solved.squeeze(-1)
    keep = (info != 0).unsqueeze(-1) | ~torch.isfinite(solved) | (solved <= 0)
    refit = torch.where(keep, old, solved).to(scale.dtype).reshape(scale.shape)
    return refit, (codes * elementwise(refit, spec, w.shape).double()).to(rounded.dtype)


def descend_codes(weight: Tensor, hessian: Tensor, rounded: Tensor, scale: Tensor, zero_point: Tensor,
                  spec: QuantSpec, *, block_size: int = BLOCK_SIZE) -> tuple[Tensor, int]:
    """One coordinate-descent sweep over the columns of ``rounded`` (module doc): the rounded
    values after it, on the grid of ``scale`` / ``zero_point`` (per element, [out, k]), and how
    many values moved. Columns no input reached (H_jj = 0) are left as they are. Updates to g
    are applied within a block of columns as they happen and to the columns after it once per
    block, as GPTQ batches its own."""
    w, q, h = weight.detach().float(), rounded.detach().float().clone(), hessian.detach().float()
    diagonal = h.diagonal()
    g = (q - w) @ h
    moved = 0
    for start in range(0, w.shape[1], block_size):
        stop = min(start + block_size, w.shape[1])
        local, deltas = g[:, start:stop].clone(), torch.zeros(w.shape[0], stop - start)
        for i, j in enumerate(range(start, stop)):
            if diagonal[j] <= 0:
                continue
            best = _round(q[:, j] - local[:, i] / diagonal[j], scale[:, j], zero_point[:, j], spec)
            delta = best - q[:, j]
            if bool(delta.any()):
                moved += int(torch.count_nonzero(delta))
                q[:, j] = best
                deltas[:, i] = delta
                local[:, i:] += delta.unsqueeze(1) * h[j, start + i:stop].unsqueeze(0)
        g += deltas @ h[start:stop]
    return q.to(rounded.dtype), moved


def upper_inverse_factor(hessian: Tensor, damping: float) -> tuple[Tensor, float]:
    """U with UᵀU = (H + λI)⁻¹, λ = damping x mean diag(H), and the λ used: the damping grows
    tenfold (up to four times) while H + λI is not positive definite in float64."""
    mean_diagonal = float(hessian.diagonal().mean())
    for attempt in range(5):
        damp = damping * 10**attempt * mean_diagonal
        damped = hessian + damp * torch.eye(hessian.shape[0], dtype=hessian.dtype)
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            return torch.linalg.cholesky(inverse, upper=True), damp
    raise ValueError(f"the calibration Hessian is not positive definite even damped by {damp:.3g}")


def gptq_round(weight: Tensor, hessian: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec, *,
               damping: float = DAMPING, block_size: int = BLOCK_SIZE, act_order: bool = True) -> Tensor:
    """The GPTQ-rounded values of ``weight`` [out, k] (on the grid of ``scale`` / ``zero_point``,
    given per element, [out, k]) for inputs with Hessian ``hessian`` [k, k] (module doc)."""
    w = weight.detach().float().clone()
    h = hessian.detach().double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(w.shape[1])
    w, h = w[:, order], h[order][:, order]
    scale, zero_point = scale[:, order].contiguous(), zero_point[:, order].contiguous()
    upper, _ = upper_inverse_factor(h, damping)
    upper = upper.float()
    rounded = torch.empty_like(w)
    for start in range(0, w.shape[1], block_size):
        stop = min(start + block_size, w.shape[1])
        block, inverse = w[:, start:stop].clone(), upper[start:stop, start:stop]
        errors = torch.empty_like(block)
        for i in range(stop - start):
            column = block[:, i]
            rounded[:, start + i] = _round(column, scale[:, start + i], zero_point[:, start + i], spec)
            error = (column - rounded[:, start + i]) / inverse[i, i]
            block[:, i:] -= error.unsqueeze(1) * inverse[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, stop:] -= errors @ upper[start:stop, stop:]
    restored = torch.empty_like(rounded)
    restored[:, order] = rounded
    return restored
