"""The ``qcompile`` command (also ``python -m qcompile``).

    qcompile compile MODEL --target cpu-int8 --calib DATA --out m.qc [--onnx m.onnx]
                     [--report report.html] [--plan plan.json] [--write-plan plan.json]
    qcompile inspect m.qc
    qcompile report m.qc -o report.html [--profile]
    qcompile diff a.qc b.qc
    qcompile bench m.qc [--model MODEL]

MODEL is ``module:factory``, a callable returning the model or ``(model, example_inputs)`` (a
tuple of positional inputs, or a dict of keyword inputs), or
(for ``compile``) a saved ``.qc`` file to export or report again. DATA is ``module:callable``
returning an iterable of batches, or a folder of ``.safetensors`` / ``.npy`` files, one batch
each, read in name order (a ``.npy`` file is one positional input; a ``.safetensors`` file's
tensors named ``0``, ``1``, ... are positional inputs and the others keyword inputs).

Exit codes scripts can test: 0 done (for ``diff``: the files agree); 1 qcompile refused or
failed (a ``QCompileError``; for ``diff``: the files differ); 2 bad usage or input (a MODEL
or DATA that does not load); 3 a file refused as a saved model (damaged, foreign, or from a
newer qcompile).
"""

from __future__ import annotations

import difflib
import importlib
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from safetensors.torch import load_file

from qcompile.api import QuantizedModel, compile, load
from qcompile.artifact import FORMAT_VERSION, read_artifact
from qcompile.errors import ArtifactError, QCompileError
from qcompile.instruments import DumpIR
from qcompile.ir.printer import print_graph
from qcompile.outliers import check_smoothing
from qcompile.profile import median_ms, profile_ops
from qcompile.report import CompileReport
from qcompile.targets import targets

# Soft wrap: messages name files and nodes, which a hard line break inside would make
# impossible to copy; the terminal wraps long lines itself.
console = Console(stderr=True, soft_wrap=True)
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_REFUSED_FILE = 1, 2, 3


class BadInput(click.UsageError):
    """A MODEL or DATA argument that does not give what the command needs (exit code 2)."""


def load_callable(spec: str, what: str) -> Any:
    """``module:attribute`` imported and looked up; the error names what was given and why."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise BadInput(f"{what} '{spec}' must be 'module:callable' (e.g. 'mypkg.models:build')")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may fail in any way while importing
        raise BadInput(f"{what} '{spec}': cannot import module '{module_name}' ({type(exc).__name__}: {exc})") from exc
    value: Any = module
    for part in attribute.split("."):
        if not hasattr(value, part):
            raise BadInput(f"{what} '{spec}': module '{module_name}' has no attribute '{attribute}'")
        value = getattr(value, part)
    if not callable(value):
        raise BadInput(f"{what} '{spec}' is a {type(value).__name__}, not a callable")
    return value


def build_model(spec: str) -> tuple[torch.nn.Module, Any]:
    """The model (and example inputs, or None) a ``module:factory`` MODEL returns."""
    try:
        made = load_callable(spec, "MODEL")()
    except BadInput:
        raise
    except Exception as exc:
        raise BadInput(f"MODEL '{spec}' failed when called ({type(exc).__name__}: {exc})") from exc
    model, example = (made if isinstance(made, tuple) and len(made) == 2 else (made, None))
    if not isinstance(model, torch.nn.Module):
        raise BadInput(f"MODEL '{spec}' returned {type(made).__name__}, not an nn.Module or (nn.Module, example_inputs)")
    return model, example


def calibration_batches(spec: str) -> list[Any]:
    """DATA as a list of batches (see the module docstring); a folder's files must agree in
    their inputs' names, dtypes and every dimension but the batch (the file that does not is named)."""
    folder = Path(spec)
    if folder.is_dir():
        return _folder_batches(folder)
    if ":" not in spec:
        raise BadInput(f"DATA '{spec}' is neither a folder nor 'module:callable'")
    try:
        data = load_callable(spec, "DATA")()
        return list(data)
    except BadInput:
        raise
    except Exception as exc:
        raise BadInput(f"DATA '{spec}' failed when called or iterated ({type(exc).__name__}: {exc})") from exc


