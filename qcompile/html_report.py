"""The compile report as one self-contained HTML page: nothing is fetched to open it.

Sections, each drawn from the report's data (a saved model carries it, so ``qcompile report
m.qc`` draws the same page):

* the pipeline as a timeline of passes (width by time, nodes added and removed), each pass
  opening on its change side by side when the compile was dumped (``DumpIR``);
* the graph: the inputs and every planned node, laid out by depth, coloured by precision
  (int8, weight-only, fp8, reference Q/DQ, float), the reason on hover;
* SQNR per node as a chart where the worst layers stand out;
* calibration ranges per observed value and batch, outlying batches marked;
* the kernel profile, where measured;
* the plan table, sortable by any column.

The SVG is written here, server side, so the page has its content without script; the little
script there is sorts the table and nothing else.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qcompile.report import CompileReport, NodeReport

COLOURS = {"int8": "#2e9e5b", "weight-only": "#3b7dd8", "fp8": "#8e5bd1", "reference": "#a8d5b5",
           "float": "#9aa0a6", "input": "#ffffff", "output": "#ffffff"}
SQNR_GOOD, SQNR_POOR = 30.0, 20.0  # dB: above GOOD is green, below POOR red


def precision_class(node: NodeReport | None, op: str = "") -> str:
    """The colour class of a node: int8 / weight-only (a table read as int8 rows, a linear on
    bf16 activations) / fp8 / reference (quantized but not lowered to a kernel) / float."""
    if node is None:
        return op if op in ("input", "output") else "float"
    if node.precision.endswith("-ref"):
        return "reference"
    if node.precision == "fp8":
        return "fp8"
    if node.precision == "int8":
        weight_only = node.op == "embedding" or node.detail.startswith("qc.linear_weight_only")
        return "weight-only" if weight_only else "int8"
    return "float"


def write_html(report: CompileReport, path: Path, dumps: Path | None = None) -> Path:
    diffs = _read_diffs(dumps, len(report.passes)) if dumps is not None else {}
    nodes = {n.name: n for n in report.nodes}
    body = "\n".join([
        _summary(report),
        _section("Pipeline", _timeline(report, diffs)),
        _section("Graph", _graph_svg(report, nodes)),
        _section("SQNR per node", _sqnr_chart(report)),
        _section("Calibration ranges", _calibration(report)),
        _section("Kernel profile", _profile(report)),
        _section("Plan", _plan_table(report)),
        *([_section("Precision search", _precision_search(report))] if report.budget else []),
    ])
    title = f"qcompile report: {report.target}"
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1>\n{body}\n<script>{_SCRIPT}</script></body></html>\n")
    path.write_text(page, encoding="utf-8")
    return path


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _section(title: str, content: str) -> str:
    anchor = "section-" + title.lower().replace(" ", "-")
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>\n{content}\n</section>'


def _summary(report: CompileReport) -> str:
    counts: dict[str, int] = {}
    for node in report.nodes:
        key = precision_class(node)
        counts[key] = counts.get(key, 0) + 1
    chips = "".join(f'<span class="chip" style="background:{COLOURS[k]}">{_e(k)}: {v}</span>'
                    for k, v in sorted(counts.items()))
    facts = [f"{report.mode} quantization"]
    if report.calibration_batches:
        facts.append(f"calibrated on {report.calibration_batches} batches")
    if report.kernel_calls_checked:
        facts.append(f"{report.kernel_calls_checked} kernel calls matched their Q/DQ reference")
    if report.output_sqnr_db:
        facts.append("output SQNR " + ", ".join(_db_text(s) for s in report.output_sqnr_db) + " dB")
    items = "".join(f"<li>{_e(note)}</li>" for note in report.notes)
    items += "".join(f'<li class="warning">{_e(w)}</li>' for w in report.calibration_findings)
    return (f'<section id="summary"><p>{_e("; ".join(facts))}</p><p>{chips}</p>'
            + (f"<ul>{items}</ul>" if items else "") + "</section>")


def _db_text(value: float | None) -> str:
    if value is None:
        return ""
    return "inf" if math.isinf(value) and value > 0 else f"{value:.1f}"


# -- pipeline ---------------------------------------------------------------------------------

def _read_diffs(folder: Path, count: int) -> dict[int, str]:
    """Each pass's unified diff from a DumpIR folder, by its place in the compile (1-based)."""
    found = {}
    for file in sorted(folder.glob("*.diff")):
        match = re.match(r"(\d+)_", file.name)
        if match and 1 <= int(match[1]) <= count:
            found[int(match[1])] = file.read_text(encoding="utf-8")
    return found


