"""Measured per-shape latencies of a node in each candidate format, cached per CPU.

A precision search needs the cost of running a node in each format. Bit counts do not give it
on a CPU (measured here: int8 activations into a weight packed for uint8 run 700x slower, an
fp32 activation into the int4 kernel 20x slower, an FP8 GEMM slower than bf16), so the cost is
measured: one op of the node's kind, weight shape and input shape, with random values, compiled
for the target in the candidate's format like a model is, and timed (median of repeated calls
after warm-up, the threads torch has now). The time includes what the format costs around its
GEMM (quantizing the input, dequantizing the output), as it would in the model.

Latencies are kept in a JSON table (``$QCOMPILE_CACHE_DIR/latency.json``, by default under
``~/.cache/qcompile``) keyed by the CPU's model and flags, torch's version, the thread count, the
target, the format and the shapes, so a table is read again only where it was measured.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from qcompile.profile import median_ms
from qcompile.qconfig import Candidate, QConfig
from qcompile.targets.cpu_features import cpu_signature

# Calls timed per measurement (after warm-up): the median of these is the latency.
REPEATS = 15


@dataclass(frozen=True)
class WeightOpShape:
    """What a node's latency depends on: its op kind, input and weight shapes, bias, and for a
    convolution its stride, padding, dilation and groups."""

    kind: str
    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    bias: bool
    conv: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int] | None = None

    def __str__(self) -> str:
        text = f"{self.kind} x{list(self.input_shape)} w{list(self.weight_shape)}{' +bias' if self.bias else ''}"
        return text + (f" conv{self.conv}" if self.conv else "")

    def module(self) -> nn.Module:
        """One op of this shape, with random weights."""
        if self.kind == "linear":
            out_features, in_features = self.weight_shape
            return nn.Linear(in_features, out_features, bias=self.bias)
        if self.kind == "conv2d" and self.conv is not None:
            stride, padding, dilation, groups = self.conv
            out_channels, per_group, *kernel = self.weight_shape
            return nn.Conv2d(per_group * groups, out_channels, tuple(kernel), stride, padding, dilation, groups,
                             bias=self.bias)
        raise ValueError(f"no latency measurement for op kind '{self.kind}'")


def cache_path() -> Path:
    return Path(os.environ.get("QCOMPILE_CACHE_DIR", "~/.cache/qcompile")).expanduser() / "latency.json"


class LatencyTable:
    """Latencies in milliseconds, measured on first use and cached on disk."""

    def __init__(self, path: Path | None = None):
        self.path = path if path is not None else cache_path()
        self.measured = 0  # measurements this table made (not read from the cache)
        try:
            self.entries: dict[str, float] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}

    def _key(self, *parts: object) -> str:
        return " | ".join([cpu_signature(), f"torch {torch.__version__}", f"{torch.get_num_threads()} threads",
                           *map(str, parts)])

    def _cached(self, key: str, measure: Callable[[], float]) -> float:
        if key not in self.entries:
            self.entries[key] = round(measure(), 5)
            self.measured += 1
            self._save()
        return self.entries[key]

    def _save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_suffix(".tmp")
            partial.write_text(json.dumps(self.entries, indent=0, sort_keys=True))
            partial.replace(self.path)
        except OSError as exc:  # a read-only home: measure again next time, say so once
            warnings.warn(f"latency table not cached at {self.path}: {exc}", stacklevel=3)

    def weight_op_ms(self, target_name: str, candidate: Candidate, shape: WeightOpShape) -> float:
        """The node's latency in ``candidate``'s format on ``target_name``."""
        # The key is the format, not the name: formats that differ only in smoothing (whose
        # float ops smoothing_ms measures) run the same kernel.
        config = None if candidate.config is None else replace(candidate.config, smooth=True)
        key = self._key(target_name, config, shape)
        return self._cached(key, lambda: _measure_weight_op(target_name, candidate, shape))

    def call_ms(self, what: str, call: Callable[[], object]) -> float:
        """The median latency of ``call()``, measured the first time ``what`` (which names
        everything the time depends on) is asked for on this machine, then read back: a choice
        made from it is made the same way when a saved model is lowered again here."""
        return self._cached(self._key(what), lambda: median_ms(call, repeats=REPEATS, warmup=1))

    def smoothing_ms(self, form: str, rows: int, width: int, channels: int, out_features: int) -> float:
        """What ``smooth-outliers`` adds in front of one linear of ``out_features`` reading a
        value of ``rows`` x ``width``: for ``scale``, one multiply of the value; for
        ``split``, the float path of ``channels`` outlier channels (their linear from the
        producer's ``width`` inputs, the activation, the product with the reader's columns, the add)."""
        key = self._key("smooth-outliers", form, f"{rows}x{width} channels {channels} out {out_features}")
        return self._cached(key, lambda: _measure_smoothing(form, rows, width, channels, out_features))


def _measure_weight_op(target_name: str, candidate: Candidate, shape: WeightOpShape) -> float:
    from qcompile.api import compile  # the measurement compiles like a model is compiled

    torch.manual_seed(0)
    module = shape.module().eval()
    x = torch.randn(shape.input_shape)
    qconfig = QConfig() if candidate.config is None else QConfig(by_op={shape.kind: candidate.config})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = compile(module, (x,), target=target_name, qconfig=qconfig, calibration_data=[(x,)],
                           outlier_smoothing=None, progress=False)
    # Without the input check: a pass over the input for NaN (8 ms on a 4096 x 1536 input), which
    # a model pays once, not at every linear.
    return median_ms(lambda: compiled.run_unchecked(x), repeats=REPEATS, warmup=3)


def _measure_smoothing(form: str, rows: int, width: int, channels: int, out_features: int) -> float:
    torch.manual_seed(0)
    x = torch.randn(rows, width)
    if form == "scale":
        factors = torch.rand(width) + 0.5
        return median_ms(lambda: x * factors, repeats=REPEATS, warmup=5)
    rows_weight, columns, output = torch.randn(channels, width), torch.randn(channels, out_features), \
        torch.randn(rows, out_features)
    return median_ms(lambda: output + F.gelu(F.linear(x, rows_weight)) @ columns, repeats=REPEATS, warmup=5)