def _folder_batches(folder: Path) -> list[Any]:
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".npy"))
    if not files:
        raise BadInput(f"DATA folder '{folder}' has no .safetensors or .npy files")
    batches, first_signature = [], None
    for file in files:
        try:
            batch = _file_batch(file)
        except Exception as exc:
            raise BadInput(f"DATA file '{file}' cannot be read ({type(exc).__name__}: {exc})") from exc
        signature = _signature(batch)
        if first_signature is None:
            first_signature = signature
        elif signature != first_signature:
            raise BadInput(f"DATA file '{file}' holds {_describe(signature)}, but '{files[0].name}' holds "
                           f"{_describe(first_signature)}: every batch needs the same inputs (only dimension 0 may differ)")
        batches.append(batch)
    return batches


def _file_batch(file: Path) -> Any:
    if file.suffix == ".npy":
        return (torch.from_numpy(np.load(file, allow_pickle=False)),)
    tensors = load_file(str(file))
    positional = sorted((k for k in tensors if k.isdigit()), key=int)
    args = tuple(tensors[k] for k in positional)
    kwargs = {k: v for k, v in tensors.items() if not k.isdigit()}
    return (args, kwargs) if kwargs else args


def _signature(batch: Any) -> tuple:
    args, kwargs = batch if isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[1], dict) else (batch, {})
    items = [(str(i), t) for i, t in enumerate(args)] + sorted(kwargs.items())
    return tuple((name, str(t.dtype).removeprefix("torch."), tuple(t.shape[1:])) for name, t in items)


def _describe(signature: tuple) -> str:
    return ", ".join(f"{name}: {dtype}[N,{','.join(map(str, dims))}]" for name, dtype, dims in signature)


class _TrackedBatches:
    """The batches, re-iterable, each pass over them shown as a progress bar (smoothing,
    calibration and the report's SQNR each read the data)."""

    def __init__(self, batches: list[Any], progress: Progress):
        self.batches, self.progress, self.passes = batches, progress, 0

    def __iter__(self) -> Iterator[Any]:
        self.passes += 1
        task = self.progress.add_task(f"calibration data, pass {self.passes}", total=len(self.batches))
        for batch in self.batches:
            yield batch
            self.progress.advance(task)


def _progress() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


def _read(path: Path) -> tuple[Any, CompileReport]:
    """A saved model's artifact and report, refused with exit code 3 when it is not one."""
    artifact = read_artifact(path)
    try:
        report = CompileReport.from_json(artifact.report)
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"'{path}' has no qcompile report ({type(exc).__name__}: {exc})") from exc
    return artifact, report


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """qcompile: quantize a PyTorch model into int8 kernels or ONNX QDQ, and look at what it did."""


def _smoothing(value: str) -> float | str:
    """``--smoothing``'s value: "auto" or a strength in [0, 1]."""
    if value == "auto":
        return value
    try:
        strength = float(value)
        check_smoothing(strength)
    except (ValueError, QCompileError):
        raise click.BadParameter(f'{value!r} is neither a strength from 0 to 1 nor "auto"') from None
    return strength


@cli.command("compile")
@click.argument("model")
@click.option("--target", default="cpu-int8", show_default=True, help=f"one of: {', '.join(sorted(targets()))}")
@click.option("--calib", "data", help="calibration DATA: module:callable or a folder of .safetensors/.npy batches")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="write the compiled model (.qc)")
@click.option("--onnx", type=click.Path(dir_okay=False, path_type=Path), help="also write an ONNX QDQ file")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), help="write the HTML report")
@click.option("--plan", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="replay a plan JSON")
@click.option("--write-plan", type=click.Path(dir_okay=False, path_type=Path), help="write the resolved plan JSON")
@click.option("--smoothing", default="0.75", show_default=True, callback=lambda _c, _p, value: _smoothing(value),
              help='outlier smoothing strength (0 to 1), or "auto" (chosen per value by local error)')