def _changed_counts(diff: str) -> tuple[int, int]:
    lines = diff.splitlines()
    added = sum(1 for line in lines if line.startswith("+") and not line.startswith("+++"))
    removed = sum(1 for line in lines if line.startswith("-") and not line.startswith("---"))
    return added, removed


def _timeline(report: CompileReport, diffs: dict[int, str]) -> str:
    if not report.passes:
        return "<p>No passes recorded.</p>"
    longest = max(p.ms for p in report.passes) or 1.0
    rows = [] if any(p.ms for p in report.passes) else [
        "<p>Pass times are not saved in a model file (equal compiles save equal bytes); the report "
        "<code>qcompile compile --report</code> or <code>qm.report.write_html</code> writes has them.</p>"]
    for number, p in enumerate(report.passes, start=1):
        width = 2 + 98 * (p.ms / longest)
        diff = diffs.get(number, "")
        added, removed = _changed_counts(diff)
        change = f"+{added} / -{removed} lines" if added or removed else ("changed" if p.changed else "no change")
        stats = ", ".join(f"{k}={v}" for k, v in p.stats.items())
        summary = (f'<span class="stage">{_e(p.stage)}</span><span class="pass">{_e(p.name.split("{")[0])}</span>'
                   f'<span class="bar" style="width:{width:.1f}%"></span><span class="ms">{p.ms:.1f} ms</span>'
                   f'<span class="change">{_e(change)}</span>')
        detail = f"<p class=\"stats\">{_e(stats)}</p>" if stats else ""
        detail += "".join(f'<p class="diagnostic">{_e(d["kind"])}: {_e(d["node"])}: {_e(d["reason"])}</p>'
                          for d in p.diagnostics)
        if added or removed:
            detail += _side_by_side(diff)
        elif p.changed:
            detail += "<p>Compile with <code>instruments=[DumpIR(dir)]</code> (or <code>qcompile compile --report</code>) " \
                      "to see this change.</p>"
        rows.append(f'<details class="pass-row"><summary>{summary}</summary>{detail}</details>')
    return '<div class="timeline">' + "\n".join(rows) + "</div>"


def _side_by_side(diff: str) -> str:
    """A unified diff as two columns, removed lines left, added right, context on both."""
    rows, removed, added = [], [], []

    def flush() -> None:
        for i in range(max(len(removed), len(added))):
            left = removed[i] if i < len(removed) else None
            right = added[i] if i < len(added) else None
            rows.append(("del" if left is not None else "", left or "", "add" if right is not None else "", right or ""))
        removed.clear()
        added.clear()

    for line in diff.splitlines():
        if line.startswith(("---", "+++")):
            continue
        if line.startswith("@@"):
            flush()
            rows.append(("hunk", line, "hunk", line))
        elif line.startswith("-"):
            removed.append(line[1:])
        elif line.startswith("+"):
            added.append(line[1:])
        else:
            flush()
            rows.append(("", line[1:], "", line[1:]))
    flush()
    cells = "".join(f'<tr><td class="{lc}">{_e(left)}</td><td class="{rc}">{_e(right)}</td></tr>'
                    for lc, left, rc, right in rows)
    return f'<table class="diff"><tr><th>before</th><th>after</th></tr>{cells}</table>'


# -- graph ------------------------------------------------------------------------------------

BOX_W, BOX_H, GAP_X, GAP_Y = 150, 34, 24, 30


