"""Instruments: timing, IR dumps, verification, numeric checks and pass skipping.

They observe a pipeline through the four hooks of :class:`~qcompile.pass_manager.Instrument`
and never change what a pass does, except ``SkipPass``, whose job is to stop one from running
(bisection without code changes).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from qcompile.errors import PipelineParseError, VerificationError
from qcompile.ir.graph import named_tensors
from qcompile.ir.printer import diff_graphs, print_graph
from qcompile.ir.verify import find_problems
from qcompile.pipeline import Instrument, Pass, PassResult, Pipeline, PipelineResult, registered_passes


class Timing(Instrument):
    """Wall time per pass (the manager's own measurement), kept after the run."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def exit_pipeline(self, result: PipelineResult) -> None:
        for record in result.records:
            if not record.skipped:
                key = f"{record.index:03d}_{record.name}"
                self.seconds[key] = record.seconds

    def summary(self) -> str:
        total = sum(self.seconds.values())
        lines = [f"{name:<36}{s * 1e3:>10.1f} ms" for name, s in self.seconds.items()]
        lines.append(f"{'total':<36}{total * 1e3:>10.1f} ms")
        return "\n".join(lines)


class DumpIR(Instrument):
    """Writes ``000_input.txt`` and, per pass, ``NNN_name.before.txt``, ``.after.txt`` and ``.diff``.

    The text files are canonical (numbered values); the diff uses node names, which survive
    the pass manager's copies, so it shows only the lines a pass touched. One instance numbers
    every pass of every pipeline it watches in one sequence (all of a compile's stages, in the
    order they ran, nothing overwritten): ``000_input.txt`` is the first pipeline's input (for a
    compile, the captured graph) and ``pipeline.txt`` has a line per pipeline.
    """

    def __init__(self, directory: str | Path, show_provenance: bool = True):
        self.directory = Path(directory)
        self.show_provenance = show_provenance
        self.written: list[Path] = []
        self._passes = 0
        self._pipelines: list[str] = []

    def _write(self, name: str, text: str) -> None:
        path = self.directory / name
        path.write_text(text)
        self.written.append(path)

    def enter_pipeline(self, pipeline: Pipeline, gm: fx.GraphModule) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self._pipelines:
            self._write("000_input.txt", print_graph(gm, show_provenance=self.show_provenance))
        self._pipelines.append(f"{self._passes + 1:03d}: {pipeline}")
        self._write("pipeline.txt", "\n".join(self._pipelines) + "\n")

    def run_after_pass(self, p: Pass, before: fx.GraphModule, result: PassResult, index: int) -> None:
        self._passes += 1
        stem = f"{self._passes:03d}_{p.name}"
        self._write(f"{stem}.before.txt", print_graph(before, show_provenance=self.show_provenance))
        self._write(f"{stem}.after.txt", print_graph(result.graph_module, show_provenance=self.show_provenance))
        self._write(f"{stem}.diff", diff_graphs(before, result.graph_module) + "\n")


def _tensor_fingerprints(gm: fx.GraphModule) -> dict[str, tuple[Any, ...]]:
    # The version counter catches in-place ops; the sums catch writes through ``.data``,
    # which bypass it.
    fingerprints = {}
    for name, t in named_tensors(gm):
        values = t.detach().double().nan_to_num(0.0)
        fingerprints[name] = (id(t), t._version, values.sum().item(), values.abs().sum().item())
    return fingerprints


class Verify(Instrument):
    """After every pass: fx lint and qcompile's invariants, an honest ``modified``, an unchanged input.

    The input check covers what the manager's graph copy cannot protect: tensors shared with the
    caller (an in-place edit bumps a tensor's version counter) and the caller's graph itself.
    """

    def __init__(self) -> None:
        self._before_text = ""
        self._before_fingerprints: dict[str, tuple[Any, ...]] = {}

    def run_before_pass(self, p: Pass, gm: fx.GraphModule, index: int) -> None:
        self._before_text = print_graph(gm, show_provenance=True)
        self._before_fingerprints = _tensor_fingerprints(gm)

    def run_after_pass(self, p: Pass, before: fx.GraphModule, result: PassResult, index: int) -> None:
        if print_graph(before, show_provenance=True) != self._before_text:
            raise VerificationError("changed its input graph; passes must edit only the copy they are given")
        changed = [
            name for name, fingerprint in _tensor_fingerprints(before).items()
            if self._before_fingerprints.get(name) != fingerprint
        ]
        if changed:
            raise VerificationError(
                f"changed shared tensors in place: {', '.join(changed)}; register new tensors instead"
            )
        problems = find_problems(result.graph_module)
        if problems:
            raise VerificationError("left an invalid graph:\n  " + "\n  ".join(problems))
        really_modified = print_graph(result.graph_module, show_provenance=True) != self._before_text
        if really_modified != result.modified:
            raise VerificationError(
                f"reported modified={result.modified} but the graph "
                f"{'changed' if really_modified else 'did not change'}"
            )


def relative_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    """max |a - e| / max |e|: scale-free, and stable when single elements are near zero."""
    expected, actual = expected.double(), actual.double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    diff = (actual - expected).abs().max().item() if expected.numel() else 0.0
    return diff / scale if scale > 0 else diff


class NumericCheck(Instrument):
    """Runs the graph before and after every pass that claims to preserve semantics.

    ``rtol`` bounds :func:`relative_error` per output; float folding (BatchNorm into conv) moves
    results by a few float32 ulps, hence the 1e-5 default.
    """

    def __init__(self, example_args: Sequence[Any] = (), example_kwargs: dict[str, Any] | None = None, rtol: float = 1e-5):
        self.example_args = tuple(example_args)
        self.example_kwargs = dict(example_kwargs or {})
        self.rtol = rtol
        self.worst: dict[str, float] = {}

    def _run(self, gm: fx.GraphModule) -> list[torch.Tensor]:
        with torch.no_grad():
            out = gm(*self.example_args, **self.example_kwargs)
        return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]

    def run_after_pass(self, p: Pass, before: fx.GraphModule, result: PassResult, index: int) -> None:
        if not p.preserves_semantics or not result.modified:
            return
        expected, actual = self._run(before), self._run(result.graph_module)
        if len(expected) != len(actual):
            raise VerificationError(f"changed the number of outputs from {len(expected)} to {len(actual)}")
        worst = 0.0
        for i, (e, a) in enumerate(zip(expected, actual)):
            if e.shape != a.shape or e.dtype != a.dtype:
                raise VerificationError(
                    f"output {i} changed from {e.dtype}{list(e.shape)} to {a.dtype}{list(a.shape)}"
                )
            err = relative_error(e, a)
            worst = max(worst, err)
            if not err <= self.rtol:
                raise VerificationError(
                    f"claims to preserve semantics but output {i} moved by {err:.3g} relative (limit {self.rtol:g})"
                )
        self.worst[f"{index:03d}_{p.name}"] = worst


class SkipPass(Instrument):
    """Skips the named passes: bisect a failing pipeline without editing it."""

    def __init__(self, *names: str):
        known = registered_passes()
        unknown = sorted(set(names) - known.keys())
        if unknown:  # a typo would otherwise skip nothing and bisect nothing
            raise PipelineParseError(f"cannot skip unknown pass{'es' if len(unknown) > 1 else ''} "
                                     f"{', '.join(map(repr, unknown))} (known passes: {', '.join(sorted(known))})")
        self.names = set(names)

    def should_run(self, p: Pass, index: int) -> bool:
        return p.name not in self.names