@click.option("--no-smoothing", is_flag=True, help="leave activation outlier channels as they are")
def compile_command(model: str, target: str, data: str | None, out: Path | None, onnx: Path | None,
                    report_path: Path | None, plan: Path | None, write_plan: Path | None,
                    smoothing: float | str, no_smoothing: bool) -> None:
    """Compile MODEL (module:factory, or a saved .qc file to export or report again)."""
    dumps = tempfile.TemporaryDirectory(prefix="qcompile-dumps-") if report_path else None
    if model.endswith(".qc") and Path(model).is_file():
        with console.status(f"loading {model}"):
            qm = load(model)
    else:
        module, example = build_model(model)
        batches = calibration_batches(data) if data else None
        with _progress() as progress:
            status = progress.add_task(f"compiling for {target}", total=None)
            args, kwargs = (None, example) if isinstance(example, dict) else (example, None)
            qm = compile(module, args, example_kwargs=kwargs, target=target,
                         calibration_data=_TrackedBatches(batches, progress) if batches is not None else None,
                         plan=plan, progress=False, outlier_smoothing=None if no_smoothing else smoothing,
                         instruments=[DumpIR(dumps.name)] if dumps else [])
            progress.update(status, total=1, completed=1)
    _summarize(qm.report)
    if out:
        console.print(f"wrote {qm.save(out)}")
    if onnx:
        with console.status(f"exporting {onnx} and cross-checking it in ONNX Runtime"):
            exported = qm.export_onnx(onnx)
        console.print(str(exported), markup=False, highlight=False)
    if write_plan:
        console.print(f"wrote {qm.report.write_plan(write_plan)}")
    if report_path:
        console.print(f"wrote {qm.report.write_html(report_path, dumps=dumps.name if dumps else None)}")
        dumps.cleanup()


def _summarize(report: CompileReport) -> None:
    counts = Counter(n.precision for n in report.nodes)
    sqnr = ", ".join("inf" if s == float("inf") else f"{s:.1f}" for s in report.output_sqnr_db)
    console.print(f"[bold]{report.target}[/bold], {report.mode}: "
                  + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
                  + (f"; output SQNR {sqnr} dB" if sqnr else ""))
    for finding in report.calibration_findings:
        console.print(f"[yellow]warning:[/yellow] {finding}")


@cli.command("inspect")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def inspect_command(path: Path) -> None:
    """What a saved model is: target, nodes by precision, bytes, format version, hash check."""
    artifact, report = _read(path)
    tensors = [t for t in artifact.graph_module.state_dict().values() if isinstance(t, torch.Tensor)]
    by_dtype = Counter()
    for tensor in tensors:
        by_dtype[str(tensor.dtype).removeprefix("torch.")] += tensor.numel() * tensor.element_size()
    table = Table(title=str(path), show_header=False)
    table.add_row("format", f"qcompile format {FORMAT_VERSION}, sha256 verified")
    table.add_row("target", f"{report.target} ({report.mode})")
    table.add_row("file", f"{path.stat().st_size:,} bytes")
    table.add_row("tensors", ", ".join(f"{k} {v:,} B" for k, v in sorted(by_dtype.items())))
    table.add_row("nodes", ", ".join(f"{v} {k}" for k, v in sorted(Counter(n.precision for n in report.nodes).items())))
    if report.output_sqnr_db:
        table.add_row("output SQNR", ", ".join(f"{s:.1f} dB" for s in report.output_sqnr_db))
    if report.calibration_batches:
        table.add_row("calibration", f"{report.calibration_batches} batches")
    Console().print(table)


@cli.command("report")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--profile", is_flag=True, help="run the compiled model on its example inputs under the profiler")
def report_command(path: Path, output: Path, profile: bool) -> None:
    """Write a saved model's report as one HTML page."""
    _, report = _read(path)
    if profile:
        qm = load(path)
        args, kwargs = qm.example
        with console.status("profiling the compiled model"):
            report.profile = profile_ops(lambda: qm(*args, **kwargs))
    console.print(f"wrote {report.write_html(output)}")