def direct_inputs(graph: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Each entry's inputs that are not reached through another of its inputs (the transitive
    reduction): a residual stream reads the embedding in every layer, but the drawing shows
    that edge once, into the first layer."""
    ancestors: dict[str, set[str]] = {}
    direct = {}
    for entry in graph:
        inputs = [i for i in entry["inputs"] if i in ancestors]
        direct[entry["name"]] = [i for i in inputs if not any(i in ancestors[j] for j in inputs if j != i)]
        ancestors[entry["name"]] = set().union(*(ancestors[i] | {i} for i in inputs))
    return direct


def _graph_svg(report: CompileReport, nodes: dict[str, NodeReport]) -> str:
    if not report.graph:
        return "<p>This report has no graph (compiled by an older qcompile, or a target without a plan).</p>"
    depth: dict[str, int] = {}
    for entry in report.graph:
        depth[entry["name"]] = 1 + max((depth[i] for i in entry["inputs"] if i in depth), default=-1)
    layers: dict[int, list[dict[str, Any]]] = {}
    for entry in report.graph:
        layers.setdefault(depth[entry["name"]], []).append(entry)
    widest = max(len(row) for row in layers.values())
    width = widest * (BOX_W + GAP_X) + GAP_X
    height = len(layers) * (BOX_H + GAP_Y) + GAP_Y
    where: dict[str, tuple[float, float]] = {}
    for level, row in layers.items():
        offset = (width - len(row) * (BOX_W + GAP_X) + GAP_X) / 2
        for i, entry in enumerate(row):
            where[entry["name"]] = (offset + i * (BOX_W + GAP_X), GAP_Y + level * (BOX_H + GAP_Y))
    edges, boxes, direct = [], [], direct_inputs(report.graph)
    for entry in report.graph:
        x, y = where[entry["name"]]
        for source in direct[entry["name"]]:
                sx, sy = where[source]
                edges.append(f'<path class="edge" d="M{sx + BOX_W / 2:.0f},{sy + BOX_H:.0f} '
                             f'C{sx + BOX_W / 2:.0f},{sy + BOX_H + GAP_Y / 2:.0f} {x + BOX_W / 2:.0f},'
                             f'{y - GAP_Y / 2:.0f} {x + BOX_W / 2:.0f},{y:.0f}"/>')
        node = nodes.get(entry["name"])
        kind = precision_class(node, entry["op"])
        tip = [entry["name"], f"op: {entry['op']}"]
        if node is not None:
            tip += [f"module: {node.module}" if node.module else "", f"precision: {node.precision}",
                    node.detail, f"SQNR {_db_text(node.sqnr_db)} dB" if node.sqnr_db is not None else ""]
        label = entry["name"] if len(entry["name"]) <= 20 else entry["name"][:19] + "…"
        sub = _module_tail(node.module) if node is not None and node.module else entry["op"]
        boxes.append(f'<g class="node {kind}" data-node="{_e(entry["name"])}"><title>{_e(chr(10).join(t for t in tip if t))}'
                     f'</title><rect x="{x:.0f}" y="{y:.0f}" width="{BOX_W}" height="{BOX_H}" rx="5" '
                     f'fill="{COLOURS[kind]}"/><text x="{x + BOX_W / 2:.0f}" y="{y + 14:.0f}">{_e(label)}</text>'
                     f'<text class="sub" x="{x + BOX_W / 2:.0f}" y="{y + 27:.0f}">{_e(sub)}</text></g>')
    legend = "".join(f'<span class="chip" style="background:{c}">{_e(k)}</span>' for k, c in COLOURS.items()
                     if k not in ("input", "output"))
    return (f'<p>{legend} Hover a node for its module, precision and reason.</p><div class="scroll">'
            f'<svg id="graph" width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
            + "".join(edges) + "".join(boxes) + "</svg></div>")


def _module_tail(module: str, length: int = 22) -> str:
    """The end of a module path, to fit a box: ``model.encoder.layer.0.attention.self.query
    (Linear)`` -> ``…0.attention.self.query``."""
    path = module.split(" (")[0]
    return path if len(path) <= length else "…" + path[-(length - 1):]


# -- SQNR -------------------------------------------------------------------------------------

def _sqnr_chart(report: CompileReport) -> str:
    measured = [n for n in report.nodes if n.sqnr_db is not None]
    if not measured:
        return "<p>No SQNR measured.</p>"
    bar, chart_h, top = 14, 180, 60.0
    width = max(300, len(measured) * (bar + 2) + 50)
    worst = sorted(measured, key=lambda n: n.sqnr_db)[:5]
    bars = []
    for i, node in enumerate(measured):
        value = node.sqnr_db if not math.isinf(node.sqnr_db) else top
        h = max(1.0, min(value, top) / top * chart_h)
        colour = "#d93025" if value < SQNR_POOR else "#f29900" if value < SQNR_GOOD else "#2e9e5b"
        x = 40 + i * (bar + 2)
        bars.append(f'<rect class="sqnr" x="{x}" y="{10 + chart_h - h:.1f}" width="{bar}" height="{h:.1f}" '
                    f'fill="{colour}"><title>{_e(node.name)}: {_db_text(node.sqnr_db)} dB ({_e(node.precision)})'
                    f'</title></rect>')
    axis = "".join(f'<text class="axis" x="34" y="{10 + chart_h - v / top * chart_h + 4:.0f}">{v:.0f}</text>'
                   f'<line class="grid" x1="38" x2="{width}" y1="{10 + chart_h - v / top * chart_h:.0f}" '
                   f'y2="{10 + chart_h - v / top * chart_h:.0f}"/>' for v in (0, 20, 30, 40, 60))
    worst_items = "".join(f"<li>{_e(n.name)} ({_e(n.module or n.op)}): {_db_text(n.sqnr_db)} dB</li>" for n in worst)
    return (f'<div class="scroll"><svg id="sqnr" width="{width}" height="{chart_h + 20}">{axis}{"".join(bars)}</svg></div>'
            f"<p>SQNR of each planned node's output in the Q/DQ graph against the float graph, in graph order; "
            f"red below {SQNR_POOR:.0f} dB. Worst:</p><ol>{worst_items}</ol>"
            "<p>Sensitivity (the output error from quantizing one node alone) is not measured by this compile.</p>")


# -- calibration ------------------------------------------------------------------------------

def _calibration(report: CompileReport) -> str:
    if not report.calibration_ranges:
        return "<p>No calibration (dynamic quantization, or a report written before ranges were kept).</p>"
    skipped = set(report.calibration_skipped)
    rows = []
    for name, ranges in report.calibration_ranges.items():
        if not ranges:
            continue
        lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
        span = (hi - lo) or 1.0
        step = 10
        marks = []
        for i, (a, b) in enumerate(ranges, start=1):
            y0, y1 = 40 - (b - lo) / span * 36, 40 - (a - lo) / span * 36
            cls = "outlier" if i in skipped else "batch"
            marks.append(f'<rect class="{cls}" x="{(i - 1) * step + 2}" y="{y0:.1f}" width="{step - 3}" '
                         f'height="{max(1.0, y1 - y0):.1f}"><title>batch {i}: [{a:.4g}, {b:.4g}]'
                         f'{" (left out)" if i in skipped else ""}</title></rect>')
        svg = f'<svg class="ranges" width="{len(ranges) * step + 4}" height="44">{"".join(marks)}</svg>'
        rows.append(f"<tr><td>{_e(name)}</td><td>{lo:.4g}</td><td>{hi:.4g}</td><td>{svg}</td></tr>")
    note = (f"<p>Batches left out as outlying: {', '.join(map(str, sorted(skipped)))} (red).</p>" if skipped
            else "<p>No batch was left out.</p>")
    return (note + '<table class="calibration"><tr><th>value</th><th>min</th><th>max</th>'
            "<th>per batch (min to max)</th></tr>" + "".join(rows) + "</table>")


# -- profile and plan -------------------------------------------------------------------------

def _profile(report: CompileReport) -> str:
    if not report.profile:
        return "<p>Not measured: <code>qcompile report m.qc --profile</code> runs the compiled model on its " \
               "example inputs under the profiler.</p>"
    total = sum(row["ms"] for row in report.profile) or 1.0
    rows = "".join(f'<tr><td>{_e(r["op"])}</td><td>{r["calls"]}</td><td>{r["ms"]:.2f}</td>'
                   f'<td><span class="bar" style="width:{100 * r["ms"] / total:.1f}%"></span></td></tr>'
                   for r in report.profile)
    return ('<table class="profile"><tr><th>op</th><th>calls</th><th>ms</th><th>share</th></tr>'
            + rows + "</table>")


def _precision_search(report: CompileReport) -> str:
    """compile(accuracy_budget=...): each compile's loss, predicted and measured, then the
    sensitivity plot and table, each node's chosen format marked."""
    from qcompile.sensitivity import Sensitivity

    budget = report.budget
    table = Sensitivity.from_json(budget["sensitivity"])
    rounds = "".join(f'<li>compile {i}: predicted {r["predicted_loss"]:.2e}, measured {r["measured_loss"]:.2e}, '
                     f'cost {r["cost"]:.4g}</li>' for i, r in enumerate(budget["rounds"], start=1))
    chosen = budget["rounds"][-1]["choices"]
    header = "".join(f"<th>{_e(h)}</th>" for h in ("node", "module", *table.candidates))
    rows = []
    for node in table.nodes:
        cells = [f"<td>{_e(node.name)}</td><td>{_e(node.module)}</td>"]
        for name, m in table.of(node.name).items():
            text = "float (not run)" if m.float_reason else f"{m.loss:.1e} · {m.latency_ms:.3f} ms"
            mark = ' class="chosen"' if chosen.get(node.name) == name else ""
            cells.append(f"<td{mark}>{_e(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<p>accuracy budget {budget["accuracy_budget"]:g} ({_e(budget["metric"])} drop, objective '
            f'{_e(budget["objective"])}), measured on {budget["evaluation_batches"]} batches</p><ul>{rounds}</ul>'
            f"{table.svg()}<table id=\"search\"><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}"
            "</tbody></table>")


