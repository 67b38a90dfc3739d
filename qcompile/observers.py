"""Observers: modules that watch a tensor during calibration and choose its scale and zero point.

Each is an ``nn.Module`` (inserted into graphs as a ``call_module`` node) whose ``forward``
records statistics and returns its input unchanged. State is mergeable (``merge(other)``), so
calibration can be split across processes and reduced.

* ``MinMaxObserver``: running min and max, per tensor or per channel.
* ``MovingAverageObserver``: exponential moving average of per-batch min and max (less
  sensitive to one extreme batch).
* ``HistogramObserver``: a histogram of values, then one of
    - ``percentile``: clip at the given percentile of |x| (or of each tail for affine specs);
    - ``entropy``: the clip threshold whose quantized distribution is closest in KL
      divergence to the observed one (TensorRT's calibration);
    - ``mse``: the range (S and Z) that minimizes the expected squared quantization error
      over the histogram, clipping error included: the least-squares choice.

A NaN or infinite value is an error that names the observed node and the batch number.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qcompile.errors import CalibrationError
from qcompile.spec import PerTensor, QuantSpec, compute_qparams


def _reduce_dims(x: Tensor, axis: int | None) -> list[int]:
    if axis is None:
        return list(range(x.dim()))
    axis = axis % x.dim()
    return [d for d in range(x.dim()) if d != axis]


class Observer(nn.Module):
    """Base: batch counting, NaN/inf checks, and qparams from the observed range."""

    def __init__(self, spec: QuantSpec, name: str = ""):
        super().__init__()
        self.spec = spec
        self.name = name
        self.batches = 0
        # (lo, hi) of each batch, whatever the observer's own statistic: what calibration's
        # sanity checks (qcompile.calibration.check_calibration) compare batches by.
        self.batch_ranges: list[tuple[float, float]] = []

    def forward(self, x: Tensor) -> Tensor:
        self.batches += 1
        if not x.is_floating_point():
            return x
        if x.numel() == 0:
            raise CalibrationError(f"observer of '{self.name}': batch {self.batches} is empty")
        lo, hi = torch.aminmax(x.detach())
        if not (torch.isfinite(lo) and torch.isfinite(hi)):  # a NaN anywhere makes both NaN
            kind = "NaN" if torch.isnan(x).any() else "an infinite value"
            raise CalibrationError(
                f"observer of '{self.name}': batch {self.batches} contains {kind}; check the calibration data"
            )
        self.batch_ranges.append((float(lo), float(hi)))
        self.observe(x.detach().float())
        return x

    def reset(self) -> None:
        """Forget everything observed (calibration runs again without an outlying batch)."""
        self.batches = 0
        self.batch_ranges = []
        self.clear()

    def clear(self) -> None:
        raise NotImplementedError

    def observe(self, x: Tensor) -> None:
        raise NotImplementedError

    def range(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def merge(self, other: Observer) -> None:
        raise NotImplementedError

    def _check_mergeable(self, other: Observer) -> None:
        if type(other) is not type(self) or other.spec != self.spec:
            raise TypeError(f"cannot merge {type(other).__name__}({other.spec}) into {type(self).__name__}({self.spec})")

    def qparams(self) -> tuple[Tensor, Tensor]:
        if self.batches == 0:
            raise CalibrationError(f"observer of '{self.name}' saw no data: was the calibration set empty?")
        lo, hi = self.range()
        return compute_qparams(lo, hi, self.spec)

    def extra_repr(self) -> str:
        return f"{self.name!r}, {self.spec}, batches={self.batches}"


class MinMaxObserver(Observer):
    def __init__(self, spec: QuantSpec, name: str = ""):
        super().__init__(spec, name)
        self.clear()

    def clear(self) -> None:
        self.lo: Tensor | None = None
        self.hi: Tensor | None = None

    def observe(self, x: Tensor) -> None:
        dims = _reduce_dims(x, self.spec.axis)
        lo, hi = x.amin(dim=dims), x.amax(dim=dims)
        self._update(lo, hi)

    def _update(self, lo: Tensor, hi: Tensor) -> None:
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)

    def range(self) -> tuple[Tensor, Tensor]:
        return self.lo, self.hi

    def merge(self, other: Observer) -> None:
        self._check_mergeable(other)
        if other.lo is not None:
            self._update(other.lo, other.hi)
        self.batches += other.batches
        self.batch_ranges = self.batch_ranges + other.batch_ranges


class MovingAverageObserver(MinMaxObserver):
    """lo ← lo + c · (batch_lo − lo), the same for hi, with c = ``averaging_constant``."""

    def __init__(self, spec: QuantSpec, name: str = "", averaging_constant: float = 0.01):
        super().__init__(spec, name)
        self.averaging_constant = averaging_constant

    def _update(self, lo: Tensor, hi: Tensor) -> None:
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            c = self.averaging_constant
            self.lo = self.lo + c * (lo - self.lo)
            self.hi = self.hi + c * (hi - self.hi)

    def merge(self, other: Observer) -> None:
        # The average of two averages, weighted by the batches each saw.
        self._check_mergeable(other)
        if other.lo is None:
            return
        if self.lo is None:
            self.lo, self.hi = other.lo, other.hi
        else:
            w = other.batches / (self.batches + other.batches)
            self.lo = self.lo + w * (other.lo - self.lo)
            self.hi = self.hi + w * (other.hi - self.hi)
        self.batches += other.batches
        self.batch_ranges = self.batch_ranges + other.batch_ranges


class HistogramObserver(Observer):
    """A ``bins``-bin histogram over [lo, hi], re-binned when a batch widens the range.

    Per-tensor only: per-channel activations are not a layout any of our kernels take.
    """

    def __init__(self, spec: QuantSpec, name: str = "", bins: int = 2048):
        if not isinstance(spec.granularity, PerTensor):
            raise ValueError(f"HistogramObserver is per-tensor only, got {spec.granularity}")
        super().__init__(spec, name)
        self.bins = bins
        self.clear()

    def clear(self) -> None:
        self.histogram = torch.zeros(self.bins, dtype=torch.float64)
        self.lo = torch.tensor(0.0)
        self.hi = torch.tensor(0.0)

    def _add(self, values: Tensor, weights: Tensor | None, lo: Tensor, hi: Tensor) -> None:
        new_lo, new_hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        if (new_lo, new_hi) != (self.lo, self.hi) and self.histogram.sum() > 0:
            # Re-bin what we have: each old bin's mass moves to the new bin of its centre.
            centres = self._centres()
            old = self.histogram
            self.lo, self.hi = new_lo, new_hi
            self.histogram = self._bin(centres, old)
        else:
            self.lo, self.hi = new_lo, new_hi
        self.histogram += self._bin(values, weights)

    def _bin(self, values: Tensor, weights: Tensor | None) -> Tensor:
        width = float(self.hi - self.lo)
        if width <= 0:
            out = torch.zeros(self.bins, dtype=torch.float64)
            out[0] = float(values.numel()) if weights is None else float(weights.sum())
            return out
        index = ((values.double() - float(self.lo)) / width * self.bins).floor().clamp(0, self.bins - 1).long()
        w = torch.ones_like(index, dtype=torch.float64) if weights is None else weights.double()
        return torch.zeros(self.bins, dtype=torch.float64).index_add_(0, index, w)

    def _centres(self) -> Tensor:
        edges = torch.linspace(float(self.lo), float(self.hi), self.bins + 1, dtype=torch.float64)
        return (edges[:-1] + edges[1:]) / 2

    def observe(self, x: Tensor) -> None:
        flat = x.flatten()
        self._add(flat, None, flat.min(), flat.max())

    def merge(self, other: Observer) -> None:
        self._check_mergeable(other)
        if other.histogram.sum() > 0:
            self._add(other._centres(), other.histogram, other.lo, other.hi)
        self.batches += other.batches
        self.batch_ranges = self.batch_ranges + other.batch_ranges

    def range(self) -> tuple[Tensor, Tensor]:
        method = self.spec.observer
        if method == "percentile":
            return self._percentile_range()
        if method == "entropy":
            return self._entropy_range()
        if method == "mse":
            return self._mse_range()
        return self.lo, self.hi

    def _percentile_range(self) -> tuple[Tensor, Tensor]:
        tail = 1.0 - self.spec.percentile / 100.0
        if self.spec.symmetric:
            hist, amax = self._abs_histogram()
            amax = torch.tensor((_quantile_bin(hist, 1.0 - tail) + 1) * amax / self.bins)
            return -amax, amax
        # The lower edge of the bin holding the low quantile, the upper edge of the high one's.
        width = float(self.hi - self.lo) / self.bins
        lo = float(self.lo) + _quantile_bin(self.histogram, tail) * width
        hi = float(self.lo) + (_quantile_bin(self.histogram, 1.0 - tail) + 1) * width
        return torch.maximum(torch.tensor(lo), self.lo), torch.minimum(torch.tensor(hi), self.hi)

    def _abs_histogram(self) -> tuple[Tensor, float]:
        """Histogram of |x| over [0, amax] with ``bins`` bins: symmetric methods work on it."""
        amax = float(torch.maximum(-self.lo, self.hi))
        centres = self._centres().abs()
        if amax == 0:
            return self.histogram.clone(), 0.0
        index = (centres / amax * self.bins).floor().clamp(0, self.bins - 1).long()
        return torch.zeros(self.bins, dtype=torch.float64).index_add_(0, index, self.histogram), amax

    def _entropy_range(self) -> tuple[Tensor, Tensor]:
        hist, amax = self._abs_histogram()
        if amax == 0:
            return self.lo, self.hi
        levels = (self.spec.qmax - self.spec.qmin) // 2 + 1  # magnitudes 0..127 for int8
        best_kl, best_bins = float("inf"), self.bins
        # Thresholds below 1/16 of the range are not searched (TensorRT's 128 of 2048 bins):
        # with few levels the KL of a tiny, heavily clipped window is deceptively small.
        first = max(levels, self.bins // 16)
        for clip_bins in range(first, self.bins + 1, max(1, self.bins // 256)):
            kl = _clipped_kl(hist, clip_bins, levels)
            if kl < best_kl:
                best_kl, best_bins = kl, clip_bins
        threshold = torch.tensor(best_bins * amax / self.bins)
        if self.spec.symmetric:
            return -threshold, threshold
        return torch.maximum(self.lo, -threshold), torch.minimum(self.hi, threshold)

    def _mse_range(self) -> tuple[Tensor, Tensor]:
        centres, counts = self._centres(), self.histogram
        lo, hi = float(self.lo), float(self.hi)
        best, best_range = float("inf"), (self.lo, self.hi)
        # Shrink the observed range by a factor (symmetric) or each end separately (affine) and
        # keep the (S, Z) whose expected squared error, rounding plus clipping, is least.
        factors = torch.linspace(0.05, 1.0, 96).tolist()
        candidates = (
            [(lo * f, hi * f) for f in factors]
            if self.spec.symmetric
            else [(lo * a, hi * b) for a in factors[::4] for b in factors[::4]]
        )
        for cand_lo, cand_hi in candidates:
            scale, zero_point = compute_qparams(torch.tensor(cand_lo), torch.tensor(cand_hi), self.spec)
            s, z = float(scale), float(zero_point)
            q = torch.clamp(torch.round(centres / s) + z, self.spec.qmin, self.spec.qmax)
            error = float((counts * ((q - z) * s - centres) ** 2).sum())
            if error < best:
                best, best_range = error, (torch.tensor(cand_lo), torch.tensor(cand_hi))
        return best_range


def _quantile_bin(hist: Tensor, q: float) -> int:
    """Index of the first bin at which the cumulative mass reaches ``q``."""
    cdf = torch.cumsum(hist, 0) / hist.sum()
    return int(torch.searchsorted(cdf, torch.tensor(q, dtype=torch.float64)).clamp(max=hist.numel() - 1))


def _clipped_kl(hist: Tensor, clip_bins: int, levels: int) -> float:
    """KL(P || Q) of clipping at ``clip_bins``.

    P is the histogram cut at ``clip_bins`` with the clipped tail folded into its last bin (what
    the data really looks like after clamping). Q is the cut histogram *without* the tail,
    merged into ``levels`` buckets and spread back evenly over each bucket's non-empty bins
    (what int8 can represent). Folding the tail into P but not Q is what charges a clip for the
    mass it moves; without it the smallest window always looks perfect.
    """
    window = hist[:clip_bins]
    p = window.clone()
    p[-1] += hist[clip_bins:].sum()
    if p.sum() == 0:
        return 0.0
    bucket = torch.div(torch.arange(clip_bins) * levels, clip_bins, rounding_mode="floor")
    nonzero = (window > 0).double()
    bucket_mass = torch.zeros(levels, dtype=torch.float64).index_add_(0, bucket, window)
    bucket_bins = torch.zeros(levels, dtype=torch.float64).index_add_(0, bucket, nonzero)
    q = torch.where(nonzero > 0, bucket_mass[bucket] / bucket_bins[bucket].clamp(min=1), torch.zeros_like(p))
    p, q = p / p.sum(), q / q.sum().clamp(min=1e-300)
    mask = p > 0
    return float((p[mask] * torch.log(p[mask] / q[mask].clamp(min=1e-12))).sum())


def make_observer(spec: QuantSpec, name: str = "") -> Observer:
    """The observer a spec asks for."""
    if spec.observer == "minmax":
        return MinMaxObserver(spec, name)
    if spec.observer == "moving-average":
        return MovingAverageObserver(spec, name)
    return HistogramObserver(spec, name)