@cli.command("diff")
@click.argument("first", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("second", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def diff_command(first: Path, second: Path) -> None:
    """Compare two saved models' plans and Q/DQ graphs (exit code 1 when they differ)."""
    (a, report_a), (b, report_b) = _read(first), _read(second)
    plan_a, plan_b = ({n["node"]: n for n in r.plan} for r in (report_a, report_b))
    lines = [f"target: {report_a.target} vs {report_b.target}"] if report_a.target != report_b.target else []
    for node in sorted(plan_a.keys() | plan_b.keys()):
        left, right = plan_a.get(node), plan_b.get(node)
        if left != right:
            lines.append(f"plan {node}: {_plan_entry(left)}  ->  {_plan_entry(right)}")
    graph = list(difflib.unified_diff(print_graph(a.graph_module, names="node").splitlines(),
                                      print_graph(b.graph_module, names="node").splitlines(),
                                      fromfile=str(first), tofile=str(second), lineterm="", n=1))
    out = Console()
    if not lines and not graph:
        out.print("the plans and the Q/DQ graphs are the same")
        return
    for line in lines:
        out.print(line, markup=False)
    for line in graph:
        out.print(line, markup=False, style="red" if line.startswith("-") else "green" if line.startswith("+") else None)
    sys.exit(EXIT_FAILED)


def _plan_entry(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "(absent)"
    if entry.get("shares_qparams_of"):
        return f"shares the qparams of {entry['shares_qparams_of']}"
    inputs = entry.get("inputs") or []
    if not inputs:
        return f"float ({entry.get('float_reason') or entry.get('rule', '')})"
    return "; ".join(f"{i['index']}={i['role']}:{i['dtype']}/{i['granularity']}"
                     + (f" scale {i['scale']}" if "scale" in i else "") for i in inputs)


@cli.command("bench")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "model_spec", help="MODEL (module:factory) to time the float model it was compiled from")
@click.option("--repeats", default=10, show_default=True, type=click.IntRange(1))
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1))
def bench_command(path: Path, model_spec: str | None, repeats: int, threads: int) -> None:
    """Latency of a saved model on its example inputs, against its Q/DQ reference and the float model."""
    torch.set_num_threads(threads)
    qm: QuantizedModel = load(path)
    args, kwargs = qm.example
    rows = [("compiled", median_ms(lambda: qm(*args, **kwargs), repeats)),
            ("Q/DQ reference graph", median_ms(lambda: qm.qdq_graph_module(*args, **kwargs), repeats))]
    if model_spec:
        model, _ = build_model(model_spec)
        model.eval()
        rows.append(("float model", median_ms(lambda: model(*args, **kwargs), repeats)))
    table = Table(title=f"{path} on its example inputs ({threads} threads, median of {repeats})")
    for column in ("path", "ms", "vs compiled"):
        table.add_column(column, justify="left" if column == "path" else "right")
    compiled_ms = rows[0][1]
    for name, ms in rows:
        table.add_row(name, f"{ms:.2f}", f"{ms / compiled_ms:.2f}x")
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    try:
        cli.main(args=argv, prog_name="qcompile", standalone_mode=False)
    except click.exceptions.Abort:
        console.print("aborted")
        return EXIT_FAILED
    except click.UsageError as exc:
        console.print(f"[red]error:[/red] {escape(exc.format_message())}", highlight=False)
        return EXIT_BAD_INPUT
    except click.ClickException as exc:
        console.print(f"[red]error:[/red] {escape(exc.format_message())}", highlight=False)
        return exc.exit_code
    except ArtifactError as exc:
        console.print(f"[red]refused:[/red] {escape(str(exc))}", highlight=False)
        return EXIT_REFUSED_FILE
    except QCompileError as exc:
        console.print(f"[red]error:[/red] {type(exc).__name__}: {escape(str(exc))}", highlight=False)
        return EXIT_FAILED
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