def _plan_table(report: CompileReport) -> str:
    header = "".join(f'<th data-column="{i}">{_e(h)}</th>'
                     for i, h in enumerate(("node", "op", "module", "precision", "SQNR dB", "detail")))
    rows = "".join(_plan_row(n) for n in report.nodes)
    return f'<table id="plan" class="sortable"><thead><tr>{header}</tr></thead><tbody>{rows}</tbody></table>'


def _plan_row(node: NodeReport) -> str:
    cells: Iterable[str] = (node.name, node.op, node.module, node.precision, _db_text(node.sqnr_db), node.detail)
    kind = precision_class(node)
    return f'<tr class="{kind}">' + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>"


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#202124;max-width:1400px}
h1{font-size:1.4em}h2{font-size:1.15em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.chip{display:inline-block;padding:.1em .6em;margin:0 .3em .3em 0;border-radius:1em;border:1px solid #ccc;font-size:.85em}
.warning{color:#b3261e}.scroll{overflow:auto;max-height:720px;border:1px solid #eee}
.timeline summary{display:flex;gap:.6em;align-items:center;cursor:pointer;font-size:.9em;padding:.1em 0}
.timeline .stage{width:5em;color:#5f6368}.timeline .pass{width:16em;font-family:monospace}
.timeline .bar{display:inline-block;height:.8em;background:#4285f4;max-width:30em}
.timeline .ms{width:6em;text-align:right}.timeline .change{color:#5f6368}
.stats,.diagnostic{font-family:monospace;font-size:.85em;margin:.2em 0 .2em 6em}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #e0e0e0;padding:.2em .5em;text-align:left}
table.diff{font-family:monospace;font-size:.8em;margin:.3em 0 .8em 6em;width:calc(100% - 6em);table-layout:fixed}
table.diff td{white-space:pre-wrap;word-break:break-all;vertical-align:top}
td.del{background:#fce8e6}td.add{background:#e6f4ea}td.hunk{background:#e8f0fe;color:#5f6368}
#graph text{font-size:11px;text-anchor:middle;font-family:monospace}#graph text.sub{fill:#3c4043;font-size:10px}
#graph rect{stroke:#5f6368}.edge{fill:none;stroke:#9aa0a6;stroke-width:1}
.axis{font-size:10px;text-anchor:end}.grid{stroke:#eee}
.ranges .batch{fill:#4285f4}.ranges .outlier{fill:#d93025}
table.profile .bar{display:inline-block;height:.7em;background:#4285f4}
#search td.chosen{background:#e6f4ea;font-weight:600}
#plan th{cursor:pointer;background:#f1f3f4}#plan th.sorted-asc::after{content:" ▲"}#plan th.sorted-desc::after{content:" ▼"}
tr.int8 td:nth-child(4){color:#2e9e5b}tr.float td:nth-child(4){color:#5f6368}tr.reference td:nth-child(4){color:#b06000}
"""

_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach(function (th) {
  th.addEventListener('click', function () {
    var table = th.closest('table'), body = table.tBodies[0], column = Number(th.dataset.column);
    var ascending = !th.classList.contains('sorted-asc');
    table.querySelectorAll('th').forEach(function (other) { other.classList.remove('sorted-asc', 'sorted-desc'); });
    th.classList.add(ascending ? 'sorted-asc' : 'sorted-desc');
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[column].textContent, y = b.cells[column].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var order = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return ascending ? order : -order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
"""
