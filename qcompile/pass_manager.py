"""The pass manager: runs a pipeline over a graph module it never changes.

The manager hands each pass its own copy of the graph (tensors are shared and read-only), so
pass authors may edit that copy in place; it checks the pipeline's order before anything runs,
calls every instrument's hooks around every pass, and turns a pass's failure into a
:class:`PassError` naming the pass and the passes that ran before it. Passes, pipelines and
the instrument hooks are defined in :mod:`qcompile.pipeline` (re-exported here).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from torch import fx

from qcompile.errors import CalibrationError, InputError, PassError, QCompileError
from qcompile.instruments import DumpIR, SkipPass, Verify
from qcompile.pipeline import (
    Instrument,
    Pass,
    PassRecord,
    PassResult,
    Pipeline,
    PipelineResult,
    parse_pass,
    registered_passes,
)

if TYPE_CHECKING:
    from qcompile.context import CompileContext

__all__ = ["Instrument", "Pass", "PassManager", "PassRecord", "PassResult", "Pipeline", "PipelineResult",
           "parse_pass", "registered_passes"]


class PassManager:
    """Runs a pipeline over a graph module it never changes.

    ``verify=True`` adds the :class:`Verify` instrument. ``QCOMPILE_DUMP_DIR`` adds
    :class:`DumpIR` and ``QCOMPILE_SKIP_PASSES`` (comma-separated names) adds :class:`SkipPass`,
    so dumping and bisection need no code change. ``context`` is the compile context passes
    that read one are given (:meth:`Pass.run`); the graph after each pass named in its
    ``snapshot_after`` is kept there under that name, and after each pass that decides the plan
    (``Pass.decides_plan``) under ``plan``.
    """

    def __init__(
        self,
        passes: Pipeline | Sequence[Pass] | str,
        instruments: Sequence[Instrument] = (),
        *,
        verify: bool = False,
        initial_properties: Iterable[str] = (),
        keep_history: bool = False,
        context: CompileContext | None = None,
    ):
        if isinstance(passes, str):
            self.pipeline = Pipeline.parse(passes)
        elif isinstance(passes, Pipeline):
            self.pipeline = passes
        else:
            self.pipeline = Pipeline(passes)
        self.initial_properties = frozenset(initial_properties)
        self.pipeline.check_order(self.initial_properties)
        self.instruments = list(instruments)
        if verify and not any(isinstance(i, Verify) for i in self.instruments):
            self.instruments.append(Verify())
        dump_dir = os.environ.get("QCOMPILE_DUMP_DIR")
        if dump_dir and not any(isinstance(i, DumpIR) for i in self.instruments):
            self.instruments.append(DumpIR(dump_dir))
        skip = os.environ.get("QCOMPILE_SKIP_PASSES")
        if skip:
            self.instruments.append(SkipPass(*[s.strip() for s in skip.split(",") if s.strip()]))
        self.keep_history = keep_history
        self.context = context

    def __call__(self, gm: fx.GraphModule) -> PipelineResult:
        self.pipeline.check_order(self.initial_properties)
        for instrument in self.instruments:
            instrument.enter_pipeline(self.pipeline, gm)
        records: list[PassRecord] = []
        history = [gm] if self.keep_history else []
        current, any_modified, ran = gm, False, []
        for index, p in enumerate(self.pipeline, start=1):
            record = PassRecord(index=index, name=p.name, text=str(p))
            records.append(record)
            if not all(i.should_run(p, index) for i in self.instruments):
                record.skipped = True
                continue
            for instrument in self.instruments:
                _run_instrument(instrument, "before", p, ran, instrument.run_before_pass, p, current, index)
            start = time.perf_counter()
            try:
                result = p.run(current, self.context)
            except (PassError, CalibrationError, InputError):
                raise  # a bad batch or input is named as such, not as the pass's failure
            except QCompileError as exc:
                raise PassError(p.name, str(exc), ran) from exc
            except Exception as exc:
                raise PassError(p.name, f"{type(exc).__name__}: {exc}", ran) from exc
            record.seconds = time.perf_counter() - start
            record.modified, record.stats, record.diagnostics = result.modified, dict(result.stats), result.diagnostics
            for instrument in self.instruments:
                _run_instrument(instrument, "after", p, ran, instrument.run_after_pass, p, current, result, index)
            ran.append(p.name)
            any_modified |= result.modified
            current = result.graph_module
            if self.keep_history:
                history.append(current)
            if self.context is not None and p.name in self.context.snapshot_after:
                self.context.snapshots[p.name] = current
            if self.context is not None and p.decides_plan:
                self.context.snapshots["plan"] = current
        outcome = PipelineResult(current, any_modified, records, history)
        for instrument in self.instruments:
            instrument.exit_pipeline(outcome)
        return outcome


def _run_instrument(instrument: Instrument, when: str, p: Pass, ran: list[str], hook: Any, *args: Any) -> None:
    """An instrument's hook; its failure is the pass's error, naming the instrument (a QCompileError
    such as Verify's says what is wrong with the pass; anything else is the instrument's own bug)."""
    try:
        hook(*args)
    except PassError:
        raise
    except QCompileError as exc:
        raise PassError(p.name, str(exc), ran) from exc
    except Exception as exc:
        raise PassError(p.name, f"instrument {type(instrument).__name__} failed {when} it: "
                                f"{type(exc).__name__}: {exc}", ran) from exc
