"""Test helpers for qcompile's passes and for users' own.

All structural checks read the canonical text IR (never ``gm.code``):

* :func:`check_text` is FileCheck over that text (``CHECK``, ``CHECK-NEXT``, ``CHECK-NOT``,
  with ``{{regex}}`` inside a pattern);
* :func:`assert_graph_diff` states the lines a pass adds and removes;
* :func:`assert_outputs_close` compares two graphs on the same inputs;
* :func:`assert_pass_contract` checks what every pass owes: an honest ``modified``, an
  unchanged input, a green verifier, idempotence, metadata kept;
* :func:`assert_rewrites` starts from literal IR (:mod:`qcompile.ir.parser`): text in, the
  pass run under its contract, the text it must print out.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from qcompile.instruments import NumericCheck, Verify, relative_error
from qcompile.ir.parser import example_inputs, parse_graph
from qcompile.ir.printer import changed_lines, diff_graphs, print_graph
from qcompile.pass_manager import PassManager
from qcompile.pipeline import Pass, PipelineResult

_DIRECTIVE = re.compile(r"^\s*(?://|#)?\s*(CHECK(?:-NEXT|-NOT)?):\s?(.*)$")


def _compile_pattern(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"\{\{(.*?)\}\}", pattern.strip())
    regex = "".join(part if i % 2 else re.escape(part) for i, part in enumerate(parts))
    return re.compile(regex)


def check_text(text: str, checks: str) -> None:
    """FileCheck: each ``CHECK`` line matches a later line, ``CHECK-NEXT`` the very next one,
    and ``CHECK-NOT`` forbids a match between its neighbouring positive checks."""
    lines = text.splitlines()
    position = 0  # index of the next line a positive check may match
    pending_not: list[tuple[str, re.Pattern[str]]] = []
    directives = [m.groups() for m in map(_DIRECTIVE.match, checks.splitlines()) if m]
    if not directives:
        raise ValueError("no CHECK directives given")

    def forbid(start: int, end: int) -> None:
        for raw, regex in pending_not:
            for i in range(start, end):
                if regex.search(lines[i]):
                    raise AssertionError(f"CHECK-NOT: '{raw}' matched line {i + 1}: {lines[i]}\n\n{text}")
        pending_not.clear()

    for kind, raw in directives:
        regex = _compile_pattern(raw)
        if kind == "CHECK-NOT":
            pending_not.append((raw, regex))
            continue
        if kind == "CHECK-NEXT":
            candidates = [position] if position < len(lines) else []
        else:
            candidates = range(position, len(lines))
        found = next((i for i in candidates if regex.search(lines[i])), None)
        if found is None:
            where = f"line {position + 1}" if kind == "CHECK-NEXT" else f"after line {position}"
            raise AssertionError(f"{kind}: '{raw}' not found {where} of:\n\n{text}")
        forbid(position, found)
        position = found + 1
    forbid(position, len(lines))


def check_graph(gm: fx.GraphModule | fx.Graph, checks: str, **print_options: Any) -> None:
    check_text(print_graph(gm, **print_options), checks)


def _claim(expected: Sequence[str], actual: list[str], kind: str, exact: bool) -> None:
    remaining = list(actual)
    for pattern in expected:
        regex = _compile_pattern(pattern)
        hit = next((line for line in remaining if regex.search(line)), None)
        if hit is None:
            raise AssertionError(f"expected a {kind} line matching '{pattern}'; {kind} lines:\n  " + "\n  ".join(actual))
        remaining.remove(hit)
    if exact and remaining:
        raise AssertionError(f"unexpected {kind} lines:\n  " + "\n  ".join(remaining))


def assert_graph_diff(
    before: fx.GraphModule,
    after: fx.GraphModule,
    added: Sequence[str] = (),
    removed: Sequence[str] = (),
    exact: bool = True,
) -> None:
    """The lines (by node name) ``after`` adds and removes relative to ``before``.

    Each expectation is a substring, with ``{{regex}}`` allowed, claimed by one changed line;
    with ``exact`` every changed line must be claimed.
    """
    actual_added, actual_removed = changed_lines(before, after)
    _claim(added, actual_added, "added", exact)
    _claim(removed, actual_removed, "removed", exact)


def _outputs(gm: fx.GraphModule, args: Sequence[Any], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = gm(*args, **kwargs)
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def assert_outputs_close(
    expected: fx.GraphModule | torch.nn.Module,
    actual: fx.GraphModule | torch.nn.Module,
    args: Sequence[Any],
    kwargs: dict[str, Any] | None = None,
    rtol: float = 1e-5,
) -> float:
    """Every output within ``rtol`` of :func:`relative_error`; returns the worst error seen."""
    kwargs = kwargs or {}
    left, right = _outputs(expected, args, kwargs), _outputs(actual, args, kwargs)
    assert len(left) == len(right), f"{len(left)} outputs vs {len(right)}"
    worst = 0.0
    for i, (e, a) in enumerate(zip(left, right)):
        assert e.shape == a.shape, f"output {i}: shape {tuple(e.shape)} vs {tuple(a.shape)}"
        err = relative_error(e, a)
        assert err <= rtol, f"output {i}: relative error {err:.3g} > {rtol:g}"
        worst = max(worst, err)
    return worst


def run_pass(p: Pass, gm: fx.GraphModule, example_args: Sequence[Any] | None = None) -> PipelineResult:
    """Run one pass under Verify (and NumericCheck when inputs are given)."""
    instruments: list[Any] = [Verify()]
    if example_args is not None:
        instruments.append(NumericCheck(example_args))
    return PassManager([p], instruments, initial_properties=p.requires)(gm)


def assert_pass_contract(p: Pass, gm: fx.GraphModule, example_args: Sequence[Any] | None = None) -> fx.GraphModule:
    """What every pass owes, checked on ``gm``; returns the transformed graph module.

    * verify mode is green: lint and invariants hold, ``modified`` is honest, input unchanged;
    * numerics hold for a pass that claims to preserve semantics (when inputs are given);
    * a second run changes nothing and says so;
    * nodes that survive keep their shape, dtype and user-module metadata.
    """
    before_text = print_graph(gm, show_provenance=True)
    first = run_pass(p, gm, example_args)
    assert print_graph(gm, show_provenance=True) == before_text, f"pass '{p.name}' changed its input"
    out = first.graph_module
    second = run_pass(p, out, example_args)
    assert not second.modified, f"pass '{p.name}' is not idempotent: a second run reported a change"
    old_nodes = {n.name: n for n in gm.graph.nodes}
    for node in out.graph.nodes:
        old = old_nodes.get(node.name)
        if old is None or old.op != node.op or old.target != node.target:
            continue
        for key in ("nn_module_stack", "stack_trace"):
            assert node.meta.get(key) == old.meta.get(key), f"pass '{p.name}' dropped meta['{key}'] of {node.name}"
        old_val, new_val = old.meta.get("val"), node.meta.get("val")
        if isinstance(old_val, torch.Tensor):
            assert isinstance(new_val, torch.Tensor), f"pass '{p.name}' dropped meta['val'] of {node.name}"
            assert (old_val.dtype, str(old_val.shape)) == (new_val.dtype, str(new_val.shape)), (
                f"pass '{p.name}' changed the type of {node.name}"
            )
    return out


def assert_rewrites(p: Pass, before: str, after: str, *, constants: Mapping[str, torch.Tensor] | None = None,
                    sizes: Mapping[str, int] | None = None) -> fx.GraphModule:
    """Literal IR in, literal IR out: ``before`` is parsed, ``p`` runs on it under
    :func:`assert_pass_contract` (with the parsed inputs, so a pass that preserves semantics is
    held to its outputs), and the result must print as ``after`` with node names (the names the
    literal IR gave its values; nodes the pass made have the names it chose). Returns the result."""
    gm = parse_graph(before, constants=constants, sizes=sizes)
    out = assert_pass_contract(p, gm, example_inputs(gm))
    actual, expected = print_graph(out, names="node"), textwrap.dedent(after).strip() + "\n"
    assert actual == expected, (f"pass '{p.name}' printed\n{actual}\nexpected\n{expected}\n"
                                f"its change:\n{diff_graphs(gm, out)}")
    return out
